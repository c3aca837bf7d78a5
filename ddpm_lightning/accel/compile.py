"""torch.compile of a network in place, falling back to block-by-block compilation when the whole fails."""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import nn

from ddpm_lightning.nets import NetworkWrapper

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: Optional[str]) -> None:
    if mode not in COMPILE_MODES:
        valid = ", ".join(str(m) for m in COMPILE_MODES)
        raise ValueError(f"unknown compile_mode {mode!r}; valid: {valid}")


def compile_blocks(net: nn.Module, mode: Optional[str] = None) -> int:
    """Compile each residual and attention block of `net` in place; returns how many were compiled."""
    from ddpm_lightning.models.attention import AttentionBlock
    from ddpm_lightning.models.layers import ResBlock

    blocks = [m for m in net.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    return len(blocks)


class CompiledCall(NetworkWrapper):
    """Calls `net` compiled as one graph; if its first compiled call fails, compiles block by block.

    `nn.Module.compile` works in place, so parameter names (state_dict keys, EMA copies, checkpoints)
    stay those of the plain network. Compilation is lazy: a failure (an unsupported op, a backend
    without a compiler) surfaces at the first call, which is therefore the one guarded. Shapes are
    static (`dynamic=False`): training batches and sampling batches have fixed sizes, and dynamic
    kernels are slower.
    """

    def __init__(self, net: nn.Module, mode: Optional[str] = None):
        check_compile_mode(mode)
        self.net = net
        self.mode = None if mode == "default" else mode
        self.whole = True
        net.compile(mode=self.mode, dynamic=False)
        self._checked = False

    def __call__(self, *args: Any, **kwargs: Any):
        if self._checked:
            return self.net(*args, **kwargs)
        try:
            out = self.net(*args, **kwargs)
        except Exception as err:  # torch._dynamo / inductor errors have no common base class
            # Undo the whole-network compilation, then compile the pieces that usually do compile.
            self.net._compiled_call_impl = None
            count = compile_blocks(self.net, self.mode)
            self.whole = False
            warnings.warn(f"torch.compile of the whole network failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); compiled its {count} blocks instead")
            out = self.net(*args, **kwargs)
        self._checked = True
        return out
