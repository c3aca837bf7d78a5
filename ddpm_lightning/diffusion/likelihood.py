"""Gaussian KL and the discretized Gaussian decoder of Ho et al. (2020) sec. 3.3."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats; broadcasts."""
    ref = next(x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, Tensor))
    logvar1, logvar2 = (
        x if isinstance(x, Tensor) else torch.tensor(x, dtype=ref.dtype, device=ref.device)
        for x in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF that Ho et al.'s code uses.

    Kept instead of the exact erf so that bits/dim match the published numbers' code.
    """
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood (nats) of uint8 data rescaled to [-1, 1] under a Gaussian binned to 256 bins.

    Ho et al. (2020) eq. 13: the edge bins take the whole tail, the others have width 2/255.
    x, means, log_scales: same shape; returns that shape.
    """
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )
