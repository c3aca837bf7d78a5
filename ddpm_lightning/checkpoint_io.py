"""Loading a DiffusionModule from a checkpoint alone, with errors that name the file."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch


def load_module(ckpt_path: str, map_location: str | torch.device = "cpu"):
    """Rebuild the DiffusionModule (network, diffusion, EMA) saved in ckpt_path by `ddpm fit`."""
    from ddpm_lightning.module import DiffusionModule

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} does not exist")
    try:
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {ckpt_path} is truncated or not a ddpm-lightning checkpoint "
                         f"({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"checkpoint {ckpt_path} has no state_dict/hyper_parameters: not written by `ddpm fit`")
    # LightningCLI adds bookkeeping keys (e.g. _instantiator) next to the real arguments.
    accepted = inspect.signature(DiffusionModule.__init__).parameters
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    module = DiffusionModule(**hparams)
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3]) or "none"
        unexpected = ", ".join(result.unexpected_keys[:3]) or "none"
        raise ValueError(f"checkpoint {ckpt_path} does not match the network its hyperparameters describe "
                         f"(missing: {missing}; unexpected: {unexpected})")
    module.on_load_checkpoint(checkpoint)
    return module
