"""Weights whose gradients arrive in another memory layout than their own, and giving them that layout.

Why: autograd's AccumulateGrad stores each gradient in its weight's layout (its "layout contract"). When
the backward writes a gradient with other strides (a compiled backward may, for channels_last
convolution weights), every step pays one strided copy per such weight. On the H100 the captured
DDPM step spent 13% of its GPU time in 76 strided copies whose count fits this (benchmarks/RESULTS.md).
Giving the weight, its optimizer state and its EMA copies the gradient's strides removes such a copy
and changes no value.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn


class GradLayoutProbe:
    """Records the strides each parameter's gradient arrives with, before AccumulateGrad copies it."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]]):
        self.params = dict(named_params)
        self.grad_strides: dict[str, tuple[int, ...]] = {}
        self.hooks = [p.register_hook(lambda grad, name=name: self._record(name, grad))
                      for name, p in self.params.items()]

    def _record(self, name: str, grad: Tensor) -> None:
        self.grad_strides[name] = tuple(grad.stride())  # the latest backward's

    def mismatches(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, gradient strides) of each parameter whose gradient arrived with other strides."""
        return [(name, stride) for name, stride in self.grad_strides.items()
                if stride != self.params[name].stride()]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def restride_(tensor: Tensor, stride: Sequence[int]) -> None:
    """Give `tensor` (a parameter or a state tensor) the strides `stride`, keeping its values and identity."""
    new = torch.empty_strided(tensor.shape, tuple(stride), dtype=tensor.dtype, device=tensor.device)
    new.copy_(tensor.detach())
    tensor.data = new


def adopt_grad_layouts(mismatches: Sequence[tuple[str, tuple[int, ...]]], net: nn.Module,
                       optimizer: torch.optim.Optimizer, copies: Sequence[nn.Module] = ()) -> None:
    """Give each named weight of `net` its gradient's strides, with its optimizer state and its copies
    in `copies` (EMA networks of the same structure), so that elementwise updates stay contiguous."""
    strides = dict(mismatches)
    for model in (net, *copies):
        for name, param in model.named_parameters():
            if name in strides:
                restride_(param, strides[name])
    for name, param in net.named_parameters():
        if name in strides:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    restride_(value, strides[name])
