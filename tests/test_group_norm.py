"""The written-out GroupNorm that compiled UNets use: F.group_norm's values and gradients, in the input's layout."""

import pytest
import torch
import torch.nn.functional as F

from ddpm_lightning.models import layers
from ddpm_lightning.models.group_norm import group_norm, group_norm_act


@pytest.mark.parametrize("channel_statistics", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_values_and_gradients_are_f_group_norms(channels_last, affine, channel_statistics):
    """Statistics per group or combined from per-channel ones: F.group_norm's values and gradients."""
    torch.manual_seed(0)
    # Channels with means and spreads of their own, so that a group's variance is within and between channels.
    x = torch.randn(3, 16, 5, 6, dtype=torch.float64) * (1 + 2 * torch.rand(16, 1, 1)) + 3 * torch.randn(16, 1, 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(16, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(16, dtype=torch.float64, requires_grad=True) if affine else None
    norm = lambda x, weight, bias: group_norm(x, 4, weight, bias, 1e-5, channel_statistics)  # noqa: E731
    assert torch.autograd.gradcheck(norm, (x, weight, bias))

    inputs = [t for t in (x, weight, bias) if t is not None]
    ours, reference = norm(x, weight, bias), F.group_norm(x, 4, weight, bias, 1e-5)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ours)
    for got, want in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(reference, inputs, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channel_statistics", [False, True])
def test_float32_statistics_hold_a_mean_a_thousand_sigmas_from_zero(channel_statistics):
    """A float32 x whose channels sit about 1000 standard deviations from zero, each at its own mean: both ways
    normalise it as float64 does to 1e-3. Combined in float32, E_c[Var_c + mu_c^2] - mu_g^2 would cancel to
    an error of about 1e-7 * 1000^2 of the variance (11% here); channel_group_statistics combines in float64."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64) + 1000 + 0.5 * torch.randn(16, 1, 1, dtype=torch.float64)
    reference = F.group_norm(x, 4, eps=1e-5)
    ours = group_norm(x.float().contiguous(memory_format=torch.channels_last), 4, eps=1e-5,
                      channel_statistics=channel_statistics)
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-3)


def test_output_and_input_gradient_keep_channels_last():
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = group_norm(x, 2, torch.ones(8), torch.zeros(8))
    (grad,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()


def test_channels_that_do_not_split_into_the_groups_are_refused():
    with pytest.raises(ValueError, match="6 channels do not split into 4 groups"):
        group_norm(torch.randn(1, 6, 2, 2), 4)


def _forward_backward(fn, norm, x):
    """fn(x) for an x that takes gradients, then x's and norm.weight's gradients of sum(out^2) (norm's zeroed
    after)."""
    leaf = x.clone().requires_grad_(True)
    out = fn(leaf)
    out.float().square().sum().backward()
    grads = leaf.grad, norm.weight.grad.clone()
    norm.zero_grad()
    return out, *grads


def _spied_groupnorm32(monkeypatch, name):
    """A GroupNorm32 with random affine weights, a bf16 channels_last input, and the list of calls it makes to
    `layers.<name>` (one entry per call)."""
    calls, real = [], getattr(layers, name)
    monkeypatch.setattr(layers, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    torch.manual_seed(0)
    norm = layers.GroupNorm32(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 4, 4).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    return calls, norm, x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_groupnorm32_takes_it_under_torch_compile_and_keeps_eager_on_aten(monkeypatch, backend):
    """Compiled: the written-out GroupNorm (ATen's would put NCHW copies into the graph). Eager: ATen's kernel.
    Both give the same values and gradients, in float32 for a bf16 input; inductor's kernels (CPU ones here)
    compute what autograd's graph of it computes."""
    calls, norm, x = _spied_groupnorm32(monkeypatch, "group_norm")
    eager = _forward_backward(norm, norm, x)
    assert calls == []
    torch._dynamo.reset()
    compiled = _forward_backward(torch.compile(norm, backend=backend, fullgraph=True), norm, x)
    assert calls, "torch.compile did not take the written-out GroupNorm"
    assert compiled[0].dtype == torch.bfloat16
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def _groupnorm32_eager(x, weight, bias, scale, shift, silu):
    """What GroupNorm32 computes eagerly: ATen's GroupNorm in float32, cast back, then scale-shift and SiLU."""
    h = F.group_norm(x.float(), 4, weight, bias, 1e-5).to(x.dtype)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h) if silu else h


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_act_computes_groupnorm32s_eager_ops(channels_last, dtype, affine, scale_shift, silu):
    """The one-kernel form is the same function as GroupNorm32's eager ops, for either layout of x, and
    keeps x's layout when run eagerly."""
    torch.manual_seed(0)
    x = (torch.randn(3, 16, 5, 6) * 3 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.randn(16), torch.randn(16)) if affine else (None, None)
    scale, shift = (torch.randn(3, 16, 1, 1).to(dtype), torch.randn(3, 16, 1, 1).to(dtype)) if scale_shift else (None, None)
    got = group_norm_act(x, 4, weight, bias, 1e-5, scale, shift, silu)
    want = _groupnorm32_eager(x, weight, bias, scale, shift, silu)
    assert got.dtype == dtype and got.shape == x.shape
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    # float32: rounding; bf16: the same float32 normalisation rounds to a neighbouring bf16 value at most
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_group_norm_act_refuses_what_it_cannot_group():
    with pytest.raises(ValueError, match=r"x \(1, 6, 2, 2\) is not \[N, C, H, W\] with C divisible by 4"):
        group_norm_act(torch.randn(1, 6, 2, 2), 4)
    with pytest.raises(ValueError, match=r"x \(2, 8, 4\) is not \[N, C, H, W\]"):
        group_norm_act(torch.randn(2, 8, 4), 4)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_groupnorm32_compiled_without_autograd_takes_the_one_kernel_form(monkeypatch, backend):
    """With one_kernel_sampling on, sampling (compiled, no autograd) a channels_last x: group_norm_act, with
    scale-shift and SiLU inside it, and the values of the eager ops. Compiled with autograd (training), for an
    NCHW x, and eager, GroupNorm32 does not take it."""
    calls, norm, x = _spied_groupnorm32(monkeypatch, "group_norm_act")
    monkeypatch.setattr(layers.GroupNorm32, "one_kernel_sampling", True)
    scale, shift = torch.randn(2, 2, 16, 1, 1).to(torch.bfloat16).unbind(0)

    def fn(x, scale, shift):
        return norm(x, scale, shift, silu=True)

    with torch.no_grad():
        eager = fn(x, scale, shift)
        assert calls == []
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=backend, fullgraph=True)(x, scale, shift)
    assert calls, "torch.compile without autograd did not take group_norm_act"
    assert compiled.dtype == torch.bfloat16
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=1.6e-2, atol=1.6e-2)
    calls.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(x.contiguous(), scale, shift)
    assert calls == []
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(x.requires_grad_(True), scale, shift).float().sum().backward()
    assert calls == []


def test_groupnorm32_samples_in_two_passes_by_default(monkeypatch):
    """The default, measured faster on an H100 (benchmarks/RESULTS.md, GPU run 3): sampling a channels_last x
    compiled takes the written-out GroupNorm, then scale-shift and SiLU, not group_norm_act."""
    one_kernel, norm, x = _spied_groupnorm32(monkeypatch, "group_norm_act")
    two_pass, _, _ = _spied_groupnorm32(monkeypatch, "group_norm")
    assert not layers.GroupNorm32.one_kernel_sampling
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(norm, backend="aot_eager", fullgraph=True)(x)
    assert one_kernel == [] and two_pass == [1]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_groupnorm32_compiled_takes_channel_statistics_for_channels_last_where_asked(monkeypatch, backend):
    """With channel_statistics on, the compiled GroupNorm of a channels_last x of 8x8 pixels, with autograd
    (training) and without (sampling), takes its statistics from channel_group_statistics, with the eager
    values and gradients. An NCHW x (whose groups are contiguous already), a 4x4 one (under
    channel_statistics_min_pixels), and the default, keep the per-group ones."""
    from ddpm_lightning.models import group_norm as group_norm_module

    calls, real = [], group_norm_module.channel_group_statistics
    monkeypatch.setattr(group_norm_module, "channel_group_statistics", lambda *a: calls.append(1) or real(*a))
    _, norm, small = _spied_groupnorm32(monkeypatch, "group_norm")
    assert small.shape[2:] == (4, 4) and layers.GroupNorm32.channel_statistics_min_pixels == 64
    x = torch.randn(2, 16, 8, 8).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def run(fn, x):  # training, then sampling
        with torch.no_grad():
            sampled = fn(x)
        return (*_forward_backward(fn, norm, x), sampled)

    assert not layers.GroupNorm32.channel_statistics
    eager = run(norm, x)
    torch._dynamo.reset()
    run(torch.compile(norm, backend=backend, fullgraph=True), x)
    assert calls == [], "the default took per-channel statistics"
    monkeypatch.setattr(layers.GroupNorm32, "channel_statistics", True)
    torch._dynamo.reset()
    compiled = run(torch.compile(norm, backend=backend, fullgraph=True), x)
    assert len(calls) == 2, "training and sampling did not both take per-channel statistics"
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    calls.clear()
    for other in (x.contiguous(), small):
        torch._dynamo.reset()
        run(torch.compile(norm, backend=backend, fullgraph=True), other)
    assert calls == []
