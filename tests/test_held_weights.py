"""FastForward under autocast runs a UNet copy whose convolution and linear weights are held in the autocast
dtype: the same values as autocast's per-call casts, without the casts, and never behind the network's weights."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpm_lightning.accel import FastForward
from ddpm_lightning.accel.held_weights import HELD_LAYERS
from ddpm_lightning.models import build_unet
from ddpm_lightning.module import DiffusionModule


def _unet(channels_last=False, **kwargs):
    torch.manual_seed(0)
    net = build_unet("tiny", image_size=8, in_channels=1, **kwargs).eval()
    with torch.no_grad():  # off the zero initialisation, so that every layer shows in the output
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _inputs(channels_last=False):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x, torch.tensor([0., 10., 500., 999.])


def _autocast(net, *args):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return net(*args).float()


class _Casts(TorchDispatchMode):
    """Counts the dtype casts the ops make."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("net_kwargs", [{}, {"learn_sigma": True, "num_classes": 3}])
def test_held_weights_compute_autocasts_values_without_its_weight_casts(channels_last, net_kwargs):
    net = _unet(channels_last, **net_kwargs)
    fast = FastForward(net, precision="bf16-mixed")
    args = (*_inputs(channels_last), *([torch.tensor([0, 1, 2, 0])] if net_kwargs else []))
    with torch.no_grad():
        got = fast(*args)
    torch.testing.assert_close(got, _autocast(net, *args), rtol=0, atol=0)

    held = [p for m in fast.target.modules() if isinstance(m, HELD_LAYERS) for p in m.parameters(recurse=False)]
    assert held and all(p.dtype == torch.bfloat16 for p in held)
    assert fast.target is not net and next(net.parameters()).dtype == torch.float32  # the network is untouched
    # Everything else is the network's own tensor, not a copy: the GroupNorms' float32 weights stay current.
    norm_weights = {id(m.weight) for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norm_weights == {id(m.weight) for m in fast.target.modules() if isinstance(m, torch.nn.GroupNorm)}
    if channels_last:
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in held if p.ndim == 4)
    # What it is for: each held parameter is one cast fewer per call.
    with torch.no_grad(), _Casts() as with_held:
        fast(*args)
    with _Casts() as plain:
        _autocast(net, *args)
    assert plain.count - with_held.count == len(held)


def test_held_weights_follow_the_network_at_each_sync():
    net = _unet()
    fast = FastForward(net, precision="bf16-mixed")
    x, t = _inputs()
    before = _autocast(net, x, t)
    with torch.no_grad():
        for m in net.modules():  # an EMA update, an optimizer step, a loaded checkpoint: in place
            if isinstance(m, HELD_LAYERS):
                m.weight.mul_(0.9)
        torch.testing.assert_close(fast(x, t), before, rtol=0, atol=0)  # not synced yet
        fast.sync_weights()
        torch.testing.assert_close(fast(x, t), _autocast(net, x, t), rtol=0, atol=0)
        net.norm_out.weight.mul_(1.5)  # shared, not held: seen at once
        torch.testing.assert_close(fast(x, t), _autocast(net, x, t), rtol=0, atol=0)
    net.train()
    with torch.no_grad():
        fast(x, t)
    assert fast.target.training  # train/eval reach the network; the copy follows at the next call
    net.eval()
    fast.held.sync()  # and at each sync (TrainStep's, before each step's forward)
    assert not fast.target.training


def test_each_sampling_run_gets_the_current_weights():
    """DiffusionModule.eval_model syncs the held copy, so sampling after more training (here an in-place change
    of the EMA weights) samples what a module loaded with those weights samples."""
    module = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=30, sample_precision="bf16-mixed")
    assert module.eval_model().net.held is not None
    noise = torch.randn(2, 1, 8, 8)
    module.sample(2, noise=noise.clone(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in module.ema.averages[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    fresh = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=30, sample_precision="bf16-mixed")
    fresh.load_state_dict(module.state_dict())
    torch.testing.assert_close(module.sample(2, noise=noise.clone(), generator=torch.Generator().manual_seed(0)),
                               fresh.sample(2, noise=noise.clone(), generator=torch.Generator().manual_seed(0)),
                               rtol=0, atol=0)


def test_only_the_projects_unets_under_autocast_are_held():
    """A custom network may read its layers' weights outside their forward, where autocast would not cast
    them; it keeps autocast's per-call casts. In float32 there is nothing to hold."""
    custom = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
    assert FastForward(custom, precision="bf16-mixed").held is None
    fast = FastForward(_unet(), precision="32")
    assert fast.held is None and fast.target is fast.net
    fast.sync_weights()  # nothing to do, and no error


def test_the_copy_of_a_network_compiled_in_place_compiles_on_its_own():
    """Sampling the training network (use_ema_for_eval=False), which on_fit_start compiled in place with the
    training settings: the copy neither shares nor disturbs that compilation."""
    net = _unet()
    net.compile()  # lazy: nothing is compiled before a call
    compiled = net._compiled_call_impl
    fast = FastForward(net, precision="bf16-mixed")
    assert fast.target._compiled_call_impl is None and net._compiled_call_impl is compiled


def test_the_training_step_casts_its_held_weights_and_gradients_all_at_once():
    """TrainStep under autocast: the forward reads the held bf16 copies, and their gradients reach the float32
    parameters through one multi-tensor copy, where autocast casts each weight in the forward and each
    gradient back: 2 casts fewer per convolution or linear parameter and step, and the same gradients."""
    from ddpm_lightning.accel import TrainStep

    def one_step(hold):
        torch.manual_seed(0)
        module = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=30)
        optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-3)
        x, t = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 5, 10, 29])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step = TrainStep(module, optimizer, capture=False, hold_weights=hold)
            step.capture = True  # so that the body calls loss.backward() itself, without a Trainer
            with _Casts() as casts:
                step._body(x, None, t, torch.ones(4), ema_updates=0)
        assert (step.held is not None) == hold
        return module, casts.count

    held_module, held_casts = one_step(True)
    plain_module, plain_casts = one_step(False)
    held = [p for m in plain_module.net.modules() if isinstance(m, HELD_LAYERS) for p in m.parameters(recurse=False)]
    assert plain_casts - held_casts == 2 * len(held)
    for a, b in zip(held_module.state_dict().values(), plain_module.state_dict().values()):
        assert torch.equal(a, b)  # after AdamW and the EMA update


@pytest.mark.parametrize("strategy, held", [("single", True), ("ddp", False)])
def test_the_training_step_holds_weights_on_a_single_device_strategy_only(monkeypatch, strategy, held):
    """A DDP wrapper, even of one process (strategy=ddp, devices=1), waits for the float32 parameters'
    gradients; the held copy would take them instead."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    chosen = SingleDeviceStrategy(device=torch.device("cpu")) if strategy == "single" else DDPStrategy()
    module = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=30)
    module._trainer = SimpleNamespace(strategy=chosen, world_size=1, precision="bf16-mixed")
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="no CUDA device"):
        step = module._make_train_step(optimizer)
    assert (step.held is not None) == held
