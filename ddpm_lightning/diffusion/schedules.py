"""Beta schedules as pure functions: float64 numpy in, float64 numpy out."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Return the named beta schedule, a float64 array of shape [num_timesteps].

    "linear" is Ho et al. (2020) sec. 4, scaled by 1000/T as improved-diffusion does so that the
    schedule keeps its shape for any T; "cosine" is Nichol & Dhariwal (2021) eq. 17 with s = 0.008.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name == "linear":
        scale = 1000 / num_timesteps
        if scale * 0.02 >= 1.0:
            raise ValueError(f"the linear schedule needs num_timesteps >= 21 (its betas scale as 1000/T, "
                             f"so T={num_timesteps} gives beta_T = {scale * 0.02:g})")
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(
            num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(SCHEDULES)}")


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas (Nichol & Dhariwal eq. 17).

    Betas are clipped at max_beta: near t = 1 the cosine alpha_bar reaches 0 and beta -> 1 would
    make the last step singular (the paper clips at 0.999).
    """
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale any schedule so that the last step has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    The last beta becomes exactly 1: pair it with mean_type "v" or "start_x" (epsilon cannot
    recover x_0 from pure noise).
    """
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas
