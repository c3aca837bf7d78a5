"""A test-only callback for tests/test_ddp.py, importable in the DDP subprocesses (PYTHONPATH=tests)."""

import os

import lightning as L
import torch


class SaveRankState(L.Callback):
    """When training ends, each rank saves what must agree across ranks to <default_root_dir>/rank<global_rank>.pt."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {
            "state_dict": {name: tensor.detach().cpu() for name, tensor in pl_module.state_dict().items()},
            "timestep_sampler": pl_module.timestep_sampler.state_dict(),
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "seed": torch.initial_seed(),
        }
        torch.save(state, os.path.join(trainer.default_root_dir, f"rank{trainer.global_rank}.pt"))
