"""Training throughput through the real `ddpm fit` path, per fast-path variant, with a diffusers baseline.

Each variant builds the experiment config's Trainer, DataModule and DiffusionModule through DDPMCLI
(data loading, flips, EMA, logging and checkpoint callbacks included), trains `--warmup` steps, then
times `--steps` steps between two device synchronisations. The diffusers baseline is a bare loop
(forward, MSE, backward, AdamW) of UNet2DModel in the matching configuration, timed in the same process
right after the first variant, so that a run stopped at its time limit still has the ratio.

    python benchmarks/train_throughput.py --variants fp32 bf16-cl bf16-cl-compile-graph \\
        --diffusers bf16-cl-compile-ro --set --data.init_args.source=folder --data.init_args.data_dir=/tmp/cifar
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from typing import Callable, Iterable
from unittest import mock

import lightning as L
import torch
import torch._dynamo
import torch._inductor.config
import torch.nn.functional as F

from bench_common import (InductorCode, diffusers_unet, flops_per_forward, images_per_second, mode_autocast, print_table,
                          time_baselines, write_json, write_profile)


class GradLayoutProbe:
    """Records the strides each parameter's gradient arrives with, before AccumulateGrad copies it into the
    parameter's own layout (one strided copy per such weight and step; none on the H100 so far)."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]):
        self.params = dict(named_params)
        self.grad_strides: dict[str, tuple[int, ...]] = {}
        self.hooks = [p.register_hook(lambda grad, name=name: self._record(name, grad))
                      for name, p in self.params.items()]

    def _record(self, name: str, grad: torch.Tensor) -> None:
        self.grad_strides[name] = tuple(grad.stride())  # the latest backward's

    def mismatches(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, gradient strides) of each parameter whose gradient arrived with other strides."""
        return [(name, stride) for name, stride in self.grad_strides.items()
                if stride != self.params[name].stride()]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def overrides(precision: str, channels_last: bool, compile: bool, cuda_graph: bool) -> list[str]:
    """`ddpm fit` flags of one variant, on top of the experiment config (which may already set some)."""
    flag = lambda value: str(value).lower()  # noqa: E731
    return [f"--trainer.precision={precision}", f"--model.channels_last={flag(channels_last)}",
            f"--model.compile={flag(compile)}", f"--model.cuda_graph={flag(cuda_graph)}"]


VARIANTS = {
    "fp32": overrides("32", False, False, False),
    "bf16": overrides("bf16-mixed", False, False, False),
    "bf16-cl": overrides("bf16-mixed", True, False, False),
    "bf16-cl-graph": overrides("bf16-mixed", True, False, True),
    "bf16-cl-compile": overrides("bf16-mixed", True, True, False),
    "bf16-compile-graph": overrides("bf16-mixed", False, True, True),
    "bf16-cl-compile-graph": overrides("bf16-mixed", True, True, True),
}


def _inductor_reads4():
    """The training network compiled with inductor's default realize_reads_threshold (4), as before session 8."""
    from ddpm_lightning.accel.compile import TRAINING_INDUCTOR_OPTIONS

    return mock.patch.dict(TRAINING_INDUCTOR_OPTIONS, {"realize_reads_threshold": 4})


def _aten_groupnorm():
    """The UNet as session 5 measured it: ATen's GroupNorm and upsampling under compile, gradients left in any
    layout, inductor's default realize_reads_threshold."""
    from ddpm_lightning.models import layers, unet

    def aten_normalize(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).to(x.dtype)

    stack = contextlib.ExitStack()
    stack.enter_context(_inductor_reads4())
    stack.enter_context(mock.patch.object(layers.GroupNorm32, "normalize", aten_normalize))
    stack.enter_context(mock.patch.object(layers, "upsample_nearest",
                                          lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest")))
    for module in (layers, unet):
        stack.enter_context(mock.patch.object(module, "keep_grad_layout", lambda x: x))
    return stack


def _channel_statistics():
    """GroupNorm's statistics from per-channel ones (GroupNorm32.channel_statistics; offline, torch 2.11: the
    DDPM CIFAR-10 forward at batch 128 moves 4.43 GB instead of 5.26, the backward the same)."""
    from ddpm_lightning.models import layers

    return mock.patch.object(layers.GroupNorm32, "channel_statistics", True)


def _autocast_weights():
    """The step as before session 10: autocast casts each weight in the forward and each gradient back, where
    TrainStep now holds bf16 copies and casts them all at once (accel/held_weights.py)."""
    from ddpm_lightning.accel import TrainStep

    return mock.patch.object(TrainStep, "hold_weights", False)


# Experiments on the paper configs' variant, each a context the variant trains in (name: base + suffix).
EXPERIMENTS = {
    # Inductor's combo kernels launch independent small kernels (GroupNorm's small sums, bias gradients) as one;
    # offline (inductor_report.py, torch 2.11, session 10) they cut the step's Triton launches from 443 to 391
    # (from 811 to 497 with the weights cast by autocast).
    "+combo": lambda: torch._inductor.config.patch(combo_kernels=True),
    # The A/B for the training compile's realize_reads_threshold of 6 (accel/compile.py; session 8, offline: a
    # third fewer backward bytes): inductor's default 4, which writes GroupNorm's recomputed output out in fp32.
    "+reads4": _inductor_reads4,
    # The A/B for the GroupNorm, gradient-layout, upsampling and reads changes made after session 5.
    "+aten-gn": _aten_groupnorm,
    "+channel-stats": _channel_statistics,
    # The A/B for the held weights (session 10, offline: 291 fewer Triton launches a step).
    "+autocast-weights": _autocast_weights,
}
VARIANTS.update({f"bf16-cl-compile-graph{suffix}": VARIANTS["bf16-cl-compile-graph"] for suffix in EXPERIMENTS})
# The module's compile_tuning (inductor's coordinate-descent tuning of each Triton kernel; GPU run 4: +10% for
# sampling, about two minutes of one-off tuning there; not yet timed for training).
VARIANTS["bf16-cl-compile-graph+cdt"] = VARIANTS["bf16-cl-compile-graph"] + ["--model.compile_tuning=true"]
DIFFUSERS_MODES = ("bf16", "bf16-cl", "bf16-cl-compile", "bf16-cl-compile-ro")


class StepTimer(L.Callback):
    """Times steps warmup..warmup+steps between device synchronisations, optionally profiles a few more
    steps (kernel time by operator, to `profile_path`), then stops the run.

    With `attribute_path` it also profiles steps 1 and 2: after compilation (step 0) but before a CUDA
    graph is captured (TrainStep warms up 3 steps eagerly), so each kernel still sits under the operator
    that launched it, e.g. autograd's AccumulateGrad, the compiled backward or the optimizer. With
    `report_layouts` it records which parameters receive a gradient whose strides differ from their own
    in the last untimed step (autograd then copies that gradient into the parameter's layout, a strided
    copy per weight and step).
    """

    ATTRIBUTE_STEPS = (1, 3)  # global steps [1, 3)

    def __init__(self, warmup: int, steps: int, profile_steps: int = 0, profile_path: str | None = None,
                 attribute_path: str | None = None, report_layouts: bool = False):
        if attribute_path and warmup < self.ATTRIBUTE_STEPS[1]:
            raise ValueError(f"attributing kernels profiles steps 1-2; needs --warmup >= {self.ATTRIBUTE_STEPS[1]}")
        self.warmup, self.steps = warmup, steps
        self.profile_steps, self.profile_path, self.attribute_path = profile_steps, profile_path, attribute_path
        self.report_layouts = report_layouts
        self.start = self.seconds = self.profiler = self.probe = None
        self.layout_mismatches: list[dict] = []

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def _start_profiler(self) -> None:
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
        self.profiler.__enter__()

    def _write_profile(self, trainer, path: str, sort_by: str) -> None:
        self._sync(trainer)
        if trainer.strategy.root_device.type != "cuda":
            sort_by = sort_by.replace("device", "cpu")
        self.profiler.__exit__(None, None, None)
        write_profile(self.profiler, path, sort_by, row_limit=60)
        self.profiler = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.report_layouts:
            self.probe = GradLayoutProbe(pl_module.net.named_parameters())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.attribute_path and step == self.ATTRIBUTE_STEPS[0]:
            self._start_profiler()
        held = getattr(getattr(pl_module, "_train_step", None), "held", None)
        if self.probe is not None and step == 1 and held is not None:
            # TrainStep (made at step 0) runs the forward on held copies: their gradients are autograd's.
            self.probe.remove()
            self.probe = GradLayoutProbe(held.net.named_parameters())
        if step == self.warmup and self.start is None:
            if self.probe is not None:  # the layouts as the last untimed step left them
                self.probe.remove()
                params = self.probe.params
                self.layout_mismatches = [
                    {"param": name, "shape": list(params[name].shape), "param_stride": list(params[name].stride()),
                     "grad_stride": list(stride)} for name, stride in self.probe.mismatches()]
            self._sync(trainer)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.attribute_path and self.profiler is not None and step == self.ATTRIBUTE_STEPS[1]:
            # Inclusive times: the parent operators (AccumulateGrad, CompiledFunctionBackward, ...) carry
            # the kernels they launched.
            self._write_profile(trainer, self.attribute_path, "device_time_total")
        if self.start is not None and step >= self.warmup + self.steps and self.seconds is None:
            self._sync(trainer)
            self.seconds = time.perf_counter() - self.start
            self.loss = float(outputs["loss"])  # a sanity check that every variant trains alike
            if not self.profile_steps:
                trainer.should_stop = True
                return
            self._start_profiler()
        elif self.profiler is not None and step >= self.warmup + self.steps + self.profile_steps:
            self._write_profile(trainer, self.profile_path, "self_device_time_total")
            trainer.should_stop = True


def run_variant(config: str, overrides: list[str], warmup: int, steps: int, root: str, profile_steps: int = 0,
                profile_path: str | None = None, attribute_path: str | None = None, report_layouts: bool = False,
                experiment: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> dict:
    """One `ddpm fit` run with a StepTimer; returns images/s and the run's facts."""
    from ddpm_lightning.config_bases import expand_config_bases
    from ddpm_lightning.lightning_cli import DDPMCLI
    from ddpm_lightning.module import DiffusionModule

    argv = expand_config_bases(["--config", config]) + [
        f"--trainer.max_steps={warmup + steps + profile_steps + 1}", f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false", "--trainer.logger=false", "--checkpoint.every_n_train_steps=0",
    ] + overrides
    sys.argv = sys.argv[:1]  # LightningCLI warns when it sees both args= and command-line arguments
    cli = DDPMCLI(DiffusionModule, L.LightningDataModule, subclass_mode_data=True, args=argv, run=False,
                  save_config_kwargs={"overwrite": True})
    timer = StepTimer(warmup, steps, profile_steps, profile_path, attribute_path, report_layouts)
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    # Each variant compiles anew: dynamo would otherwise reuse an earlier variant's code (its guards do not
    # cover inductor's settings), as the first +combo run did on the GPU (it timed the default's kernels).
    torch._dynamo.reset()
    with experiment():
        cli.trainer.fit(cli.model, cli.datamodule)
    batch = cli.datamodule.device_batch_size() * cli.trainer.world_size
    return {"images_per_s": batch * steps / timer.seconds, "batch": batch, "seconds": timer.seconds,
            "wall_s": time.perf_counter() - start, "net": cli.model.hparams.net, "image_size": cli.model.hparams.image_size,
            "in_channels": cli.model.hparams.in_channels, "module": cli.model, "final_loss": timer.loss,
            **({"grad_layout_mismatches": timer.layout_mismatches} if report_layouts else {})}


def diffusers_baseline(preset: str, mode: str, batch: int, warmup: int, steps: int, device: torch.device) -> float:
    """images/s of UNet2DModel's bare training loop (forward, MSE, backward, fused AdamW) in `mode`."""
    channels_last = "-cl" in mode
    net, kwargs = diffusers_unet(preset, device, channels_last)
    call = net
    if "compile" in mode:
        call = torch.compile(net, mode="reduce-overhead" if mode.endswith("-ro") else None)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=device.type == "cuda")
    size, channels = kwargs["sample_size"], kwargs["in_channels"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn_like(x)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with mode_autocast(mode, device):
            loss = F.mse_loss(call(x, t, return_dict=False)[0].float(), target)
        loss.backward()
        optimizer.step()

    return images_per_second(step, batch, warmup, steps, device)


def diffusers_baselines(modes: list[str], records: dict, args: argparse.Namespace, device: torch.device,
                        code: InductorCode | None) -> None:
    """Times (and empties) `modes` of the diffusers baseline at the first trained variant's net and batch."""
    first = next(iter(records.values()))
    time_baselines("train", modes,
                   lambda mode: diffusers_baseline(first["net"], mode, first["batch"], args.warmup, args.steps, device),
                   records, args, code, batch=first["batch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/cifar10_ddpm.yaml")
    parser.add_argument("--variants", nargs="+", default=["bf16-cl-compile-graph"], choices=sorted(VARIANTS))
    parser.add_argument("--diffusers", nargs="*", default=[], choices=DIFFUSERS_MODES)
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps (compilation, capture, autotuning)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--peak_tflops", type=float, default=800.0,
                        help="for MFU: the card's dense bf16 rate (800: an H100 SXM's measured matmul rate)")
    parser.add_argument("--root", default="/tmp/ddpm_train_throughput")
    parser.add_argument("--profile_steps", type=int, default=0, help="profile this many steps after timing")
    parser.add_argument("--profile_dir", default=".", help="writes profile-<variant>.txt here")
    parser.add_argument("--attribute", action="store_true",
                        help="profile steps 1-2 (compiled, not yet captured) by launching operator to "
                             "<profile_dir>/attrib-<variant>.txt, and list the weights whose gradient arrives "
                             "in another layout than the weight's (needs --warmup >= 3)")
    parser.add_argument("--inductor_code", default=None, help="append inductor's generated code to this file")
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="more `ddpm fit` overrides, last")
    args = parser.parse_args()

    rows, records = [], {}
    code = InductorCode(args.inductor_code) if args.inductor_code else None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pending = list(args.diffusers)  # timed once a variant has trained: a run cut at its time limit keeps the ratio
    for name in args.variants:
        if records and pending:
            diffusers_baselines(pending, records, args, device, code)
        if code:
            code.label = f"train {name}"
        try:
            result = run_variant(args.config, VARIANTS[name] + args.set, args.warmup, args.steps,
                                 f"{args.root}/{name}", args.profile_steps, f"{args.profile_dir}/profile-{name}.txt",
                                 experiment=next((make for suffix, make in EXPERIMENTS.items()
                                                  if name.endswith(suffix)), contextlib.nullcontext),
                                 # Only for the plain variants: an experiment differs in settings, not in which
                                 # operators launch the kernels.
                                 attribute_path=f"{args.profile_dir}/attrib-{name}.txt"
                                 if args.attribute and "+" not in name else None,
                                 report_layouts=args.attribute)
        except Exception as err:  # one failing variant must not cost the others' numbers
            print(f"[train] {name}: FAILED {type(err).__name__}: {err}", flush=True)
            traceback.print_exc()
            continue
        result.pop("module")
        records[name] = result
        print(f"[train] {name}: {result['images_per_s']:.0f} img/s, loss {result['final_loss']:.4f} at step "
              f"{args.warmup + args.steps} (wall {result['wall_s']:.0f} s)", flush=True)
        if "grad_layout_mismatches" in result:
            mismatches = result["grad_layout_mismatches"]
            print(f"[train] {name}: {len(mismatches)} weights receive gradients in another layout"
                  + "".join(f"\n[train]   {m['param']} {m['shape']}: param {m['param_stride']}, grad {m['grad_stride']}"
                            for m in mismatches[:8]), flush=True)
        if args.json:  # as it goes: a run stopped at its time limit keeps the variants it finished
            write_json(args.json, args, records)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not records:
        return 1
    diffusers_baselines(pending, records, args, device, code)
    first = next(iter(records.values()))
    flops = 3 * flops_per_forward(first["net"], first["image_size"], first["in_channels"])
    best_diffusers = max((r["images_per_s"] for k, r in records.items() if k.startswith("diffusers")), default=None)
    for name, record in records.items():
        record["mfu"] = record["images_per_s"] * flops / (args.peak_tflops * 1e12)
        ratio = record["images_per_s"] / best_diffusers if best_diffusers else None
        rows.append([name, f"{record['images_per_s']:.0f}", f"{100 * record['mfu']:.1f}%",
                     "" if ratio is None else f"{ratio:.2f}"])
    print_table(["variant", "img/s", "MFU", "vs best diffusers"], rows,
                f"training, {args.config}, batch {first['batch']}, {flops / 3e9:.1f} GFLOP/forward/image")
    if args.json:
        write_json(args.json, args, records, flops_per_train_image=flops)


if __name__ == "__main__":
    sys.exit(main())
