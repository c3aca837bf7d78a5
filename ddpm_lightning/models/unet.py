"""One configurable UNet for DDPM (Ho et al., 2020) and improved DDPM / ADM (Nichol & Dhariwal, 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionBlock
from .embedding import timestep_embedding
from .grad_layout import keep_grad_layout
from .layers import DOWNSAMPLE_PADDINGS, Downsample, EmbedSequential, GroupNorm32, ResBlock, Upsample, zero_module


def _check_config(
    image_size: int,
    channel_mult: Sequence[int],
    attention_resolutions: Sequence[int],
    base_channels: int,
    norm_groups: int,
    downsample_padding: str,
) -> None:
    """Reject configurations the UNet of Ho et al. / Nichol & Dhariwal cannot build, with one-line errors."""
    if not channel_mult:
        raise ValueError("channel_mult must name at least one resolution level")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size {image_size} is not divisible by 2**(len(channel_mult)-1) = {factor} "
            f"(channel_mult {tuple(channel_mult)})"
        )
    levels = [image_size // 2**level for level in range(len(channel_mult))]
    unused = sorted(set(attention_resolutions) - set(levels))
    if unused:
        raise ValueError(
            f"attention_resolutions {unused} never occur for image_size {image_size}; the resolutions are {levels}"
        )
    widths = [base_channels * mult for mult in channel_mult]
    if any(width % norm_groups for width in widths):
        raise ValueError(f"channel widths {widths} are not all divisible by norm_groups {norm_groups}")
    if downsample_padding not in DOWNSAMPLE_PADDINGS:
        raise ValueError(f"downsample_padding {downsample_padding!r} is not one of {DOWNSAMPLE_PADDINGS}")


class UNet(nn.Module):
    """The DDPM UNet of Ho et al. (2020) and the improved UNet of Nichol & Dhariwal (2021), one class.

    ``forward(x, t, y=None)`` takes x [N, C, H, W], t [N] (int or float, embedded as given: the
    caller rescales) and class labels y [N] when ``num_classes`` is set.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        image_size: int = 32,
        dropout: float = 0.0,
        num_heads: int = 1,
        num_head_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        learn_sigma: bool = False,
        num_classes: int | None = None,
        resblock_updown: bool = False,
        use_checkpoint: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: float = 0.0,
        downsample_padding: str = "symmetric",
        norm_groups: int = 32,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        channel_mult = tuple(int(mult) for mult in channel_mult)
        attention_resolutions = tuple(int(res) for res in attention_resolutions)
        _check_config(image_size, channel_mult, attention_resolutions, base_channels, norm_groups, downsample_padding)
        # Everything needed to rebuild the network, e.g. for checkpoints or a matched diffusers model.
        self.config = dict(
            in_channels=in_channels, base_channels=base_channels, channel_mult=channel_mult,
            num_res_blocks=num_res_blocks, attention_resolutions=attention_resolutions, image_size=image_size,
            dropout=dropout, num_heads=num_heads, num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm, learn_sigma=learn_sigma, num_classes=num_classes,
            resblock_updown=resblock_updown, use_checkpoint=use_checkpoint, flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift, downsample_padding=downsample_padding, norm_groups=norm_groups, norm_eps=norm_eps,
        )  # fmt: skip
        self.in_channels = in_channels
        # learn_sigma: the second half of the output parameterises Sigma (Nichol & Dhariwal eq. 15).
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.image_size = image_size
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.base_channels = base_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.use_checkpoint = use_checkpoint

        emb_channels = 4 * base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.label_embed = nn.Embedding(num_classes, emb_channels) if num_classes is not None else None

        def res_block(cin: int, cout: int, resample: str = "none") -> ResBlock:
            return ResBlock(cin, cout, emb_channels, dropout, use_scale_shift_norm, resample, norm_groups, norm_eps)

        def attention(channels: int) -> AttentionBlock:
            if num_head_channels and channels % num_head_channels:
                raise ValueError(
                    f"attention: {channels} channels are not a multiple of num_head_channels {num_head_channels}"
                )
            heads = channels // num_head_channels if num_head_channels else num_heads
            return AttentionBlock(channels, heads, norm_groups, norm_eps)

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        # Layout mirrors improved-diffusion's input_blocks/output_blocks: every down block emits one
        # skip connection and every up block consumes one, so checkpoints map index for index.
        self.down_blocks = nn.ModuleList()
        skip_channels = [base_channels]
        channels, resolution = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(channels, base_channels * mult)]
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    layers.append(attention(channels))
                self.down_blocks.append(EmbedSequential(*layers))
                skip_channels.append(channels)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(channels, channels, "down")
                    if resblock_updown
                    else Downsample(channels, downsample_padding)
                )
                self.down_blocks.append(EmbedSequential(down))
                skip_channels.append(channels)
                resolution //= 2

        self.mid_block = EmbedSequential(
            res_block(channels, channels), attention(channels), res_block(channels, channels)
        )

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                layers = [res_block(channels + skip_channels.pop(), base_channels * mult)]
                channels = base_channels * mult
                if resolution in attention_resolutions:
                    layers.append(attention(channels))
                if level and index == num_res_blocks:
                    layers.append(res_block(channels, channels, "up") if resblock_updown else Upsample(channels))
                    resolution *= 2
                self.up_blocks.append(EmbedSequential(*layers))

        self.norm_out = GroupNorm32(norm_groups, channels, eps=norm_eps)
        self.conv_out = zero_module(nn.Conv2d(channels, self.out_channels, 3, padding=1))

    def _run(self, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            # Recompute activations in backward: memory for compute (Chen et al., 2016), as ADM does.
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Predict eps (and the Sigma interpolation when learn_sigma) for x [N, C, H, W] at t [N]."""
        if (y is None) != (self.num_classes is None):
            raise ValueError(
                f"y must be given if and only if the UNet is class-conditional (num_classes={self.num_classes})"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = timestep_embedding(t, self.base_channels, self.flip_sin_to_cos, self.freq_shift)
        emb = self.time_embed(temb.to(self.time_embed[0].weight.dtype))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.mid_block, h, emb)
        for block in self.up_blocks:
            # Each input's gradient is a channel slice of the concatenation's; cuDNN would copy it.
            h = self._run(block, torch.cat([keep_grad_layout(h), keep_grad_layout(skips.pop())], dim=1), emb)
        # A learned-variance loss reads a channel slice of the output; inductor (torch 2.11) writes the slice's
        # gradient into a new NCHW buffer, which cuDNN would copy back.
        return keep_grad_layout(self.conv_out(self.norm_out(h, silu=True)))
