"""Reverse-process samplers: ancestral DDPM (Ho et al. 2020) and DDIM (Song et al. 2021).

Both share one loop; a step function turns x_t into x_{t-1}. Randomness is injectable: `noise`
fixes x_T, and `generator` is a torch.Generator, a list of one per sample, or a SeededNoise (per-sample
and drawn on the device, the fast choice on a GPU). With the last two, a sample's image depends on
its own seed only (sharding a batch across ranks gives the same images). With neither, the global RNG
is drawn in the same order as improved-diffusion.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from .seeded_noise import SeededNoise

if TYPE_CHECKING:
    from .gaussian_diffusion import GaussianDiffusion

Generators = Union[None, torch.Generator, Sequence[torch.Generator], SeededNoise]


def progress_iter(items: Iterable, progress: bool, desc: str) -> Iterable:
    """Wrap items in a tqdm bar when progress is asked for."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc)


def randn(shape: Sequence[int], generator: Generators, device: torch.device, like: Optional[Tensor] = None) -> Tensor:
    """Standard normal noise of `shape` on `device`, drawn from `generator` (see module doc)."""
    if generator is None:
        return torch.randn_like(like) if like is not None else torch.randn(*shape, device=device)
    if isinstance(generator, torch.Generator):
        return torch.randn(tuple(shape), generator=generator, device=generator.device).to(device)
    if isinstance(generator, SeededNoise):
        return generator.randn(shape).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack(
        [torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]
    ).to(device)


def reverse_timesteps(num_timesteps: int, skip_fraction: float) -> list[int]:
    """The steps to run, noisiest first, after dropping round(skip_fraction * K) noisiest of K.

    Nichol & Dhariwal's ablation of skipping the start of the reverse process: the loop starts from
    pure noise at the first kept step.
    """
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}")
    num_skipped = round(skip_fraction * num_timesteps)
    if num_skipped >= num_timesteps:
        raise ValueError(f"skip_fraction {skip_fraction} drops all {num_timesteps} steps")
    return list(range(num_timesteps - num_skipped))[::-1]


def _model_device(model: Callable) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def p_sample(
    diffusion: "GaussianDiffusion", model: Callable, x: Tensor, t: Tensor, clip_denoised: bool = True,
    model_kwargs: Optional[dict] = None, generator: Generators = None,
) -> dict[str, Tensor]:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (Ho et al. Algorithm 2, line 4)."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    noise = randn(x.shape, generator, x.device, like=x)
    # No noise is added at the last step (t = 0): x_0 is the mean.
    nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
    return {"sample": sample, "pred_xstart": out["pred_xstart"]}


def ddim_sample(
    diffusion: "GaussianDiffusion", model: Callable, x: Tensor, t: Tensor, eta: float = 0.0,
    clip_denoised: bool = True, model_kwargs: Optional[dict] = None, generator: Generators = None,
) -> dict[str, Tensor]:
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021 eq. 12); eta = 1 gives DDPM's variance."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
    # eps is re-derived from the clipped x_0 prediction, whatever the model predicts.
    eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar = diffusion._coef("alphas_cumprod", t, x)
    alpha_bar_prev = diffusion._coef("alphas_cumprod_prev", t, x)
    # Song et al. eq. 16: sigma_t(eta)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    noise = randn(x.shape, generator, x.device, like=x)
    mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return {"sample": mean_pred + nonzero_mask * sigma * noise, "pred_xstart": out["pred_xstart"]}


@torch.no_grad()
def sample_loop(
    diffusion: "GaussianDiffusion", step: Callable, model: Callable, shape: Sequence[int],
    noise: Optional[Tensor] = None, clip_denoised: bool = True, skip_fraction: float = 0.0,
    progress: bool = False, generator: Generators = None, model_kwargs: Optional[dict] = None,
    device: Optional[torch.device] = None, desc: str = "sampling",
) -> Tensor:
    """Run `step` from pure noise down to t = 0 and return x_0 of `shape`."""
    shape = tuple(shape)
    indices = reverse_timesteps(diffusion.num_timesteps, skip_fraction)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {shape}")
        x = noise
    else:
        x = randn(shape, generator, torch.device(device) if device is not None else _model_device(model))
    for i in progress_iter(indices, progress, desc):
        t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
        x = step(diffusion, model, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                 generator=generator)["sample"]
    return x


def p_sample_loop(diffusion: "GaussianDiffusion", model: Callable, shape: Sequence[int], **kwargs) -> Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. (2020). shape: (N, C, ...); returns [N, C, ...]."""
    return sample_loop(diffusion, p_sample, model, shape, desc="DDPM sampling", **kwargs)


def ddim_sample_loop(
    diffusion: "GaussianDiffusion", model: Callable, shape: Sequence[int], eta: float = 0.0, **kwargs
) -> Tensor:
    """DDIM sampling (Song et al. 2021) with stochasticity eta; eta = 0 is the deterministic ODE."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return sample_loop(diffusion, partial(ddim_sample, eta=eta), model, shape, desc="DDIM sampling", **kwargs)
