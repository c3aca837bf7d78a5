"""Sampling throughput (network forwards per second) of the real sampling path, with a diffusers baseline.

Each variant builds a DiffusionModule with the preset network (random weights: speed does not depend
on them) and its fast-path options, warms up one batch (compilation and graph capture), then times
`sampling.generate_uint8` (per-sample seeded noise, the respaced DDPM loop, uint8 conversion) over
`--num_batches` batches. Forward img/s = samples x steps / seconds. The diffusers baseline is a bare
loop of UNet2DModel forwards on one batch under inference_mode. A variant name with the suffix `+bench`
runs with cuDNN's autotuner on (`torch.backends.cudnn.benchmark`, which `ddpm fit` sets through the
Trainer but the sampling commands leave at torch's default, off). The suffix `+one-kernel-gn` compiles each
GroupNorm with what follows it as one kernel (`group_norm_act`, the default from session 9 until GPU run 3
measured it slower), `+combo` with inductor's combo kernels, `+autocast-weights` with the weights cast by
autocast at every call, as before session 10 (the A/B for `accel/held_weights.py`), `+eager-noise` with the seeded
noise drawn eagerly where the module compiles it (the A/B for session 17's compiled draw), and `+cdt` with the
module's `compile_tuning` (inductor's coordinate-descent tuning of each Triton kernel). Suffixes combine
(`bf16-cl-compile-graph+one-kernel-gn+cdt`). The diffusers baselines run right after the first variant, so that a
run stopped at its time limit still has the ratio.

    python benchmarks/sample_throughput.py --batch_size 512 --respacing 100 \\
        --variants fp32 bf16-cl-graph bf16-cl-compile-graph --diffusers bf16-cl-compile-ro
"""

from __future__ import annotations

import argparse
import contextlib
import time
import traceback
from unittest import mock

import torch

from bench_common import (InductorCode, diffusers_unet, flops_per_forward, images_per_second, mode_autocast,
                          print_table, synchronize, time_baselines, write_json, write_profile)

VARIANTS = {
    "fp32": dict(),
    "bf16": dict(sample_precision="bf16-mixed"),
    "bf16-cl": dict(sample_precision="bf16-mixed", channels_last=True),
    "bf16-cl-graph": dict(sample_precision="bf16-mixed", channels_last=True, cuda_graph=True),
    "bf16-compile-graph": dict(sample_precision="bf16-mixed", compile=True, cuda_graph=True),
    "bf16-cl-compile-graph": dict(sample_precision="bf16-mixed", channels_last=True, compile=True, cuda_graph=True),
    "bf16-cl-compile-ma-graph": dict(sample_precision="bf16-mixed", channels_last=True, compile=True,
                                     compile_mode="max-autotune-no-cudagraphs", cuda_graph=True),
}
SUFFIXES = ("+bench", "+one-kernel-gn", "+channel-stats", "+combo", "+autocast-weights", "+eager-noise", "+cdt")
DIFFUSERS_MODES = ("fp32", "bf16", "bf16-cl", "bf16-cl-compile", "bf16-cl-compile-ro")


def variant_parts(name: str) -> tuple[str, frozenset[str]]:
    """A variant name's base (a key of VARIANTS) and its suffixes, each at most once, in any order."""
    base, *rest = name.split("+")
    suffixes = frozenset(f"+{suffix}" for suffix in rest)
    if base not in VARIANTS or not suffixes <= set(SUFFIXES) or len(suffixes) != len(rest):
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: one of {', '.join(VARIANTS)}, "
                                         f"then any of the suffixes {' '.join(SUFFIXES)}")
    return base, suffixes


def variant_name(name: str) -> str:
    """argparse's check of a variant name."""
    variant_parts(name)
    return name


def variant_options(name: str) -> dict:
    """The DiffusionModule options of a variant name: its base's, with compile_tuning for `+cdt`."""
    base, suffixes = variant_parts(name)
    return {**VARIANTS[base], **({"compile_tuning": True} if "+cdt" in suffixes else {})}


@contextlib.contextmanager
def variant_context(name: str):
    """What a variant's suffixes set while it runs: cuDNN's autotuner on for `+bench` (off otherwise), the
    one-kernel GroupNorm for `+one-kernel-gn`, GroupNorm statistics from per-channel ones for `+channel-stats`
    (GroupNorm32.channel_statistics), inductor's combo kernels for `+combo`, the weights cast at each
    call for `+autocast-weights`, the noise drawn eagerly for `+eager-noise` (`+cdt` is a module option:
    variant_options); the previous settings afterwards.
    Dynamo forgets earlier variants' code first, since its guards need not cover what a suffix changes."""
    import torch._inductor.config as inductor_config

    from ddpm_lightning.accel import FastForward
    from ddpm_lightning.diffusion import SeededNoise
    from ddpm_lightning.models import layers

    suffixes = variant_parts(name)[1]
    torch._dynamo.reset()
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = "+bench" in suffixes
    try:
        with mock.patch.object(layers.GroupNorm32, "one_kernel_sampling", "+one-kernel-gn" in suffixes), \
                mock.patch.object(layers.GroupNorm32, "channel_statistics", "+channel-stats" in suffixes), \
                mock.patch.object(FastForward, "hold_weights", "+autocast-weights" not in suffixes), \
                mock.patch.object(SeededNoise, "compiled_draws", "+eager-noise" not in suffixes), \
                inductor_config.patch(combo_kernels="+combo" in suffixes or inductor_config.combo_kernels):
            yield
    finally:
        torch.backends.cudnn.benchmark = saved


def build_module(preset: str, image_size: int, in_channels: int, device: torch.device, **options):
    """A random-weights module; seeded, so every variant holds the same weights."""
    from ddpm_lightning.module import DiffusionModule

    torch.manual_seed(0)
    module = DiffusionModule(net=preset, image_size=image_size, in_channels=in_channels, **options)
    # Output layers start at zero; random ones make the output comparison below meaningful.
    # Drawn in logical order and copied, so that a channels_last weight gets the same values.
    weight = torch.randn(module.net.conv_out.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    with torch.no_grad():
        for net in (module.net, *module.ema.averages):
            net.conv_out.weight.copy_(weight)
    return module.to(device).eval()


@torch.no_grad()
def relative_error(module, reference, batch_size: int) -> float:
    """||fast - fp32 eager|| / ||fp32 eager|| of the sampling network (EMA weights) on one noisy batch."""
    hp = module.hparams
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch_size, hp.in_channels, hp.image_size, hp.image_size, generator=g).to(module.device)
    t = torch.randint(0, hp.num_timesteps, (batch_size,), generator=g).to(module.device)
    fast = module.eval_model()(x, t).float()
    exact = reference.eval_model()(x, t).float()
    return float((fast - exact).norm() / exact.norm())


@torch.no_grad()
def noise_difference(module, batch_size: int) -> float:
    """max |drawn as sampling draws it - drawn eagerly| of one seeded noise batch: 0 unless the module compiles
    the draw (then Box–Muller's float32 log, cos and sin may round differently; the integer words may not)."""
    from ddpm_lightning.sampling import per_sample_noise

    hp = module.hparams
    shape = (batch_size, hp.in_channels, hp.image_size, hp.image_size)
    fast = per_sample_noise(0, range(batch_size), module.device, compile=bool(hp.compile)).randn(shape)
    eager = per_sample_noise(0, range(batch_size), module.device).randn(shape)
    return float((fast - eager).abs().max())


def time_variant(module, batch_size: int, num_batches: int, respacing: str) -> tuple[float, float]:
    """Forward passes per second of generate_uint8 over num_batches batches, and the seconds of the warm-up batch
    before them (compilation, kernel tuning, graph capture: what an evaluation pays once)."""
    from ddpm_lightning.sampling import generate_uint8

    steps = module.diffusion.respace(respacing).num_timesteps
    start = time.perf_counter()
    generate_uint8(module, range(batch_size), seed=1, batch_size=batch_size, respacing="5")  # warm-up, capture
    synchronize(module.device)  # the warm-up's end, and the timed batches' start
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    images, _ = generate_uint8(module, range(batch_size * num_batches), seed=0, batch_size=batch_size,
                               respacing=respacing)
    synchronize(module.device)
    seconds = time.perf_counter() - start
    assert images.shape[0] == batch_size * num_batches
    return batch_size * num_batches * steps / seconds, warmup


def profile_variant(module, batch_size: int, respacing: str, path: str) -> None:
    """Kernel time by operator over one batch of sampling (run after time_variant: compiled and captured)."""
    from ddpm_lightning.sampling import generate_uint8

    activities = [torch.profiler.ProfilerActivity.CPU]
    if module.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        generate_uint8(module, range(batch_size), seed=2, batch_size=batch_size, respacing=respacing)
        synchronize(module.device)
    sort = "self_device_time_total" if module.device.type == "cuda" else "self_cpu_time_total"
    write_profile(profiler, path, sort, row_limit=40)


def diffusers_forward(preset: str, mode: str, batch: int, iters: int, device: torch.device) -> float:
    """Forward img/s of UNet2DModel in a bare inference loop in `mode`."""
    channels_last = "-cl" in mode
    net, kwargs = diffusers_unet(preset, device, channels_last)
    net.eval()
    call = net
    if "compile" in mode:
        call = torch.compile(net, mode="reduce-overhead" if mode.endswith("-ro") else None)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, kwargs["in_channels"], kwargs["sample_size"], kwargs["sample_size"], device=device)
    x = x.contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        with torch.inference_mode(), mode_autocast(mode, device):
            call(x, t, return_dict=False)

    return images_per_second(step, batch, 3, iters, device)


def diffusers_baselines(modes: list[str], records: dict, args: argparse.Namespace, device: torch.device,
                        code: InductorCode | None) -> None:
    """Times (and empties) `modes` of the diffusers baseline into `records`."""
    time_baselines("sample", modes, lambda mode: diffusers_forward(args.preset, mode, args.batch_size, 20, device),
                   records, args, code, label=f" batch {args.batch_size}", unit="forward img/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ddpm_cifar10")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--in_channels", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--respacing", default="100", help="sampling steps per image")
    parser.add_argument("--num_batches", type=int, default=2, help="timed batches per variant")
    parser.add_argument("--variants", nargs="+", default=["bf16-cl-compile-graph"], type=variant_name,
                        help=f"a base ({', '.join(VARIANTS)}), then any of the suffixes {' '.join(SUFFIXES)}")
    parser.add_argument("--diffusers", nargs="*", default=[], choices=DIFFUSERS_MODES)
    parser.add_argument("--peak_tflops", type=float, default=800.0, help="for MFU: the card's dense bf16 rate")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile_dir", default=None, help="write profile-<variant>.txt (one batch) here")
    parser.add_argument("--inductor_code", default=None, help="append inductor's generated code to this file")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    code = InductorCode(args.inductor_code) if args.inductor_code else None
    reference = build_module(args.preset, args.image_size, args.in_channels, device)
    records = {}
    pending = list(args.diffusers)
    for index, name in enumerate(args.variants):
        if index == 1:
            diffusers_baselines(pending, records, args, device, code)
        if code:
            code.label = f"sample {name} batch {args.batch_size}"
        try:
            module = build_module(args.preset, args.image_size, args.in_channels, device, **variant_options(name))
            with variant_context(name):
                rate, warmup = time_variant(module, args.batch_size, args.num_batches, args.respacing)
                # After timing, so the comparison runs on the captured graph (the batch shape is the same).
                records[name] = {"images_per_s": rate, "rel_error": relative_error(module, reference, args.batch_size),
                                 "noise_max_diff": noise_difference(module, args.batch_size),
                                 "warmup_s": warmup, "cudnn_benchmark": torch.backends.cudnn.benchmark}
                if args.profile_dir:
                    profile_variant(module, args.batch_size, args.respacing,
                                    f"{args.profile_dir}/profile-sample-{name}.txt")
            if args.json:  # as it goes: a run stopped at its time limit keeps the variants it finished
                write_json(args.json, args, records)
        except Exception as err:  # one failing variant must not cost the others' numbers
            print(f"[sample] {name}: FAILED {type(err).__name__}: {err}", flush=True)
            traceback.print_exc()
            continue
        print(f"[sample] {name}: {rate:.0f} forward img/s, relative error vs fp32 {records[name]['rel_error']:.1e}, "
              f"noise vs eager {records[name]['noise_max_diff']:.1e}, warm-up {warmup:.0f} s", flush=True)
        del module
    diffusers_baselines(pending, records, args, device, code)
    flops = flops_per_forward(args.preset, args.image_size, args.in_channels)
    best = max((r["images_per_s"] for k, r in records.items() if k.startswith("diffusers")), default=None)
    rows = []
    for name, record in records.items():
        record["mfu"] = record["images_per_s"] * flops / (args.peak_tflops * 1e12)
        error = f"{record['rel_error']:.1e}" if "rel_error" in record else ""
        rows.append([name, f"{record['images_per_s']:.0f}", f"{100 * record['mfu']:.1f}%",
                     f"{record['images_per_s'] / best:.2f}" if best else "", error])
    print_table(["variant", "forward img/s", "MFU", "vs best diffusers", "rel. error vs fp32"], rows,
                f"sampling, {args.preset}, batch {args.batch_size}, respacing {args.respacing}")
    if args.json:
        write_json(args.json, args, records)


if __name__ == "__main__":
    main()
