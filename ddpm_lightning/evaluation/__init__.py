"""`ddpm evaluate`: FID / IS (and bits/dim) over a grid of samplers, step counts and skip fractions."""
from ddpm_lightning.evaluation.grid import (
    DDIM_SPACINGS, Cell, build_grid, check_grid, parse_samplers, parse_skip_fractions, parse_steps, split_list,
)
from ddpm_lightning.evaluation.plots import fid_series, plot_fid_vs_skip, plot_fid_vs_steps
from ddpm_lightning.evaluation.results import ResultsStore, read_csv, write_tables
from ddpm_lightning.evaluation.runner import PLOT_NAMES, bits_per_dim, evaluate_grid
from ddpm_lightning.evaluation.sources import (
    WEIGHTS_KINDS, EvalCheckpoint, bpd_batches, datamodule_from_checkpoint, load_checkpoint, resolve_data,
    resolve_labels,
)

__all__ = [
    "DDIM_SPACINGS", "Cell", "build_grid", "check_grid", "parse_samplers", "parse_skip_fractions", "parse_steps",
    "split_list", "fid_series", "plot_fid_vs_skip", "plot_fid_vs_steps", "ResultsStore", "read_csv", "write_tables",
    "PLOT_NAMES", "bits_per_dim", "evaluate_grid", "WEIGHTS_KINDS", "EvalCheckpoint", "bpd_batches",
    "datamodule_from_checkpoint", "load_checkpoint", "resolve_data", "resolve_labels",
]
