"""GroupNorm (Wu & He, 2018) written out, so that torch.compile keeps its input's memory layout.

ATen's `group_norm` makes a CUDA input contiguous before normalising it. Under channels_last that puts an
NCHW copy of every normalised activation into the compiled graph: the forward writes it beside the
channels_last one, autograd saves it, and each convolution backward copies it back (on an H100 with torch
2.11, 76 copies and 13% of a DDPM CIFAR-10 training step; benchmarks/RESULTS.md). Here the channels are
split into groups by a view, which exists in both layouts, and the backward is ATen's own formula
(`native_group_norm_backward`), so the graph saves what ATen saves: the input, the mean and 1/std.

`group_norm(..., channel_statistics=True)` takes each group's statistics from its channels' own (opt-in through
`GroupNorm32.channel_statistics`): under channels_last a channel is what memory holds contiguously, where a group
is not (see `channel_group_statistics`).

`group_norm_act` is an opt-in form for sampling (`GroupNorm32.one_kernel_sampling`): the norm and the ops
after it, written so that inductor makes one kernel of them. It moves fewer bytes but ran slower on an H100,
so it is off by default (see its docstring).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


def _per_channel(values: Tensor, channels: int, ndim: int) -> Tensor:
    """[N, G] group values or [N, C] channel values as [N, C, 1, ...], which broadcasts against an activation
    (ndim 2 gives [N, C])."""
    if values.shape[1] != channels:  # each group's value for each of its channels
        values = values.unsqueeze(-1).expand(-1, -1, channels // values.shape[1])
    return values.reshape(values.shape[0], channels, *(1,) * (ndim - 2))


def channel_group_statistics(x: Tensor, num_groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Each group's mean and 1/sigma (Wu & He eq. 2, biased variance), [N, G] each, from the mean and variance of
    each of its channels: the law of total variance over equal-sized channels,
    Var_g = E_c[Var_c + mu_c^2] - mu_g^2, with mu_g = E_c[mu_c].

    Why: the reduction then runs over the pixels of each (sample, channel). In a channels_last x those rows are
    adjacent in memory, so the statistics read whole pixels; the rows of a (sample, group) reduction are C/G
    channels, then a jump of C to the next pixel. Inductor also fuses a per-channel reduction into the kernel that
    writes x (a residual sum, say), since both iterate over [N, C, H, W]. Offline (torch 2.11, H100 code,
    benchmarks/RESULTS.md) the DDPM CIFAR-10 sampling forward at batch 512 moves 16.2 GB instead of 17.6, the
    training forward at batch 128 4.4 instead of 5.3.

    The [N, C] combination runs in float64: in float32, E[Var_c + mu_c^2] - mu_g^2 would cancel to an error of
    about 1e-7 mu^2 / sigma^2 relative to the variance (11% for channels 1000 sigma from zero). What is left is
    the float32 rounding of the channel means, at most about 1e-7 |mu| / sigma (9e-6 there).
    """
    var_c, mean_c = torch.var_mean(x, dim=tuple(range(2, x.ndim)), correction=0)  # [N, C], Welford per channel
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    var_c, mean_c = var_c.to(wide), mean_c.to(wide)
    mean = mean_c.unflatten(1, (num_groups, -1)).mean(-1)
    var = (var_c + mean_c.square()).unflatten(1, (num_groups, -1)).mean(-1) - mean.square()
    return mean.to(x.dtype), torch.rsqrt(var.clamp_min(0) + eps).to(x.dtype)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                channel_statistics: bool) -> Tensor:
        if channel_statistics:
            mean, rstd = channel_group_statistics(x, num_groups, eps)
        else:
            groups = x.unflatten(1, (num_groups, -1))  # [N, G, C/G, *spatial]: a view in NCHW and channels_last
            var, mean = torch.var_mean(groups, dim=tuple(range(2, groups.ndim)), correction=0)
            rstd = torch.rsqrt(var + eps)  # [N, G]: 1/sigma of Wu & He's eq. 2 (biased variance)
        # Eqs. 1 and 3, y = gamma * (x - mu) / sigma + beta, as one scale and shift per (sample, channel), the
        # way ATen's CUDA kernel computes it.
        c = x.shape[1]
        scale = _per_channel(rstd, c, 2) * (weight if weight is not None else 1)
        shift = -_per_channel(mean, c, 2) * scale + (bias if bias is not None else 0)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.num_groups = num_groups
        return x * _per_channel(scale, c, x.ndim) + _per_channel(shift, c, x.ndim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, g = x.shape[0], x.shape[1], ctx.num_groups
        spatial = tuple(range(2, x.ndim))
        ds = (grad * x).sum(spatial).view(n, g, -1)  # sum over H, W of dL/dy * x, per channel
        db = grad.sum(spatial).view(n, g, -1)  # sum over H, W of dL/dy, per channel
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            gamma = weight.view(1, g, -1) if weight is not None else torch.ones_like(db[:1])
            ds_g, db_g = (ds * gamma).sum(-1), (db * gamma).sum(-1)  # [N, G]
            m = math.prod(x.shape[2:]) * (c // g)  # elements per group
            # dx = rstd * gamma * dy + c2 * x + c3, with the group means of dL/dx_hat folded into c2 and c3.
            c2 = (db_g * mean - ds_g) * rstd ** 3 / m
            c3 = -c2 * mean - db_g * rstd / m
            grad_x = (grad * _per_channel((rstd.unsqueeze(-1) * gamma).flatten(1), c, x.ndim)
                      + x * _per_channel(c2, c, x.ndim) + _per_channel(c3, c, x.ndim))
        if ctx.needs_input_grad[2]:
            grad_weight = ((ds - db * mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).sum(0).reshape(c)
        if ctx.needs_input_grad[3]:
            grad_bias = db.sum(0).reshape(c)
        return grad_x, None, grad_weight, grad_bias, None, None


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5, channel_statistics: bool = False) -> Tensor:
    """F.group_norm's values and gradients, with the output (and what autograd saves) in x's layout; the
    statistics per group, or with `channel_statistics` from per-channel ones (channel_group_statistics)."""
    if x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {x.shape[1]} channels do not split into {num_groups} groups")
    return _GroupNorm.apply(x, num_groups, weight, bias, eps, channel_statistics)


def group_norm_act(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                   eps: float = 1e-5, scale: Tensor | None = None, shift: Tensor | None = None,
                   silu: bool = False) -> Tensor:
    """GroupNorm of a [N, C, H, W] x in float32, cast to x's dtype, then Nichol & Dhariwal's scale-shift norm
    h * (1 + scale) + shift ([N, C, 1, 1] each) and SiLU where asked: the ops written for torch.compile to
    make one kernel of, for networks run without autograd (sampling).

    The ops act on x's channels grouped as [N, H, W, G, C/G], the order of a channels_last x in memory, and
    return the [N, C, H, W] view of that. Inductor (torch 2.11) then computes each group's statistics and its
    output in one kernel, whose second pass reads the group again from cache. The [N, C, H, W] form of the
    same ops takes two kernels: the statistics, and an output kernel that reads x from memory again. The
    DDPM CIFAR-10 sampling graph moves 23% fewer bytes (offline, benchmarks/RESULTS.md). Torch 2.14's
    inductor turns this fusion down (its loop reordering now follows the statistics, which it cannot align)
    and writes the same two kernels for either form.
    - Whatever follows the norm has to be applied here, on the grouped view. An op on the returned view is
      a pointwise kernel over [N, C, H, W] again.
    - On an H100 (torch 2.11) it sampled 11% slower than two passes: the kernel reads each group's C/G
      channels, then jumps 2C bytes to the next pixel, twice, and ran at about 1.2 TB/s (benchmarks/RESULTS.md,
      GPU run 3). A form whose programs read whole pixels (all groups) would keep the saving; none is built.
    - Where one_kernel_sampling is on, GroupNorm32 takes this form for channels_last inputs only. In an NCHW
      network, inductor lays out some activations channels_last (its layout optimisation), how many
      depending on the net. Offline, with torch 2.11, this grouping moved 19% fewer bytes for the DDPM
      CIFAR-10 net in NCHW but 2% more for the tiny net, and NCHW-order grouping 35% more for the former.
    """
    if x.ndim != 4 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_act: x {tuple(x.shape)} is not [N, C, H, W] with C divisible by {num_groups}")
    c = x.shape[1]

    def grouped(t: Tensor) -> Tensor:
        return t.permute(0, 2, 3, 1).unflatten(3, (num_groups, -1))
    groups = grouped(x.float())
    var, mean = torch.var_mean(groups, dim=(1, 2, 4), correction=0, keepdim=True)
    # y = gamma * (x - mu) / sigma + beta (Wu & He eqs. 1 and 3) as x * a + b, as _GroupNorm and ATen compute it.
    a = torch.rsqrt(var + eps)
    if weight is not None:
        a = a * grouped(weight.view(1, c, 1, 1))
    b = -mean * a
    if bias is not None:
        b = b + grouped(bias.view(1, c, 1, 1))
    h = (groups * a + b).to(x.dtype)
    if scale is not None:
        h = h * (1 + grouped(scale)) + grouped(shift)
    return (F.silu(h) if silu else h).flatten(3).permute(0, 3, 1, 2)
