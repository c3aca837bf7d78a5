"""The diffusion mathematics: schedules, the Gaussian process, respacing, samplers, likelihoods.

No Lightning and no network here: every method takes the model as an argument.
"""

from .gaussian_diffusion import (
    LOSS_TYPES,
    MEAN_TYPES,
    VAR_TYPES,
    GaussianDiffusion,
    extract,
)
from .likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from .respace import space_timesteps
from .samplers import reverse_timesteps
from .seeded_noise import SeededNoise
from .schedules import SCHEDULES, betas_for_alpha_bar, get_named_beta_schedule, rescale_zero_terminal_snr
from .timestep_sampler import (
    TIMESTEP_SAMPLERS,
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

__all__ = [
    "GaussianDiffusion", "extract", "MEAN_TYPES", "VAR_TYPES", "LOSS_TYPES",
    "get_named_beta_schedule", "betas_for_alpha_bar", "rescale_zero_terminal_snr", "SCHEDULES",
    "space_timesteps", "reverse_timesteps", "SeededNoise",
    "normal_kl", "discretized_gaussian_log_likelihood", "approx_standard_normal_cdf", "mean_flat",
    "UniformSampler", "LossSecondMomentResampler", "create_named_schedule_sampler", "TIMESTEP_SAMPLERS",
]
