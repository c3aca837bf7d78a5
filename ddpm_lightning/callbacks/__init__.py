"""Callbacks own evaluation and image logging (SampleCallback, FIDCallback) and what a resume needs (LastCheckpoint,
RNGState)."""
from ddpm_lightning.callbacks.fid import FIDCallback
from ddpm_lightning.callbacks.last_checkpoint import LastCheckpoint
from ddpm_lightning.callbacks.rng_state import RNGState
from ddpm_lightning.callbacks.sample_grid import SampleCallback

__all__ = ["FIDCallback", "LastCheckpoint", "RNGState", "SampleCallback"]
