"""Sampling t for training: uniform, or importance sampling by the loss (Nichol & Dhariwal sec. 3.3)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


class UniformSampler:
    """t ~ U{0, ..., T-1} with unit weights (Ho et al. Algorithm 1)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalised sampling weights, one per step."""
        return np.ones([self.num_timesteps], dtype=np.float64)

    def sample(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(t [N] long, importance weights [N] float) on device."""
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)
        return t, torch.ones(batch_size, device=device)

    def update_with_local_losses(self, local_ts: Tensor, local_losses: Tensor) -> None:
        """Uniform sampling ignores the losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossSecondMomentResampler(UniformSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last 10 losses of each step (Nichol & Dhariwal eq. 18).

    Uniform until every step has a full history; then mixed with `uniform_prob` of uniform so no
    step starves, and the losses are reweighted by 1/(T p_t) so their mean is unbiased.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([self.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([self.num_timesteps], dtype=np.int64)
        self._probs_cache: dict = {}

    def warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def sample(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(t [N], weights 1/(T p_t) [N]) drawn on the device from cached probabilities."""
        probs = self._probs_cache.get(device)
        if probs is None:
            w = self.weights()
            probs = torch.as_tensor(w / w.sum(), dtype=torch.float64, device=device)
            self._probs_cache[device] = probs
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = (1.0 / (self.num_timesteps * probs[t])).float()
        return t, weights

    def update_with_local_losses(self, local_ts: Tensor, local_losses: Tensor) -> None:
        """Record this rank's losses; under DDP every rank gathers all ranks' so states stay equal."""
        ts, losses = local_ts.detach(), local_losses.detach().to(torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ts, losses = _all_gather_padded(ts, losses)
        self.update_with_all_losses(ts.tolist(), losses.tolist())

    def update_with_all_losses(self, ts: list[int], losses: list[float]) -> None:
        """Push each (t, loss) into t's history in order, dropping the oldest when full."""
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1
        self._probs_cache.clear()

    def state_dict(self) -> dict:
        # Tensors, not numpy arrays: checkpoints must load with torch.load(weights_only=True).
        return {"loss_history": torch.from_numpy(self._loss_history.copy()),
                "loss_counts": torch.from_numpy(self._loss_counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        history = np.asarray(state["loss_history"], dtype=np.float64)
        if history.shape != self._loss_history.shape:
            raise ValueError(
                f"timestep sampler state has shape {history.shape}, expected {self._loss_history.shape}"
            )
        self._loss_history = history.copy()
        self._loss_counts = np.asarray(state["loss_counts"], dtype=np.int64).copy()
        self._probs_cache.clear()


def _all_gather_padded(ts: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
    """Gather variable-length [n_r] tensors from every rank, in rank order."""
    dist = torch.distributed
    world = dist.get_world_size()
    size = torch.tensor([ts.numel()], device=ts.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    pad = longest - ts.numel()
    ts_p = torch.cat([ts, ts.new_zeros(pad)])
    losses_p = torch.cat([losses, losses.new_zeros(pad)])
    all_ts = [torch.zeros_like(ts_p) for _ in range(world)]
    all_losses = [torch.zeros_like(losses_p) for _ in range(world)]
    dist.all_gather(all_ts, ts_p)
    dist.all_gather(all_losses, losses_p)
    return (
        torch.cat([x[:n] for x, n in zip(all_ts, sizes)]),
        torch.cat([x[:n] for x, n in zip(all_losses, sizes)]),
    )


def create_named_schedule_sampler(name: str, num_timesteps: int):
    """Build a timestep sampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(num_timesteps)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {name!r}; valid: {', '.join(TIMESTEP_SAMPLERS)}")
