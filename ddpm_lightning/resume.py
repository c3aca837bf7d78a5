"""Checkpoints that survive a kill: atomic writes, and `--ckpt_path last` that skips a damaged file."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file in the same folder, then rename over the target.

    A rename within one file system is atomic: a kill mid-write leaves the previous checkpoint intact
    and at worst a stray `.tmp` file, never a half-written `last.ckpt`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def is_readable_checkpoint(path: Path) -> bool:
    """True when path is a complete torch zip archive (every member's CRC checks out)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def resolve_resume_path(ckpt_path: Optional[str], checkpoint_dir: str) -> Optional[str]:
    """`last` -> last.ckpt in checkpoint_dir, or, if that file is damaged, the newest intact step=*.ckpt.

    An explicit path that is damaged is an error naming it; `last` with nothing there starts afresh.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if path.is_file() and not is_readable_checkpoint(path):
            raise ValueError(f"checkpoint {ckpt_path} is truncated or corrupted")
        return ckpt_path
    folder = Path(checkpoint_dir)
    last = folder / "last.ckpt"
    if not last.exists():
        return "last"  # Lightning warns and starts from scratch
    if is_readable_checkpoint(last):
        return str(last)
    periodic = sorted(folder.glob("step=*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in periodic:
        if is_readable_checkpoint(candidate):
            rank_zero_warn(f"{last} is truncated or corrupted; resuming from {candidate}, the newest intact checkpoint")
            return str(candidate)
    raise ValueError(f"{last} is truncated or corrupted and {folder} holds no intact step=*.ckpt to fall back to")
