"""Inductor's CUDA code for the UNet, generated on a machine without a GPU.

Inductor decides buffer layouts, fusions and extern-kernel calls before it compiles a single kernel, so
the code it would run on an H100 can be written out on a CPU: the tensors are fake CUDA tensors, an
H100's device properties stand in for the card's, and the step that compiles the Triton kernels (it
needs a driver) is never reached. `inductor_report.py` reads the result, as it reads the code
`--inductor_code` saves on a real GPU, so the two can be compared.

What differs from a GPU run, and why:
- The sampling forward is traced on fake CUDA tensors under CUDA autocast, as on a GPU.
- The training step cannot be: autograd's engine needs a CUDA device to run a backward on CUDA tensors.
  Its joint graph is traced on fake CPU tensors instead, with CUDA autocast's bf16 policy for the ops the
  UNet uses (CPU autocast has another op list), then each partitioned graph is moved to CUDA and lowered.
- The model takes the branches it takes under torch.compile (`torch.compiler.is_compiling()` answers True
  while tracing, as under dynamo), e.g. GroupNorm32's layout-keeping formula.
- ATen's composite ops that branch on the device would take the CPU branch in the training trace. The one
  the UNets call, aten.group_norm, is given its CUDA branch: it makes a CUDA input contiguous, where the
  CPU branch keeps channels_last. Without that, this trace missed the NCHW copies of the GPU's real code.
- Convolutions get cuDNN's layout rules (a GPU-less trace would take the slow kernel's), attention takes
  cuDNN's fused kernel (what torch 2.11 picks on an H100), and two passes that run kernels on the card
  are off: constant folding, and the padding of matmuls with unaligned sizes (the paper nets' are
  aligned).

These replace private torch functions (`unittest.mock`), so a new torch release may need this file
updated; `tests/test_benchmarks.py` says when.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (offline)", major=9, minor=0, multi_processor_count=132,
    max_threads_per_multi_processor=2048, regs_per_multiprocessor=65536, warp_size=32,
    total_memory=80 * 2**30, L2_cache_size=50 * 2**20, shared_memory_per_block_optin=232448,
    gcnArchName="", uuid="offline")


def _cudnn_attention(q, k, v, *args, **kwargs):
    """F.scaled_dot_product_attention as an H100 runs it (torch's backend choice needs the card)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, torch.is_grad_enabled())[0]


@contextlib.contextmanager
def _cudnn_rules() -> Iterator[None]:
    """Convolutions take cuDNN's memory-format rules and attention cuDNN's fused kernel while tracing."""
    with mock.patch.object(torch._C, "_select_conv_backend", lambda *a, **k: torch._C._ConvBackend.Cudnn), \
            mock.patch.object(F, "scaled_dot_product_attention", _cudnn_attention):
        yield


@contextlib.contextmanager
def _tracing_as_compiled() -> Iterator[None]:
    """The model's code sees what it sees under torch.compile: `torch.compiler.is_compiling()` is True."""
    with mock.patch("torch.compiler.is_compiling", lambda: True):
        yield


@contextlib.contextmanager
def _offline_h100(save: Callable[[str], None]) -> Iterator[None]:
    """Inductor lowers for an H100 and hands each wrapper to `save` before it would compile kernels."""
    import torch._inductor.config as config
    import torch._inductor.fx_passes.joint_graph as joint_graph
    import torch._inductor.fx_passes.post_grad as post_grad
    import torch.utils._triton as triton_utils
    from torch._inductor.graph import GraphLowering

    cuda = "torch.cuda."
    patches = [mock.patch(cuda + name, value, create=True) for name, value in {
        "is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
        "get_device_properties": lambda *a, **k: H100, "_get_device_properties": lambda *a, **k: H100,
        "get_device_capability": lambda *a, **k: (H100.major, H100.minor), "is_bf16_supported": lambda *a, **k: True,
        "get_device_name": lambda *a, **k: H100.name, "get_rng_state": lambda *a, **k: torch.zeros(16, dtype=torch.uint8),
        "set_rng_state": lambda *a, **k: None, "_lazy_init": lambda *a, **k: None, "_exchange_device": lambda *a, **k: 0,
        "_maybe_exchange_device": lambda *a, **k: 0, "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None}.items()]
    patches += [
        mock.patch("torch.utils._triton.triton_hash_with_backend", lambda *a, **k: "offline"),
        mock.patch("torch._subclasses.fake_tensor.init_gpu_context", lambda *a, **k: None),
        mock.patch.object(GraphLowering, "save_output_code", save),
        mock.patch.object(config, "compile_threads", 1),
        mock.patch.object(config, "joint_graph_constant_folding", False),
        mock.patch.object(config, "shape_padding", False),  # decided by timing matmuls on the card
        mock.patch.object(config, "benchmark_kernel", True),  # each kernel's bytes in its metadata
        mock.patch.object(config, "fx_graph_cache", False),  # a cached graph would skip the lowering
        mock.patch.object(torch._functorch.config, "enable_autograd_cache", False),
    ]
    # The passes' pattern tables are traced once per device, on real tensors: asked for CUDA, trace the CPU's
    # (the same patterns). Any other call stays as it was, so that a table built earlier in this process
    # is found in the cache and not registered twice.
    on_cpu = lambda v: torch.device("cpu") if isinstance(v, torch.device) and v.type == "cuda" else v  # noqa: E731
    for module in (joint_graph, post_grad):
        if hasattr(module, "lazy_init"):
            init = module.lazy_init
            patches.append(mock.patch.object(module, "lazy_init", lambda *a, _init=init, **k: _init(
                *map(on_cpu, a), **{key: on_cpu(v) for key, v in k.items()})))

    def forget_triton_probes() -> None:  # cached answers to "is there a GPU?", from before or during the patches
        for probe in (triton_utils.has_triton, getattr(triton_utils, "has_triton_package", None)):
            if hasattr(probe, "cache_clear"):
                probe.cache_clear()

    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        forget_triton_probes()
        yield
    forget_triton_probes()


def _lower(compile_graph: Callable[[], None], codes: list[str]) -> None:
    """Runs inductor up to the point where it would compile the kernels it has just written to `codes`."""
    written = len(codes)
    try:
        compile_graph()
    except Exception as err:  # the expected end: loading the module compiles Triton kernels for a real card
        if len(codes) == written:
            raise RuntimeError(f"inductor stopped before writing its code: {type(err).__name__}: {err}") from err


def _fake_like(mode, tensor: torch.Tensor, device: str) -> torch.Tensor:
    with mode:
        return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=device)


def sampling_forward_code(net: nn.Module, batch_size: int, channels_last: bool, held_weights: bool = True) -> list[str]:
    """The wrapper code of the compiled sampling forward (eval mode, bf16 autocast, no autograd), of the network
    FastForward runs: with its convolution and linear weights held in bf16 (accel/held_weights.py), or, with
    `held_weights=False`, cast by autocast at each call."""
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from ddpm_lightning.accel.held_weights import HeldWeights

    net = net.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if held_weights:
        net = HeldWeights(net, torch.bfloat16).net
    names = [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    state = [_fake_like(mode, t.detach(), "cuda") for t in (*net.parameters(), *net.buffers())]
    c, size = net.config["in_channels"], net.config["image_size"]
    x = torch.empty(batch_size, c, size, size)
    x = _fake_like(mode, x.contiguous(memory_format=torch.channels_last) if channels_last else x, "cuda")
    t = _fake_like(mode, torch.empty(batch_size), "cuda")

    def forward(state, x, t):
        # CUDA autocast's state set directly: torch.autocast("cuda") asks the driver whether bf16 works.
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.set_autocast_enabled("cuda", True)
        torch.autocast_increment_nesting()
        try:
            out = torch.func.functional_call(net, dict(zip(names, state)), (x, t))
        finally:
            torch.autocast_decrement_nesting()
            torch.set_autocast_enabled("cuda", False)
            torch.clear_autocast_cache()
        return out.float()

    with _cudnn_rules(), _tracing_as_compiled(), torch.no_grad():
        graph = make_fx(forward, tracing_mode="fake", _allow_non_fake_inputs=True)(state, x, t)
    codes: list[str] = []
    with _cudnn_rules(), _offline_h100(codes.append), mode:
        _lower(lambda: compile_fx(graph, [*state, x, t]), codes)
    return codes


# CUDA autocast's policy for the ops the UNets call (torch/amp and aten/src/ATen/autocast_mode.cpp).
_AUTOCAST_BF16 = {F.conv2d, F.linear, torch.matmul, torch.bmm, torch.addmm, torch.mm, _cudnn_attention}
_AUTOCAST_FP32 = {F.group_norm, F.layer_norm, F.softmax, F.log_softmax, F.mse_loss}


class _CudaOnCpu(torch.overrides.TorchFunctionMode):
    """What CUDA does differently, applied to CPU tensors: autocast's casts (the bf16 ops get bf16 inputs, the
    fp32 ops fp32), and aten.group_norm's CUDA branch, which makes its input contiguous (NCHW) where the CPU
    branch keeps channels_last (aten/src/ATen/native/group_norm.cpp)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in _AUTOCAST_BF16 else torch.float32 if func in _AUTOCAST_FP32 else None
        if dtype is not None:
            cast = lambda a: a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
            args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
        if func is F.group_norm:
            args = (args[0].contiguous(), *args[1:])
        return func(*args, **kwargs)


def training_step_code(net: nn.Module, batch_size: int, channels_last: bool,
                       grad_layouts: list | None = None, inductor_options: dict | None = None,
                       held_weights: bool = True) -> list[str]:
    """The wrapper code of the compiled training forward and backward (train mode, bf16 autocast, MSE), of the
    network TrainStep runs: with its convolution and linear weights held in bf16 as the forward's leaves
    (accel/held_weights.py; the casts in and out are TrainStep's multi-tensor copies, outside these graphs),
    or, with `held_weights=False`, cast by autocast in the forward and their gradients cast back.

    `grad_layouts`, a list, receives (name, weight strides, gradient strides) for each weight whose
    gradient the backward graph returns in other strides (inductor keeps a graph output's traced
    strides); autograd would copy each such gradient into its weight's layout every step.
    `inductor_options` default to those `ddpm fit` compiles the training network with
    (TRAINING_INDUCTOR_OPTIONS); {} gives inductor's own defaults."""
    from ddpm_lightning.accel.compile import TRAINING_INDUCTOR_OPTIONS
    from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition
    from torch._inductor.compile_fx import compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.fx_passes.replace_random import replace_random_passes
    from torch._inductor.virtualized import V
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    from ddpm_lightning.accel.held_weights import HeldWeights

    net = net.train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if held_weights:
        net = HeldWeights(net, torch.bfloat16, trainable=True).net
    names = [n for n, _ in net.named_parameters()]
    buffers = dict(net.named_buffers())
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    params = [mode.from_tensor(p.detach()).requires_grad_(True) for p in net.parameters()]
    c, size = net.config["in_channels"], net.config["image_size"]
    x = torch.empty(batch_size, c, size, size)
    x = mode.from_tensor(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    t = mode.from_tensor(torch.empty(batch_size))
    noise = mode.from_tensor(torch.empty_like(x))
    graphs: dict[str, tuple] = {}

    def keep(kind: str):
        def compiler(graph, example_inputs):
            graphs[kind] = (graph, example_inputs)
            return make_boxed_func(graph.forward)
        return compiler

    def loss(params, x, t, noise):
        with _CudaOnCpu():
            out = torch.func.functional_call(net, {**dict(zip(names, params)), **buffers}, (x, t))
        return F.mse_loss(out.float()[:, :c], noise)  # a learned-variance net also outputs its v

    step = aot_function(loss, fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                        partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    with _cudnn_rules(), _tracing_as_compiled(), mode:
        step(params, x, t, noise).backward()

    cuda = torch.device("cuda", 0)
    retarget = lambda v: cuda if isinstance(v, torch.device) and v.type == "cpu" else (  # noqa: E731
        type(v)(retarget(a) for a in v) if isinstance(v, (list, tuple)) else v)
    codes: list[str] = []
    options = TRAINING_INDUCTOR_OPTIONS if inductor_options is None else inductor_options
    with _cudnn_rules(), _offline_h100(codes.append), torch._inductor.config.patch(options):
        for kind in ("forward", "backward"):
            graph, inputs = graphs[kind]
            for node in graph.graph.nodes:
                node.args = retarget(node.args)
                node.kwargs = {k: retarget(v) for k, v in node.kwargs.items()}
            graph.recompile()
            cuda_mode = FakeTensorMode(allow_non_fake_inputs=True)
            cuda_inputs = [_fake_like(cuda_mode, i, "cuda") if isinstance(i, torch.Tensor) else i for i in inputs]
            outputs = FakeTensorProp(graph, cuda_mode).propagate(*cuda_inputs)
            if kind == "backward" and grad_layouts is not None:
                grad_layouts += [(name, tuple(p.stride()), tuple(g.stride())) for name, p, g in zip(names, params, outputs)
                                 if g is not None and tuple(g.stride()) != tuple(p.stride())]
            with cuda_mode, V.set_fake_mode(cuda_mode):
                replace_random_passes(graph)  # dropout's random numbers, as inductor's own pipeline does
                _lower(lambda: compile_fx_inner(graph, cuda_inputs, is_backward=kind == "backward"), codes)
    return codes
