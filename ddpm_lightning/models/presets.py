"""Named UNet configurations: DDPM (Ho et al., 2020), improved DDPM (Nichol & Dhariwal, 2021), test sizes."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from .unet import UNet

# Conventions that differ between the two families but carry no parameters. DDPM's follow the
# original TensorFlow code as diffusers' converted checkpoints keep it: [sin, cos] embedding with
# exponent / (half - 1), bottom/right-only 'SAME' padding before a stride-2 conv, GroupNorm eps 1e-6.
DDPM_CONVENTIONS: dict[str, Any] = dict(
    flip_sin_to_cos=False, freq_shift=1, downsample_padding="asymmetric", norm_eps=1e-6, num_heads=1
)
# improved-diffusion: [cos, sin] embedding with exponent / half, symmetric padding, PyTorch eps.
ADM_CONVENTIONS: dict[str, Any] = dict(
    flip_sin_to_cos=True, freq_shift=0, downsample_padding="symmetric", norm_eps=1e-5
)

_IDDPM_CIFAR10: dict[str, Any] = dict(
    **ADM_CONVENTIONS, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3,
    attention_resolutions=(16, 8), num_heads=4, use_scale_shift_norm=True, learn_sigma=True, dropout=0.3,
    image_size=32,
)  # fmt: skip

PRESETS: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType({
    # Ho et al. (2020) CIFAR-10 model, 35.7M parameters, same as diffusers' google/ddpm-cifar10-32.
    "ddpm_cifar10": MappingProxyType(dict(
        **DDPM_CONVENTIONS, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(16,), dropout=0.1, image_size=32,
    )),
    # Nichol & Dhariwal (2021) CIFAR-10 model (cifar10_uncond_50M_500K.pt architecture).
    "iddpm_cifar10": MappingProxyType(_IDDPM_CIFAR10),
    # Nichol & Dhariwal (2021) ImageNet 64x64 model (imagenet64_uncond_100M_1500K.pt architecture).
    "iddpm_imagenet64": MappingProxyType(dict(_IDDPM_CIFAR10, channel_mult=(1, 2, 3, 4), dropout=0.0, image_size=64)),
    # Unit-test size: ADM features (heads, scale-shift norm) in well under 1M parameters.
    "tiny": MappingProxyType(dict(
        **ADM_CONVENTIONS, in_channels=3, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), num_heads=2, use_scale_shift_norm=True, dropout=0.0, image_size=16,
    )),
    # CPU quickstart: 16x16 single-channel digits in minutes on two cores. Base 32 rather than 64
    # gives ~3x the optimiser steps in the same time, which matters more for a few-minute run.
    "small": MappingProxyType(dict(
        **ADM_CONVENTIONS, in_channels=1, base_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
        attention_resolutions=(8,), num_heads=4, use_scale_shift_norm=True, dropout=0.0, image_size=16,
    )),
})  # fmt: skip


def build_unet(preset: str, **overrides: Any) -> UNet:
    """Build the UNet of a named preset (Ho et al., 2020; Nichol & Dhariwal, 2021), with keyword overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; valid presets: {', '.join(sorted(PRESETS))}")
    config = {**PRESETS[preset], **overrides}
    try:
        return UNet(**config)
    except ValueError as error:
        raise ValueError(f"preset {preset!r}: {error}") from None
