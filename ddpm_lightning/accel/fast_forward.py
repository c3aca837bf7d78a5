"""The network as sampling loops call it: optionally compiled, under autocast, replayed from CUDA graphs."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ddpm_lightning.accel.compile import CompiledCall
from ddpm_lightning.accel.held_weights import HeldWeights, holds
from ddpm_lightning.nets import NetworkWrapper

SAMPLE_PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The autocast dtype for a Lightning-style precision string ("32", "bf16-mixed", "16-mixed")."""
    if precision not in SAMPLE_PRECISIONS:
        raise ValueError(f"unknown sample_precision {precision!r}; valid: {', '.join(SAMPLE_PRECISIONS)}")
    return SAMPLE_PRECISIONS[precision]


class FastForward(NetworkWrapper):
    """Calls net(x, t[, y]) for sampling: 1,000 (or 100) calls on one batch shape per image batch.

    compile and cuda_graph apply on CUDA devices; elsewhere only the autocast precision does. compile_options
    are inductor's settings for that compilation (None: its defaults; accel/compile.py).

    Why graphs: a sampling step is a forward pass of a few hundred kernels on a fixed shape, and at
    small images the host cannot launch them as fast as the GPU runs them. Each (shape, dtype) is
    captured once, after two warm-up calls on a side stream, and replayed with the inputs copied in.
    Graphs are used only on CUDA, in eval mode and without autograd (sampling); anything else runs
    the network directly. The network's parameters are read in place, so EMA updates between
    sampling runs are seen by the replays. Outputs are float32 so the diffusion arithmetic stays in
    full precision whatever the network's autocast dtype.

    Under autocast, a project UNet runs as a copy whose convolution and linear layers hold their weights in
    the autocast dtype (held_weights.py), which saves each call casting them anew: the same values, 138 fewer
    kernels in a compiled DDPM CIFAR-10 forward. Those weights are copied in by `sync_weights()`, which
    DiffusionModule.eval_model calls each time it hands the network out, i.e. before each sampling batch;
    the rest of the parameters are the network's own, read in place.
    Other networks are called as they are, and autocast casts their weights at each call.

    A compiled network replays a smaller batch (the last one of an evaluation: 50,000 = 97 x 512 + 336)
    through the graph of a larger batch it has already captured, padded: a new shape would cost a fresh
    compilation, tens of seconds on a GPU, against one padded batch's extra arithmetic. The padding rows
    hold stale inputs and their outputs are dropped; no row affects another (GroupNorm and attention
    act per sample).
    """

    # Off: autocast casts a UNet's weights at every call, as before session 10 (the benchmarks' A/B).
    hold_weights = True

    def __init__(self, net: nn.Module, precision: str = "32", compile: bool = False,
                 compile_mode: Optional[str] = None, cuda_graph: bool = False,
                 compile_options: Optional[dict[str, Any]] = None):
        self.net = net
        self.dtype = autocast_dtype(precision)
        self.compile, self.compile_mode, self.compile_options = compile, compile_mode, compile_options
        held = self.hold_weights and self.dtype is not None and holds(net)
        self.held = HeldWeights(net, self.dtype) if held else None
        self.target = net if self.held is None else self.held.net  # the network the calls run
        self.call = self.target  # compiled at the first call on a CUDA device
        self.cuda_graph = cuda_graph
        self.graphs: dict[tuple, dict[str, Any]] = {}
        self.pool = None

    def sync_weights(self) -> None:
        """Brings the held copy's weights up to the network's (when there is a copy)."""
        if self.held is not None:
            self.held.sync()

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if self.held is not None:
            self.held.follow_mode()  # at each call: cheap, unlike the weights' sync
        if self.compile and self._on_cuda(x) and self.call is self.target:
            self.call = CompiledCall(self.target, self.compile_mode, self.compile_options)
        if not (self.cuda_graph and self._on_cuda(x) and not torch.is_grad_enabled() and not self.net.training):
            return self._run(x, t, y, capturing=False)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, None if y is None else (tuple(y.shape), y.dtype))
        entry = self.graphs.get(key)
        if entry is None and self.compile:
            entry = self._larger_batch(key)
        if entry is None:
            try:
                entry = self._capture(key, x, t, y)
            except RuntimeError as err:  # e.g. an op that syncs with the host: sample without graphs
                self.cuda_graph = False
                warnings.warn(f"cuda_graph: capturing the sampling network failed "
                              f"({str(err).splitlines()[0][:200]}); sampling continues without graphs")
                return self._run(x, t, y, capturing=False)
        n = x.shape[0]
        entry["x"][:n].copy_(x)
        entry["t"][:n].copy_(t)
        if y is not None:
            entry["y"][:n].copy_(y)
        entry["graph"].replay()
        # A copy: the caller may keep this output while the next replay overwrites the static one.
        return entry["out"][:n].clone()

    @staticmethod
    def _on_cuda(x: Tensor) -> bool:
        return x.is_cuda

    def _larger_batch(self, key: tuple) -> Optional[dict[str, Any]]:
        """The captured graph of the smallest larger batch of the same per-sample shapes and dtypes, if any."""
        def per_sample(k: tuple) -> tuple:
            (x_shape, x_dtype, t_shape, t_dtype, y_key) = k
            return x_shape[1:], x_dtype, t_shape[1:], t_dtype, None if y_key is None else (y_key[0][1:], y_key[1])

        larger = [k for k in self.graphs if per_sample(k) == per_sample(key) and k[0][0] > key[0][0]]
        return self.graphs[min(larger, key=lambda k: k[0][0])] if larger else None

    def _run(self, x: Tensor, t: Tensor, y: Optional[Tensor], capturing: bool) -> Tensor:
        if self.dtype is None:
            context = contextlib.nullcontext()
        else:
            # No weight-cast cache inside a capture: cached casts would outlive the graph's memory.
            context = torch.autocast(x.device.type, dtype=self.dtype, cache_enabled=not capturing)
        with context:
            out = self.call(x, t) if y is None else self.call(x, t, y)
        return out.float()

    def _capture(self, key: tuple, x: Tensor, t: Tensor, y: Optional[Tensor]) -> dict[str, Any]:
        entry: dict[str, Any] = {"x": x.clone(), "t": t.clone(), "y": None if y is None else y.clone()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compilation, cuDNN autotuning and workspace allocation happen here
                self._run(entry["x"], entry["t"], entry["y"], capturing=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            entry["out"] = self._run(entry["x"], entry["t"], entry["y"], capturing=True)
        # Graphs of one network share a memory pool: only one replays at a time.
        self.pool = graph.pool()
        entry["graph"] = graph
        self.graphs[key] = entry
        return entry
