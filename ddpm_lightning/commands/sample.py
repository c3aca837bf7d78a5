"""`ddpm sample`: images from a checkpoint, sharded over every visible device, seeded per sample."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from jsonargparse import ArgumentParser

from ddpm_lightning.commands.speed_options import add_speed_arguments, apply_speed_options
from ddpm_lightning.sampling import SAMPLERS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ddpm sample", description="Sample images from a ddpm-lightning checkpoint.")
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by `ddpm fit`")
    parser.add_argument("--output_dir", type=str, required=True, help="writes samples.npz and grid.png here")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--respacing", type=Optional[str], default=None, help='e.g. "100", "ddim50"; default: all T steps')
    parser.add_argument("--sampler", type=str, default="ddpm", choices=list(SAMPLERS))
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    parser.add_argument("--skip_fraction", type=float, default=0.0, help="skip this fraction of the noisiest steps")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--no_ema", action="store_true", help="sample with the trained weights, not the EMA")
    parser.add_argument("--seed", type=int, default=0)
    add_speed_arguments(parser)
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--devices", type=str, default="1", help='"1", "4", or "-1" for every visible device')
    parser.add_argument("--grid_size", type=int, default=64, help="images in grid.png")
    return parser


def run_sample(argv: list[str]) -> None:
    """Parse, load the checkpoint, generate this rank's shard, and let rank 0 write the outputs."""
    import torch
    from lightning.fabric import Fabric

    from ddpm_lightning.checkpoint_io import load_module
    from ddpm_lightning.image_io import save_grid
    from ddpm_lightning.sampling import generate_uint8

    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num_samples and --batch_size must be >= 1")
    devices = int(args.devices) if args.devices.lstrip("-").isdigit() else args.devices
    fabric = Fabric(accelerator=args.accelerator, devices=devices, strategy="auto")
    fabric.launch()
    module = load_module(args.ckpt_path, use_ema=not args.no_ema)
    apply_speed_options(module, args)
    module = module.to(fabric.device).eval()

    # Contiguous shards of the sample indices; each sample's seed depends on its index only.
    rank, world = fabric.global_rank, fabric.world_size
    lo, hi = rank * args.num_samples // world, (rank + 1) * args.num_samples // world
    images, labels = generate_uint8(
        module, range(lo, hi), args.seed, args.batch_size, progress=rank == 0, respacing=args.respacing,
        sampler=args.sampler, eta=args.eta, skip_fraction=args.skip_fraction, use_ema=not args.no_ema,
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard = out / f".shard-{rank:05d}.pt"
    torch.save({"images": images, "labels": labels}, shard)
    fabric.barrier()
    if rank == 0:
        parts = [torch.load(out / f".shard-{r:05d}.pt") for r in range(world)]
        arrays = {"arr_0": torch.cat([p["images"] for p in parts]).numpy()}
        if parts[0]["labels"] is not None:
            arrays["arr_1"] = torch.cat([p["labels"] for p in parts]).numpy()
        np.savez(out / "samples.npz", **arrays)
        save_grid(arrays["arr_0"][: args.grid_size], out / "grid.png")
        for r in range(world):
            (out / f".shard-{r:05d}.pt").unlink()
        print(f"wrote {len(arrays['arr_0'])} samples to {out / 'samples.npz'} and a grid to {out / 'grid.png'}")
    fabric.barrier()
