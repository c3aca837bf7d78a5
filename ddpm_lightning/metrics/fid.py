"""Fréchet Inception Distance (Heusel et al. 2017) from float64 running sums of features.

Memory stays bounded whatever the image count: per stream we keep sum(f), sum(f f^T) and n in float64
(2048 + 2048^2 doubles, 32 MiB), as torchmetrics' FrechetInceptionDistance does, and derive
mu = sum / n and sigma = (sum f f^T - n mu mu^T) / (n - 1), the unbiased covariance of np.cov.

Why not torchmetrics' FrechetInceptionDistance itself:
- it runs Inception inside update(); here one pass feeds both FID and IS (the 299x299 forward dominates);
- its real-image sums are metric states reduced with "sum" on every sync, so reference statistics loaded on
  every rank would count world_size times; here the reference is a plain FeatureStats, outside any state;
- its compute() casts the distance back to float32.
RunningFeatureStats is still a torchmetrics Metric, so DDP ranks all-reduce their sums on compute().
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


@dataclass
class FeatureStats:
    """Mean [D] and covariance [D, D] (float64) of count images' features: the Gaussian FID compares."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        dim = self.mu.shape[0] if self.mu.ndim == 1 else -1
        if self.mu.ndim != 1 or self.sigma.shape != (dim, dim):
            raise ValueError(f"FeatureStats: expected mu [D] and sigma [D, D], got {self.mu.shape}, {self.sigma.shape}")

    def save(self, path: Union[str, Path]) -> None:
        """Writes an npz with mu, sigma (the keys of TTUR's and pytorch-fid's files) and count, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        with open(partial, "wb") as file:
            np.savez(file, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))
        os.replace(partial, path)  # a reader never sees half a file

    @classmethod
    def load(cls, path: Union[str, Path]) -> "FeatureStats":
        """Reads our npz files, or TTUR / pytorch-fid statistics files (mu and sigma; count 0 = unknown)."""
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                keys = ", ".join(data.files)
                raise ValueError(f"FID statistics file '{path}' has no mu and sigma arrays (keys: {keys})")
            return cls(data["mu"], data["sigma"], int(data["count"]) if "count" in data else 0)


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the FID of Heusel et al. (2017), in float64."""
    if stats1.mu.shape != stats2.mu.shape:
        raise ValueError(
            f"FID between {stats1.mu.shape[0]}-d and {stats2.mu.shape[0]}-d features: "
            "were the two statistics computed with different feature extractors?"
        )
    mu1, sigma1, mu2, sigma2 = (torch.from_numpy(a) for a in (stats1.mu, stats1.sigma, stats2.mu, stats2.sigma))
    # Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)). The right side is symmetric positive
    # semi-definite, so two symmetric eigendecompositions give it without the complex round-off that
    # scipy's sqrtm(S1 S2) or eigvals(S1 S2) (torch-fidelity, torchmetrics) meet on a non-symmetric product.
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma1)
    root1 = (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    inner = root1 @ sigma2 @ root1
    trace_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_covmean)


class RunningFeatureStats(Metric):
    """Mean and covariance of a stream of features, from float64 sums that DDP ranks all-reduce."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    features_sum: Tensor
    outer_sum: Tensor
    count: Tensor

    def __init__(self, num_features: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("features_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer_sum", torch.zeros(num_features, num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        """Adds a batch of features [N, D]."""
        if features.ndim != 2 or features.shape[1] != self.features_sum.shape[0]:
            raise ValueError(f"expected features [N, {self.features_sum.shape[0]}], got {tuple(features.shape)}")
        features = features.double()
        self.features_sum += features.sum(dim=0)
        self.outer_sum += features.T @ features
        self.count += features.shape[0]

    def compute(self) -> FeatureStats:
        """The FeatureStats of every feature seen (on every rank, when synced)."""
        count = int(self.count)
        if count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {count}")
        mu = self.features_sum / count
        sigma = (self.outer_sum - count * torch.outer(mu, mu)) / (count - 1)
        return FeatureStats(mu.cpu().numpy(), sigma.cpu().numpy(), count)
