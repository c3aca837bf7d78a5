"""Sinusoidal timestep embedding in both conventions used by the DDPM family."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(
    timesteps: Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Transformer sinusoidal embedding of t, as in Ho et al. (2020) and Nichol & Dhariwal (2021).

    Args:
        timesteps: [N] int or float tensor, embedded exactly as given (fractional values allowed).
        dim: embedding width D.
        flip_sin_to_cos: True puts cos first ([cos, sin], improved-diffusion); False gives [sin, cos].
        freq_shift: the exponent is divided by ``dim // 2 - freq_shift``. DDPM (and diffusers'
            DDPM checkpoints) use 1; improved-diffusion uses 0.

    Returns:
        [N, D] float32 tensor.
    """
    half = dim // 2
    # Multiply first, then divide, in float32: the order both reference implementations use,
    # so imported checkpoints see bit-identical embeddings.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None]
    parts = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    embedding = torch.cat(parts, dim=-1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding
