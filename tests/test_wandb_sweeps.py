"""W&B: the sweep files expand into valid `ddpm` command lines, an offline run records what it should, and
without credentials the run falls back to CSV. Nothing here reaches a server."""

import csv
import importlib.util
import itertools
import json
import math
import struct
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

from ddpm_lightning.cli import main
from ddpm_lightning.loggers import FALLBACKS, prepare_wandb_loggers, wandb_has_credentials

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
WANDB_YAML = str(ROOT / "experiments" / "base" / "wandb.yaml")
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
TINY = ["--model.net=tiny", "--data.init_args.image_size=8", "--data.init_args.batch_size=16",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--trainer.max_steps=3"]


# ----------------------------------------------------------------------------------------------- sweeps
def candidate_values(spec: dict) -> list:
    """Every value of a `values` list; the two ends of a distribution (what random/bayes draw between)."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    distribution = spec.get("distribution", "uniform")
    if distribution in ("uniform", "int_uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values"):
        return [spec["min"], spec["max"]]
    if distribution == "log_uniform":  # min and max are natural logs
        return [math.exp(spec["min"]), math.exp(spec["max"])]
    raise ValueError(f"no test draws for distribution {distribution!r}: add them here")


def sweep_runs(sweep: dict) -> list[dict]:
    """The parameter sets a grid sweep runs (all of them), or representative draws of a random/bayes one."""
    names = sorted(sweep["parameters"])
    choices = [candidate_values(sweep["parameters"][name]) for name in names]
    return [dict(zip(names, values)) for values in itertools.product(*choices)]


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The command line `wandb agent` runs for these parameters (wandb_agent.Agent._command_run)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    sweep_vars = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    sweep_vars.update(interpreter=["python"], program=[sweep.get("program")], env=["/usr/bin/env"],
                      args_json_file=["wandb/sweep-ID/config-RUN.json"])
    argv: list[str] = []
    for chunk in sweep_utils.create_sweep_command(list(sweep["command"])):  # fills ${envvar:NAME}
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):  # a macro stands alone and becomes 0..n arguments
            argv += sweep_vars.get(chunk[2:-1]) or []
        else:
            argv.append(chunk)
    return argv


def lookup(config: dict, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def print_config(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_sweep_is_tested():
    assert {path.stem for path in SWEEPS} == {"iddpm_schedule_loss_grid", "lr_dropout_search", "eval_respacing_skip"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda path: path.stem)
def test_sweep_commands_are_valid_ddpm_command_lines(path, capsys, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes")
    if sweep["method"] == "bayes":
        assert sweep["metric"]["goal"] in ("minimize", "maximize")
    monkeypatch.chdir(ROOT)  # the agent runs in the repository root: the files are named from there
    monkeypatch.setenv("DDPM_EVAL_CKPT", "runs/cifar10_iddpm_cosine_hybrid/checkpoints/last.ckpt")
    runs = sweep_runs(sweep)
    commands = [agent_command(sweep, params) for params in runs]
    seen, models = set(), set()
    for params, argv in zip(runs, commands):
        assert argv[:2] == ["/usr/bin/env", "ddpm"], argv
        subcommand, args = argv[2], argv[3:]
        if subcommand == "fit":
            config = print_config([subcommand, *args], capsys)
            logger = config["trainer"]["logger"]
            assert logger["class_path"] == "ddpm_lightning.loggers.DDPMWandbLogger"
            assert logger["init_args"]["fallback"] is None
            arrived = {}
            for name, value in params.items():
                if name == "config":  # an experiment file: its settings arrive, and its output folder
                    arrived[name] = config["trainer"]["default_root_dir"]
                    assert arrived[name] == f"runs/{Path(value).stem}"
                else:
                    arrived[name] = lookup(config, name)
                    assert arrived[name] == pytest.approx(value), name
            model = config["model"]
            models.add((model["schedule"], model["var_type"], model["loss_type"], model["num_timesteps"], model["lr"]))
        else:
            from ddpm_lightning.commands.evaluate import build_parser
            from ddpm_lightning.evaluation import grid

            assert subcommand == "evaluate"
            parsed = build_parser().parse_args(args)
            assert parsed.ckpt_path == ["runs/cifar10_iddpm_cosine_hybrid/checkpoints/last.ckpt"]
            assert grid.parse_samplers(parsed.sampler) == ["ddpm"]
            arrived = {"respacing": grid.parse_steps(parsed.respacing),
                       "skip_fraction": grid.parse_skip_fractions(parsed.skip_fraction)}
            assert arrived == {"respacing": [int(params["respacing"])], "skip_fraction": [params["skip_fraction"]]}
        seen.add(json.dumps(arrived, sort_keys=True))
    assert len(seen) == len(runs)  # every run of the sweep is a different setting
    if path.stem == "iddpm_schedule_loss_grid":  # Nichol & Dhariwal's grid, T = 4000, lr 1e-4
        assert models == {(schedule, *loss, 4000, 1e-4) for schedule in ("linear", "cosine")
                          for loss in (("fixed_large", "mse"), ("learned_range", "rescaled_mse"))}
    if path.stem == "lr_dropout_search":  # L_hybrid with the cosine schedule, the paper's best
        assert {m[:4] for m in models} == {("cosine", "learned_range", "rescaled_mse", 4000)}
    if path.stem == "eval_respacing_skip":
        assert len(seen) == 5 * 4


def test_wandb_yaml_works_as_a_base_and_as_a_second_config(tmp_path, capsys):
    leaf = tmp_path / "mine.yaml"
    leaf.write_text(yaml.safe_dump({"__base__": [QUICKSTART, WANDB_YAML], "model": {"schedule": "linear"}}))
    as_base = print_config(["fit", "--config", str(leaf)], capsys)
    as_second = print_config(["fit", "--config", QUICKSTART, "--config", WANDB_YAML], capsys)
    for config in (as_base, as_second):
        assert config["trainer"]["logger"]["class_path"] == "ddpm_lightning.loggers.DDPMWandbLogger"
        assert config["trainer"]["logger"]["init_args"]["fallback"] == "csv"
        assert config["model"]["net"] == "small"  # the quickstart's settings survive
    assert (as_base["model"]["schedule"], as_second["model"]["schedule"]) == ("linear", "cosine")  # the leaf wins


# ------------------------------------------------------------------------------------- an offline run
def wandb_records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header, then a LevelDB log (32 KiB blocks, 7-byte chunks)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if left < 7 or kind == 0:  # the end of a block is zero padding
            pos += left
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE/LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_offline_run_logs_metrics_config_name_and_sample_grid(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    try:
        main(["fit", "--config", QUICKSTART, "--config", WANDB_YAML, *TINY, f"--trainer.default_root_dir={tmp_path}"])
    finally:
        # What the end of the `ddpm` process does (wandb's atexit hook): finish the run, then wait for the
        # service to write it out. finish() alone can return before the .wandb file holds the run's records.
        wandb.finish()
        wandb.teardown()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    run, config, history = None, {}, []
    for record in wandb_records(next(run_dir.glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    assert run.display_name == "cosine-mse-T1000-tiny"  # schedule-loss_type-T-net of the quickstart + tiny
    assert run.run_group == tmp_path.name and run.project == "ddpm-lightning"
    # the whole resolved config, nested as in the YAML
    assert config["model"]["schedule"] == "cosine" and config["model"]["net"] == "tiny"
    assert config["trainer"]["max_steps"] == 3 and config["data"]["init_args"]["image_size"] == 8
    losses = {row["trainer/global_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert sorted(losses) == [0, 1, 2] and all(math.isfinite(v) and v > 0 for v in losses.values())
    (grid,) = [row for row in history if "samples/ddpm_50_skip0.0/_type" in row]  # SampleCallback at train end
    assert grid["trainer/global_step"] == 3 and grid["samples/ddpm_50_skip0.0/count"] == 1
    (image_file,) = grid["samples/ddpm_50_skip0.0/filenames"]
    assert (run_dir / "files" / image_file).stat().st_size > 100


# ---------------------------------------------------------------------------------- not logged in
@pytest.fixture
def logged_out(tmp_path, monkeypatch):
    """No key, no netrc, not offline; a wandb.init would be a bug, so it fails the test."""
    import wandb

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DISABLED", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))

    def no_run(*args, **kwargs):
        raise AssertionError("wandb.init called without credentials")

    monkeypatch.setattr(wandb, "init", no_run)
    assert not wandb_has_credentials()


@pytest.mark.parametrize("fallback", FALLBACKS)
def test_not_logged_in_falls_back_with_one_line(fallback, tmp_path, logged_out, capsys):
    main(["fit", "--config", QUICKSTART, "--config", WANDB_YAML, *TINY, f"--trainer.default_root_dir={tmp_path}",
          f"--trainer.logger.init_args.fallback={fallback}"])
    tensorboard = fallback == "tensorboard" and any(map(importlib.util.find_spec, ("tensorboard", "tensorboardX")))
    kind = "TensorBoardLogger" if tensorboard else "CSVLogger"
    said = [line for line in capsys.readouterr().err.splitlines() if "W&B" in line]
    assert said == [(f"ddpm: W&B is not logged in (no WANDB_API_KEY, no `wandb login` credentials) and WANDB_MODE is "
                     f"not offline: logging with {kind} under {tmp_path} instead (fallback: {fallback})")]
    logs = tmp_path / "lightning_logs" / "version_0"
    if tensorboard:
        assert list(logs.glob("events.out.tfevents.*"))
    else:
        rows = list(csv.DictReader((logs / "metrics.csv").open()))
        assert [int(row["step"]) for row in rows if row.get("train/loss")] == [0, 1, 2]
    assert not (tmp_path / "wandb").exists()


def test_not_logged_in_without_fallback_is_a_one_line_error(tmp_path, logged_out, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, "--config", WANDB_YAML, *TINY, f"--trainer.default_root_dir={tmp_path}",
              "--trainer.logger.init_args.fallback=null"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ddpm: error: W&B is not logged in") and "wandb login" in err and "fallback=csv" in err


def test_credentials_are_found_without_a_server(logged_out, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert wandb_has_credentials()  # the key's format only: verifying it would need the server


# ------------------------------------------------------------------------------------------ sweep runs
def test_a_sweep_run_gets_its_own_folder_group_and_name(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    logger = Namespace(class_path="ddpm_lightning.loggers.DDPMWandbLogger",
                       init_args=Namespace(save_dir=None, group=None, name=None, offline=False, fallback="csv"))
    config = Namespace(trainer=Namespace(default_root_dir="runs/cifar10_iddpm_cosine_hybrid", logger=logger),
                       model=Namespace(net="iddpm_cifar10", schedule="cosine", loss_type="rescaled_mse",
                                       num_timesteps=4000))
    prepare_wandb_loggers(config)
    root = "runs/cifar10_iddpm_cosine_hybrid/sweep-abc123/run7"  # checkpoints of parallel runs never mix
    assert config.trainer.default_root_dir == root and logger.init_args.save_dir == root
    assert logger.init_args.group == "cifar10_iddpm_cosine_hybrid"
    assert logger.init_args.name == "cosine-rescaled_mse-T4000-iddpm_cifar10"
