"""Map openai/improved-diffusion checkpoints (Nichol & Dhariwal, 2021) onto the UNet."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .convert_diffusers import default_image_size
from .presets import ADM_CONVENTIONS
from .unet import UNet

_TOP_LEVEL = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embed.0", "time_embed.2": "time_embed.2",
              "label_emb": "label_embed", "out.0": "norm_out", "out.2": "conv_out"}  # fmt: skip
# ResBlock, AttentionBlock, Downsample (op) and Upsample (conv) sub-layers.
_INNER_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "emb_proj", "out_layers.0": "norm2",
                "out_layers.3": "conv2", "skip_connection": "skip", "norm": "norm", "qkv": "qkv",
                "proj_out": "proj_out", "op": "conv", "conv": "conv"}  # fmt: skip
_BLOCK_KEY = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?(\d+)\.(.+)$")
_TARGET_LIST = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks"}


def _indices(state_dict: Mapping[str, Tensor], prefix: str) -> list[int]:
    return sorted({int(key.split(".")[1]) for key in state_dict if key.startswith(prefix + ".")})


def _is_upsampler(state_dict: Mapping[str, Tensor], block: int) -> bool:
    # An output block that ends its level holds an Upsample conv, or (resblock_updown) a second ResBlock.
    prefix = f"output_blocks.{block}."
    return any(re.match(rf"{re.escape(prefix)}[1-9]\d*\.(conv|in_layers\.0)\.weight$", key) for key in state_dict)


def unet_kwargs(state_dict: Mapping[str, Tensor], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """UNet keyword arguments read off an improved-diffusion state dict (Nichol & Dhariwal), plus overrides."""
    if "input_blocks.0.0.weight" not in state_dict or "out.2.weight" not in state_dict:
        raise ValueError("not an improved-diffusion state dict: input_blocks.0.0.weight / out.2.weight missing")
    base, in_channels = state_dict["input_blocks.0.0.weight"].shape[:2]
    out_channels = state_dict["out.2.weight"].shape[0]
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out channels {out_channels} must be in_channels {in_channels} or twice it")
    outputs, inputs = _indices(state_dict, "output_blocks"), _indices(state_dict, "input_blocks")
    # Level boundaries show only in the output path: the first upsampling block closes the lowest level.
    first_up = next((block for block in outputs if _is_upsampler(state_dict, block)), len(outputs) - 1)
    num_res_blocks = first_up
    num_levels = len(outputs) // (num_res_blocks + 1)
    if len(outputs) != num_levels * (num_res_blocks + 1) or len(inputs) != num_levels * (num_res_blocks + 1):
        raise ValueError(
            f"cannot read the level structure: {len(inputs)} input and {len(outputs)} output blocks "
            f"for {num_levels} levels of {num_res_blocks} res blocks"
        )
    first_blocks = [1 + level * (num_res_blocks + 1) for level in range(num_levels)]
    widths = [state_dict[f"input_blocks.{block}.0.in_layers.2.weight"].shape[0] for block in first_blocks]
    if any(width % base for width in widths):
        raise ValueError(f"level widths {widths} are not multiples of the base width {base}")
    channel_mult = tuple(width // base for width in widths)
    attention_levels = [
        lv for lv, block in enumerate(first_blocks) if f"input_blocks.{block}.1.qkv.weight" in state_dict
    ]
    emb_out = state_dict["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    image_size = int(overrides.get("image_size") or default_image_size(channel_mult))
    kwargs = dict(
        ADM_CONVENTIONS, in_channels=in_channels, base_channels=base, channel_mult=channel_mult,
        num_res_blocks=num_res_blocks, image_size=image_size,
        attention_resolutions=tuple(image_size // 2**level for level in attention_levels),
        # Not stored in tensors; every improved-diffusion release uses 4 heads.
        num_heads=4, use_scale_shift_norm=emb_out == 2 * widths[0], learn_sigma=out_channels == 2 * in_channels,
        num_classes=state_dict["label_emb.weight"].shape[0] if "label_emb.weight" in state_dict else None,
        resblock_updown=f"input_blocks.{first_blocks[0] + num_res_blocks}.0.op.weight" not in state_dict
        and num_levels > 1,
    )  # fmt: skip
    return {**kwargs, **overrides}


def _legacy_qkv_to_fused(tensor: Tensor, num_heads: int) -> Tensor:
    """Reorder qkv rows from improved-diffusion's per-head [q_h, k_h, v_h] to [q | k | v] (Nichol & Dhariwal)."""
    # QKVAttention reshapes (N, 3C, T) to (N*heads, 3C/heads, T) and then splits q, k, v, so
    # row r belongs to head r // (3C/heads); conv1d weights also carry a trailing kernel dim of 1.
    rows = tensor.shape[0]
    grouped = tensor.reshape(num_heads, 3, rows // (3 * num_heads), *tensor.shape[1:2])
    return grouped.transpose(0, 1).reshape(rows, *tensor.shape[1:2])


def convert_state_dict(state_dict: Mapping[str, Tensor], unet: UNet) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an improved-diffusion state dict to the UNet's names; returns (mapped, unmapped source keys)."""
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        target: str | None = None
        top = next((old for old in _TOP_LEVEL if key.startswith(old + ".")), None)
        if top is not None:
            target = _TOP_LEVEL[top] + key[len(top) :]
        elif match := _BLOCK_KEY.match(key):
            blocks, block, layer, rest = match.groups()
            inner = next((old for old in _INNER_NAMES if rest.startswith(old + ".")), None)
            if inner is not None and (blocks == "middle_block") == (block is None):
                # improved-diffusion's input_blocks[0] is the stem conv, so down blocks start at 1.
                index = "" if block is None else f"{int(block) - (blocks == 'input_blocks')}."
                target = f"{_TARGET_LIST[blocks]}.{index}{layer}.{_INNER_NAMES[inner]}{rest[len(inner) :]}"
        if target is None:
            unmapped.append(key)
            continue
        if target.split(".")[-2] in ("qkv", "proj_out") and tensor.ndim == 3:
            tensor = tensor[..., 0]  # Conv1d(kernel 1) weights become Linear weights.
        if target.split(".")[-2] == "qkv":
            try:
                attention = unet.get_submodule(target.rsplit(".", 2)[0])
            except AttributeError:
                unmapped.append(key)
                continue
            tensor = _legacy_qkv_to_fused(tensor, attention.num_heads)
        mapped[target] = tensor
    return mapped, unmapped
