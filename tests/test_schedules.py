"""Beta schedules: pinned values from the papers' definitions (Ho et al. sec. 4; Nichol & Dhariwal eq. 17)."""

import math

import numpy as np
import pytest

from ddpm_lightning.diffusion import (
    GaussianDiffusion,
    betas_for_alpha_bar,
    get_named_beta_schedule,
    rescale_zero_terminal_snr,
)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("T", [21, 50, 1000, 4000])
def test_schedule_is_float64_in_range(schedule, T):
    betas = get_named_beta_schedule(schedule, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert (betas > 0).all() and (betas <= 0.999).all()


def test_linear_pinned():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    assert betas[1] == pytest.approx(0.00011991991991992, rel=1e-12)
    # improved-diffusion scales by 1000/T so that T = 4000 keeps the same alpha_bar curve
    betas4000 = get_named_beta_schedule("linear", 4000)
    assert betas4000[0] == pytest.approx(2.5e-5, rel=1e-12) and betas4000[-1] == pytest.approx(5e-3, rel=1e-12)
    assert np.cumprod(1 - betas4000)[-1] == pytest.approx(4.246652275802249e-05, rel=1e-9)


def test_cosine_pinned():
    betas = get_named_beta_schedule("cosine", 1000)
    assert betas[0] == pytest.approx(4.128422482196914e-05, rel=1e-12)
    assert betas[1] == pytest.approx(4.614175273665033e-05, rel=1e-12)
    assert betas[-1] == 0.999  # clipped
    assert get_named_beta_schedule("cosine", 4000)[0] == pytest.approx(9.865818813681315e-06, rel=1e-12)
    # alpha_bar follows cos^2((t/T + s)/(1 + s) pi/2) / f(0) until the clip
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert np.cumprod(1 - betas)[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-9)


def test_betas_for_alpha_bar_clips_at_max_beta():
    betas = betas_for_alpha_bar(10, lambda t: 1 - t, max_beta=0.5)
    assert betas.max() == 0.5 and betas[0] == pytest.approx(0.1)


def test_posterior_variance_pinned():
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000))
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_variance[1] == pytest.approx(5.4531876613021935e-05, rel=1e-12)
    # the log is clipped at t = 0 to the t = 1 value
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1] == pytest.approx(-9.81672513529567, rel=1e-12)
    c = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 1000))
    assert c.posterior_variance[1] == pytest.approx(2.178949614569182e-05, rel=1e-12)
    assert c.posterior_log_variance_clipped[0] == pytest.approx(-10.734082532465003, rel=1e-12)
    # fixed_large is beta_t except at t = 0, where it takes the posterior variance (reference choice)
    assert d.fixed_large_variance[0] == d.posterior_variance[1] and d.fixed_large_variance[5] == d.betas[5]


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'.*linear, cosine"):
        get_named_beta_schedule("quadratic", 1000)
    with pytest.raises(ValueError, match="positive integer"):
        get_named_beta_schedule("linear", 0)
    with pytest.raises(ValueError, match="linear schedule needs num_timesteps >= 21.*T=10 gives beta_T = 2"):
        get_named_beta_schedule("linear", 10)
    assert get_named_beta_schedule("cosine", 1).shape == (1,)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr(schedule):
    betas = get_named_beta_schedule(schedule, 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    alphas_cumprod = np.cumprod(1 - rescaled)
    assert alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-15) and rescaled[-1] == pytest.approx(1.0)
    # Lin et al. keep the first step unchanged
    assert alphas_cumprod[0] == pytest.approx(1 - betas[0], rel=1e-12)
    with pytest.raises(ValueError, match="zero-terminal-SNR.*'v'"):
        GaussianDiffusion(betas=rescaled, mean_type="epsilon")
    GaussianDiffusion(betas=rescaled, mean_type="v")
