"""A DiffusionModule around released weights: DDPM (Ho et al. 2020, diffusers layout) and improved DDPM
(Nichol & Dhariwal 2021, openai/improved-diffusion .pt files), so they can be sampled and evaluated untrained.

A weights file holds the network only; the diffusion it was trained under is not in it. RELEASE_DEFAULTS
are the releases' own settings (google/ddpm-cifar10-32: linear, T = 1000, fixed_large; improved-diffusion's
CIFAR-10 and ImageNet-64 models: cosine, T = 4000, learned_range when the network predicts variances);
anything else must be stated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Optional, Union

from torch import Tensor

from ddpm_lightning.models import import_weights
from ddpm_lightning.module import DiffusionModule

RELEASE_DEFAULTS: dict[str, dict[str, Any]] = {
    "diffusers": {"schedule": "linear", "num_timesteps": 1000},
    "iddpm": {"schedule": "cosine", "num_timesteps": 4000},
}
LEARNED_VARIANCES = ("learned", "learned_range")


def module_from_pretrained(
    source: Union[str, os.PathLike, Mapping[str, Tensor]], kind: str, schedule: Optional[str] = None,
    num_timesteps: Optional[int] = None, var_type: Optional[str] = None, mean_type: str = "epsilon",
    **unet_overrides: Any,
) -> DiffusionModule:
    """A DiffusionModule whose network and EMA copy both hold the imported weights (kind: diffusers | iddpm).

    schedule, num_timesteps: default to the release's (RELEASE_DEFAULTS). var_type: defaults to
    learned_range for a network with variance outputs, else fixed_large. unet_overrides: what the file
    cannot tell, e.g. image_size for an improved-diffusion network of an unusual shape.
    """
    net = import_weights(source, kind, **unet_overrides)  # validates kind, and the file against the UNet
    defaults = RELEASE_DEFAULTS[kind]
    var_type = var_type or ("learned_range" if net.learn_sigma else "fixed_large")
    if (var_type in LEARNED_VARIANCES) != net.learn_sigma:
        has = "predicts" if net.learn_sigma else "does not predict"
        valid = ", ".join(LEARNED_VARIANCES) if net.learn_sigma else "fixed_large, fixed_small"
        name = "the given state dict" if isinstance(source, Mapping) else str(source)
        raise ValueError(f"var_type {var_type!r} does not fit {name}: its network {has} variances; valid: {valid}")
    config = dict(net.config)
    module = DiffusionModule(
        # A plain spec, so that the module's hyperparameters rebuild this exact network.
        net={"class_path": "ddpm_lightning.models.UNet", "init_args": config},
        image_size=config["image_size"], in_channels=config["in_channels"], num_classes=net.num_classes,
        class_cond=net.num_classes is not None, num_timesteps=num_timesteps or defaults["num_timesteps"],
        schedule=schedule or defaults["schedule"], var_type=var_type, mean_type=mean_type,
    )
    weights = net.state_dict()
    # Released weights are already the EMA weights; sampling reads ema.averages[0] by default.
    module.net.load_state_dict(weights)
    module.ema.averages[0].load_state_dict(weights)
    return module.eval()
