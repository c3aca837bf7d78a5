"""Loading a DiffusionModule from a checkpoint alone, with errors that name the file."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch


def load_module(ckpt_path: str, map_location: str | torch.device = "cpu", use_ema: bool = True):
    """Rebuild the DiffusionModule (network, diffusion, EMA) saved in ckpt_path by `ddpm fit`.

    use_ema=False accepts a checkpoint without EMA weights (e.g. converted from another codebase); its EMA
    copies then hold the trained weights.
    """
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
    _load_weights(module, checkpoint["state_dict"], ckpt_path, use_ema)
    module.on_load_checkpoint(checkpoint)
    return module


def _load_weights(module, saved: dict[str, torch.Tensor], ckpt_path: str, use_ema: bool) -> None:
    """load_state_dict, with one line that says how the checkpoint differs from the network it describes."""
    expected = module.state_dict()
    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    reshaped = [name for name in expected if name in saved and saved[name].shape != expected[name].shape]
    no_ema = bool(missing) and all(name.startswith("ema.") for name in missing) and not (unexpected or reshaped)
    if no_ema and use_ema:
        raise ValueError(f"checkpoint {ckpt_path} has no EMA weights (no ema.* entries); "
                         "use its trained weights with --no_ema")
    if (missing or unexpected or reshaped) and not no_ema:
        problems = [f"{len(reshaped)} weights of other shapes ({_shapes(reshaped, saved, expected)})"] if reshaped else []
        problems += [f"{len(names)} {kind} ({_some(names)})" for kind, names in
                     (("missing", missing), ("unexpected", unexpected)) if names]
        raise ValueError(f"checkpoint {ckpt_path} holds another network than its hyperparameters describe "
                         f"(net={module.hparams.net!r}): " + "; ".join(problems))
    # strict=False only ever skips the EMA entries here (the checks above let nothing else through).
    module.load_state_dict(saved, strict=False)
    if no_ema:
        for average in module.ema.averages:
            average.load_state_dict(module.net.state_dict())


def _some(names: list[str], shown: int = 2) -> str:
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _shapes(names: list[str], saved: dict, expected: dict, shown: int = 2) -> str:
    described = [f"{name} {list(saved[name].shape)} in the file, {list(expected[name].shape)} here" for name in names]
    return _some(described, shown)
