"""Per-quartile-of-t loss means, accumulated on the device (improved-diffusion logs loss_q0..q3)."""

from __future__ import annotations

import torch
from torch import Tensor


class QuartileLog:
    """Running sums of each loss term per quartile of t; no host sync until compute_and_reset."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self.sums: dict[str, Tensor] = {}
        self.counts: Tensor | None = None

    @torch.no_grad()
    def update(self, t: Tensor, losses: dict[str, Tensor]) -> None:
        quartile = (4 * t) // self.num_timesteps
        if self.counts is None or self.counts.device != t.device:
            self.counts = torch.zeros(4, device=t.device)
            self.sums = {}
        self.counts.index_add_(0, quartile, torch.ones_like(t, dtype=self.counts.dtype))
        for name, value in losses.items():
            acc = self.sums.setdefault(name, torch.zeros(4, device=t.device))
            acc.index_add_(0, quartile, value.detach().to(acc.dtype))

    def compute_and_reset(self, reduce_sum=None) -> dict[str, float]:
        """{"loss_q0": ..., "mse_q3": ...} for the quartiles that saw samples since the last call.

        reduce_sum sums a tensor over DDP ranks; every rank must call this at the same step, and
        then gets the same keys and values (per-rank means would log different keys per rank).
        """
        if self.counts is None:
            return {}
        reduce_sum = reduce_sum or (lambda x: x)
        counts = reduce_sum(self.counts.clone()).cpu()
        out = {}
        for name, acc in self.sums.items():
            acc = reduce_sum(acc.clone()).cpu()
            for q in range(4):
                if counts[q] > 0:
                    out[f"{name}_q{q}"] = float(acc[q] / counts[q])
        self.counts.zero_()
        for acc in self.sums.values():
            acc.zero_()
        return out
