"""SampleCallback: a fixed-seed grid of EMA samples every N steps and at the end of training, saved and logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.loggers import Logger

from ddpm_lightning.image_io import grid_tensor, save_grid
from ddpm_lightning.metrics.fid_is import sampler_tag
from ddpm_lightning.sampling import check_respacing, check_sampling_options, generate_uint8


def log_grid(logger: Logger, key: str, grid: torch.Tensor, step: int) -> None:
    """Logs a float [C, H, W] grid in [0, 1] to a logger that takes images; others (CSVLogger) are skipped."""
    if callable(getattr(logger, "log_image", None)):  # WandbLogger
        # Rounded as torchvision's save_image rounds, so the logged grid is the PNG's.
        hwc = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        logger.log_image(key=key, images=[hwc], step=step)
        return
    add_image = getattr(getattr(logger, "experiment", None), "add_image", None)
    if callable(add_image):  # TensorBoardLogger's SummaryWriter
        add_image(key, grid, global_step=step)


class SampleCallback(L.Callback):
    """Every every_n_steps optimizer steps, and when training ends, samples a fixed-seed grid on rank zero.

    The grid is saved as <output_dir or trainer.default_root_dir>/samples/step_XXXXXXX.png and logged to
    every logger that takes images (W&B's log_image, TensorBoard's add_image) as samples/<sampler tag>.
    Sample i has seed (seed, i), so every grid shows the same noise through training.

    Args:
        every_n_steps: optimizer steps between grids.
        num_samples: images in the grid.
        sampler, respacing, eta, skip_fraction: as in DiffusionModule.sample ("ddpm" | "ddim", "100", ...).
        use_ema: sample with the EMA weights (the first decay), as evaluations do.
        seed: the run seed of the per-sample noise.
        batch_size: images per sampling batch (default: all at once).
        output_dir: where samples/ goes (default: trainer.default_root_dir).
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 64,
        sampler: str = "ddpm",
        respacing: Optional[str] = "100",
        eta: float = 0.0,
        skip_fraction: float = 0.0,
        use_ema: bool = True,
        seed: int = 0,
        batch_size: Optional[int] = None,
        output_dir: Optional[str] = None,
    ):
        super().__init__()
        check_sampling_options(sampler, skip_fraction, eta)
        checks = (("every_n_steps", every_n_steps), ("num_samples", num_samples), ("batch_size", batch_size or 1))
        for name, value in checks:
            if value < 1:
                raise ValueError(f"SampleCallback: {name} must be >= 1, got {value}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.sample_kwargs = dict(sampler=sampler, respacing=respacing, eta=eta, skip_fraction=skip_fraction,
                                  use_ema=use_ema)
        self.seed = seed
        self.batch_size = batch_size or num_samples
        self.output_dir = output_dir
        self.tag = sampler_tag(sampler, respacing, skip_fraction, eta)
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # a bad respacing fails now, not at the first grid thousands of steps in
            check_respacing(self.sample_kwargs["respacing"], pl_module.diffusion.num_timesteps)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tag=self.tag, num_samples=self.num_samples, seed=self.seed)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at one step: one grid per step.
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._sample_grid(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end, not on_fit_end: the module is still on its device and the loggers still open.
        if trainer.global_step != self._last_step:
            self._sample_grid(trainer, pl_module)

    def _sample_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = self._last_step = trainer.global_step
        # Rank zero alone samples and writes; nothing below is a collective, so the others just go on.
        if not trainer.is_global_zero:
            return
        indices = range(self.num_samples)
        images, _ = generate_uint8(pl_module, indices, self.seed, self.batch_size, **self.sample_kwargs)
        path = Path(self.output_dir or trainer.default_root_dir) / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path)
        grid = grid_tensor(images)
        for logger in trainer.loggers:
            log_grid(logger, f"samples/{self.tag}", grid, step)
