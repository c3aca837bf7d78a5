"""`last.ckpt` always holds where training stopped: at every checkpoint, at its end, and when told to stop (SIGTERM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException


class LastCheckpoint(L.Callback):
    """Writes `<dirpath>/last.ckpt` with every periodic checkpoint, at the last step and on SIGTERM.

    It owns last.ckpt (the CLI turns ModelCheckpoint's save_last off): ModelCheckpoint would write it again
    when training ends, and so would a save there. By then Lightning has closed the epoch's books as if the
    epoch were complete (it counts an epoch that max_steps cut short as processed, and does not reset the batch
    count of one that ended on its last batch), so a run resumed from it skips the rest of the epoch, or runs a
    one-batch epoch. Saved at the end of the last batch instead, the state is that of a periodic checkpoint,
    which Lightning resumes exactly. Runs that end otherwise (max_epochs, early stopping) save when they end.

    On SIGTERM Lightning raises at the end of the current batch (rank 0's signal is broadcast), so the saved
    state is a consistent post-step state and the collective save cannot deadlock. In one process the save is
    made at that batch's end, before Lightning, on an epoch's last batch, would close the epoch's books; under
    DDP the ranks learn of the signal at different points and the save waits for Lightning's exception.
    SLURM's SIGUSR1 belongs to Lightning's SLURMEnvironment, which saves hpc_ckpt_N.ckpt and requeues the job.

    Args:
        dirpath: the checkpoint folder (default <default_root_dir>/checkpoints).
        every_n_train_steps: refresh last.ckpt at these steps too (ModelCheckpoint's period; 0: never).
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = 0):
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps or 0
        self._saved_step = -1

    def _path(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / "last.ckpt"

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(str(self._path(trainer)))
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # With gradient accumulation several batches end at one step: one save per step.
        if trainer.fast_dev_run or step == self._saved_step:
            return
        periodic = self.every_n_train_steps > 0 and step > 0 and step % self.every_n_train_steps == 0
        last_step = trainer.max_steps not in (None, -1) and step >= trainer.max_steps
        preempted = trainer.received_sigterm and trainer.world_size == 1
        if periodic or last_step or preempted:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run and trainer.global_step != self._saved_step:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.global_step != self._saved_step:
            self._save(trainer)
        if trainer.is_global_zero:
            print(f"SIGTERM: saved step {trainer.global_step} to {self._path(trainer)}; "
                  "resume with --ckpt_path last", flush=True)
