"""The UNet of Ho et al. (2020) / Nichol & Dhariwal (2021): presets, embedding, blocks, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_lightning.models import PRESETS, build_unet, layers
from ddpm_lightning.models.attention import AttentionBlock
from ddpm_lightning.models.embedding import timestep_embedding
from ddpm_lightning.models.layers import Downsample, ResBlock


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # Zero-initialised output layers make a fresh net output 0; give every weight a value.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(max(parameter[0].numel(), 1)))
    return module


def _count(preset: str) -> int:
    with torch.device("meta"):  # counts without allocating 100M+ parameters
        return sum(p.numel() for p in build_unet(preset).parameters())


@pytest.mark.parametrize(
    "preset,count", [("ddpm_cifar10", 35_746_307), ("iddpm_cifar10", 52_546_438), ("iddpm_imagenet64", 121_063_942)]
)
def test_paper_presets_have_exact_parameter_counts(preset, count):
    assert _count(preset) == count


def test_ddpm_cifar10_matches_diffusers_parameter_count():
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        reference = diffusers.UNet2DModel(
            sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2, attention_head_dim=None,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )  # fmt: skip
    assert _count("ddpm_cifar10") == sum(p.numel() for p in reference.parameters())


def test_small_presets_sizes():
    assert _count("tiny") < 1_000_000
    assert 1_000_000 < _count("small") < 10_000_000
    assert set(PRESETS) == {"ddpm_cifar10", "iddpm_cifar10", "iddpm_imagenet64", "tiny", "small"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_exposes_compatibility_attributes(preset):
    config = PRESETS[preset]
    with torch.device("meta"):
        net = build_unet(preset)
    assert (net.in_channels, net.image_size) == (config["in_channels"], config["image_size"])
    assert net.learn_sigma == config.get("learn_sigma", False) and net.num_classes is None
    assert net.out_channels == net.in_channels * (2 if net.learn_sigma else 1)


def test_overrides_learn_sigma_classes_and_channels():
    net = _randomize(build_unet("tiny", in_channels=1, learn_sigma=True, num_classes=10)).eval()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 10, 999])
    out = net(x, t, torch.tensor([0, 1, 2]))
    assert out.shape == (3, 2, 16, 16) and net.out_channels == 2
    assert not torch.allclose(out, net(x, t, torch.tensor([3, 4, 5])))
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t)


def test_preset_errors_are_one_line_and_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown UNet preset 'huge'; valid presets: .*ddpm_cifar10.*tiny"):
        build_unet("huge")
    with pytest.raises(ValueError, match=r"preset 'tiny': image_size 15 is not divisible by .* = 2"):
        build_unet("tiny", image_size=15)
    with pytest.raises(ValueError, match=r"preset 'small': attention_resolutions \[3\] never occur for image_size 16"):
        build_unet("small", attention_resolutions=(3,))


def test_fresh_network_zero_initialises_output_layers():
    net = build_unet("tiny")
    zeroed = [m.conv2 for m in net.modules() if isinstance(m, ResBlock)]
    zeroed += [m.proj_out for m in net.modules() if isinstance(m, AttentionBlock)] + [net.conv_out]
    assert len(zeroed) > 10 and all(p.abs().sum() == 0 for m in zeroed for p in m.parameters())
    assert torch.count_nonzero(net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))) == 0


@pytest.mark.parametrize("flip,shift", [(False, 1), (True, 0)])
def test_timestep_embedding_matches_both_conventions(flip, shift):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    # Pinned by hand for dim 4: frequencies 10000 ** (-i / (half - shift)).
    freqs = torch.tensor([1.0, 1e-4 if shift == 1 else 1e-2])
    sin, cos = torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)
    expected = torch.cat([cos, sin] if flip else [sin, cos], dim=1)
    torch.testing.assert_close(timestep_embedding(t, 4, flip, shift), expected)
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.models.embeddings.get_timestep_embedding(t, 128, flip, shift)
    assert torch.equal(timestep_embedding(t, 128, flip, shift), reference)


def test_timesteps_are_embedded_as_given():
    net = _randomize(build_unet("tiny")).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        as_int, as_float = net(x, torch.tensor([7])), net(x, torch.tensor([7.0]))
        fractional = net(x, torch.tensor([7.25]))
    assert torch.equal(as_int, as_float)
    assert (fractional - as_int).abs().max() > 1e-4  # no rounding or rescaling inside


def test_attention_matches_naive_multihead_softmax_attention():
    block = _randomize(AttentionBlock(64, num_heads=4)).eval()
    x = torch.randn(2, 64, 4, 4)
    tokens = F.group_norm(x, 32, block.norm.weight, block.norm.bias, 1e-5).flatten(2).transpose(1, 2)
    q, k, v = block.qkv(tokens).chunk(3, dim=-1)
    heads = [slice(h * 16, (h + 1) * 16) for h in range(4)]
    out = torch.cat([torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 4.0, -1) @ v[..., s] for s in heads], -1)
    expected = x + block.proj_out(out).transpose(1, 2).reshape(2, 64, 4, 4)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_uses_scaled_dot_product_attention(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    build_unet("tiny")(torch.randn(1, 3, 16, 16), torch.tensor([3]))
    assert len(calls) == 4  # the 8x8 level has 1 down and 2 up blocks with attention, plus the middle


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_timestep_conditioning(scale_shift):
    block = _randomize(ResBlock(32, 64, emb_channels=16, use_scale_shift_norm=scale_shift)).eval()
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 16)
    h = block.conv1(F.silu(F.group_norm(x, 32, block.norm1.weight, block.norm1.bias, 1e-5)))
    e = block.emb_proj(F.silu(emb))[:, :, None, None]
    norm2 = lambda z: F.group_norm(z, 32, block.norm2.weight, block.norm2.bias, 1e-5)  # noqa: E731
    if scale_shift:  # Nichol & Dhariwal: norm(h) * (1 + scale) + shift
        h = norm2(h) * (1 + e[:, :64]) + e[:, 64:]
    else:  # Ho et al.: add the projected embedding before the norm
        h = norm2(h + e)
    expected = block.skip(x) + block.conv2(F.silu(h))
    torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=1e-5)


def test_downsample_padding_conventions():
    x = torch.randn(1, 32, 8, 8)
    for padding, pad in (("symmetric", (1, 1, 1, 1)), ("asymmetric", (0, 1, 0, 1))):
        down = _randomize(Downsample(32, padding))
        torch.testing.assert_close(down(x), F.conv2d(F.pad(x, pad), down.conv.weight, down.conv.bias, stride=2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_nearest_upsampling_is_f_interpolate_with_a_block_sum_backward(monkeypatch, channels_last):
    """Under torch.compile, with a backward to come, the 2x2 broadcast (whose backward inductor lowers to a sum
    per block, not a scatter-add) gives F.interpolate's output and layouts exactly, and its gradient; eager
    and gradient-free code call F.interpolate."""
    calls = []
    interpolate = F.interpolate
    monkeypatch.setattr(layers.F, "interpolate", lambda *a, **k: calls.append(1) or interpolate(*a, **k))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weights = torch.randn(2, 3, 8, 10, dtype=torch.float64)

    def run(fn):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf)
        (out * weights).sum().backward()
        return out, leaf.grad

    want = run(lambda t: interpolate(t, scale_factor=2.0, mode="nearest"))
    assert run(layers.upsample_nearest)[0].stride() == want[0].stride() and calls == [1]
    torch._dynamo.reset()
    got = run(torch.compile(layers.upsample_nearest, backend="aot_eager", fullgraph=True))
    assert calls == [1], "the compiled upsampling should not call F.interpolate"
    assert got[0].stride() == want[0].stride() and got[1].stride() == x.stride()
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1])  # float64; the four terms are summed in another order
    with torch.no_grad():  # no backward to shape: F.interpolate's gather, which fuses better when sampling
        torch.testing.assert_close(torch.compile(layers.upsample_nearest, backend="aot_eager")(x), want[0])
    assert len(calls) > 1


def test_resblock_updown_replaces_resampling_convs():
    plain, updown = build_unet("tiny"), build_unet("tiny", resblock_updown=True)
    assert (
        sum(isinstance(m, ResBlock) for m in updown.modules())
        == sum(isinstance(m, ResBlock) for m in plain.modules()) + 2
    )
    assert [m.resample for m in updown.modules() if isinstance(m, ResBlock) and m.resample != "none"] == ["down", "up"]
    out = _randomize(updown)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert out.shape == (2, 3, 16, 16) and out.abs().mean() > 0


def test_num_head_channels_sets_heads_per_width():
    net = build_unet("small", num_head_channels=32)
    widths = {m.qkv.in_features: m.num_heads for m in net.modules() if isinstance(m, AttentionBlock)}
    assert widths == {64: 2, 128: 4}  # 64 channels at 8x8, 128 in the middle
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        build_unet("tiny", num_heads=3)
    with pytest.raises(ValueError, match="not a multiple of num_head_channels 48"):
        build_unet("tiny", num_head_channels=48)


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    import torch.utils.checkpoint as checkpoint_module

    def gradients(use_checkpoint: bool) -> list[torch.Tensor]:
        net = _randomize(build_unet("tiny", use_checkpoint=use_checkpoint, dropout=0.0)).train()
        net(torch.ones(2, 3, 16, 16), torch.tensor([4, 9])).square().mean().backward()
        return [p.grad for p in net.parameters()]

    calls = []
    original = checkpoint_module.checkpoint
    monkeypatch.setattr("ddpm_lightning.models.unet.checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    for plain, checkpointed in zip(gradients(False), gradients(True), strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=1e-4)
    assert len(calls) == len(build_unet("tiny").down_blocks) + 1 + len(build_unet("tiny").up_blocks)


def test_dropout_is_active_in_training_only():
    net = _randomize(build_unet("tiny", dropout=0.5))
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    assert not torch.equal(net.train()(x, t), net(x, t))
    assert torch.equal(net.eval()(x, t), net(x, t))


def test_channels_last_and_bf16_autocast():
    net = _randomize(build_unet("tiny")).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 600])
    with torch.no_grad():
        reference = net(x, t)
        net_cl = net.to(memory_format=torch.channels_last)
        scale = reference.abs().max().item()  # other conv kernels: agree to float32 rounding
        torch.testing.assert_close(
            net_cl(x.to(memory_format=torch.channels_last), t), reference, atol=1e-5 * scale, rtol=0
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net_cl(x.to(memory_format=torch.channels_last), t)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).abs().mean() < 0.05 * reference.abs().mean()
