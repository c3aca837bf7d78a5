"""What an evaluation reads: the checkpoints (ours or released weights) with their labels, and the data.

Where the data comes from when --data is not given: a checkpoint written by `ddpm fit` records its
DataModule (LightningCLI stores the class path and arguments under datamodule_hyper_parameters), so the
first such checkpoint's DataModule is rebuilt. Released weights record none.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.metrics.distributed import rank_and_world_size

# "checkpoint": a `ddpm fit` checkpoint; the others are released weights (ddpm_lightning.models.import_weights).
WEIGHTS_KINDS = ("checkpoint", "diffusers", "iddpm")


@dataclass
class EvalCheckpoint:
    """A model under evaluation: its label in tables and plots, where it came from, and what it is."""

    label: str
    path: str
    module: Any  # DiffusionModule
    identity: dict[str, Any] = field(default_factory=dict)  # what the results key records about the model


def default_label(path: str) -> str:
    """runs/cosine/checkpoints/last.ckpt -> "cosine", .../step=500.ckpt -> "cosine:step=500", x/model.pt -> "model"."""
    file = Path(path)
    if file.parent.name == "checkpoints" and file.parent.parent.name:
        run = file.parent.parent.name
        return run if file.stem == "last" else f"{run}:{file.stem}"
    return file.stem or file.name


def resolve_labels(paths: Sequence[str], labels: Optional[Sequence[str]] = None) -> list[str]:
    """--labels if given (one per checkpoint, all different), else default labels made unique with #2, #3, ..."""
    if labels:
        if len(labels) != len(paths) or len(set(labels)) != len(labels):
            raise ValueError(f"--labels: expected {len(paths)} different labels, one per --ckpt_path, got "
                             f"{', '.join(labels)}")
        return list(labels)
    resolved: list[str] = []
    for path in paths:
        label = default_label(path)
        candidate, copy = label, 2
        while candidate in resolved:
            candidate, copy = f"{label}#{copy}", copy + 1
        resolved.append(candidate)
    return resolved


def per_checkpoint(option: str, values: Sequence[Any], count: int) -> list[Any]:
    """One value for every checkpoint, or one per checkpoint in --ckpt_path order."""
    if len(values) == 1 or not values:
        return list(values or [None]) * count
    if len(values) != count:
        raise ValueError(f"{option}: expected 1 value or {count} (one per --ckpt_path), got {len(values)}")
    return list(values)


def file_identity(path: str) -> dict[str, Any]:
    """Path, size and modification time: a checkpoint overwritten in place (last.ckpt) is a new model."""
    target = Path(path).resolve()
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    stats = [p.stat() for p in files]
    return {"path": str(target), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def load_checkpoint(path: str, label: str, weights_kind: str = "checkpoint", schedule: Optional[str] = None,
                    num_timesteps: Union[int, str, None] = None, var_type: Optional[str] = None,
                    image_size: Optional[int] = None, use_ema: bool = True) -> EvalCheckpoint:
    """A `ddpm fit` checkpoint, or released weights of weights_kind wrapped as a DiffusionModule, on the CPU.

    use_ema=False (`--no_ema`) also accepts a `ddpm fit` checkpoint that holds no EMA weights.
    """
    if weights_kind not in WEIGHTS_KINDS:
        raise ValueError(f"--weights_kind {weights_kind!r}: valid: {', '.join(WEIGHTS_KINDS)}")
    if weights_kind == "checkpoint":
        from ddpm_lightning.checkpoint_io import load_module

        module = load_module(path, use_ema=use_ema).eval()
        return EvalCheckpoint(label, path, module, {"kind": weights_kind, **file_identity(path)})
    from ddpm_lightning.pretrained import module_from_pretrained

    if num_timesteps is not None and not str(num_timesteps).isdigit():
        raise ValueError(f"--num_timesteps {num_timesteps!r}: expected a positive integer per checkpoint, e.g. 4000")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--ckpt_path {path}: no such file or folder")
    overrides = {"image_size": image_size} if image_size else {}
    module = module_from_pretrained(path, weights_kind, schedule, int(num_timesteps) if num_timesteps else None,
                                    var_type, **overrides)
    hp = module.hparams
    identity = {"kind": weights_kind, **file_identity(path), "schedule": hp.schedule,
                "num_timesteps": hp.num_timesteps, "var_type": hp.var_type, "image_size": hp.image_size}
    return EvalCheckpoint(label, path, module, identity)


def datamodule_from_checkpoint(path: str) -> Optional[ImageDataModule]:
    """The DataModule a `ddpm fit` checkpoint was trained on, rebuilt from its recorded arguments, or None."""
    # mmap: only the small hyper-parameter dict is read, not the weights again.
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    recorded = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    class_path = recorded.pop("_class_path", None)
    if not class_path:
        return None
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"checkpoint {path} records DataModule {class_path}, which cannot be imported; "
                         "pass --data or --reference_stats") from None
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in recorded.items() if not k.startswith("_") and k in accepted})


def resolve_data(data: Optional[ImageDataModule], checkpoints: Sequence[EvalCheckpoint], needed: str = "",
                 ) -> Optional[ImageDataModule]:
    """--data, else (when `needed` names what for) the DataModule of the first `ddpm fit` checkpoint; its images
    must have the checkpoints' shape, and all checkpoints one shape, since one reference serves them all."""
    shapes = {(c.module.hparams.in_channels, c.module.hparams.image_size) for c in checkpoints}
    if len(shapes) > 1:
        raise ValueError(f"--ckpt_path: the checkpoints sample differently shaped images {sorted(shapes)}; "
                         "one FID reference fits one shape, so evaluate them in separate runs")
    if data is None and needed:
        recorded = next((c.path for c in checkpoints if c.identity.get("kind") == "checkpoint"), None)
        data = datamodule_from_checkpoint(recorded) if recorded else None
        if data is None:
            stats = "--reference_stats PATH (an npz of mu and sigma) or " if "reference" in needed else ""
            raise ValueError(f"no data for {needed}: pass {stats}--data (a DataModule, e.g. --data CIFAR10DataModule "
                             "--data.data_dir DIR); the checkpoints record none")
        if rank_and_world_size()[0] == 0:
            print(f"data: {data.owner} {dict(data.hparams)}, as recorded in {recorded}", file=sys.stderr)
    (channels, image_size), = shapes
    if data is not None and (data.channels, data.image_size) != (channels, image_size):
        raise ValueError(f"{data.owner} gives {data.channels}x{data.image_size}px images but the checkpoints sample "
                         f"{channels}x{image_size}px; set --data.image_size {image_size}")
    return data


def bpd_batches(datamodule: ImageDataModule, num_images: int) -> tuple[Tensor, Tensor]:
    """The first num_images (uint8 [N, C, H, W], labels [N]) of the test split, or of validation without one."""
    dataset = datamodule.build_test_dataset()
    if dataset is None:
        datamodule.setup("validate")
        dataset = datamodule.val_dataset
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"--bpd: {datamodule.owner} has no test split and no validation images")
    count = min(num_images, len(dataset))
    images, labels = zip(*(dataset[i] for i in range(count)))
    return torch.stack([torch.as_tensor(x) for x in images]), torch.as_tensor(labels, dtype=torch.int64)
