"""Training throughput through the real `ddpm fit` path, per fast-path variant, with a diffusers baseline.

Each variant builds the experiment config's Trainer, DataModule and DiffusionModule through DDPMCLI
(data loading, flips, EMA, logging and checkpoint callbacks included), trains `--warmup` steps, then
times `--steps` steps between two device synchronisations. The diffusers baseline is a bare loop
(forward, MSE, backward, AdamW) of UNet2DModel in the matching configuration, timed in the same process.

    python benchmarks/train_throughput.py --variants fp32 bf16-cl bf16-cl-compile-graph \\
        --diffusers bf16-cl-compile-ro --set --data.init_args.source=folder --data.init_args.data_dir=/tmp/cifar
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback

import lightning as L
import torch
import torch.nn.functional as F

from bench_common import diffusers_unet, flops_per_forward, print_table, synchronize, write_json



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
    # An experiment: compiled autograd traces AccumulateGrad too, so inductor may write each weight gradient in
    # its parameter's layout instead of leaving a strided copy per weight (see RESULTS.md's profile).
    "bf16-cl-compile-graph+ca": overrides("bf16-mixed", True, True, True),
}
DIFFUSERS_MODES = ("bf16", "bf16-cl", "bf16-cl-compile", "bf16-cl-compile-ro")


class StepTimer(L.Callback):
    """Times steps warmup..warmup+steps between device synchronisations, optionally profiles a few more
    steps (kernel time by operator, to `profile_path`), then stops the run."""

    def __init__(self, warmup: int, steps: int, profile_steps: int = 0, profile_path: str | None = None):
        self.warmup, self.steps = warmup, steps
        self.profile_steps, self.profile_path = profile_steps, profile_path
        self.start = self.seconds = self.profiler = None

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(trainer)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.start is not None and step >= self.warmup + self.steps and self.seconds is None:
            self._sync(trainer)
            self.seconds = time.perf_counter() - self.start
            self.loss = float(outputs["loss"])  # a sanity check that every variant trains alike
            if not self.profile_steps:
                trainer.should_stop = True
                return
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
        elif self.profiler is not None and step >= self.warmup + self.steps + self.profile_steps:
            self._sync(trainer)
            self.profiler.__exit__(None, None, None)
            table = self.profiler.key_averages().table(sort_by="self_device_time_total", row_limit=40)
            with open(self.profile_path, "w") as handle:
                handle.write(table)
            self.profiler = None
            trainer.should_stop = True


def run_variant(config: str, overrides: list[str], warmup: int, steps: int, root: str, profile_steps: int = 0,
                profile_path: str | None = None, compiled_autograd: bool = False) -> dict:
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
    timer = StepTimer(warmup, steps, profile_steps, profile_path)
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    import torch._dynamo

    torch._dynamo.config.compiled_autograd = compiled_autograd
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        torch._dynamo.config.compiled_autograd = False
    batch = cli.datamodule.device_batch_size() * cli.trainer.world_size
    return {"images_per_s": batch * steps / timer.seconds, "batch": batch, "seconds": timer.seconds,
            "wall_s": time.perf_counter() - start, "net": cli.model.hparams.net, "image_size": cli.model.hparams.image_size,
            "in_channels": cli.model.hparams.in_channels, "module": cli.model, "final_loss": timer.loss}


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
        context = torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in mode else contextlib.nullcontext()
        with context:
            loss = F.mse_loss(call(x, t, return_dict=False)[0].float(), target)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


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
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="more `ddpm fit` overrides, last")
    args = parser.parse_args()

    rows, records = [], {}
    for name in args.variants:
        try:
            result = run_variant(args.config, VARIANTS[name] + args.set, args.warmup, args.steps,
                                 f"{args.root}/{name}", args.profile_steps, f"{args.profile_dir}/profile-{name}.txt",
                                 compiled_autograd=name.endswith("+ca"))
        except Exception as err:  # one failing variant must not cost the others' numbers
            print(f"[train] {name}: FAILED {type(err).__name__}: {err}", flush=True)
            traceback.print_exc()
            continue
        result.pop("module")
        records[name] = result
        print(f"[train] {name}: {result['images_per_s']:.0f} img/s, loss {result['final_loss']:.4f} at step "
              f"{args.warmup + args.steps} (wall {result['wall_s']:.0f} s)", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not records:
        return 1
    first = next(iter(records.values()))
    flops = 3 * flops_per_forward(first["net"], first["image_size"], first["in_channels"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for mode in args.diffusers:
        try:
            rate = diffusers_baseline(first["net"], mode, first["batch"], args.warmup, args.steps, device)
        except Exception as err:
            print(f"[train] diffusers {mode}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        records[f"diffusers {mode}"] = {"images_per_s": rate, "batch": first["batch"]}
        print(f"[train] diffusers {mode}: {rate:.0f} img/s", flush=True)
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
