"""RNGState: every rank's random streams travel in checkpoints, so a resumed run draws what an unbroken one would."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities import rank_zero_warn


class RNGState(L.Callback):
    """Saves the torch (CPU and CUDA), numpy and Python random states of every rank; restores them on resume.

    Training draws t, the noise and the flips from the global generators; without their states a resumed run
    would draw from the seed again. The states are gathered from every rank (each draws its own
    stream: DiffusionModule.setup offsets the seed by rank) when a checkpoint is written, a collective that
    is safe because Lightning dumps checkpoints on every rank; rank r restores entry r when training starts,
    after the sanity check and the loaders' set-up, right before the first batch. (Lightning repeats, after
    that point, a validation that the unbroken run made between the saved step and the next one, so draws of
    a validation loader come out alike too.)
    """

    def __init__(self) -> None:
        self._restored: Optional[list[dict[str, Any]]] = None

    def state_dict(self) -> dict[str, Any]:
        return {"per_rank": _all_gather_object(_to_tensors(_collect_rng_states()))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = list(state_dict["per_rank"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is None:
            return
        states, self._restored = self._restored, None
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds the random streams of {len(states)} processes, this run has "
                           f"{trainer.world_size}: they start afresh from the seed instead")
            return
        _set_rng_states(_from_tensors(states[trainer.global_rank]))


def _all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] without a process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _to_tensors(states: dict[str, Any]) -> dict[str, Any]:
    """Lightning's RNG state dict with numpy arrays and long tuples as tensors: checkpoints must load with
    torch.load(weights_only=True)."""
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    version, python_state, gauss = states["python"]
    return {
        "torch": states["torch"],
        "torch.cuda": list(states.get("torch.cuda", [])),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "python": (version, torch.tensor(python_state, dtype=torch.int64), gauss),
    }


def _from_tensors(saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of _to_tensors, for _set_rng_states; CUDA states only onto as many devices as were saved."""
    kind, keys, position, has_gauss, cached_gaussian = saved["numpy"]
    version, python_state, gauss = saved["python"]
    states = {
        "torch": saved["torch"],
        "numpy": (kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian),
        "python": (version, tuple(python_state.tolist()), gauss),
    }
    cuda = saved.get("torch.cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        states["torch.cuda"] = cuda
    return states
