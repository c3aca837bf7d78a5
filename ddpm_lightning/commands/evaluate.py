"""`ddpm evaluate`: FID / IS of one or more checkpoints over samplers x step counts x skip fractions, resumable.

FID reference, first that applies: --reference_stats (an npz of mu and sigma: ours, TTUR's or pytorch-fid's),
else the statistics of --data's --reference_split, else those of the DataModule recorded in the first
`ddpm fit` checkpoint (cached on disk either way). --bpd reads --data, else that recorded DataModule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentParser

from ddpm_lightning.commands.speed_options import add_speed_arguments, apply_speed_options
from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.evaluation.grid import DDIM_SPACINGS
from ddpm_lightning.evaluation.sources import WEIGHTS_KINDS
from ddpm_lightning.metrics.reference_stats import REFERENCE_SPLITS
from ddpm_lightning.sampling import SAMPLERS

IMPORT_OPTIONS = ("weights_kind", "schedule", "num_timesteps", "var_type")  # one value, or one per checkpoint


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ddpm evaluate", description="FID / IS of checkpoints over a grid of samplers, "
                            "sampling steps and skip fractions; reruns skip the finished cells.")
    add = parser.add_argument
    add("--ckpt_path", type=str, action="append", required=True,
        help="`ddpm fit` checkpoint or released weights (--weights_kind); repeat or comma-list to compare models")
    add("--labels", type=Optional[str], default=None, help="one per checkpoint (default: run folder or file name)")
    add("--output_dir", type=str, required=True, help="results.csv/.md, fid_vs_steps.png, fid_vs_skip.png, cells/")
    add("--respacing", type=str, default="25,50,100,200,1000", help="sampling step counts; T = all steps")
    add("--sampler", type=str, default="ddpm,ddim", help=" and/or ".join(SAMPLERS))
    add("--skip_fraction", type=str, default="0,0.1,0.2,0.3", help="fractions of the noisiest steps skipped, in [0, 1)")
    add("--eta", type=float, default=0.0, help="DDIM stochasticity")
    add("--ddim_spacing", type=str, default="uniform", help=f"{' | '.join(DDIM_SPACINGS)}: DDIM takes 'N' or 'ddimN'")
    add("--num_samples", type=int, default=50000)
    add("--batch_size", type=int, default=256)
    add("--seed", type=int, default=0)
    add("--no_ema", action="store_true", help="evaluate the trained weights, not the EMA")
    add("--is_splits", type=int, default=10, help="Inception Score splits")
    add("--inception_weights", type=Optional[str], default=None, help="torch-fidelity's file (default: torch.hub's)")
    add("--reference_stats", type=Optional[str], default=None, help="npz with mu and sigma")
    parser.add_subclass_arguments(ImageDataModule, "data", required=False, help="reference statistics and --bpd data")
    add("--reference_split", type=str, default="train", help=" | ".join(REFERENCE_SPLITS))
    add("--stats_cache_dir", type=Optional[str], default=None, help="reference statistics cache")
    add("--bpd", action="store_true", help="bits/dim of each checkpoint on test (else validation) images")
    add("--bpd_num_samples", type=int, default=1000)
    add("--weights_kind", type=str, default="checkpoint", help=" | ".join(WEIGHTS_KINDS))
    add("--schedule", type=Optional[str], default=None, help="imported weights: linear | cosine (default: release's)")
    add("--num_timesteps", type=Optional[str], default=None, help="imported weights: T (default: the release's)")
    add("--var_type", type=Optional[str], default=None, help="imported weights (default: learned_range if learned)")
    add("--image_size", type=Optional[int], default=None, help="imported weights whose size cannot be inferred")
    add("--wandb_project", type=Optional[str], default=None, help="log the table and plots to this W&B project")
    add_speed_arguments(parser)
    add("--accelerator", type=str, default="auto")
    add("--devices", type=str, default="1", help='"1", "4", or "-1" for every visible device')
    return parser


def run_evaluate(argv: list[str], feature_extractor: Optional[Any] = None) -> list[dict[str, Any]]:
    """Parse and check everything, load the models and the reference, run the grid; returns the table's rows.

    feature_extractor replaces the Inception network (tests use a small stand-in).
    """
    from lightning.fabric import Fabric

    from ddpm_lightning.evaluation import grid, sources
    from ddpm_lightning.evaluation.results import table_columns
    from ddpm_lightning.evaluation.runner import PLOT_NAMES, evaluate_grid
    from ddpm_lightning.metrics import FeatureStats, build_inception, reference_stats, resolve_inception_weights

    parser = build_parser()
    args = parser.parse_args(argv)
    steps, samplers = grid.parse_steps(args.respacing), grid.parse_samplers(args.sampler)
    skip_fractions = grid.parse_skip_fractions(args.skip_fraction)
    for name, minimum in (("num_samples", 2), ("batch_size", 1), ("is_splits", 1), ("bpd_num_samples", 1)):
        if getattr(args, name) < minimum:
            raise ValueError(f"--{name} must be >= {minimum}, got {getattr(args, name)}")
    if args.reference_split not in REFERENCE_SPLITS:
        raise ValueError(f"--reference_split {args.reference_split!r}: valid: {', '.join(REFERENCE_SPLITS)}")
    paths = grid.split_list(args.ckpt_path)
    labels = sources.resolve_labels(paths, grid.split_list(args.labels))
    imports = [dict(zip(IMPORT_OPTIONS, values)) for values in zip(*(
        sources.per_checkpoint(f"--{name}", grid.split_list(getattr(args, name)), len(paths)) for name in IMPORT_OPTIONS
    ))]
    if args.reference_stats is not None and not Path(args.reference_stats).expanduser().is_file():
        raise FileNotFoundError(f"--reference_stats: no file at '{args.reference_stats}'")
    if feature_extractor is None and args.inception_weights is not None:
        resolve_inception_weights(args.inception_weights)  # a wrong path fails now, not after loading the models
    data = parser.instantiate(args).data if args.data else None

    devices = int(args.devices) if args.devices.lstrip("-").isdigit() else args.devices
    fabric = Fabric(accelerator=args.accelerator, devices=devices, strategy="auto")
    fabric.launch()
    checkpoints = [sources.load_checkpoint(path, label, image_size=args.image_size, use_ema=not args.no_ema, **options)
                   for path, label, options in zip(paths, labels, imports)]
    for checkpoint in checkpoints:
        apply_speed_options(checkpoint.module, args)
        checkpoint.module.to(fabric.device)
    cells = grid.build_grid(labels, samplers, steps, skip_fractions, args.eta)
    grid.check_grid(cells, {c.label: c.module.hparams.num_timesteps for c in checkpoints}, args.ddim_spacing)
    needed = " and ".join(need for need, wanted in (("the FID reference", args.reference_stats is None),
                                                    ("--bpd", args.bpd)) if wanted)
    data = sources.resolve_data(data, checkpoints, needed)

    extractor = feature_extractor if feature_extractor is not None else build_inception(args.inception_weights)
    extractor = extractor.to(fabric.device).eval()
    if args.reference_stats is not None:
        reference, reference_name = FeatureStats.load(args.reference_stats), str(args.reference_stats)
    else:
        reference = reference_stats(data, extractor, args.reference_split, args.stats_cache_dir)
        reference_name = f"{data.owner}:{args.reference_split}"
    bpd_data = sources.bpd_batches(data, args.bpd_num_samples) if args.bpd else None

    rows = evaluate_grid(checkpoints, cells, reference, extractor, args.output_dir, args.num_samples, args.batch_size,
                         args.seed, not args.no_ema, args.ddim_spacing, args.is_splits, reference_name, bpd_data)
    if fabric.global_rank == 0:
        out = Path(args.output_dir)
        print(f"wrote {len(rows)} rows to {out / 'results.csv'} and results.md; plots: {', '.join(PLOT_NAMES)}")
        if args.wandb_project:
            from ddpm_lightning.evaluation.wandb_log import log_to_wandb

            settings = {k: v for k, v in args.as_dict().items() if k != "data"}
            plots = [out / name for name in PLOT_NAMES]
            log_to_wandb(args.wandb_project, out, rows, table_columns(args.bpd), plots, settings)
    fabric.barrier()
    return rows
