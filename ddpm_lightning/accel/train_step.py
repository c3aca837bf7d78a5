"""One training step as one CUDA graph: forward, loss, backward, clipping, AdamW and the EMA update.

Why: at batch 128 the DDPM CIFAR-10 net is launch-bound on a modern GPU. A step is over a thousand
kernels (forward, backward, optimizer, EMA), and the host cannot issue them as fast as the GPU runs
them. Replaying a captured graph issues them all with one call. This is PyTorch's whole-network
capture (torch.cuda.graph): warm up a few real steps on a side stream, capture one step into static
buffers, then copy each batch into those buffers and replay.

The step computes what DiffusionModule's automatic-optimization step computes, in the same order
(t from the timestep sampler, noise and dropout drawn inside the step, clipping by global norm as
Lightning clips, AdamW, then EMA of the post-step weights). Without CUDA it runs eagerly, which is
how tests/test_accel.py checks it against the Lightning path bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ddpm_lightning.module import DiffusionModule


class TrainStep:
    """Runs DiffusionModule training steps, captured as a CUDA graph when `capture` is True.

    Args:
        module: the DiffusionModule (its net, model wrapper, diffusion, EMA and grad_clip are used).
        optimizer: the plain torch optimizer over module.net's parameters.
        capture: capture and replay a CUDA graph (needs CUDA); False runs the same step eagerly.
        warmup_steps: real steps run eagerly on a side stream before the capture, so that lazy
            initialisation (cuBLAS/cuDNN handles, compilation, optimizer state) happens outside it.
        hold_weights: under autocast, run the forward on a copy of a project UNet whose convolution and linear
            weights are held in the autocast dtype (HeldWeights), cast in and their gradients cast out with a
            few multi-tensor copies a step instead of one cast per weight and use. Off under DDP, whose
            gradient hooks sit on the float32 parameters.
    """

    # Off: autocast casts each weight and gradient, as before session 10 (the benchmarks' A/B).
    hold_weights = True

    def __init__(self, module: "DiffusionModule", optimizer: torch.optim.Optimizer, capture: bool,
                 warmup_steps: int = 3, hold_weights: bool = True):
        self.module = module
        self.optimizer = optimizer
        self.capture = capture
        self.warmup_steps = warmup_steps
        # Clipped in the order Lightning clips: the optimizer's parameters, group by group.
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.held, self.model = self._held_model(hold_weights and self.hold_weights)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.key: Optional[tuple] = None
        self.static: dict[str, Optional[Tensor]] = {}
        self.outputs: dict[str, Tensor] = {}
        self.eager_calls = 0
        self.ema_weights: Optional[Tensor] = None
        if capture:
            self._make_capturable()

    def _make_capturable(self) -> None:
        # A captured step reads the learning rate and the EMA weights from device memory, so that
        # the schedule and the EMA warmup still move between replays (a Python float would be
        # frozen into the graph). Done here, after any checkpoint restored plain floats.
        device = self.params[0].device
        self._plain_groups = [(group["lr"], group["capturable"]) for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], Tensor):
                group["lr"] = torch.tensor(float(group["lr"]), device=device)
            group["capturable"] = True
        if self.module.ema.warmup:
            self.ema_weights = torch.zeros(len(self.module.ema.decays), device=device)

    def __call__(self, x_start: Tensor, y: Optional[Tensor], t: Tensor, weights: Tensor, ema_updates: int) -> dict[str, Tensor]:
        """One optimizer step on (x_start, y) at timesteps t with importance weights; returns the losses.

        The returned tensors are the graph's static outputs: read them before the next call.
        """
        if self.ema_weights is not None:
            for i, decay in enumerate(self.module.ema.decays):
                self.ema_weights[i].fill_(1.0 - self.module.ema.decay_at(decay, ema_updates))
        if not self.capture:
            self._zero_grad()
            return self._body(x_start, y, t, weights, ema_updates)
        key = (tuple(x_start.shape), x_start.dtype, None if y is None else tuple(y.shape))
        if self.graph is not None and key == self.key:
            self._load_static(x_start, y, t, weights)
            self.graph.replay()
            return self.outputs
        if self.eager_calls < self.warmup_steps or self.graph is not None:
            # Warm-up, or a batch of another shape (a short last batch): a real step, eagerly.
            self.eager_calls += 1
            return self._eager_on_side_stream(x_start, y, t, weights, ema_updates)
        try:
            self._capture(x_start, y, t, weights, ema_updates, key)
        except RuntimeError as err:
            # Something in this configuration cannot be captured (a host sync, say). A capture only records,
            # so nothing of this step has run yet: train on, uncaptured, rather than stop a run.
            self.graph, self.capture = None, False
            for group, (lr, capturable) in zip(self.optimizer.param_groups, self._plain_groups):
                group["lr"], group["capturable"] = float(group["lr"]) if not isinstance(lr, Tensor) else lr, capturable
            warnings.warn(f"cuda_graph: capturing the training step failed ({str(err).splitlines()[0][:200]}); "
                          "training continues without a graph")
            self._zero_grad()
            return self._body(x_start, y, t, weights, ema_updates)
        self.graph.replay()  # capturing only records: this replay runs the step for this batch
        return self.outputs

    # ----------------------------------------------------------------- internals
    def _held_model(self, hold: bool):
        """(HeldWeights, the model the step runs on its copy), or (None, module.model)."""
        from ddpm_lightning.accel.compile import CompiledCall
        from ddpm_lightning.accel.held_weights import HeldWeights, holds

        module, device = self.module, self.params[0].device.type
        if not (hold and torch.is_autocast_enabled(device) and holds(module.net)):
            return None, module.model
        held = HeldWeights(module.net, torch.get_autocast_dtype(device), trainable=True)
        model = copy.copy(module.model)  # the timestep rescaling, around the copy
        model.net = held.net
        if isinstance(module.model.net, CompiledCall):  # compiled as on_fit_start compiled module.net
            model.net = CompiledCall(held.net, module.hparams.compile_mode, module.training_inductor_options())
        return held, model

    def _body(self, x_start: Tensor, y: Optional[Tensor], t: Tensor, weights: Tensor, ema_updates: int) -> dict[str, Tensor]:
        module, held = self.module, self.held
        if held is not None:
            held.sync()  # this step's weights, cast: one multi-tensor copy (and the network's train/eval mode)
        with self._autocast():
            losses = module.diffusion.training_losses(self.model, x_start, t, model_kwargs=module._model_kwargs(y))
            loss = (losses["loss"] * weights).mean()
        if self.capture:
            loss.backward()
        else:
            module.manual_backward(loss)  # under DDP, Lightning prepares the gradient all-reduce here
        if held is not None:
            held.copy_grads()
        if module.hparams.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, module.hparams.grad_clip)
        self.optimizer.step()
        if self.ema_weights is not None:
            module.ema.update_with_weights(module.net, self.ema_weights)
        else:
            module.ema.update(module.net, ema_updates)
        return {"total": loss.detach(), **{name: value.detach() for name, value in losses.items()}}

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.held is not None:
            self.held.zero_grad()

    def _autocast(self):
        # Inside a captured graph autocast must not cache casted weights across the capture
        # (PyTorch's CUDA graphs notes); the dtype is whatever the trainer's precision set.
        device = self.params[0].device.type
        if self.capture and torch.is_autocast_enabled(device):
            return torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)
        return contextlib.nullcontext()

    def _eager_on_side_stream(self, x_start, y, t, weights, ema_updates) -> dict[str, Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._zero_grad()
            out = self._body(x_start, y, t, weights, ema_updates)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _load_static(self, x_start, y, t, weights) -> None:
        self.static["x_start"].copy_(x_start)
        self.static["t"].copy_(t)
        self.static["weights"].copy_(weights)
        if y is not None:
            self.static["y"].copy_(y)

    def _capture(self, x_start, y, t, weights, ema_updates, key) -> None:
        self.static = {"x_start": x_start.clone(), "y": None if y is None else y.clone(),
                       "t": t.clone(), "weights": weights.clone()}
        # Gradients allocated inside the capture live in the graph's pool; every replay's backward
        # then writes them afresh, so no zero_grad is needed between replays.
        self._zero_grad()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            s = self.static
            self.outputs = self._body(s["x_start"], s["y"], s["t"], s["weights"], ema_updates)
        self.key = key
