"""Exponential moving averages of a network's weights (Ho et al. sec. 4 used a 0.9999 decay)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn


class EMA(nn.Module):
    """One frozen copy of `net` per decay rate, updated with fused foreach ops.

    Being an nn.Module, the copies move with the LightningModule, are saved in its state_dict (and
    so in checkpoints), and are restored on resume. Every DDP rank applies the same update to the
    same synchronised weights, so the averages stay identical across ranks without communication.
    """

    def __init__(self, net: nn.Module, decays: Sequence[float], warmup: bool = False):
        super().__init__()
        for decay in decays:
            if not 0.0 <= decay < 1.0:
                raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decays = tuple(float(d) for d in decays)
        self.warmup = warmup
        self.averages = nn.ModuleList(copy.deepcopy(net).requires_grad_(False) for _ in self.decays)

    def decay_at(self, decay: float, num_updates: int) -> float:
        """With warmup, min(decay, (1 + n) / (10 + n)) so early averages are not stuck at init."""
        return min(decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else decay

    @torch.no_grad()
    def update(self, net: nn.Module, num_updates: int) -> None:
        """average <- decay * average + (1 - decay) * weights, for every rate.

        num_updates (the optimizer steps so far) comes from the caller: reading a device counter
        here would cost a host sync every step.
        """
        params = [p.detach() for p in net.parameters()]
        buffers = [b for b in net.buffers()]
        for decay, average in zip(self.decays, self.averages):
            decay = self.decay_at(decay, num_updates)
            average_params = list(average.parameters())
            if params[0].dtype == average_params[0].dtype:
                torch._foreach_lerp_(average_params, params, 1.0 - decay)
            else:
                for a, p in zip(average_params, params):
                    a.lerp_(p.to(a.dtype), 1.0 - decay)
            for a, b in zip(average.buffers(), buffers):
                a.copy_(b)

    @torch.no_grad()
    def update_with_weights(self, net: nn.Module, weights: Tensor) -> None:
        """average += weights[i] * (weights - average) with the lerp weights (1 - decay) on the device.

        For a captured CUDA graph, where the warmup's step-dependent decay cannot be a Python float.
        """
        params = [p.detach() for p in net.parameters()]
        buffers = [b for b in net.buffers()]
        for i, average in enumerate(self.averages):
            average_params = list(average.parameters())
            deltas = torch._foreach_sub([p.to(a.dtype) for a, p in zip(average_params, params)], average_params)
            torch._foreach_mul_(deltas, weights[i])
            torch._foreach_add_(average_params, deltas)
            for a, b in zip(average.buffers(), buffers):
                a.copy_(b)

    def forward(self, *args, **kwargs):  # pragma: no cover - an EMA is used through .averages
        raise RuntimeError("call ema.averages[i], not the EMA container")
