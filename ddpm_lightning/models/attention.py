"""Spatial self-attention block of Ho et al. (2020), multi-head as in Nichol & Dhariwal (2021)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .layers import GroupNorm32, zero_module


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all pixels (Ho et al., 2020; Nichol & Dhariwal, 2021).

    The fused ``qkv`` projection stores its 3C output rows as [q | k | v], each split into
    ``num_heads`` contiguous blocks of C / num_heads rows. improved-diffusion's legacy per-head
    [q_h, k_h, v_h] order is converted on import (see ``convert_iddpm``).
    """

    def __init__(self, channels: int, num_heads: int = 1, norm_groups: int = 32, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = GroupNorm32(norm_groups, channels, eps=norm_eps)
        # One matmul for q, k and v instead of three: fewer kernel launches and one read of the input.
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        head_dim = channels // self.num_heads
        # [N, C, H, W] -> [NHW, C] tokens: a free view when x is channels_last. Flat, so that the projection
        # is one matrix product even where a compiler lays the normalised x out NCHW (inductor's sampling
        # graph does, and a 3-D input then became a batched product with a broadcast weight).
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        qkv = self.qkv(tokens).view(batch, height * width, 3, self.num_heads, head_dim)
        # [3, N, heads, HW, head_dim] with unit stride on head_dim, the layout SDPA kernels want.
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # Default scale 1/sqrt(head_dim) equals improved-diffusion's q*s, k*s with s = head_dim**-0.25.
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj_out(out.transpose(1, 2).reshape(batch, height * width, channels))
        return x + out.view(batch, height, width, channels).permute(0, 3, 1, 2)
