"""space_timesteps and respaced processes: improved-diffusion's semantics, pinned."""

import numpy as np
import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion, get_named_beta_schedule, space_timesteps


def test_single_section_fractional_stride():
    steps = sorted(space_timesteps(1000, "100"))
    assert len(steps) == 100 and steps[:8] == [0, 10, 20, 30, 40, 50, 61, 71] and steps[-1] == 999
    assert sorted(space_timesteps(1000, "25")) == [
        0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749, 791, 832, 874,
        916, 957, 999]
    assert sorted(space_timesteps(4000, "100"))[:6] == [0, 40, 81, 121, 162, 202]
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, [100]) == space_timesteps(1000, "100") == space_timesteps(1000, 100)


def test_sections_remainder_goes_to_earliest():
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert steps[:12] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100, 107]
    assert len(steps) == 45
    # 10 steps into 3 sections: sizes 4, 3, 3
    assert sorted(space_timesteps(10, "2,2,2")) == [0, 3, 4, 6, 7, 9]


def test_ddim_integer_stride():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    with pytest.raises(ValueError, match="no integer stride gives exactly 7"):
        space_timesteps(10, "ddim7")


def test_trailing_includes_last_step():
    steps = sorted(space_timesteps(1000, "trailing25"))
    assert len(steps) == 25 and steps[-1] == 999 and steps[0] == 39 and steps[1] - steps[0] == 40


@pytest.mark.parametrize("bad", ["abc", "10,x", "ddim", "trailingx", "0", "", "10,,5"])
def test_malformed_respacing(bad):
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(1000, bad)


def test_unsatisfiable_section():
    with pytest.raises(ValueError, match="cannot take 200 steps from a section of 100"):
        space_timesteps(300, "10,200,20")


def base(schedule="linear", **kw):
    return GaussianDiffusion(betas=get_named_beta_schedule(schedule, 1000), **kw)


def test_respaced_betas_from_kept_alphas_cumprod():
    d = base("cosine")
    kept = sorted(space_timesteps(1000, "100"))
    r = d.respace(kept)
    assert r.num_timesteps == 100 and list(r.timestep_map) == kept
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-10)
    expected_betas = 1 - d.alphas_cumprod[kept] / np.append(1.0, d.alphas_cumprod[kept][:-1])
    np.testing.assert_allclose(r.betas, expected_betas, rtol=1e-12)
    assert r.betas.dtype == np.float64 and r.original_num_timesteps == 1000


def test_respace_with_all_steps_is_the_base_process():
    d = base("linear", var_type="fixed_large")
    r = d.respace(range(1000))
    np.testing.assert_allclose(r.betas, d.betas, rtol=1e-10)
    np.testing.assert_allclose(r.posterior_variance, d.posterior_variance, rtol=1e-9, atol=1e-20)
    x = torch.randn(3, 2, 4)
    t = torch.tensor([0, 500, 999])
    net = lambda x, t: torch.sin(x + t[:, None, None] / 1000)
    for a, b in zip(r.p_mean_variance(net, x, t).values(), d.p_mean_variance(net, x, t).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_respaced_model_sees_original_indices_and_respace_composes():
    seen = []

    def net(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    r = base().respace("100")
    x = torch.randn(2, 3)
    r.p_mean_variance(net, x, torch.tensor([0, 99]))
    assert seen[-1].tolist() == [0, 999] and seen[-1].dtype == torch.long
    r.training_losses(net, x, torch.tensor([1, 2]))
    assert seen[-1].tolist() == [10, 20]
    rr = r.respace([0, 50, 99])
    rr.p_mean_variance(net, x, torch.tensor([1, 2]))
    assert seen[-1].tolist() == [505, 999] and rr.original_num_timesteps == 1000
    np.testing.assert_allclose(rr.alphas_cumprod, base().alphas_cumprod[[0, 505, 999]], rtol=1e-10)
    with pytest.raises(ValueError, match="subset"):
        base().respace([0, 1000])
