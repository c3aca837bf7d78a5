"""UNet building blocks shared by DDPM (Ho et al., 2020) and ADM (Nichol & Dhariwal, 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grad_layout import keep_grad_layout, memory_format
from .group_norm import group_norm, group_norm_act

DOWNSAMPLE_PADDINGS = ("symmetric", "asymmetric")
RESAMPLE_MODES = ("none", "up", "down")


def upsample_nearest(x: Tensor) -> Tensor:
    """Nearest-neighbour x2 upsampling (Ho et al., 2020), whose compiled backward keeps x's layout."""
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and x.requires_grad:
        # Each pixel broadcast to a 2x2 block, so that the backward is a sum over each block. Inductor
        # lowers F.interpolate's backward to a scatter-add instead: atomics from a channels_last gradient
        # into an NCHW float32 buffer, 398 us of an H100 training step at 32x32 (benchmarks/RESULTS.md).
        # Without a backward, F.interpolate's gather fuses better (sampling moves 0.8% fewer bytes).
        n, c, h, w = x.shape
        blocks = keep_grad_layout(x)[:, :, :, None, :, None].expand(n, c, h, 2, w, 2)
        # A reshape of a broadcast is NCHW; autograd saves the output for the convolution after it.
        return blocks.reshape(n, c, 2 * h, 2 * w).contiguous(memory_format=memory_format(x))
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, the output-layer initialisation of Ho et al. and Nichol & Dhariwal."""
    # Zeroed output layers make every residual branch start as the identity, which both
    # reference implementations rely on for stable early training.
    for parameter in module.parameters():
        parameter.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32, as improved-diffusion's GroupNorm32 (Nichol & Dhariwal), then the
    scale-shift norm h * (1 + scale) + shift of Nichol & Dhariwal and SiLU where asked."""

    # On, sampling a channels_last network under torch.compile takes group_norm_act (the benchmarks'
    # +one-kernel-gn A/B). Off by default: on an H100 (torch 2.11) it moved 23% fewer bytes but sampled 11%
    # slower (22,584 against 25,463 forward img/s), its kernels reading each group's few channels at a
    # 2C-byte stride (benchmarks/RESULTS.md, GPU run 3).
    one_kernel_sampling = False
    # On, the compiled GroupNorm of a channels_last x takes each group's statistics from per-channel ones
    # (group_norm.py, channel_group_statistics), in training and sampling: offline (torch 2.11), 8-10% fewer
    # bytes for the paper nets' sampling and 16% for DDPM CIFAR-10's training forward, reading whole pixels.
    # In NCHW a group is contiguous already. Off until a GPU has timed it (the benchmarks' +channel-stats).
    channel_statistics = False
    # Only for activations of this many pixels or more: at 4x4 a channel's row is too short to pay for the
    # small kernels that combine the channels. Offline, DDPM CIFAR-10 sampling at batch 512: 181 launches and
    # 16.17 GB with its 4x4 GroupNorms per channel, 170 and 16.15 GB without (8x8 kept: 163, 16.23 GB).
    channel_statistics_min_pixels = 64

    def forward(self, x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None,
                silu: bool = False) -> Tensor:
        if (self.one_kernel_sampling and torch.compiler.is_compiling() and not torch.is_grad_enabled()
                and x.is_contiguous(memory_format=torch.channels_last)):
            # The norm and what follows it as one kernel (see group_norm_act).
            return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift, silu)
        h = self.normalize(x)
        if scale is not None:
            h = h * (1 + scale) + shift
        return F.silu(h) if silu else h

    def normalize(self, x: Tensor) -> Tensor:
        """The GroupNorm alone, in float32, cast back to x's dtype."""
        # Statistics in bf16/fp16 lose precision; upcasting is a no-op for float32 inputs.
        if torch.compiler.is_compiling():
            # ATen's group_norm would put an NCHW copy of each channels_last activation into the compiled
            # graph (see group_norm.py); eager keeps ATen's fused kernel.
            per_channel = (self.channel_statistics and x.is_contiguous(memory_format=torch.channels_last)
                           and math.prod(x.shape[2:]) >= self.channel_statistics_min_pixels)
            return group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps, per_channel).to(x.dtype)
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)


class EmbedBlock(nn.Module):
    """Marker for layers whose forward takes the timestep embedding (Ho et al., 2020)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface only
        raise NotImplementedError


class EmbedSequential(nn.Sequential):
    """Sequential that passes the timestep embedding to the layers that take it (Ho et al., 2020)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, EmbedBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 convolution, the downsampling of Ho et al. (2020) and Nichol & Dhariwal (2021)."""

    def __init__(self, channels: int, padding: str = "symmetric") -> None:
        super().__init__()
        if padding not in DOWNSAMPLE_PADDINGS:
            raise ValueError(f"downsample padding {padding!r} is not one of {DOWNSAMPLE_PADDINGS}")
        # DDPM's TensorFlow 'SAME' padding pads only bottom/right for even sizes (diffusers keeps it
        # as downsample_padding=0); improved-diffusion pads 1 on every side.
        self.pad_bottom_right = padding == "asymmetric"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.pad_bottom_right else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_bottom_right:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (Ho et al., 2020)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest(x))


class ResBlock(EmbedBlock):
    """Residual block with timestep conditioning, Ho et al. (2020); scale-shift norm and
    BigGAN-style resampling from Nichol & Dhariwal (2021) / Dhariwal & Nichol (2021)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        resample: str = "none",
        norm_groups: int = 32,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if resample not in RESAMPLE_MODES:
            raise ValueError(f"resample {resample!r} is not one of {RESAMPLE_MODES}")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resample = resample
        self.norm1 = GroupNorm32(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # Scale-shift norm needs a scale and a shift per channel, hence twice the width.
        self.emb_proj = nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm else 1))
        self.norm2 = GroupNorm32(norm_groups, out_channels, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        # BigGAN-style blocks resample without weights; the convolutions that follow learn the rest.
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2)
        if self.resample == "up":
            return upsample_nearest(x)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.norm1(x, silu=True)
        if self.resample != "none":
            # Resample after the activation, as guided-diffusion does, so both paths agree in size.
            h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        emb_out = self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            # Nichol & Dhariwal: norm(h) * (1 + scale) + shift, an adaptive GroupNorm.
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.norm2(h, scale, shift, silu=True)
        else:
            h = self.norm2(h + emb_out, silu=True)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h
