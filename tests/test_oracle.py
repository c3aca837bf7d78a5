"""The analytic oracle: samplers driven by the exact E[eps | x_t] of a Gaussian mixture.

For data x_0 ~ sum_k w_k N(mu_k, s^2 I), x_t | k ~ N(sqrt(a) mu_k, (a s^2 + 1 - a) I) with
a = alpha_bar_t, so the ideal noise predictor is known in closed form. With it, a correct sampler
must give back the mixture's mode weights and spread; and the papers' schedule observations
(Nichol & Dhariwal sec. 3.2, figs. 3-5) can be shown without training anything.
"""

import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion, get_named_beta_schedule

DIM = 32  # in 2-D the schedules barely differ; the effects need room
WEIGHTS = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
STD = 0.3
NUM_SAMPLES = 4000


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These are thousands of tiny ops: on 2 shared cores, thread hand-offs cost 8x the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mixture_means() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.sign(torch.randn(len(WEIGHTS), DIM, generator=g, dtype=torch.float64)) * 0.5


class MixtureOracle:
    """E[eps | x_t] for the mixture; called with original timestep indices like any network."""

    def __init__(self, alphas_cumprod, means):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.means = means

    def __call__(self, x, t):
        a = self.alphas_cumprod[t][:, None, None]
        var = a * STD**2 + 1 - a
        diff = x[:, None, :] - a.sqrt() * self.means[None]  # [N, K, D]
        log_resp = torch.log(WEIGHTS)[None] - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * DIM * torch.log(var[..., 0])
        resp = torch.softmax(log_resp, dim=1)
        # eps = -sqrt(1 - a) * grad log q(x_t)
        return (resp[..., None] * diff / var).sum(1) * (1 - a[:, 0]).sqrt()


def sample(schedule, respacing=None, sampler="ddpm", skip_fraction=0.0, var_type="fixed_large"):
    base = GaussianDiffusion(betas=get_named_beta_schedule(schedule, 1000), var_type=var_type)
    diffusion = base.respace(respacing) if respacing else base
    means = mixture_means()
    oracle = MixtureOracle(base.alphas_cumprod, means)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(NUM_SAMPLES, DIM, generator=g, dtype=torch.float64)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    x = loop(oracle, (NUM_SAMPLES, DIM), noise=noise, clip_denoised=False, skip_fraction=skip_fraction, generator=g)
    nearest = torch.cdist(x, means).argmin(1)
    weights = torch.bincount(nearest, minlength=len(WEIGHTS)).double() / NUM_SAMPLES
    spread = ((x - means[nearest]) ** 2).mean().sqrt().item()
    return weights, spread


def weight_error(weights):
    return (weights - WEIGHTS).abs().sum().item()


def spread_error(spread):
    return abs(spread - STD) / STD


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("respacing,sampler", [(None, "ddpm"), ("100", "ddpm"), ("ddim50", "ddim")])
def test_samplers_reproduce_the_mixture(schedule, respacing, sampler):
    weights, spread = sample(schedule, respacing, sampler)
    # 4000 samples: the binomial std of a weight is <= 0.008
    assert (weights - WEIGHTS).abs().max() < 0.03, weights
    # DDIM's last deterministic step shrinks towards the posterior mean, hence the 10%
    assert spread_error(spread) < (0.02 if respacing is None else 0.1), spread


@pytest.mark.parametrize("sampler,var_type", [("ddpm", "fixed_large"), ("ddpm", "fixed_small"), ("ddim", "fixed_small")])
def test_cosine_beats_linear_with_25_steps(sampler, var_type):
    """Nichol & Dhariwal sec. 3.2: the cosine schedule degrades less when sampling with few steps."""
    _, linear_spread = sample("linear", "25", sampler, var_type=var_type)
    _, cosine_spread = sample("cosine", "25", sampler, var_type=var_type)
    assert spread_error(cosine_spread) < 0.75 * spread_error(linear_spread), (linear_spread, cosine_spread)


def test_skipping_the_first_20_percent():
    """Nichol & Dhariwal fig. 4: the linear schedule's last 20% of forward steps carry almost no signal
    (figs. 3 and 5), so skipping them in reverse is harmless; the cosine schedule still has signal there."""
    linear_full, _ = sample("linear", "200")
    linear_skip, _ = sample("linear", "200", skip_fraction=0.2)
    cosine_full, _ = sample("cosine", "200")
    cosine_skip, _ = sample("cosine", "200", skip_fraction=0.2)
    # measured: 0.023, 0.007, 0.008, 0.065 (the binomial noise of this sum is about 0.016)
    assert weight_error(linear_full) < 0.035 and weight_error(linear_skip) < 0.035
    assert weight_error(cosine_full) < 0.035
    assert weight_error(cosine_skip) > 0.045
    assert weight_error(cosine_skip) > 3 * max(weight_error(linear_skip), weight_error(cosine_full))
    # why: alpha_bar at 80% of the process
    linear_ab = GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000)).alphas_cumprod[799]
    cosine_ab = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 1000)).alphas_cumprod[799]
    assert linear_ab < 2e-3 and 0.05 < cosine_ab < 0.15
