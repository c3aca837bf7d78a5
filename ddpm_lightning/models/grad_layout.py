"""Gradients in their tensor's memory layout, for compiled channels_last UNets.

cuDNN's convolution backward copies a gradient that is not dense in the layout it runs in: once if it is
dense in the other layout, twice if it is not dense at all (aten/src/ATen/native/cudnn/ConvShared.cpp).
Three places in the UNet get such gradients under torch.compile: a concatenation gives each input a channel
slice of its own gradient, F.interpolate's nearest-upsampling backward is written NCHW (which
layers.upsample_nearest now avoids), and a learned-variance loss's channel slice of the output has its
gradient written NCHW with torch 2.11. Inductor's offline code for an H100 (benchmarks/RESULTS.md) showed 6 such
copies per DDPM CIFAR-10 training step with torch 2.11 and 26 with 2.14. Asking for the gradient in the
tensor's layout costs at most one Triton copy, and none where inductor can write the buffer in that layout in
the first place.
"""

from __future__ import annotations

import torch
from torch import Tensor


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor laid out so (and not also contiguous), else contiguous_format."""
    channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class _KeepGradLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.layout = memory_format(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=ctx.layout)


def keep_grad_layout(x: Tensor) -> Tensor:
    """x itself; under torch.compile, its gradient comes back dense in x's layout."""
    return _KeepGradLayout.apply(x) if torch.compiler.is_compiling() else x
