"""Throughput of the project UNet against diffusers' UNet2DModel in a matched configuration.

Times training steps (forward + backward + AdamW) and inference forward passes in images/s,
interleaving the two networks in one process and reporting the median over repetitions.

    python benchmarks/unet_throughput.py --config ddpm_cifar10 --batch_size 8 --precision fp32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ddpm_lightning.models import PRESETS, build_unet
from ddpm_lightning.models.convert_diffusers import convert_state_dict
from ddpm_lightning.models.import_weights import load_strict


def diffusers_config(config: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """UNet2DModel kwargs for a project UNet config, and whether the match is exact (heads may differ)."""
    if config["resblock_updown"]:
        raise ValueError("diffusers' UNet2DModel has no matching resblock_updown option")
    base, mult, size = config["base_channels"], config["channel_mult"], config["image_size"]
    attention = [size // 2**level in config["attention_resolutions"] for level, _ in enumerate(mult)]
    down = ["AttnDownBlock2D" if flag else "DownBlock2D" for flag in attention]
    # diffusers takes one head width for the whole net; ADM takes one head count.
    widths = {base * m for m, flag in zip(mult, attention, strict=True) if flag} | {base * mult[-1]}
    if config["num_head_channels"]:
        head_dim, exact = config["num_head_channels"], True
    elif config["num_heads"] == 1:
        head_dim, exact = None, True
    else:
        head_dim = max(widths) // config["num_heads"]
        exact = all(width // head_dim == config["num_heads"] for width in widths)
    kwargs = dict(
        sample_size=size, in_channels=config["in_channels"],
        out_channels=config["in_channels"] * (2 if config["learn_sigma"] else 1),
        block_out_channels=tuple(base * m for m in mult), layers_per_block=config["num_res_blocks"],
        down_block_types=tuple(down), up_block_types=tuple(n.replace("Down", "Up") for n in reversed(down)),
        attention_head_dim=head_dim, downsample_padding=0 if config["downsample_padding"] == "asymmetric" else 1,
        flip_sin_to_cos=config["flip_sin_to_cos"], freq_shift=config["freq_shift"], norm_eps=config["norm_eps"],
        norm_num_groups=config["norm_groups"], attn_norm_num_groups=config["norm_groups"],
        resnet_time_scale_shift="scale_shift" if config["use_scale_shift_norm"] else "default",
        dropout=config["dropout"], num_class_embeds=config["num_classes"],
    )  # fmt: skip
    return kwargs, exact


def _measure(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Seconds per call of step, averaged over iters calls."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ddpm_cifar10", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2, help="timed calls per repetition")
    parser.add_argument("--json", default=None, help="write the results to this path")
    args = parser.parse_args()
    from diffusers import UNet2DModel

    device = torch.device(args.device)
    torch.manual_seed(0)
    project = build_unet(args.config)
    reference_kwargs, exact = diffusers_config(project.config)
    reference = UNet2DModel(**reference_kwargs)
    # Same weights in both (the project net's zero-initialised layers would otherwise be special).
    load_strict(project, *convert_state_dict(reference.state_dict(), project))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    nets = {"project": project, "diffusers": reference}
    calls: dict[str, Callable[..., torch.Tensor]] = {
        "project": lambda x, t: project(x, t),
        "diffusers": lambda x, t: reference(x, t, return_dict=False)[0],
    }
    for name, net in nets.items():
        net.to(device, memory_format=memory_format)
        if args.compile:
            compiled = torch.compile(net)
            calls[name] = (lambda c: lambda x, t: c(x, t))(compiled) if name == "project" else (
                lambda c: lambda x, t: c(x, t, return_dict=False)[0])(compiled)  # fmt: skip
    size, channels = project.image_size, project.in_channels
    x = torch.randn(args.batch_size, channels, size, size, device=device).to(memory_format=memory_format)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    target = torch.randn(args.batch_size, project.out_channels, size, size, device=device)

    def autocast() -> contextlib.AbstractContextManager:
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    optimizers = {name: torch.optim.AdamW(net.parameters(), lr=1e-4) for name, net in nets.items()}

    def train_step(name: str) -> Callable[[], None]:
        def step() -> None:
            optimizers[name].zero_grad(set_to_none=True)
            with autocast():
                loss = F.mse_loss(calls[name](x, t).float(), target)
            loss.backward()
            optimizers[name].step()

        return step

    def forward_step(name: str) -> Callable[[], None]:
        def step() -> None:
            with torch.inference_mode(), autocast():
                calls[name](x, t)

        return step

    with torch.no_grad():  # sanity: the matched networks compute the same function
        nets["project"].eval(), nets["diffusers"].eval()
        max_diff = (calls["project"](x, t) - calls["diffusers"](x, t)).abs().max().item()
    load_before = os.getloadavg()
    seconds: dict[str, dict[str, list[float]]] = {"train": {n: [] for n in nets}, "forward": {n: [] for n in nets}}
    for rep in range(args.reps + 1):  # repetition 0 is warm-up (allocator, compile, caches)
        order = list(nets) if rep % 2 == 0 else list(reversed(nets))  # alternate who goes first
        for mode, make in (("train", train_step), ("forward", forward_step)):
            for name in order:
                nets[name].train(mode == "train")
                elapsed = _measure(make(name), args.iters, device)
                if rep:
                    seconds[mode][name].append(elapsed)

    results = {}
    print(
        f"config={args.config} device={device} batch={args.batch_size} precision={args.precision} "
        f"channels_last={args.channels_last} compile={args.compile} heads_match={exact} max|diff|={max_diff:.2e} "
        f"loadavg={load_before[0]:.1f}->{os.getloadavg()[0]:.1f}"
    )
    print(f"{'mode':<8} {'project img/s':>14} {'diffusers img/s':>16} {'ratio':>7} {'paired':>7}")
    for mode, per_net in seconds.items():
        rates = {name: args.batch_size / statistics.median(values) for name, values in per_net.items()}
        ratio = rates["project"] / rates["diffusers"]
        # Each repetition times both nets back to back, so its own ratio shrugs off slow load drifts.
        paired = statistics.median(d / p for p, d in zip(per_net["project"], per_net["diffusers"], strict=True))
        results[mode] = {"images_per_s": rates, "ratio": ratio, "paired_ratio": paired, "seconds_per_call": per_net}
        print(f"{mode:<8} {rates['project']:>14.2f} {rates['diffusers']:>16.2f} {ratio:>7.3f} {paired:>7.3f}")
    if args.json:
        import diffusers

        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   platform.processor()) if platform.system() == "Linux" else platform.processor()  # fmt: skip
        record = dict(
            args=vars(args), torch=torch.__version__, diffusers=diffusers.__version__, cpu=cpu,
            threads=torch.get_num_threads(), gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
            heads_match=exact, max_abs_output_diff=max_diff, load_average_before_after=[load_before, os.getloadavg()],
            results=results,
        )  # fmt: skip
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=2)


if __name__ == "__main__":
    main()
