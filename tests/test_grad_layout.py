"""keep_grad_layout: the gradients a concatenation and a layout change hand back come dense in their tensor's layout."""

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_lightning.models import build_unet, grad_layout
from ddpm_lightning.models.grad_layout import keep_grad_layout, memory_format

CL = torch.channels_last


def _grad_of(x, make_output, keep):
    """The gradient that reaches x (a non-leaf, so autograd does not restride it) through make_output."""
    grads = []
    x.register_hook(grads.append)
    make_output(grad_layout._KeepGradLayout.apply(x) if keep else x).square().sum().backward()
    return grads[0]


def test_a_concatenations_gradient_comes_back_dense_in_the_inputs_layout():
    leaf = torch.randn(2, 4, 3, 3).contiguous(memory_format=CL).requires_grad_(True)
    other = torch.randn(2, 6, 3, 3).contiguous(memory_format=CL)
    cat = lambda h: torch.cat([h, other], dim=1)  # noqa: E731
    sliced = _grad_of(leaf * 1.0, cat, keep=False)
    assert not sliced.is_contiguous(memory_format=CL)  # a channel slice of a 10-channel gradient
    dense = _grad_of(leaf * 1.0, cat, keep=True)
    assert dense.is_contiguous(memory_format=CL) and not dense.is_contiguous()
    torch.testing.assert_close(dense, sliced, rtol=0, atol=0)


def test_an_nchw_gradient_comes_back_channels_last():
    """As F.interpolate's compiled nearest-upsampling backward writes it (torch 2.11, benchmarks/RESULTS.md)."""
    leaf = torch.randn(2, 4, 3, 3).contiguous(memory_format=CL).requires_grad_(True)
    to_nchw = lambda h: h.contiguous() * 1.0  # noqa: E731  (its backward hands h an NCHW gradient)
    assert _grad_of(leaf * 1.0, to_nchw, keep=False).is_contiguous()
    kept = _grad_of(leaf * 1.0, to_nchw, keep=True)
    assert kept.is_contiguous(memory_format=CL) and not kept.is_contiguous()


def test_it_is_the_tensor_itself_outside_torch_compile_and_a_function_inside(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    assert keep_grad_layout(x) is x
    assert memory_format(x) == torch.contiguous_format and memory_format(x.contiguous(memory_format=CL)) == CL
    assert memory_format(torch.randn(2, 3, 1, 1).contiguous(memory_format=CL)) == torch.contiguous_format
    layouts_asked = []
    monkeypatch.setattr(grad_layout, "memory_format", lambda t: layouts_asked.append(t.shape) or memory_format(t))
    traced = torch.compile(lambda t: keep_grad_layout(t) * 2, backend="aot_eager", fullgraph=True)
    leaf = torch.randn(2, 3, 4, 4).contiguous(memory_format=CL).requires_grad_(True)
    traced(leaf).sum().backward()
    assert layouts_asked, "under torch.compile keep_grad_layout should apply its Function"
    torch.testing.assert_close(leaf.grad, torch.full_like(leaf, 2.0))


class _ConvolutionGradients(TorchDispatchMode):
    """Records whether each convolution backward's incoming gradient is dense channels_last."""

    def __init__(self):
        super().__init__()
        self.channels_last: list[tuple[tuple[int, ...], bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            self.channels_last.append((tuple(args[0].shape), args[0].is_contiguous(memory_format=CL)))
        return func(*args, **(kwargs or {}))


def test_every_convolution_of_a_compiled_channels_last_unet_gets_its_gradient_channels_last():
    """The skip concatenations' slices, the upsampling and the output all hand cuDNN a dense channels_last
    gradient, which it would otherwise copy. The output matters for a learned-variance net, whose loss reads a
    channel slice: the slice's backward pads its gradient with zeros in a new NCHW buffer (ATen does, and so
    does inductor's code with torch 2.11)."""
    torch.manual_seed(0)
    net = build_unet("tiny", image_size=8, in_channels=3, learn_sigma=True).to(memory_format=CL)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=CL)
    loss = torch.compile(lambda x, t: F.mse_loss(net(x, t)[:, :3], x), backend="aot_eager")
    value = loss(x, torch.tensor([3, 700]))
    with _ConvolutionGradients() as seen:
        value.backward()
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    assert len(seen.channels_last) == convolutions
    assert [shape for shape, dense in seen.channels_last if not dense] == []
