"""DDPM and DDIM loops: skip_fraction, injectable randomness, DDIM/DDPM identities, progress."""

import pytest
import torch

from ddpm_lightning.diffusion import GaussianDiffusion, get_named_beta_schedule
from ddpm_lightning.diffusion.samplers import ddim_sample, p_sample
from ddpm_lightning.diffusion.seeded_noise import SeededNoise


def make(**kw):
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), **kw)


def net(x, t):
    return torch.tanh(x) * (t.float().reshape(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
@pytest.mark.parametrize("skip_fraction,expected_calls", [(0.0, 100), (0.2, 80), (0.005, 100), (0.015, 98)])
def test_skip_fraction_drops_the_noisiest_steps(loop, skip_fraction, expected_calls):
    seen = []

    def recording(x, t):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    r = make().respace("100")
    getattr(r, loop)(recording, (2, 1, 2, 2), skip_fraction=skip_fraction)
    assert len(seen) == expected_calls
    # starts at the first kept step, in original indices, and runs down to 0
    assert seen[0] == r.timestep_map[expected_calls - 1] and seen[-1] == 0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_skip_fraction_out_of_range(bad):
    with pytest.raises(ValueError, match=r"skip_fraction must be in \[0, 1\)"):
        make().respace("10").p_sample_loop(net, (1, 1, 2, 2), skip_fraction=bad)


PER_SAMPLE = {
    "cpu generators": lambda seeds: [torch.Generator().manual_seed(s) for s in seeds],
    "seeded noise": lambda seeds: SeededNoise(torch.tensor(seeds)),
}


@pytest.mark.parametrize("per_sample", PER_SAMPLE.values(), ids=PER_SAMPLE.keys())
@pytest.mark.parametrize("loop,kwargs", [("p_sample_loop", {}), ("ddim_sample_loop", {"eta": 0.5})])
def test_per_sample_generators_make_images_independent_of_the_batch(loop, kwargs, per_sample):
    r = make().respace("20")
    full = getattr(r, loop)(net, (4, 1, 3, 3), generator=per_sample([10, 11, 12, 13]), **kwargs)
    part = getattr(r, loop)(net, (2, 1, 3, 3), generator=per_sample([12, 13]), **kwargs)
    torch.testing.assert_close(full[2:], part)
    again = getattr(r, loop)(net, (4, 1, 3, 3), generator=per_sample([10, 11, 12, 13]), **kwargs)
    torch.testing.assert_close(full, again)
    assert not torch.allclose(full[0], full[1])


def test_single_generator_and_given_noise():
    r = make().respace("10")
    a = r.p_sample_loop(net, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    b = r.p_sample_loop(net, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    noise = torch.randn(2, 1, 2, 2)
    x1 = r.ddim_sample_loop(net, (2, 1, 2, 2), noise=noise)
    x2 = r.ddim_sample_loop(net, (2, 1, 2, 2), noise=noise.clone())
    torch.testing.assert_close(x1, x2)  # eta = 0 is deterministic given x_T
    with pytest.raises(ValueError, match="noise shape"):
        r.p_sample_loop(net, (3, 1, 2, 2), noise=noise)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_eta_one_is_the_ddpm_step(schedule):
    """Song et al.: eta = 1 gives sigma_t^2 = posterior variance, i.e. DDPM with fixed_small."""
    d = GaussianDiffusion(betas=get_named_beta_schedule(schedule, 1000), var_type="fixed_small").respace("50")
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 30, 49])
    model = lambda x, t: torch.sin(x)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ddpm = p_sample(d, model, x, t, clip_denoised=False, generator=g1)["sample"]
    ddim = ddim_sample(d, model, x, t, eta=1.0, clip_denoised=False, generator=g2)["sample"]
    torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_no_noise_at_the_last_step():
    d = make().respace("10")
    x = torch.randn(2, 1, 2, 2)
    t = torch.zeros(2, dtype=torch.long)
    a = p_sample(d, net, x, t)["sample"]
    b = p_sample(d, net, x, t)["sample"]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, d.p_mean_variance(net, x, t)["mean"])


def test_progress_bar(capsys):
    make().respace("5").p_sample_loop(net, (1, 1, 2, 2), progress=True)
    make().respace("5").ddim_sample_loop(net, (1, 1, 2, 2), progress=True)
    err = capsys.readouterr().err
    assert "DDPM sampling" in err and "DDIM sampling" in err and "5/5" in err


def test_clip_denoised_keeps_samples_in_range():
    wild = lambda x, t: torch.full_like(x, -50.0)  # eps prediction that implies |x_0| >> 1
    x = make().respace("25").p_sample_loop(wild, (8, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0 + 1e-5


def test_class_conditional_images_and_labels_depend_on_the_sample_index_only():
    """generate_uint8 draws labels and noise per sample on the module's device (SeededNoise)."""
    from ddpm_lightning.module import DiffusionModule
    from ddpm_lightning.sampling import generate_uint8

    torch.manual_seed(0)
    module = DiffusionModule(net="tiny", image_size=8, in_channels=1, class_cond=True, num_classes=10)
    images, labels = generate_uint8(module, range(5), seed=3, batch_size=2, respacing="4")
    part_images, part_labels = generate_uint8(module, [3, 4], seed=3, batch_size=5, respacing="4")
    assert torch.equal(images[3:], part_images) and torch.equal(labels[3:], part_labels)
    assert labels.device.type == "cpu" and len(set(labels.tolist())) > 1


def test_a_compiling_module_compiles_its_seeded_noise_too(monkeypatch):
    """The ~80 elementwise ops of each step's draw are fused where the network is compiled (on CUDA)."""
    from ddpm_lightning import sampling
    from ddpm_lightning.diffusion import SeededNoise
    from ddpm_lightning.module import DiffusionModule

    made = []
    monkeypatch.setattr(sampling, "SeededNoise",
                        lambda seeds, compile: made.append(compile) or SeededNoise(seeds, compile))
    for compile in (False, True):
        module = DiffusionModule(net="tiny", image_size=8, in_channels=1, compile=compile)
        sampling.generate_uint8(module, range(3), seed=0, batch_size=2, respacing="2")
    assert made == [False, False, True, True]  # a noise per batch of 2
