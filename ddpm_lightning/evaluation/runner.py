"""Running an evaluation grid: FID and IS per cell, bits/dim per checkpoint, resumable, over DDP ranks.

Every rank runs every cell (compute_fid_is shards the samples and all-reduces); rank 0 alone reads and
writes the results folder, and broadcasts which cells are already done so that all ranks skip the same
ones. Each cell uses the same seed, so cells share their initial noise (common random numbers): the
differences between cells are less noisy than independent runs would make them.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ddpm_lightning.data.transforms import to_signed_unit_range
from ddpm_lightning.evaluation.grid import Cell, check_grid, respacing_string
from ddpm_lightning.evaluation.plots import plot_fid_vs_skip, plot_fid_vs_steps
from ddpm_lightning.evaluation.results import ResultsStore, write_tables
from ddpm_lightning.evaluation.sources import EvalCheckpoint
from ddpm_lightning.metrics import FeatureStats, compute_fid_is
from ddpm_lightning.metrics.distributed import broadcast_from_rank_zero, rank_and_world_size
from ddpm_lightning.sampling import sample_seed

PLOT_NAMES = ("fid_vs_steps.png", "fid_vs_skip.png")


def _digest(*arrays: Any) -> str:
    hasher = hashlib.sha1()
    for array in arrays:
        hasher.update(memoryview(array.tobytes() if hasattr(array, "tobytes") else bytes(array)))
    return hasher.hexdigest()[:16]


@torch.no_grad()
def bits_per_dim(module: Any, images: Tensor, labels: Optional[Tensor], batch_size: int = 256, seed: int = 0,
                 use_ema: bool = True) -> float:
    """Mean bits/dim of uint8 [N, C, H, W] images under the full variational bound (Ho et al. eq. 5), over ranks."""
    rank, world_size = rank_and_world_size()
    device, model = module.device, module.eval_model(use_ema)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    # Whole batches of one global grid, dealt out to the ranks and each seeded by its first index, so that
    # every image meets the same noise however many ranks there are.
    for start in range(0, len(images), batch_size)[rank::world_size]:
        stop = min(start + batch_size, len(images))
        x_start = to_signed_unit_range(images[start:stop].to(device))
        kwargs = {"y": labels[start:stop].to(device)} if module.hparams.class_cond else None
        # calc_bpd_loop draws its noise from the global generator: seed it per batch, and put it back after.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(sample_seed(seed, start))
            bpd = module.diffusion.calc_bpd_loop(model, x_start, model_kwargs=kwargs)["total_bpd"]
        total += torch.stack([bpd.double().sum(), torch.tensor(float(len(bpd)), dtype=torch.float64, device=device)])
    if world_size > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1])


def evaluate_grid(
    checkpoints: Sequence[EvalCheckpoint], cells: Sequence[Cell], reference: FeatureStats, feature_extractor: nn.Module,
    output_dir: Union[str, Path], num_samples: int, batch_size: int = 256, seed: int = 0, use_ema: bool = True,
    ddim_spacing: str = "uniform", is_splits: int = 10, reference_name: str = "",
    bpd_data: Optional[tuple[Tensor, Tensor]] = None, progress: bool = True,
) -> list[dict[str, Any]]:
    """FID/IS of every cell (reusing finished ones in output_dir), bits/dim of every checkpoint when bpd_data
    (uint8 images, labels) is given; writes results.csv/.md after each cell and the two plots at the end.

    Call it on every rank. Returns the table's rows, one per cell, in the order of `cells`.
    """
    from tqdm.auto import tqdm

    rank, _ = rank_and_world_size()
    by_label = {checkpoint.label: checkpoint for checkpoint in checkpoints}
    check_grid(cells, {label: c.module.hparams.num_timesteps for label, c in by_label.items()}, ddim_spacing)
    store, with_bpd = ResultsStore(output_dir), bpd_data is not None
    shared = {"num_samples": num_samples, "seed": seed, "use_ema": use_ema, "is_splits": is_splits,
              "features": feature_extractor.cache_name, "reference": _digest(reference.mu, reference.sigma)}
    respacings = [respacing_string(c, by_label[c.label].module.hparams.num_timesteps, ddim_spacing) for c in cells]
    keys = [{"metric": "fid_is", "model": by_label[cell.label].identity, "sampler": cell.sampler, "steps": cell.steps,
             "respacing": respacing or "full", "skip_fraction": cell.skip_fraction, "eta": cell.eta, **shared,
             **_precision(by_label[cell.label])}
            for cell, respacing in zip(cells, respacings)]
    results = broadcast_from_rank_zero([store.get(key) for key in keys] if rank == 0 else None)
    bpd: dict[str, float] = {}

    def rows() -> list[dict[str, Any]]:
        done = [(cell, respacing, result) for cell, respacing, result in zip(cells, respacings, results) if result]
        return [_row(cell, respacing, result, by_label[cell.label], bpd.get(cell.label), reference_name, shared)
                for cell, respacing, result in done]

    todo = [index for index, result in enumerate(results) if result is None]
    for index in tqdm(todo, desc="grid cells", disable=not progress or rank != 0):
        cell, started = cells[index], time.perf_counter()
        metrics = compute_fid_is(
            by_label[cell.label].module, reference, feature_extractor, num_samples, seed, batch_size, is_splits,
            progress=progress, respacing=respacings[index], sampler=cell.sampler, eta=cell.eta or 0.0,
            skip_fraction=cell.skip_fraction, use_ema=use_ema,
        )
        results[index] = {**metrics, "seconds": time.perf_counter() - started}
        if rank == 0:
            store.put(keys[index], results[index])
            write_tables(rows(), output_dir, with_bpd)

    for checkpoint in checkpoints if with_bpd else ():
        images, labels = bpd_data
        key = {"metric": "bpd", "model": checkpoint.identity, "images": _digest(images.numpy()), "seed": seed,
               "use_ema": use_ema}
        stored = broadcast_from_rank_zero(store.get(key, "bpd") if rank == 0 else None)
        if stored is None:
            stored = {"bpd": bits_per_dim(checkpoint.module, images, labels, batch_size, seed, use_ema)}
            if rank == 0:
                store.put(key, stored, "bpd")
        bpd[checkpoint.label] = stored["bpd"]

    table = rows()
    if rank == 0 and table:
        write_tables(table, output_dir, with_bpd)
        plot_fid_vs_steps(table, Path(output_dir) / PLOT_NAMES[0])
        plot_fid_vs_skip(table, Path(output_dir) / PLOT_NAMES[1])
    return table


def _precision(checkpoint: EvalCheckpoint) -> dict[str, str]:
    """The sampling precision, part of a cell's identity when it is not float32 (keys of float32 cells predate it)."""
    precision = checkpoint.module.hparams.get("sample_precision", "32")
    return {} if precision == "32" else {"sample_precision": precision}


def _row(cell: Cell, respacing: Optional[str], result: dict[str, Any], checkpoint: EvalCheckpoint,
         bpd: Optional[float], reference_name: str, shared: dict[str, Any]) -> dict[str, Any]:
    hp = checkpoint.module.hparams
    return {"label": cell.label, "sampler": cell.sampler, "steps": cell.steps, "respacing": respacing or "full",
            "skip_fraction": cell.skip_fraction, "eta": cell.eta, "num_samples": shared["num_samples"],
            "fid": result["fid"], "is_mean": result["is_mean"], "is_std": result["is_std"],
            "seconds": result["seconds"], "bpd": bpd, "num_timesteps": hp.num_timesteps, "schedule": hp.schedule,
            "var_type": hp.var_type, "seed": shared["seed"], "use_ema": shared["use_ema"],
            "reference": reference_name, "ckpt_path": checkpoint.path}
