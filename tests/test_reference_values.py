"""ddpm_lightning reproduces openai/improved-diffusion number for number (see reference_setup.py)."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion, get_named_beta_schedule
from reference_setup import CASES, reference_inputs, reference_net

REFERENCE = json.loads((Path(__file__).parent / "data" / "improved_diffusion_reference.json").read_text())
MEAN = ("epsilon", "start_x", "previous_x")
VAR = ("fixed_small", "fixed_large", "learned", "learned_range")
LOSS = ("mse", "rescaled_mse", "kl", "rescaled_kl")


def make(case, mean_type="epsilon", var_type="fixed_small", loss_type="mse"):
    schedule, T, respacing = CASES[case]
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule(schedule, T), mean_type=mean_type,
                                  var_type=var_type, loss_type=loss_type)
    return diffusion.respace(respacing) if respacing else diffusion


def assert_matches(ours, expected, what):
    torch.testing.assert_close(torch.as_tensor(ours, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=2e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_losses_and_p_mean_variance_match_reference(case):
    for mean_type, var_type, loss_type in itertools.product(MEAN, VAR, LOSS):
        key = f"{case}/{mean_type}/{var_type}/{loss_type}"
        expected = REFERENCE[key]
        diffusion = make(case, mean_type, var_type, loss_type)
        x0, x_t, noise, t = reference_inputs(diffusion.num_timesteps)
        net = reference_net(var_type.startswith("learned"))
        losses = diffusion.training_losses(net, x0, t, noise=noise)
        assert set(losses) == {k for k in expected if not k.startswith("pmv_")}, key
        for name, value in losses.items():
            assert value.shape == (4,)
            assert_matches(value, expected[name], f"{key} {name}")
        if loss_type == "mse":
            out = diffusion.p_mean_variance(net, x_t, t)
            for name in ("mean", "variance", "log_variance", "pred_xstart"):
                assert_matches(out[name].double().flatten(1).sum(1), expected[f"pmv_{name}"], f"{key} {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_bpd_and_sampling_loops_match_reference(case):
    expected = REFERENCE[f"{case}/loops"]
    schedule, T, _ = CASES[case]
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule(schedule, T), var_type="learned_range").respace("10")
    x0, _, _, _ = reference_inputs(10)
    net = reference_net(True)
    torch.manual_seed(0)
    bpd = diffusion.calc_bpd_loop(net, x0)
    assert bpd["vb"].shape == bpd["mse"].shape == bpd["xstart_mse"].shape == (4, 10)
    assert_matches(bpd["total_bpd"], expected["total_bpd"], "total_bpd")
    assert_matches(bpd["prior_bpd"], expected["prior_bpd"], "prior_bpd")
    assert_matches(bpd["vb"].sum(0), expected["vb_sum"], "vb")
    assert_matches(bpd["mse"].sum(0), expected["mse_sum"], "mse")
    torch.manual_seed(0)
    assert_matches(diffusion.p_sample_loop(net, x0.shape).flatten(1).sum(1), expected["ddpm_sum"], "p_sample_loop")
    torch.manual_seed(0)
    assert_matches(diffusion.ddim_sample_loop(net, x0.shape, eta=0.5).flatten(1).sum(1), expected["ddim_sum"], "ddim")
