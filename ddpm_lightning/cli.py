"""`ddpm`: train, validate and test with LightningCLI; sample and evaluate checkpoints."""

from __future__ import annotations

import os
import sys

from lightning.fabric.utilities.exceptions import MisconfigurationException

from ddpm_lightning.nonfinite import NonFiniteLossError

USAGE = """ddpm: DDPM / Improved DDPM on PyTorch Lightning.

  ddpm fit --config experiments/<name>.yaml [--trainer.devices=8 --model.schedule=cosine ...]
  ddpm validate | test --config ... --ckpt_path PATH
  ddpm sample --ckpt_path PATH --num_samples N --output_dir DIR [--respacing 100] [--sampler ddpm|ddim] ...
  ddpm evaluate --ckpt_path PATH[,PATH] --output_dir DIR --respacing 25,100,1000 --sampler ddpm,ddim \
      --skip_fraction 0,0.2 --num_samples 50000 [--reference_stats PATH | --data ...] [--bpd]

`ddpm fit --help` lists every training option with its default; `ddpm sample --help` and
`ddpm evaluate --help` list theirs.
"""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ddpm` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["evaluate"]:
            from ddpm_lightning.commands.evaluate import run_evaluate

            return run_evaluate(argv[1:])
        if argv[:1] == ["sample"]:
            from ddpm_lightning.commands.sample import run_sample

            return run_sample(argv[1:])
        if not argv or argv[0] in ("-h", "--help"):
            print(USAGE)
        from ddpm_lightning.config_bases import expand_config_bases
        from ddpm_lightning.lightning_cli import DDPMCLI
        from ddpm_lightning.module import DiffusionModule
        from lightning import LightningDataModule

        # LightningCLI reads sys.argv; hand it the expanded chain of --config files there.
        sys.argv = sys.argv[:1] + expand_config_bases(argv)
        DDPMCLI(DiffusionModule, LightningDataModule, subclass_mode_data=True, save_config_kwargs={"overwrite": True})
    except NonFiniteLossError as err:
        print(f"ddpm: error: {err}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError, NotADirectoryError, MisconfigurationException) as err:
        # Bad input is the user's to fix: one line naming it, unless a traceback is asked for.
        if os.environ.get("DDPM_DEBUG"):
            raise
        print(f"ddpm: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
