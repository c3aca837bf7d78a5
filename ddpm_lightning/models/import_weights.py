"""Load released DDPM (Ho et al., 2020) and improved-DDPM (Nichol & Dhariwal, 2021) weights into the UNet."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import convert_diffusers, convert_iddpm
from .unet import UNet

KINDS = ("diffusers", "iddpm")
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _load_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(f"reading {path} needs the 'safetensors' package") from error
        return load_file(str(path), device="cpu")
    # weights_only: a checkpoint is data; refuse pickled code.
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return dict(state_dict)


def load_checkpoint(source: str | os.PathLike | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict | None]:
    """(state dict, diffusers config or None) from a state dict, a .pt/.bin/.safetensors file or a diffusers folder."""
    if isinstance(source, Mapping):
        return dict(source), None
    path = Path(source)
    if path.is_dir():
        # A whole pipeline folder keeps its UNet under unet/.
        if not (path / "config.json").exists() and (path / "unet" / "config.json").exists():
            path = path / "unet"
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is a folder without config.json, so not a diffusers model folder")
        config = json.loads((path / "config.json").read_text())
        for name in _DIFFUSERS_WEIGHTS:
            if (path / name).exists():
                return _load_file(path / name), config
        raise ValueError(f"{path} has none of {', '.join(_DIFFUSERS_WEIGHTS)}")
    if not path.exists():
        raise ValueError(f"no checkpoint at {path}")
    return _load_file(path), None


def _preview(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_strict(unet: UNet, mapped: Mapping[str, Tensor], unmapped: list[str]) -> None:
    """Copy mapped tensors into the UNet, or raise one ValueError naming every key that does not fit."""
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    mismatched = sorted(
        f"{key} {tuple(mapped[key].shape)} vs {tuple(expected[key].shape)}"
        for key in set(mapped) & set(expected)
        if mapped[key].shape != expected[key].shape
    )
    problems = [
        f"{label}: {_preview(keys)}"
        for label, keys in (
            ("unmapped checkpoint keys", sorted(unmapped)),
            ("mapped keys the UNet lacks", unexpected),
            ("UNet keys missing from the checkpoint", missing),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError("checkpoint does not fit the UNet; " + "; ".join(problems))
    unet.load_state_dict(dict(mapped), strict=True)


def import_weights(source: str | os.PathLike | Mapping[str, Tensor], kind: str, **overrides: Any) -> UNet:
    """Build the UNet for a DDPM (Ho et al.) or improved-DDPM (Nichol & Dhariwal) checkpoint and load it.

    kind="diffusers": a UNet2DModel folder, file or state dict (architecture from config.json, else
    from the tensors with DDPM's conventions). kind="iddpm": an openai/improved-diffusion state dict
    or file (architecture from the tensors; num_heads=4 and image_size by channel_mult unless given).
    overrides: UNet keyword arguments for what the checkpoint cannot tell (image_size, num_heads, dropout, ...).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    state_dict, config = load_checkpoint(source)
    if kind == "diffusers":
        unet = UNet(**convert_diffusers.unet_kwargs(config, state_dict, overrides))
        mapped, unmapped = convert_diffusers.convert_state_dict(state_dict, unet)
    else:
        if config is not None:
            raise ValueError("kind='iddpm' takes an improved-diffusion file or state dict, not a diffusers folder")
        unet = UNet(**convert_iddpm.unet_kwargs(state_dict, overrides))
        mapped, unmapped = convert_iddpm.convert_state_dict(state_dict, unet)
    load_strict(unet, mapped, unmapped)
    return unet


def from_hub(repo_id: str, subfolder: str | None = None, **overrides: Any) -> UNet:
    """Download a diffusers DDPM UNet (e.g. google/ddpm-cifar10-32, Ho et al.) and import it; needs internet."""
    from huggingface_hub import snapshot_download  # Imported here: only this explicit call touches the network.

    patterns = ["*.json", "*.safetensors", "*.bin"]
    folder = Path(
        snapshot_download(repo_id, allow_patterns=[f"{subfolder}/{p}" for p in patterns] if subfolder else patterns)
    )
    return import_weights(folder / subfolder if subfolder else folder, "diffusers", **overrides)
