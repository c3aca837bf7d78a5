"""Build the network a DiffusionModule trains from a plain, checkpointable specification."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Optional, Union

from torch import nn

from ddpm_lightning.models import build_unet

NetSpec = Union[str, dict]


def build_network(spec: NetSpec, overrides: Optional[dict[str, Any]] = None, **data_args: Any) -> nn.Module:
    """A preset name ("ddpm_cifar10", "small", ...) or {"class_path": ..., "init_args": {...}}.

    data_args (image_size, in_channels, learn_sigma, num_classes) come from the data and the
    diffusion settings; `overrides` beats both. The spec stays plain data, so that
    save_hyperparameters records it and a checkpoint alone rebuilds the network.
    """
    overrides = dict(overrides or {})
    if isinstance(spec, str):
        return build_unet(spec, **{**data_args, **overrides})
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"net must be a preset name or a dict with 'class_path', got {spec!r}")
    module_name, _, class_name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"net class_path {spec['class_path']!r} cannot be imported") from None
    # A custom network gets only the data arguments its __init__ names.
    params = inspect.signature(cls).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    data_args = {k: v for k, v in data_args.items() if takes_any or k in params}
    return cls(**{**data_args, **dict(spec.get("init_args") or {}), **overrides})


class NetworkWrapper:
    """Base of the plain (non-nn.Module) wrappers around a network, which samplers treat like the network.

    Not an nn.Module, so that the wrapped weights appear once in a state_dict. Subclasses set `self.net`
    and define __call__; parameters, training and train/eval reach the wrapped network.
    """

    net: nn.Module

    def parameters(self):
        return self.net.parameters()

    @property
    def training(self) -> bool:
        return self.net.training

    def train(self, mode: bool = True):
        self.net.train(mode)
        return self

    def eval(self):
        return self.train(False)

