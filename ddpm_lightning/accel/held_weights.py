"""A network's convolution and linear weights held in the autocast dtype, for sampling and the captured step.

Under autocast every call casts each convolution and linear layer's weight and bias to the autocast dtype
anew, and sampling calls the same weights 100 to 1,000 times per image. In the compiled DDPM CIFAR-10
sampling forward (batch 512, bf16, channels_last; inductor's code for an H100, torch 2.11, offline) those
casts are 138 of the 222 Triton launches and 0.22 of the 13.68 GB moved (benchmarks/RESULTS.md). A copy of
the network whose layers already hold the cast weights computes the same values without them: autocast's
cast of a weight already in its dtype is the weight itself, and the cast is the same rounding either way.

Training casts too, forward and back: the compiled DDPM CIFAR-10 step (batch 128, same code) casts each weight
to bf16 in its forward and each bf16 gradient back to float32 in its backward. TrainStep holds the copy's weights
as the leaves the forward reads (`trainable=True`), so each step casts all of them at once, in a few multi-tensor
copies: the weights in before the forward (`sync`), the gradients out after the backward (`copy_grads`). On an
H100 (torch 2.11, GPU run 3) the forward's Triton launches fell from 366 to 164 and the backward's from 482 to
394, and the step ran 2.1% faster; sampling, 1.4%. The values are eager
autocast's: the same bf16 weights, and the same bf16 gradients, cast up (tests/test_accel.py pins the step to
Lightning's bit for bit under bf16-mixed on the CPU).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# The layers whose parameters autocast casts (torch.amp's lower-precision ops: convolutions, linear layers).
HELD_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def holds(net: nn.Module) -> bool:
    """Whether `net`'s weights may be held: the project's UNet, whose convolution and linear weights are read
    only by their layers. A custom network may read them elsewhere, where autocast would not have cast them."""
    from ddpm_lightning.models.unet import UNet

    return isinstance(net, UNet)


class HeldWeights:
    """`self.net`: a copy of `net` whose convolution and linear layers hold their parameters in `dtype`.

    Everything else is `net`'s own, shared rather than copied (the GroupNorms' float32 weights, buffers), so
    only the held parameters can fall behind `net`'s: `sync()` copies their current values in, in place, so
    that CUDA graphs captured on the copy stay valid. The copy follows `net`'s device and train/eval mode at
    each sync. With `trainable`, the held parameters take gradients, which `copy_grads()` casts into `net`'s.
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype, trainable: bool = False):
        sources = [m for m in net.modules() if isinstance(m, HELD_LAYERS)]
        held = {id(p) for m in sources for p in m.parameters(recurse=False)}
        memo: dict = {id(t): t for t in (*net.parameters(), *net.buffers()) if id(t) not in held}
        compiled = getattr(net, "_compiled_call_impl", None)
        if compiled is not None:  # compiled in place (the training network): the copy compiles on its own
            memo[id(compiled)] = None
        self.source, self.net = net, copy.deepcopy(net, memo)
        self.layers = [m for m in self.net.modules() if isinstance(m, HELD_LAYERS)]
        self.pairs: list[tuple[nn.Module, str, torch.Tensor]] = []  # (net's layer, parameter name, held copy)
        for source, layer in zip(sources, self.layers):
            layer.to(dtype)
            for name, param in layer.named_parameters(recurse=False):
                param.requires_grad_(trainable and getattr(source, name).requires_grad)
                self.pairs.append((source, name, param))
        self.sync()

    def follow_mode(self) -> None:
        """The copy in `net`'s train/eval mode: train() and eval() reach the network, not its copy."""
        if self.net.training != self.source.training:
            self.net.train(self.source.training)

    def sync(self) -> None:
        """Copies `net`'s current convolution and linear parameters into the held ones (cast), in place."""
        self.follow_mode()
        if not self.pairs:
            return
        sources = [getattr(layer, name) for layer, name, _ in self.pairs]
        if self.pairs[0][2].device != sources[0].device:  # net moved (e.g. to the GPU after a CPU sample)
            for layer in self.layers:
                layer.to(sources[0].device)  # in place: the parameters stay the same objects
        with torch.no_grad():
            torch._foreach_copy_([held for _, _, held in self.pairs], sources)

    def zero_grad(self) -> None:
        """The held gradients to None, so that the next backward writes them afresh."""
        for _, _, held in self.pairs:
            held.grad = None

    def copy_grads(self) -> None:
        """Casts the held parameters' gradients into `net`'s (allocated where absent), as autocast's backward
        casts each one; a parameter without a gradient (unused this step) keeps none."""
        pairs = [(getattr(layer, name), held.grad) for layer, name, held in self.pairs if held.grad is not None]
        for source, _ in pairs:
            if source.grad is None:
                source.grad = torch.empty_like(source)
        with torch.no_grad():
            torch._foreach_copy_([source.grad for source, _ in pairs], [grad for _, grad in pairs])
