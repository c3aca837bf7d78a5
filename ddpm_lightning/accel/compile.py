"""torch.compile of a network in place, falling back to block-by-block compilation when the whole fails."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn

from ddpm_lightning.nets import NetworkWrapper

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Inductor's settings for the training network (sampling keeps inductor's defaults). Inductor writes out a
# computation that two kernels use and that reads more than `realize_reads_threshold` buffers (default 4),
# instead of recomputing it in each. The backward recomputes GroupNorm's output from its input, mean, 1/std,
# weight and bias (5 reads) for SiLU's gradient, in both of GroupNorm's backward kernels (the reductions and
# the input gradient); at 4 it goes through an fp32 buffer, written and read back. At 6 each kernel recomputes
# it: offline (benchmarks/RESULTS.md, H100 code, torch 2.11, channels_last) the DDPM CIFAR-10 backward at batch
# 128 moves 7.95 GB instead of 11.91, ImageNet-64's at batch 32 12.95 instead of 16.13. The sampling forward
# gains nothing from it (17.78 to 18.0 GB at batch 512).
TRAINING_INDUCTOR_OPTIONS: dict[str, Any] = {"realize_reads_threshold": 6}

# What `compile_tuning` adds: inductor's coordinate-descent tuning, which times each generated Triton kernel at
# its first launch with neighbouring block sizes and warp counts and keeps the fastest (max-autotune's kernel
# tuning, without its GEMM templates). GPU run 4 (benchmarks/RESULTS.md, H100, torch 2.11): DDPM CIFAR-10
# sampling at batch 512 went from 25,652 to 28,221 forward img/s (+10%): a forward's GPU time fell from 19.6 to
# 17.8 ms, all of it in the Triton kernels. The tuning took about two minutes once (read from the run's file
# times), which inductor caches on the machine. Off by default: a 50,000-sample, 100-step evaluation on a fresh
# machine loses more to the tuning than it gains. Not yet timed for training.
TUNING_INDUCTOR_OPTIONS: dict[str, Any] = {"coordinate_descent_tuning": True}


def inductor_options(base: Optional[dict[str, Any]], tuning: bool) -> Optional[dict[str, Any]]:
    """`base` (None: inductor's defaults) with TUNING_INDUCTOR_OPTIONS added when `tuning`."""
    return {**(base or {}), **TUNING_INDUCTOR_OPTIONS} if tuning else base


def check_compile_mode(mode: Optional[str]) -> None:
    if mode not in COMPILE_MODES:
        valid = ", ".join(str(m) for m in COMPILE_MODES)
        raise ValueError(f"unknown compile_mode {mode!r}; valid: {valid}")


def check_compile_tuning(compile: bool, tuning: bool) -> None:
    if tuning and not compile:
        raise ValueError("compile_tuning=True tunes the compiled network's kernels; set compile=True too")


def compile_kwargs(mode: Optional[str], options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """torch.compile's mode and inductor options as keyword arguments. torch.compile takes one or the other,
    so options fold the mode's own settings in (what torch.compile does with a mode)."""
    mode = None if mode == "default" else mode
    if not options:
        return {"mode": mode, "dynamic": False}
    from torch._inductor import list_mode_options

    mode_options = list_mode_options(mode, dynamic=False) if mode else {}
    return {"options": {**mode_options, **options}, "dynamic": False}


def compile_blocks(net: nn.Module, mode: Optional[str] = None, options: Optional[dict[str, Any]] = None) -> int:
    """Compile each residual and attention block of `net` in place; returns how many were compiled."""
    from ddpm_lightning.models.attention import AttentionBlock
    from ddpm_lightning.models.layers import ResBlock

    blocks = [m for m in net.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    for block in blocks:
        block.compile(**compile_kwargs(mode, options))
    return len(blocks)


class CompiledCall(NetworkWrapper):
    """Calls `net` compiled as one graph; if its first compiled call fails, compiles block by block.

    `nn.Module.compile` works in place, so parameter names (state_dict keys, EMA copies, checkpoints)
    stay those of the plain network. Compilation is lazy: a failure (an unsupported op, a backend
    without a compiler) surfaces at the first call, which is therefore the one guarded. Shapes are
    static (`dynamic=False`): training batches and sampling batches have fixed sizes, and dynamic
    kernels are slower. `options` are inductor's settings (torch.compile's `options`), e.g.
    TRAINING_INDUCTOR_OPTIONS. A network that is already compiled keeps that compilation and its settings:
    sampling from the training network (use_ema_for_eval=False) must not recompile the graph the training
    step runs, with other settings.
    """

    def __init__(self, net: nn.Module, mode: Optional[str] = None, options: Optional[dict[str, Any]] = None):
        check_compile_mode(mode)
        self.net = net
        self.mode, self.options = mode, options
        self.whole = True
        if getattr(net, "_compiled_call_impl", None) is None:
            net.compile(**compile_kwargs(mode, options))
        self._checked = False

    def __call__(self, *args: Any, **kwargs: Any):
        if self._checked:
            return self.net(*args, **kwargs)
        try:
            out = self.net(*args, **kwargs)
        except Exception as err:  # torch._dynamo / inductor errors have no common base class
            # Undo the whole-network compilation, then compile the pieces that usually do compile.
            self.net._compiled_call_impl = None
            count = compile_blocks(self.net, self.mode, self.options)
            self.whole = False
            warnings.warn(f"torch.compile of the whole network failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); compiled its {count} blocks instead")
            out = self.net(*args, **kwargs)
        self._checked = True
        return out
