"""The LightningCLI behind `ddpm fit | validate | test`."""

from __future__ import annotations

import os

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import ddpm_lightning.data  # noqa: F401  (registers the DataModules for short class_path names)
from ddpm_lightning.callbacks.last_checkpoint import LastCheckpoint
from ddpm_lightning.callbacks.rng_state import RNGState
from ddpm_lightning.loggers import DDPMWandbLogger, prepare_wandb_loggers
from ddpm_lightning.resume import AtomicCheckpointIO, resolve_resume_path


class SaveConfigToLoggers(SaveConfigCallback):
    """Writes config.yaml as LightningCLI does, and makes the resolved config the W&B run's config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            if isinstance(logger, DDPMWandbLogger):
                logger.log_config(config)


class DDPMCLI(LightningCLI):
    """Links the data's shape to the model and keeps checkpoints where `--ckpt_path last` finds them."""

    def __init__(self, *args, save_config_callback: type[SaveConfigCallback] = SaveConfigToLoggers, **kwargs):
        super().__init__(*args, save_config_callback=save_config_callback, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            # last.ckpt is LastCheckpoint's: ModelCheckpoint would rewrite it when training ends, in a state that
            # Lightning resumes at the wrong batch (see LastCheckpoint).
            "checkpoint.save_last": False,
            "checkpoint.save_top_k": -1,
            "checkpoint.every_n_train_steps": 10000,
            "checkpoint.filename": "step={step}",
            "checkpoint.auto_insert_metric_name": False,
            # A resumed run that reaches a step again overwrites its step=N.ckpt: "-v1" siblings would be
            # passed over by the damaged-last.ckpt fallback.
            "checkpoint.enable_version_counter": False,
        })
        # The network's input shape and label count are the data's, decided once, in the DataModule.
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        prepare_wandb_loggers(config)  # may move a sweep run's default_root_dir: before the checkpoint folder
        if config.checkpoint.dirpath is None:
            # A fixed folder (not the logger's version_N) so that `--ckpt_path last` resumes.
            root = config.trainer.default_root_dir or os.getcwd()
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        if config.checkpoint.save_last:
            raise ValueError("--checkpoint.save_last: last.ckpt is written by ddpm itself (with every checkpoint, "
                             "at the last step and on SIGTERM); leave save_last off")

    def _parse_ckpt_path(self) -> None:
        # Before LightningCLI reads the checkpoint's hyperparameters: `last` skips a damaged last.ckpt for
        # the newest intact periodic one, and a damaged explicit path is named in one line.
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path"):
            config = self.config[subcommand]
            root = config.trainer.default_root_dir or os.getcwd()
            folder = config.checkpoint.dirpath or os.path.join(root, "checkpoints")
            config.ckpt_path = resolve_resume_path(config.ckpt_path, folder, hpc_dir=root)
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs):
        """Every run writes checkpoints atomically, last.ckpt where it stopped, and its random streams in them."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = trainer_config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        configured = trainer_config.get("callbacks") or []
        configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
        checkpoint = self._get(self.config, "checkpoint")
        callbacks = configured + [LastCheckpoint(checkpoint.dirpath, checkpoint.every_n_train_steps), RNGState()]
        return super().instantiate_trainer(plugins=plugins, callbacks=callbacks, **kwargs)
