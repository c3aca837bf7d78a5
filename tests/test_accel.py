"""Fast paths compute what the plain paths compute: the graph-mode step (eager on the CPU), channels_last,
grad_clip, compile's block fallback, and the sampling forward wrapper."""

import contextlib
import shutil

import lightning as L
import pytest
import torch
from test_metrics import one_thread  # noqa: F401  (autouse: tiny ops run faster on one thread)
from torch.utils.data import DataLoader, TensorDataset

from ddpm_lightning.accel import CompiledCall, FastForward, fast_forward
from ddpm_lightning.accel.fast_forward import autocast_dtype
from ddpm_lightning.module import DiffusionModule


def _images(n=24, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1, torch.zeros(n, dtype=torch.long)


def _fit(tmp_path, steps=6, trainer_kw=None, callbacks=(), **module_kw):
    """Train a tiny module for `steps` steps on fixed data; returns (module, logged train/loss values)."""
    L.seed_everything(0, verbose=False)
    kw = dict(net="tiny", image_size=8, in_channels=1, num_timesteps=50, warmup_steps=3, ema_decay=[0.9, 0.5],
              net_overrides={"dropout": 0.1})
    kw.update(module_kw)
    module = DiffusionModule(**kw)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    x, y = _images()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record(), *callbacks],
                        default_root_dir=tmp_path, **(trainer_kw or {}))
    trainer.fit(module, loader)
    assert trainer.global_step == steps
    return module, losses, trainer


@pytest.mark.parametrize("variant", [
    dict(),
    dict(grad_clip=0.05, ema_warmup=True),
    dict(timestep_sampler="loss-second-moment", var_type="learned_range", loss_type="rescaled_mse"),
    dict(trainer_kw=dict(precision="bf16-mixed"), grad_clip=0.05, channels_last=True),
])
def test_graph_mode_step_equals_the_lightning_step_bit_for_bit(tmp_path, variant):
    """cuda_graph=True runs TrainStep (eagerly on the CPU): same weights, EMA, optimizer state, losses. Under
    bf16-mixed the step's forward reads bf16 copies of the convolution and linear weights (HeldWeights) where
    Lightning's autocast casts the float32 ones at each use: the same values."""
    plain, plain_losses, _ = _fit(tmp_path / "a", **variant)
    with pytest.warns(UserWarning, match="no CUDA device"):
        graphed, graphed_losses, trainer = _fit(tmp_path / "b", cuda_graph=True, **variant)
    assert not graphed.automatic_optimization
    assert (graphed._train_step.held is not None) == ("trainer_kw" in variant)  # held under bf16-mixed only
    assert graphed_losses == plain_losses
    for (name, a), b in zip(plain.state_dict().items(), graphed.state_dict().values()):
        assert torch.equal(a, b), name
    opt_a = plain.trainer.optimizers[0].state_dict()
    opt_b = trainer.optimizers[0].state_dict()
    for key in opt_a["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(opt_a["state"][key][field]), torch.as_tensor(opt_b["state"][key][field]))
    # The warmup schedule moved the learning rate in both.
    assert opt_a["param_groups"][0]["lr"] == pytest.approx(float(opt_b["param_groups"][0]["lr"]))
    assert float(opt_b["param_groups"][0]["lr"]) == pytest.approx(2e-4)


def test_graph_mode_refuses_fp16_loss_scaling(monkeypatch):
    # Lightning turns 16-mixed into bf16-mixed on the CPU, so the Trainer's precision is stood in for.
    module = DiffusionModule(net="tiny", image_size=8, in_channels=1, cuda_graph=True)
    monkeypatch.setattr(module, "_loss_scaled", lambda: True)
    with pytest.raises(ValueError, match="cuda_graph does not apply fp16 loss scaling; use --trainer.precision=bf16"):
        module._make_train_step(torch.optim.AdamW(module.net.parameters()))


def test_grad_clip_equals_trainer_gradient_clip_val(tmp_path):
    a, la, _ = _fit(tmp_path / "a", trainer_kw={"gradient_clip_val": 0.01})
    b, lb, _ = _fit(tmp_path / "b", grad_clip=0.01)
    c, lc, _ = _fit(tmp_path / "c")
    assert la == lb and la != lc
    assert all(torch.equal(x, y) for x, y in zip(a.net.parameters(), b.net.parameters()))
    with pytest.raises(ValueError, match="set twice"):
        _fit(tmp_path / "d", grad_clip=0.01, trainer_kw={"gradient_clip_val": 0.01})


class FusedOnCPU(DiffusionModule):
    """Fused AdamW as on a GPU (torch has a CPU kernel too), to meet Lightning's fused-optimizer guard here."""

    def configure_optimizers(self):
        config = super().configure_optimizers()
        old = config["optimizer"]
        new = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, fused=True)
        config["lr_scheduler"]["scheduler"] = torch.optim.lr_scheduler.LambdaLR(new, old and (lambda step: 1.0))
        config["optimizer"] = new
        return config


@pytest.mark.parametrize("clip", ["model", "trainer"])
def test_clipping_a_fused_optimizer_under_bf16_mixed_precision(tmp_path, clip):
    """Lightning alone raises "does not allow for gradient clipping" here (found on an H100 run)."""
    L.seed_everything(0, verbose=False)
    module = FusedOnCPU(net="tiny", image_size=8, in_channels=1, num_timesteps=50,
                        grad_clip=1e-3 if clip == "model" else None)
    x, y = _images()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, gradient_clip_val=1e-3 if clip == "trainer" else None)
    before = [p.detach().clone() for p in module.net.parameters()]
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert trainer.global_step == 2 and trainer.optimizers[0].defaults["fused"]
    # Clipped to a tiny norm, AdamW's normalised step is still lr-sized: the weights moved.
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.parameters()))


def test_channels_last_keeps_the_function_and_the_layout(tmp_path):
    a, la, _ = _fit(tmp_path / "a", steps=3)
    b, lb, _ = _fit(tmp_path / "b", steps=3, channels_last=True)
    conv = b.net.conv_out.weight  # conv_in has one input channel, for which both layouts coincide
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert b.ema.averages[0].conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    # Same function, different summation order in the convolutions: equal up to float32 rounding.
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=1e-5)


def test_bad_fast_path_options_are_one_line():
    kw = dict(net="tiny", image_size=8, in_channels=1)
    for bad, match in [
        (dict(cuda_graph=True, nonfinite_loss="skip"), "nonfinite_loss='skip'"),
        (dict(cuda_graph=True, compile=True, compile_mode="reduce-overhead"), "makes its own CUDA graphs"),
        (dict(compile=True, compile_mode="fastest"), "unknown compile_mode 'fastest'; valid"),
        (dict(sample_precision="bf16"), "unknown sample_precision 'bf16'; valid: 32, bf16-mixed, 16-mixed"),
        (dict(grad_clip=0.0), "grad_clip must be > 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            DiffusionModule(**kw, **bad)


class Broken(torch.nn.Module):
    """Compiles block by block but not whole: its forward fails when traced by dynamo."""

    def __init__(self):
        super().__init__()
        from ddpm_lightning.models.layers import ResBlock

        self.block = ResBlock(32, 32, 16)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        if torch.compiler.is_compiling():
            raise RuntimeError("unsupported at the top level")
        return self.block(x, torch.zeros(x.shape[0], 16))


def test_compile_falls_back_to_blocks_when_the_whole_network_fails(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    net = Broken()
    call = CompiledCall(net, "default")
    assert compiled == [("Broken", {"mode": None, "dynamic": False})]

    def failing_first_call(*args, **kwargs):
        raise RuntimeError("backend failed\nlong trace")

    net._compiled_call_impl = failing_first_call  # what Module.compile would have installed
    x = torch.randn(2, 32, 4, 4)
    with pytest.warns(UserWarning, match="RuntimeError: backend failed\\); compiled its 1 blocks instead"):
        out = call(x, torch.zeros(2))
    assert call.whole is False and compiled[-1] == ("ResBlock", {"mode": None, "dynamic": False})
    assert net._compiled_call_impl is None and out.shape == x.shape
    call(x, torch.zeros(2))  # later calls go straight through
    assert net.calls == 2


def test_the_training_network_compiles_with_the_training_inductor_options_and_once(monkeypatch):
    """on_fit_start compiles the training network with TRAINING_INDUCTOR_OPTIONS, the compile mode's own
    settings folded in (torch.compile takes a mode or options, not both); sampling it later keeps that
    compilation, and a sampling network (an EMA copy) gets the mode alone, i.e. inductor's defaults."""
    from ddpm_lightning.accel.compile import TRAINING_INDUCTOR_OPTIONS, compile_kwargs

    compiled = []

    def fake_compile(self, **kw):
        compiled.append((self, kw))
        self._compiled_call_impl = self._call_impl

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    monkeypatch.setattr(DiffusionModule, "device", property(lambda self: torch.device("cuda")))  # a GPU's path
    module = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=50, compile=True,
                             compile_mode="max-autotune-no-cudagraphs")
    module.on_fit_start()
    assert isinstance(module.model.net, CompiledCall)
    options = {"max_autotune": True, "coordinate_descent_tuning": True, "realize_reads_threshold": 6}
    assert TRAINING_INDUCTOR_OPTIONS == {"realize_reads_threshold": 6}
    assert compiled == [(module.net, {"options": options, "dynamic": False})]
    CompiledCall(module.net, "max-autotune-no-cudagraphs")  # sampling from the training network
    CompiledCall(module.ema.averages[0], "max-autotune-no-cudagraphs")
    assert compiled[1:] == [(module.ema.averages[0], {"mode": "max-autotune-no-cudagraphs", "dynamic": False})]
    # torch.compile checks the option names when it is called (the compilation itself waits for a call).
    torch.compile(torch.nn.Identity(), **compile_kwargs("max-autotune-no-cudagraphs", TRAINING_INDUCTOR_OPTIONS))
    torch.compile(torch.nn.Identity(), **compile_kwargs(None, TRAINING_INDUCTOR_OPTIONS))
    with pytest.raises(RuntimeError, match="Unexpected optimization option no_such_option"):
        torch.compile(torch.nn.Identity(), **compile_kwargs(None, {"no_such_option": 1}))


def test_compile_tuning_adds_coordinate_descent_tuning_to_training_and_sampling(monkeypatch):
    """compile_tuning puts inductor's coordinate-descent tuning into the training network's compilation, beside
    its reads threshold, and into the sampling networks' (otherwise inductor's defaults). Off by default; asked for
    without compile it is refused in one line; turning compile off for sampling turns it off too."""
    from ddpm_lightning.accel.compile import TUNING_INDUCTOR_OPTIONS

    compiled = []

    def fake_compile(self, **kw):
        compiled.append(kw)
        self._compiled_call_impl = self._call_impl

    monkeypatch.setattr(torch.nn.Module, "compile", fake_compile)
    monkeypatch.setattr(DiffusionModule, "device", property(lambda self: torch.device("cuda")))
    assert TUNING_INDUCTOR_OPTIONS == {"coordinate_descent_tuning": True}
    module = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=50, compile=True,
                             compile_tuning=True)
    module.on_fit_start()
    assert compiled == [{"options": {"realize_reads_threshold": 6, "coordinate_descent_tuning": True},
                         "dynamic": False}]
    assert module.eval_model().net.compile_options == {"coordinate_descent_tuning": True}
    plain = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=50, compile=True)
    assert not plain.hparams.compile_tuning and plain.eval_model().net.compile_options is None
    assert plain.training_inductor_options() == {"realize_reads_threshold": 6}
    torch.compile(torch.nn.Identity(), options=module.training_inductor_options())  # names inductor knows
    with pytest.raises(ValueError, match=r"^compile_tuning=True tunes the compiled network's kernels; set "
                                         r"compile=True too$"):
        DiffusionModule(net="tiny", image_size=8, in_channels=1, compile_tuning=True)
    module.set_sampling_options(compile=False)
    assert not module.hparams.compile_tuning
    with pytest.raises(ValueError, match="set compile=True too"):
        module.set_sampling_options(compile_tuning=True)
    module.set_sampling_options(compile=True, compile_tuning=True)
    assert module.hparams.compile_tuning and module.eval_model().net.compile_options == TUNING_INDUCTOR_OPTIONS


def test_fast_forward_autocasts_and_returns_float32():
    net = torch.nn.Conv2d(1, 1, 1)
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x, t):
            seen["dtype"] = net(x).dtype
            return net(x)

    fast = FastForward(Probe(), precision="bf16-mixed")
    out = fast(torch.randn(2, 1, 4, 4), torch.zeros(2))
    assert seen["dtype"] == torch.bfloat16 and out.dtype == torch.float32
    assert autocast_dtype("32") is None


@pytest.mark.parametrize("compile", [True, False])
def test_a_compiled_network_replays_a_smaller_batch_through_a_larger_graph(monkeypatch, compile):
    """The tail batch of an evaluation (here 3 after 4) reuses the batch-4 graph, padded, when a new shape
    would mean a new compilation; without compile a new capture is cheap and happens. Stands in for a GPU:
    the fake graph's replay runs the network on the static buffers, as a real replay does."""
    captured = []

    def fake_capture(self, key, x, t, y):
        entry = {"x": x.clone(), "t": t.clone(), "y": None if y is None else y.clone()}
        entry["out"] = self._run(entry["x"], entry["t"], entry["y"], capturing=False)

        class Graph:
            def replay(_):
                entry["out"].copy_(self._run(entry["x"], entry["t"], entry["y"], capturing=False))

        entry["graph"] = Graph()
        self.graphs[key] = entry
        captured.append(key[0])
        return entry

    compiled = []

    class Compiled:  # stands in for CompiledCall (inductor is not what this test is about) and records its settings
        def __init__(self, target, mode=None, options=None):
            compiled.append((mode, options))
            self.target = target

        def __call__(self, *args):
            return self.target(*args)

    monkeypatch.setattr(FastForward, "_on_cuda", staticmethod(lambda x: True))
    monkeypatch.setattr(FastForward, "_capture", fake_capture)
    monkeypatch.setattr(fast_forward, "CompiledCall", Compiled)
    from ddpm_lightning.models import build_unet

    torch.manual_seed(0)
    net = build_unet("tiny", image_size=8, in_channels=1).eval()
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.05)
    options = {"coordinate_descent_tuning": True}
    fast = FastForward(net, compile=compile, cuda_graph=True, compile_options=options)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1.0, 200.0, 500.0, 999.0])
    with torch.no_grad():
        fast(x, t)
        out = fast(x[1:] * 2, t[1:])
        torch.testing.assert_close(out, net(x[1:] * 2, t[1:]))
        fast(torch.randn(2, 1, 16, 16), t[:2])  # another per-sample shape: its own graph
        fast(torch.randn(6, 1, 8, 8), torch.zeros(6))  # a larger batch: its own graph
    assert captured == ([(4, 1, 8, 8), (2, 1, 16, 16), (6, 1, 8, 8)] if compile else
                        [(4, 1, 8, 8), (3, 1, 8, 8), (2, 1, 16, 16), (6, 1, 8, 8)])
    assert compiled == ([(None, options)] if compile else [])  # once, with the settings it was given


def test_sampling_with_fast_options_matches_the_plain_network():
    """FastForward in fp32 (no graphs on the CPU) samples exactly what the plain network samples."""
    plain = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=30)
    fast = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=30, cuda_graph=True)
    fast.load_state_dict(plain.state_dict())
    assert isinstance(fast.eval_model().net, FastForward)
    assert fast.eval_model().net is fast.eval_model().net  # cached: graphs are captured once
    noise = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fast.sample(3, noise=noise.clone(), generator=torch.Generator().manual_seed(0)),
                               plain.sample(3, noise=noise.clone(), generator=torch.Generator().manual_seed(0)),
                               rtol=0, atol=0)


def test_compile_is_for_cuda_devices_only(tmp_path, monkeypatch):
    """Paper configs turn compile on; on the CPU training and sampling run eagerly, with one warning."""
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: pytest.fail("compiled on the CPU"))
    with pytest.warns(UserWarning, match="compile: applies on CUDA devices only; training on cpu runs eagerly"):
        module, _, _ = _fit(tmp_path, steps=2, compile=True)
    assert module.model.net is module.net
    module.sample(2, respacing="3")
    assert module.eval_model().net.call is module.ema.averages[0]


def test_a_failed_capture_trains_on_uncaptured(tmp_path, monkeypatch):
    """Stands in for a GPU on which capture fails: the run warns and goes on with the same step, uncaptured."""
    from ddpm_lightning.accel import TrainStep

    def fake_capture(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing\n(long CUDA message)")

    original_init = TrainStep.__init__

    def capturing_init(self, module, optimizer, capture, warmup_steps=3, hold_weights=True):
        original_init(self, module, optimizer, capture=True, warmup_steps=0,  # capture at the first step
                      hold_weights=hold_weights)

    monkeypatch.setattr(TrainStep, "__init__", capturing_init)
    monkeypatch.setattr(TrainStep, "_capture", fake_capture)
    monkeypatch.setattr(TrainStep, "_autocast", lambda self: contextlib.nullcontext())
    plain, plain_losses, _ = _fit(tmp_path / "a", steps=5)
    with pytest.warns(UserWarning, match="capturing the training step failed \\(operation not permitted when "
                                         "stream is capturing\\); training continues without a graph"):
        fallback, losses, _ = _fit(tmp_path / "b", steps=5, cuda_graph=True)
    assert fallback._train_step.capture is False and fallback._train_step.graph is None
    assert losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fallback.state_dict().values()))


def test_the_paper_config_with_its_fast_paths_trains_on_a_cpu(tmp_path, recwarn):
    """cifar10_ddpm.yaml as shipped (bf16-mixed, channels_last, compile, cuda_graph, in-memory data), on the
    CPU: compile and the graph step give way with a warning each; the run trains and writes last.ckpt."""
    from pathlib import Path

    from test_data import write_cifar_folder

    from ddpm_lightning.cli import main

    write_cifar_folder(tmp_path / "cifar" / "train", per_class=3)
    root = Path(__file__).resolve().parents[1]
    main(["fit", "--config", str(root / "experiments" / "cifar10_ddpm.yaml"), "--trainer.callbacks=[]",
          "--model.net=tiny", "--data.init_args.image_size=8", "--data.init_args.source=folder", f"--data.init_args.data_dir={tmp_path / 'cifar'}",
          "--data.init_args.global_batch_size=4", "--data.init_args.num_workers=0", "--trainer.max_steps=2",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    hp = checkpoint["hyper_parameters"]
    assert checkpoint["global_step"] == 2 and hp["cuda_graph"] and hp["compile"] and hp["channels_last"]
    assert hp["grad_clip"] == 1.0 and hp["sample_precision"] == "bf16-mixed"
    messages = [str(w.message) for w in recwarn]
    assert any("compile: applies on CUDA devices only" in m for m in messages)
    assert any("cuda_graph: no CUDA device" in m for m in messages)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on a CPU")
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_network_matches_eager_in_values_and_gradients(dtype):
    """The UNet compiles as one graph (no graph break, no per-block fallback) with inductor, channels_last
    included, and computes the eager function: in float32 outputs and every weight gradient agree to
    rounding; under bf16 autocast (the paper configs) the output and the whole gradient agree to bf16's."""
    import copy

    from torch._dynamo.utils import counters

    from ddpm_lightning.models import build_unet

    torch.manual_seed(0)
    eager = build_unet("tiny", image_size=8, in_channels=1, dropout=0.0).to(memory_format=torch.channels_last)
    with torch.no_grad():  # a zero output layer would make every upstream gradient zero
        eager.conv_out.weight.normal_(0, 0.05)
    compiled_net = copy.deepcopy(eager)
    call = CompiledCall(compiled_net)
    counters.clear()
    x = torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    outs = []
    for net in (eager, call):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = net(x, t).float()
        out.square().mean().backward()
        outs.append(out.detach())
    assert call.whole, "the whole network should compile; it fell back to blocks"
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    grads = [torch.cat([p.grad.flatten() for p in net.parameters()]) for net in (eager, compiled_net)]
    if dtype is None:
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled_net.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=lambda m: f"{name}: {m}")
    else:
        # Per tensor, biases whose gradient nearly cancels (a bias before a GroupNorm) are all bf16 noise;
        # the output and the gradient as a whole are what bf16 rounding must leave intact.
        assert (outs[1] - outs[0]).norm() / outs[0].norm() < 2e-2
        assert (grads[1] - grads[0]).norm() / grads[0].norm() < 2e-2
    assert grads[0].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on a CPU")
@pytest.mark.parametrize("dtype, one_kernel", [(None, False), (torch.bfloat16, False), ("held", False),
                                               (None, True), ("held", True)])
def test_compiled_sampling_network_matches_eager(monkeypatch, dtype, one_kernel):
    """Without autograd (sampling) the compiled UNet is one graph and computes the eager function: to rounding
    in float32, to bf16's under bf16 autocast, also as FastForward runs it there, with its weights held in bf16
    ("held"). Each GroupNorm takes group_norm_act with what follows it where one_kernel_sampling is on, and
    two passes (the default) where it is off."""
    import copy

    from torch._dynamo.utils import counters

    from ddpm_lightning.accel.held_weights import HeldWeights
    from ddpm_lightning.models import build_unet, layers
    from ddpm_lightning.models.group_norm import group_norm_act

    calls = []
    monkeypatch.setattr(layers, "group_norm_act", lambda *a, **k: calls.append(1) or group_norm_act(*a, **k))
    monkeypatch.setattr(layers.GroupNorm32, "one_kernel_sampling", one_kernel)
    torch.manual_seed(0)
    eager = build_unet("tiny", image_size=8, in_channels=1).to(memory_format=torch.channels_last).eval()
    with torch.no_grad():
        eager.conv_out.weight.normal_(0, 0.05)
    held = dtype == "held"
    dtype = torch.bfloat16 if held else dtype
    call = CompiledCall(HeldWeights(eager, dtype).net if held else copy.deepcopy(eager))
    counters.clear()
    x = torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0.0, 10.0, 500.0, 999.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        want, got = eager(x, t).float(), call(x, t).float()
    assert call.whole and counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert len(calls) == one_kernel * sum(isinstance(m, layers.GroupNorm32) for m in eager.modules())
    if dtype is None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        assert (got - want).norm() / want.norm() < 2e-2
