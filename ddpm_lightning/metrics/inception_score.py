"""Inception Score (Salimans et al. 2016) from per-split float64 running sums, in bounded memory.

IS = exp(E_x KL(p(y|x) || p(y))) on each of `splits` groups of images, reported as mean and (population)
std over the groups, as improved-gan's reference code and torch-fidelity do. Per group, with p = softmax(logits):

    E_x KL(p(y|x) || p(y)) = mean_x sum_y p log p  -  sum_y q log q,   q = mean_x p,

so a group needs only sum_x p [num_classes], sum_x sum_y p log p and a count: 10 x 1008 doubles, where
torchmetrics' InceptionScore keeps every logit (50k x 1008 float32 = 200 MB per rank, all-gathered to every
rank) and splits after an unseeded random permutation, so its score changes from run to run.

Groups are contiguous ranges of the sample index, with improved-gan's and torch-fidelity's boundaries
i * N // splits. Our samples are i.i.d. by construction (one seed per index), so no shuffle is needed; with
the index carried alongside each image, the split does not depend on batching or on the number of DDP ranks.
The result equals torch-fidelity's isc_features_to_metric(logits, splits, shuffle=False).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric


def split_of(indices: Tensor, num_samples: int, splits: int) -> Tensor:
    """The group of each sample index: i lies in [g * N // splits, (g + 1) * N // splits)."""
    # The largest g with g * N // splits <= i, i.e. g * N < (i + 1) * splits.
    return ((indices + 1) * splits - 1) // num_samples


class RunningInceptionScore(Metric):
    """Inception Score of num_samples images fed with their sample indices, from sums DDP ranks all-reduce."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    probs_sum: Tensor
    neg_entropy_sum: Tensor
    counts: Tensor

    def __init__(self, num_classes: int, num_samples: int, splits: int = 10, **kwargs: Any):
        super().__init__(**kwargs)
        if not 1 <= splits <= num_samples:
            raise ValueError(f"Inception Score: splits must be in [1, num_samples={num_samples}], got {splits}")
        self.num_samples = num_samples
        self.splits = splits
        self.add_state("probs_sum", torch.zeros(splits, num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("neg_entropy_sum", torch.zeros(splits, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(splits, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, indices: Tensor) -> None:
        """Adds logits [N, num_classes] of the samples with global indices [N] in [0, num_samples)."""
        indices = torch.as_tensor(indices, dtype=torch.int64, device=logits.device)
        if logits.ndim != 2 or logits.shape[1] != self.probs_sum.shape[1] or indices.shape != logits.shape[:1]:
            raise ValueError(f"expected logits [N, {self.probs_sum.shape[1]}] and indices [N], "
                             f"got {tuple(logits.shape)} and {tuple(indices.shape)}")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(f"sample indices must lie in [0, {self.num_samples})")
        log_p = logits.double().log_softmax(dim=1)
        p = log_p.exp()
        group = split_of(indices, self.num_samples, self.splits)
        self.probs_sum.index_add_(0, group, p)
        self.neg_entropy_sum.index_add_(0, group, (p * log_p).sum(dim=1))
        self.counts.index_add_(0, group, torch.ones_like(group))

    def compute(self) -> tuple[float, float]:
        """(mean, std) of the per-group scores; every one of the num_samples images must have been added."""
        total = int(self.counts.sum())
        if total != self.num_samples:
            raise ValueError(f"Inception Score over {self.num_samples} images, but {total} were added")
        counts = self.counts.double()
        q = self.probs_sum / counts[:, None]
        # 0 * log 0 = 0 for classes no image of the group predicts.
        q_log_q = torch.where(q > 0, q * q.log(), torch.zeros_like(q)).sum(dim=1)
        scores = (self.neg_entropy_sum / counts - q_log_q).exp()
        return float(scores.mean()), float(scores.std(unbiased=False))
