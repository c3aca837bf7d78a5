"""Weights & Biases for `ddpm fit`: a WandbLogger with this project's run names, groups and config, and a fallback.

`experiments/base/wandb.yaml` turns it on. Before the classes are built, `prepare_wandb_loggers` fills in what
the resolved config decides (the folder, the group, the run name) and, when W&B has no credentials and no
offline mode, either swaps the logger for a CSV/TensorBoard one (`fallback: csv`) or stops with one line.
Credentials are looked up on this machine only: nothing here talks to a server.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union, get_args

from jsonargparse import Namespace
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

Fallback = Literal["csv", "tensorboard"]
FALLBACKS = get_args(Fallback)
NOT_LOGGED_IN = "W&B is not logged in (no WANDB_API_KEY, no `wandb login` credentials) and WANDB_MODE is not offline"
NO_FALLBACK = (f"{NOT_LOGGED_IN}: run `wandb login`, set WANDB_MODE=offline, or let the logger fall back to CSV "
               "with --trainer.logger.init_args.fallback=csv")


def wandb_is_offline() -> bool:
    """Whether wandb will run without a server: WANDB_MODE=offline|dryrun|disabled or WANDB_DISABLED=true."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1")


def wandb_has_credentials() -> bool:
    """Whether wandb would find credentials (environment, identity token, netrc, settings) without asking a server."""
    import wandb

    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # older wandb: the same lookup, through the (since deprecated) wandb.api
        return wandb.api.api_key is not None
    host = wbauth.HostUrl(wandb_setup.singleton().settings.base_url)
    try:
        auth = wbauth.authenticate_session(host=host, source="ddpm", prompt=False, verify=False, update_session=False)
    except AuthenticationError:  # a malformed key: wandb.init would refuse it too
        return False
    return auth is not None


def run_name(model: Mapping[str, Any]) -> str:
    """The run's name from the choices that tell runs apart: `cosine-rescaled_mse-T4000-iddpm_cifar10`."""
    net = model.get("net", "net")
    if isinstance(net, Mapping):  # {"class_path": "package.module.MyNet", "init_args": ...}
        net = str(net.get("class_path", "net")).rsplit(".", 1)[-1]
    return f"{model.get('schedule')}-{model.get('loss_type')}-T{model.get('num_timesteps')}-{net}"


class DDPMWandbLogger(WandbLogger):
    """Lightning's WandbLogger whose run is named after the diffusion settings and carries the full config.

    Args:
        project: the W&B project (WANDB_PROJECT, when set, wins over the default only if project is not given).
        name: the run's display name; default: schedule-loss_type-T<num_timesteps>-net (see `run_name`).
        group: default under `ddpm fit`: the experiment, i.e. the name of trainer.default_root_dir.
        tags, entity: as in wandb.init.
        save_dir: where wandb/ goes; default under `ddpm fit`: WANDB_DIR, else trainer.default_root_dir.
        log_model: upload checkpoints as artifacts: True at the end of training, "all" as they are written.
        offline: log to disk only (same as WANDB_MODE=offline); `wandb sync` uploads later.
        fallback: without credentials and without offline mode, `ddpm fit` logs with "csv" or "tensorboard"
            instead (one line says so); None stops with an error instead.
        **kwargs: passed on to wandb.init (notes, job_type, resume, ...).
    """

    def __init__(
        self,
        project: Optional[str] = None,
        name: Optional[str] = None,
        group: Optional[str] = None,
        tags: Optional[list[str]] = None,
        entity: Optional[str] = None,
        save_dir: Optional[str] = None,
        log_model: Union[bool, Literal["all"]] = False,
        offline: bool = False,
        fallback: Optional[Fallback] = None,
        **kwargs: Any,
    ):
        _check_fallback(fallback)
        if not offline and not wandb_is_offline() and not wandb_has_credentials():
            raise ValueError(NO_FALLBACK)
        project = project or os.environ.get("WANDB_PROJECT") or "ddpm-lightning"
        save_dir = save_dir or os.environ.get("WANDB_DIR") or "."
        os.makedirs(save_dir, exist_ok=True)  # wandb would otherwise fall back to a temporary folder
        super().__init__(name=name, save_dir=save_dir, project=project, log_model=log_model, offline=offline,
                         group=group, tags=tags, entity=entity, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            del self._wandb_init["anonymous"]  # wandb warns about the setting even when it is None
        self.fallback = fallback

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        # Outside `ddpm fit` the first hyperparameters are the module's: they name the run if nothing else did.
        if isinstance(params, Mapping) and "schedule" in params and self._experiment is None and not self._name:
            self._wandb_init["name"] = self._name = run_name(params)
        super().log_hyperparams(params)

    @rank_zero_only
    def log_config(self, config: dict[str, Any]) -> None:
        """The whole resolved `ddpm fit` config as the run's config (model.schedule, trainer.max_steps, ...)."""
        self.experiment.config.update(config, allow_val_change=True)


def _check_fallback(fallback: Optional[str]) -> None:
    if fallback is not None and fallback not in FALLBACKS:
        raise ValueError(f"unknown W&B fallback {fallback!r}; valid: {', '.join(FALLBACKS)} (or null)")


def _logger_class(entry: Any) -> Optional[type]:
    class_path = getattr(entry, "class_path", None) if isinstance(entry, Namespace) else None
    if not class_path:
        return None
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name, None)


def _fallback_logger(kind: str, root: str) -> Namespace:
    if kind == "tensorboard" and (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
        class_path = "lightning.pytorch.loggers.TensorBoardLogger"
    else:
        class_path = "lightning.pytorch.loggers.CSVLogger"
    return Namespace(class_path=class_path, init_args=Namespace(save_dir=root))


def sweep_run_dir(root: str) -> str:
    """Under a `wandb agent`, each run gets its own folder (root/sweep-<id>/<run id>), so checkpoints never mix."""
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return os.path.join(root, f"sweep-{sweep_id}", run_id) if sweep_id and run_id else root


def prepare_wandb_loggers(config: Namespace) -> None:
    """Fill in the W&B loggers of a parsed `ddpm fit` config from the config itself, or apply their fallback.

    Sets each DDPMWandbLogger's save_dir, group and name where they are unset, moves a sweep run's
    trainer.default_root_dir to its own folder, and without credentials (and not offline) replaces the
    logger by its fallback after one line on stderr. Call it before the classes are instantiated.
    """
    loggers = config.trainer.logger
    entries = loggers if isinstance(loggers, list) else [loggers]
    indices = [i for i, entry in enumerate(entries)
               if (cls := _logger_class(entry)) and issubclass(cls, DDPMWandbLogger)]
    if not indices:
        return
    experiment_root = config.trainer.default_root_dir or os.getcwd()
    root = config.trainer.default_root_dir = sweep_run_dir(experiment_root)
    logged_in = wandb_is_offline() or wandb_has_credentials()
    for i in indices:
        args = entries[i].init_args
        _check_fallback(args.fallback)
        if not logged_in and not args.offline and args.fallback is None:
            raise ValueError(NO_FALLBACK)  # here, before jsonargparse would bury it in a Union type error
        if not logged_in and not args.offline:
            fallback = _fallback_logger(args.fallback, root)
            if rank_zero_only.rank == 0:
                kind = fallback.class_path.rsplit(".", 1)[-1]
                print(f"ddpm: {NOT_LOGGED_IN}: logging with {kind} under {root} instead (fallback: {args.fallback})",
                      file=sys.stderr)
            entries[i] = fallback
            continue
        if args.save_dir is None and not os.environ.get("WANDB_DIR"):
            args.save_dir = root
        if args.group is None:
            args.group = os.path.basename(os.path.normpath(experiment_root))
        if args.name is None:
            model = config.model.as_dict() if isinstance(config.model, Namespace) else dict(config.model)
            args.name = run_name(model)
    config.trainer.logger = entries if isinstance(loggers, list) else entries[0]
