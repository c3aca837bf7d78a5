"""Map diffusers UNet2DModel checkpoints of the DDPM architecture (Ho et al., 2020) onto the UNet."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .unet import UNet

# UNet2DModel.__init__ defaults, applied to keys a config.json omits.
_DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True, mid_block_type="UNetMidBlock2D",
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None,
)  # fmt: skip

# Settings the UNet reproduces only at these values.
_REQUIRED: dict[str, Any] = dict(
    center_input_sample=False, time_embedding_type="positional", mid_block_type="UNetMidBlock2D",
    mid_block_scale_factor=1, downsample_type="conv", upsample_type="conv", act_fn="silu", add_attention=True,
    class_embed_type=None,
)  # fmt: skip

# improved-diffusion's script_util picks channel_mult from image_size; its inverse recovers the size
# for the released DDPM / ADM checkpoints when a caller gives none.
IMAGE_SIZE_BY_MULT: dict[tuple[int, ...], int] = {
    (1, 2, 2, 2): 32, (1, 2, 3, 4): 64, (1, 1, 2, 3, 4): 128, (1, 1, 2, 2, 4, 4): 256,
}  # fmt: skip

_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "emb_proj", "norm2": "norm2",
                 "conv2": "conv2", "conv_shortcut": "skip"}  # fmt: skip
# Current diffusers names, then the pre-0.14 names that google/ddpm-* checkpoints still use.
_ATTENTION_NAMES = {"group_norm": "norm", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_QKV_PART = {"to_q": 0, "to_k": 1, "to_v": 2, "query": 0, "key": 1, "value": 2}

_TOP_LEVEL = {
    "conv_in": "conv_in",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "class_embedding": "label_embed",
    "conv_norm_out": "norm_out",
    "conv_out": "conv_out",
}
_BLOCK_KEY = re.compile(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
_MID_KEY = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def default_image_size(channel_mult: tuple[int, ...]) -> int:
    """The image size that goes with channel_mult in the released checkpoints (Nichol & Dhariwal, 2021)."""
    if channel_mult in IMAGE_SIZE_BY_MULT:
        return IMAGE_SIZE_BY_MULT[channel_mult]
    raise ValueError(f"cannot infer image_size for channel_mult {channel_mult}; pass image_size=...")


def _config_from_tensors(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """Recover a UNet2DModel config from tensor names and shapes, with DDPM's conventions (Ho et al.)."""
    if "conv_in.weight" not in state_dict or "conv_out.weight" not in state_dict:
        raise ValueError("not a diffusers UNet2DModel state dict: conv_in.weight / conv_out.weight missing")
    levels = sorted({int(m.group(2)) for key in state_dict if (m := _BLOCK_KEY.match(key)) and m.group(1) == "down"})
    attention_levels = {level for level in levels if f"down_blocks.{level}.attentions.0.to_q.weight" in state_dict
                        or f"down_blocks.{level}.attentions.0.query.weight" in state_dict}  # fmt: skip
    first_resnets = {key.split(".")[3] for key in state_dict if key.startswith("down_blocks.0.resnets.")}
    emb_width = state_dict["down_blocks.0.resnets.0.time_emb_proj.weight"].shape[0]
    width0 = state_dict["down_blocks.0.resnets.0.conv1.weight"].shape[0]
    down = ["AttnDownBlock2D" if level in attention_levels else "DownBlock2D" for level in levels]
    return dict(
        in_channels=state_dict["conv_in.weight"].shape[1],
        out_channels=state_dict["conv_out.weight"].shape[0],
        block_out_channels=[state_dict[f"down_blocks.{level}.resnets.0.conv1.weight"].shape[0] for level in levels],
        layers_per_block=len(first_resnets),
        down_block_types=down,
        up_block_types=[name.replace("Down", "Up") for name in reversed(down)],
        num_class_embeds=state_dict["class_embedding.weight"].shape[0]
        if "class_embedding.weight" in state_dict
        else None,
        resnet_time_scale_shift="scale_shift" if emb_width == 2 * width0 else "default",
        attn_norm_num_groups=32,
        # Not stored in tensors: DDPM's values, as google/ddpm-* configs set them.
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        norm_eps=1e-6,
        attention_head_dim=None,
    )


def unet_kwargs(config: Mapping[str, Any] | None, state_dict: Mapping[str, Tensor],
                overrides: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """UNet keyword arguments equivalent to a diffusers UNet2DModel config (or its tensors), plus overrides."""
    cfg = {**_DIFFUSERS_DEFAULTS, **(config if config is not None else _config_from_tensors(state_dict))}
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"kind='diffusers' expects a UNet2DModel, got {cfg['_class_name']}")
    for name, value in _REQUIRED.items():
        if cfg[name] != value:
            raise ValueError(f"unsupported diffusers setting {name}={cfg[name]!r} (the UNet needs {value!r})")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if (
        any(kind not in ("DownBlock2D", "AttnDownBlock2D") for kind in down)
        or [kind.replace("Up", "Down") for kind in reversed(up)] != down
    ):
        raise ValueError(f"unsupported block types {down} / {up}: need mirrored (Attn)DownBlock2D/(Attn)UpBlock2D")
    widths = list(cfg["block_out_channels"])
    base = widths[0]
    if any(width % base for width in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of {base}")
    if cfg["time_embedding_dim"] not in (None, 4 * base):
        raise ValueError(f"unsupported time_embedding_dim {cfg['time_embedding_dim']} (the UNet uses {4 * base})")
    scale_shift = cfg["resnet_time_scale_shift"]
    if scale_shift not in ("default", "scale_shift"):
        raise ValueError(f"unsupported resnet_time_scale_shift {scale_shift!r}")
    if scale_shift == "scale_shift" and cfg["attn_norm_num_groups"] is None:
        # diffusers then builds the middle attention without a GroupNorm, which ADM never does.
        raise ValueError("resnet_time_scale_shift='scale_shift' needs attn_norm_num_groups (mid attention norm)")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        raise ValueError("attn_norm_num_groups must equal norm_num_groups")
    if cfg["downsample_padding"] not in (0, 1):
        raise ValueError(f"unsupported downsample_padding {cfg['downsample_padding']}")
    learn_sigma = cfg["out_channels"] == 2 * cfg["in_channels"]
    if not learn_sigma and cfg["out_channels"] != cfg["in_channels"]:
        raise ValueError(f"out_channels {cfg['out_channels']} must be in_channels {cfg['in_channels']} or twice it")
    channel_mult = tuple(width // base for width in widths)
    sample_size = cfg["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise ValueError(f"only square images are supported, sample_size={sample_size}")
        sample_size = sample_size[0]
    image_size = int(overrides.get("image_size") or sample_size or default_image_size(channel_mult))
    kwargs = dict(
        in_channels=cfg["in_channels"], base_channels=base, channel_mult=channel_mult,
        num_res_blocks=cfg["layers_per_block"], image_size=image_size, dropout=cfg["dropout"],
        attention_resolutions=tuple(image_size // 2**lv for lv, kind in enumerate(down) if kind.startswith("Attn")),
        num_heads=1, num_head_channels=cfg["attention_head_dim"], use_scale_shift_norm=scale_shift == "scale_shift",
        learn_sigma=learn_sigma, num_classes=cfg["num_class_embeds"], flip_sin_to_cos=cfg["flip_sin_to_cos"],
        freq_shift=cfg["freq_shift"],
        downsample_padding="asymmetric" if cfg["downsample_padding"] == 0 else "symmetric",
        norm_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"],
    )  # fmt: skip
    return {**kwargs, **overrides}


def _rename_inside(block: str, rest: str) -> tuple[str, int | None] | None:
    """(new name, qkv part or None) for a tensor inside a resnet / attention / resampler, or None."""
    table = _RESNET_NAMES if block == "resnets" else _ATTENTION_NAMES
    if block in ("downsamplers", "upsamplers"):
        return (rest, None) if rest.startswith("conv.") else None
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :], None
    if block == "attentions":
        for old, part in _QKV_PART.items():
            if rest.startswith(old + "."):
                return "qkv" + rest[len(old) :], part
    return None


def convert_state_dict(state_dict: Mapping[str, Tensor], unet: UNet) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a UNet2DModel state dict to the UNet's names; returns (mapped, unmapped source keys)."""
    per_level = unet.config["num_res_blocks"] + 1
    mapped: dict[str, Tensor] = {}
    qkv_parts: dict[str, dict[int, tuple[str, Tensor]]] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        target: str | None = None
        part: int | None = None
        top = next((old for old in _TOP_LEVEL if key.startswith(old + ".")), None)
        if top is not None:
            target = _TOP_LEVEL[top] + key[len(top) :]
        elif match := _BLOCK_KEY.match(key):
            side, level, block, index, rest = match.groups()
            position = int(level) * per_level + (per_level - 1 if block.endswith("samplers") else int(index))
            blocks = unet.down_blocks if side == "down" else unet.up_blocks
            if position < len(blocks) and (renamed := _rename_inside(block, rest)):
                # Resamplers close their level's last block, after any attention.
                slot = {"resnets": 0, "attentions": 1}.get(block, len(blocks[position]) - 1)
                target, part = f"{side}_blocks.{position}.{slot}.{renamed[0]}", renamed[1]
        elif match := _MID_KEY.match(key):
            block, index, rest = match.groups()
            if renamed := _rename_inside(block, rest):
                slot = 1 if block == "attentions" else 2 * int(index)
                target, part = f"mid_block.{slot}.{renamed[0]}", renamed[1]
        if target is None:
            unmapped.append(key)
        elif part is None:
            mapped[target] = tensor
        else:
            qkv_parts.setdefault(target, {})[part] = (key, tensor)
    for target, parts in qkv_parts.items():
        if len(parts) != 3:
            absent = "/".join("qkv"[index] for index in range(3) if index not in parts)
            unmapped.extend(f"{key} (no {absent} to fuse into {target})" for key, _ in parts.values())
            continue
        # Separate q, k, v projections stack into the fused [q | k | v] rows the UNet uses.
        mapped[target] = torch.cat([parts[index][1] for index in range(3)], dim=0)
    return mapped, unmapped
