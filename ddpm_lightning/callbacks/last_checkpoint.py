"""`last.ckpt` always holds where training stopped: at its end, and when the job is told to stop (SIGTERM)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class LastCheckpoint(L.Callback):
    """Writes `<dirpath>/last.ckpt` at the end of fit and on SIGTERM, so `--ckpt_path last` resumes.

    ModelCheckpoint writes last.ckpt only with its periodic saves; a run that stops between two of
    them (max_steps, preemption) would otherwise resume from an older step. Lightning turns SIGTERM
    into a SIGTERMException at the end of the current batch, on every rank together (rank 0's signal
    is broadcast), so the saved state is a consistent post-step state and the collective save cannot
    deadlock. SLURM's SIGUSR1 belongs to Lightning's SLURMEnvironment, which saves and requeues itself.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def _path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            trainer.save_checkpoint(str(self._path(trainer)))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self._path(trainer)
        trainer.save_checkpoint(str(path))
        if trainer.is_global_zero:
            print(f"SIGTERM: saved step {trainer.global_step} to {path}; resume with --ckpt_path last", flush=True)
