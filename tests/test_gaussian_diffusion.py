"""GaussianDiffusion: consistency with the forward process, the loss dictionary, and clear errors."""

import itertools

import numpy as np
import pytest
import torch

from ddpm_lightning.diffusion import (
    LOSS_TYPES,
    MEAN_TYPES,
    VAR_TYPES,
    GaussianDiffusion,
    get_named_beta_schedule,
)


def make(schedule="linear", T=1000, **kw):
    return GaussianDiffusion(betas=get_named_beta_schedule(schedule, T), **kw)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_is_bayes_rule_on_the_forward_process(schedule):
    """q(x_{t-1} | x_t, x_0) from Gaussian conditioning of q(x_{t-1} | x_0) q(x_t | x_{t-1}), in float64."""
    d = make(schedule)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    xt = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 300, 700, 999])
    mean, var, _ = d.q_posterior_mean_variance(x0, xt, t)
    a_prev = torch.as_tensor(d.alphas_cumprod[t - 1])[:, None]
    alpha = torch.as_tensor(1 - d.betas[t])[:, None]
    beta = torch.as_tensor(d.betas[t])[:, None]
    precision = 1 / (1 - a_prev) + alpha / beta
    expected_mean = (a_prev.sqrt() * x0 / (1 - a_prev) + alpha.sqrt() * xt / beta) / precision
    torch.testing.assert_close(var, (1 / precision).expand_as(x0), rtol=1e-9, atol=0)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)


def test_q_sample_marginal_moments():
    d = make("cosine")
    x0 = torch.full((20000, 1), 0.7)
    t = torch.full((20000,), 400)
    xt = d.q_sample(x0, t)
    a = d.alphas_cumprod[400]
    assert xt.mean().item() == pytest.approx(np.sqrt(a) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - a, rel=0.05)
    mean, var, log_var = d.q_mean_variance(x0[:2], t[:2])
    assert torch.allclose(var, torch.full_like(var, 1 - a)) and torch.allclose(log_var.exp(), var)


def perfect_model(d, x0, noise, mean_type):
    """A model that knows x_0 and the noise: its prediction is exactly the target of mean_type."""
    def model(x_t, t):
        if mean_type == "epsilon":
            out = noise
        elif mean_type == "start_x":
            out = x0
        elif mean_type == "v":
            out = d.v_target(x0, t, noise)
        else:
            out = d.q_posterior_mean_variance(x0, x_t, t)[0]
        if d.var_type in ("learned", "learned_range"):
            out = torch.cat([out, torch.zeros_like(out)], dim=1)
        return out
    return model


@pytest.mark.parametrize("mean_type,var_type,loss_type", list(itertools.product(MEAN_TYPES, VAR_TYPES, LOSS_TYPES)))
def test_loss_dictionary(mean_type, var_type, loss_type):
    d = make("cosine", T=200, mean_type=mean_type, var_type=var_type, loss_type=loss_type)
    x0 = torch.rand(6, 2, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 1, 50, 100, 150, 199])
    learned = var_type in ("learned", "learned_range")
    out_param = torch.randn(6, 4 if learned else 2, 4, 4, requires_grad=True)
    losses = d.training_losses(lambda x, t: out_param, x0, t, noise=noise)

    if loss_type in ("kl", "rescaled_kl"):
        assert set(losses) == {"loss"}
        kl = make("cosine", T=200, mean_type=mean_type, var_type=var_type, loss_type="kl")
        plain = kl.training_losses(lambda x, t: out_param, x0, t, noise=noise)["loss"]
        factor = 200 if loss_type == "rescaled_kl" else 1
        torch.testing.assert_close(losses["loss"], plain * factor)
    else:
        assert set(losses) == ({"loss", "mse", "vb"} if learned else {"loss", "mse"})
        expected = losses["mse"] + losses["vb"] if learned else losses["mse"]
        torch.testing.assert_close(losses["loss"], expected)
    for value in losses.values():
        assert value.shape == (6,) and torch.isfinite(value).all()

    if learned and loss_type in ("mse", "rescaled_mse"):
        # L_hybrid: the vb term reaches only the variance channels (Nichol & Dhariwal sec. 3.1)
        (grad,) = torch.autograd.grad(losses["vb"].sum(), out_param)
        assert grad[:, :2].abs().max() == 0 and grad[:, 2:].abs().max() > 0
        vb_kl = make("cosine", T=200, mean_type=mean_type, var_type=var_type, loss_type="kl")
        kl_terms = vb_kl.training_losses(lambda x, t: out_param.detach(), x0, t, noise=noise)["loss"]
        scale = 200 / 1000 if loss_type == "rescaled_mse" else 1.0
        torch.testing.assert_close(losses["vb"], kl_terms * scale)

    # With the perfect prediction the mse is zero and p recovers x_0 exactly.
    if loss_type == "mse":
        model = perfect_model(d, x0, noise, mean_type)
        assert d.training_losses(model, x0, t, noise=noise)["mse"].max() < 1e-9
        x_t = d.q_sample(x0, t, noise)
        pred = d.p_mean_variance(model, x_t, t, clip_denoised=False)["pred_xstart"]
        torch.testing.assert_close(pred, x0, rtol=1e-3, atol=2e-3)


def test_learned_range_interpolates_between_fixed_variances():
    d = make("linear", var_type="learned_range")
    x = torch.randn(3, 2)
    t = torch.tensor([1, 500, 999])
    for v, expected in ((-1.0, d.posterior_log_variance_clipped), (1.0, np.log(d.betas))):
        out = d.p_mean_variance(lambda x, t: torch.cat([x, torch.full_like(x, v)], 1), x, t)
        torch.testing.assert_close(out["log_variance"][:, 0], torch.tensor(expected[t], dtype=torch.float32))


def test_fixed_variances():
    for var_type, arr in (("fixed_small", "posterior_variance"), ("fixed_large", "fixed_large_variance")):
        d = make("linear", var_type=var_type)
        t = torch.tensor([0, 1, 999])
        out = d.p_mean_variance(lambda x, t: x, torch.randn(3, 2), t)
        torch.testing.assert_close(out["variance"][:, 0], torch.tensor(getattr(d, arr)[t], dtype=torch.float32))
    assert make("linear", var_type="fixed_large").fixed_large_variance[0] == make().posterior_variance[1]


def test_batch_first_any_rank():
    d = make("linear", T=100)
    for shape in ((4, 8), (4, 3, 8), (4, 3, 8, 8), (4, 1, 2, 4, 4)):
        x0 = torch.randn(shape)
        t = torch.randint(0, 100, (4,))
        losses = d.training_losses(lambda x, t: torch.zeros_like(x), x0, t)
        assert losses["loss"].shape == (4,)


def test_coefficients_follow_input_dtype():
    d = make("linear", T=100)
    x = torch.randn(2, 3, dtype=torch.float64)
    t = torch.tensor([3, 50])
    assert d.q_sample(x, t).dtype == torch.float64
    assert d.q_sample(x.float(), t).dtype == torch.float32


def test_bad_t():
    d = make("linear", T=100)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"t out of range.*\[0, 99\]"):
        d.q_sample(x, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="t out of range"):
        d.training_losses(lambda x, t: x, x, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        d.q_sample(x, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="t has 3 entries but the batch has 2"):
        d.q_sample(x, torch.tensor([0, 1, 2]))


def test_wrong_channel_count_for_learned_variance():
    d = make("linear", T=100, var_type="learned_range")
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"needs 2 x 3 channels"):
        d.training_losses(lambda x, t: torch.zeros_like(x), x, torch.tensor([1, 2]))
    fixed = make("linear", T=100)
    with pytest.raises(ValueError, match="model output has shape"):
        fixed.p_mean_variance(lambda x, t: torch.cat([x, x], 1), x, torch.tensor([1, 2]))


@pytest.mark.parametrize("kind,value", [("mean_type", "eps"), ("var_type", "fixedsmall"), ("loss_type", "l2")])
def test_unknown_options_list_valid_names(kind, value):
    with pytest.raises(ValueError, match=f"unknown {kind} '{value}'; valid: "):
        make(**{kind: value})


def test_bad_betas():
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]"):
        GaussianDiffusion(betas=[0.1, 0.0])
