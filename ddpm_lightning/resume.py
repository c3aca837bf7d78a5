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


def resolve_resume_path(ckpt_path: Optional[str], checkpoint_dir: str, hpc_dir: Optional[str] = None) -> Optional[str]:
    """`last` -> the newest of last.ckpt in checkpoint_dir and hpc_ckpt_*.ckpt in hpc_dir; if that file is
    damaged, the newest intact one of those and the periodic step=*.ckpt.

    Lightning's SLURM auto-requeue (SIGUSR1) writes hpc_ckpt_N.ckpt into default_root_dir; when the job is
    then killed before it can save last.ckpt, that file holds the newest state. An explicit path that is
    damaged is an error naming it; `last` with nothing there starts afresh.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if path.is_file() and not is_readable_checkpoint(path):
            raise ValueError(f"checkpoint {ckpt_path} is truncated or corrupted")
        return ckpt_path
    folder = Path(checkpoint_dir)
    hpc = list(Path(hpc_dir).glob("hpc_ckpt_*.ckpt")) if hpc_dir is not None else []
    newest_first = _newest_first([folder / "last.ckpt", *hpc])
    if not newest_first:
        return "last"  # Lightning warns and starts from scratch
    newest = newest_first[0]
    if is_readable_checkpoint(newest):
        return str(newest)
    for candidate in _newest_first(newest_first[1:] + list(folder.glob("step=*.ckpt"))):
        if is_readable_checkpoint(candidate):
            rank_zero_warn(f"{newest} is truncated or corrupted; resuming from {candidate}, the newest intact checkpoint")
            return str(candidate)
    raise ValueError(f"{newest} is truncated or corrupted and {folder} holds no intact step=*.ckpt to fall back to")


def _newest_first(paths: list[Path]) -> list[Path]:
    existing = [path for path in paths if path.exists()]
    return sorted(existing, key=lambda path: path.stat().st_mtime, reverse=True)
