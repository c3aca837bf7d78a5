"""Callbacks own evaluation and image logging: sample grids (SampleCallback) and FID / Inception Score (FIDCallback)."""
from ddpm_lightning.callbacks.fid import FIDCallback
from ddpm_lightning.callbacks.last_checkpoint import LastCheckpoint
from ddpm_lightning.callbacks.sample_grid import SampleCallback

__all__ = ["FIDCallback", "LastCheckpoint", "SampleCallback"]
