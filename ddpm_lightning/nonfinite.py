"""What to do when the training loss turns NaN or Inf: skip the batch, or stop and say where."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

NONFINITE_POLICIES = ("stop", "skip")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss; the message names the step and the saved checkpoint."""


class NonFiniteGuard:
    """Tracks non-finite losses for a DiffusionModule.

    "stop" costs nothing per step: the first bad step is recorded on the device and read at the next
    log interval, where the module syncs anyway. Training then stops with a checkpoint of the
    (already damaged) state saved beside, never over, the last good ones.
    "skip" drops the batch before backward, which needs the verdict on the host every step (one
    sync); under DDP the verdict is shared so that every rank skips together.
    """

    def __init__(self, policy: str):
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"unknown nonfinite_loss {policy!r}; valid: {', '.join(NONFINITE_POLICIES)}")
        self.policy = policy
        self.first_bad_step: Tensor | None = None
        self.skipped = 0

    def should_skip(self, loss: Tensor, strategy) -> bool:
        """"skip" policy: True when any rank's loss is non-finite."""
        finite = bool(torch.isfinite(loss.detach()))
        return not strategy.reduce_boolean_decision(finite, all=True)

    def record(self, loss: Tensor, step: int) -> None:
        """"stop" policy: remember the first step whose loss was non-finite, on the device."""
        if self.first_bad_step is None or self.first_bad_step.device != loss.device:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def check(self, trainer) -> None:
        """At a log interval: if any rank saw a non-finite loss, save a checkpoint and stop."""
        if self.first_bad_step is None:
            return
        first = int(trainer.strategy.reduce(self.first_bad_step.clone().float(), reduce_op="max"))
        if first < 0:
            return
        root = Path(trainer.default_root_dir) / "checkpoints"
        path = root / f"nonfinite-step={first}.ckpt"
        trainer.save_checkpoint(str(path))
        raise NonFiniteLossError(
            f"training loss became non-finite at step {first} (seen at step {trainer.global_step}); the state "
            f"was saved to {path} for inspection; resume from an earlier checkpoint in {root}, e.g. with a "
            f"lower learning rate, or use --model.nonfinite_loss=skip"
        )
