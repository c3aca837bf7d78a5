"""Shared by the benchmark scripts: the machine's description, FLOP counts, a plain table printer, profiles,
and inductor's generated code written beside them."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import time
from typing import Callable

import torch


def environment() -> dict:
    """What the numbers were measured on: card, torch, lightning, date."""
    import lightning

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "lightning": lightning.__version__,
            "cuda": torch.version.cuda, "date": datetime.date.today().isoformat()}


def flops_per_forward(preset: str, image_size: int, in_channels: int) -> float:
    """FLOPs of one image's forward pass of a preset UNet (convolutions and matmuls, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_lightning.models import build_unet

    net = build_unet(preset, image_size=image_size, in_channels=in_channels).eval()
    x = torch.zeros(1, in_channels, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, torch.zeros(1, dtype=torch.long))
    return float(counter.get_total_flops())


def print_table(header: list[str], rows: list[list[str]], title: str) -> None:
    """A markdown table, ready for benchmarks/RESULTS.md."""
    print(f"\n{title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def diffusers_unet(preset: str, device: torch.device, channels_last: bool):
    """diffusers' UNet2DModel configured like a project preset (see unet_throughput.diffusers_config)."""
    from diffusers import UNet2DModel

    from ddpm_lightning.models import build_unet
    from unet_throughput import diffusers_config

    kwargs, _ = diffusers_config(build_unet(preset).config)
    net = UNet2DModel(**kwargs).to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return net, kwargs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mode_autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for a diffusers baseline mode that names bf16, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in mode else contextlib.nullcontext()


def images_per_second(step: Callable[[], None], batch: int, warmup: int, iters: int, device: torch.device) -> float:
    """Runs `step` warmup times untimed, then times iters calls between two device synchronisations."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return batch * iters / (time.perf_counter() - start)


class InductorCode:
    """Appends the code inductor generates for each graph it compiles (the wrapper with its Triton kernels)
    to `path`, under a `label` the script sets per variant.

    Why: a profile names kernels (`triton_poi_fused__to_copy_add_clone_convolution_...`), and only the
    generated code says which buffers such a kernel reads and writes, in which strides, and where an extern
    kernel (a cuDNN convolution) gets a layout copy. Inductor reports a graph loaded from its on-disk
    cache too; code already written is referred to by its number, not written again.
    """

    def __init__(self, path: str):
        from torch._inductor.graph import GraphLowering

        self.path, self.label, self.seen = path, "", {}
        GraphLowering.save_output_code = self._save

    def _save(self, code: str) -> None:
        number = len(self.seen) + 1
        with open(self.path, "a") as handle:
            if code in self.seen:
                handle.write(f"# ===== {self.label}: the code of graph {self.seen[code]}\n")
            else:
                self.seen[code] = number
                handle.write(f"# ===== {self.label}: graph {number}\n{code}\n")


def write_profile(profiler, path: str, sort_by: str, row_limit: int) -> None:
    """A finished profile as a table at `path` (whole kernel names), and each event's device time and calls by
    name beside it (`path` with .json), which inductor_report.py --kernel_times joins with the generated code's
    bytes per kernel into each kernel's achieved bandwidth."""
    events = profiler.key_averages()
    with open(path, "w") as handle:
        handle.write(events.table(sort_by=sort_by, row_limit=row_limit, max_name_column_width=160))
    times = {e.key: {"calls": e.count, "device_us": e.self_device_time_total} for e in events
             if e.self_device_time_total > 0}
    with open(path.rsplit(".", 1)[0] + ".json", "w") as handle:
        json.dump(times, handle, indent=1)


def write_json(path: str, args, results: dict, **extra) -> None:
    """The machine, the arguments and the results, as the files in benchmarks/results/ hold them."""
    with open(path, "w") as handle:
        json.dump({"env": environment(), "args": vars(args), **extra, "results": results}, handle, indent=2)


def time_baselines(tag: str, modes: list[str], rate_of: Callable[[str], float], records: dict, args,
                   code: InductorCode | None, label: str = "", unit: str = "img/s", **extra) -> None:
    """Times (and empties) `modes` of the diffusers baseline with `rate_of(mode)` into `records`, writing the
    JSON after each, so that a run stopped at its time limit keeps what it measured. A failing mode is
    reported and skipped."""
    while modes:
        mode = modes.pop(0)
        if code:
            code.label = f"diffusers {mode}{label}"
        try:
            rate = rate_of(mode)
        except Exception as err:
            print(f"[{tag}] diffusers {mode}: FAILED {type(err).__name__}: {err}", flush=True)
            continue
        records[f"diffusers {mode}"] = {"images_per_s": rate, **extra}
        print(f"[{tag}] diffusers {mode}: {rate:.0f} {unit}", flush=True)
        if args.json:
            write_json(args.json, args, records)
