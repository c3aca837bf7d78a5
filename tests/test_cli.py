"""The `ddpm` command: fit through LightningCLI, resume, sample from a checkpoint, experiment configs."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ddpm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "experiments" / "quickstart.yaml")
TINY = ["--model.net=tiny", "--data.init_args.image_size=8", "--data.init_args.batch_size=16",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"]


def fit(tmp_path, *extra):
    main(["fit", "--config", QUICKSTART, *TINY, f"--trainer.default_root_dir={tmp_path}", *extra])


def test_fast_dev_run(tmp_path):
    fit(tmp_path, "--trainer.fast_dev_run=2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps, then resumed from `last` to 8: the checkpoint the other tests sample from."""
    root = tmp_path_factory.mktemp("run")
    fit(root, "--trainer.max_steps=4", "--checkpoint.every_n_train_steps=2", "--model.timestep_sampler=loss-second-moment")
    first = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    fit(root, "--trainer.max_steps=8", "--checkpoint.every_n_train_steps=2", "--model.timestep_sampler=loss-second-moment",
        "--ckpt_path=last")
    return root, first


def test_resume_continues_the_step_count(trained):
    root, first = trained
    assert first["global_step"] == 4
    resumed = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 8
    assert not list((root / "checkpoints").glob("last-v*.ckpt"))
    assert (root / "checkpoints" / "step=6.ckpt").exists()
    # EMA and timestep-sampler state travel in the checkpoint
    assert any(k.startswith("ema.averages.0.") for k in resumed["state_dict"])
    counts_first = first["timestep_sampler"]["loss_counts"].sum()
    assert resumed["timestep_sampler"]["loss_counts"].sum() > counts_first > 0


def test_losses_are_logged_per_quartile_of_t(trained):
    import csv

    rows = [row for path in sorted(trained[0].glob("lightning_logs/version_*/metrics.csv"))
            for row in csv.DictReader(path.open())]
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss", "train/mse", "train/loss_q0", "train/loss_q3"} <= logged
    steps = sorted({int(row["step"]) for row in rows if row.get("train/loss")})
    assert steps == list(range(8))  # log_every_n_steps=1, across the resume


def sample(ckpt, out, *extra):
    main(["sample", "--ckpt_path", str(ckpt), "--output_dir", str(out), "--respacing", "5", *extra])
    return np.load(out / "samples.npz")["arr_0"]


def test_sample_from_checkpoint_alone(trained, tmp_path):
    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    a = sample(ckpt, tmp_path / "a", "--num_samples", "5", "--batch_size", "2", "--seed", "3")
    assert a.shape == (5, 8, 8, 1) and a.dtype == np.uint8
    assert (tmp_path / "a" / "grid.png").exists()
    # per-sample seeds: the batch size does not change the images, the seed does
    b = sample(ckpt, tmp_path / "b", "--num_samples", "3", "--batch_size", "3", "--seed", "3")
    np.testing.assert_array_equal(a[:3], b)
    c = sample(ckpt, tmp_path / "c", "--num_samples", "3", "--seed", "4")
    assert not np.array_equal(b, c)
    d = sample(ckpt, tmp_path / "d", "--num_samples", "3", "--seed", "3", "--no_ema", "--sampler", "ddim")
    assert d.shape == b.shape


def test_sample_precision_flag_overrides_the_checkpoint(trained, tmp_path, capsys, monkeypatch):
    from ddpm_lightning.module import DiffusionModule

    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    seen = []
    original = DiffusionModule.set_sampling_options
    monkeypatch.setattr(DiffusionModule, "set_sampling_options",
                        lambda self, *args: (original(self, *args), seen.append((dict(self.hparams), self)))[0])
    sample(ckpt, tmp_path / "a", "--num_samples", "2")
    sample(ckpt, tmp_path / "b", "--num_samples", "2", "--sample_precision", "bf16-mixed")
    (exact, exact_module), (fast, fast_module) = seen
    assert exact["sample_precision"] == "32" and exact_module.eval_model().net is exact_module.ema.averages[0]
    assert fast["sample_precision"] == "bf16-mixed" and fast_module.eval_model().net.dtype == torch.bfloat16
    assert fast["compile"] is False and fast["cuda_graph"] is False  # unset flags keep the checkpoint's
    with pytest.raises(SystemExit) as exit_info:
        sample(ckpt, tmp_path / "c", "--sample_precision", "bf16")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ddpm: error: unknown sample_precision 'bf16'; valid: 32, bf16-mixed, 16-mixed")
    with pytest.raises(SystemExit) as exit_info:  # the checkpoint was trained without compile
        sample(ckpt, tmp_path / "d", "--compile_tuning", "true")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ddpm: error: compile_tuning=True tunes the compiled network's kernels; set compile=True too")
    sample(ckpt, tmp_path / "e", "--num_samples", "2", "--compile", "true", "--compile_tuning", "true")
    assert seen[-1][0]["compile"] is True and seen[-1][0]["compile_tuning"] is True


def test_sample_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ddpm: error: checkpoint {tmp_path / 'missing.ckpt'} does not exist"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt_path", str(bad), "--output_dir", str(tmp_path)])
    assert "is truncated or not a ddpm-lightning checkpoint" in capsys.readouterr().err


def test_unknown_option_value_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--model.schedule=sigmoid", "--trainer.fast_dev_run=1")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "ddpm: error: unknown beta schedule 'sigmoid'; valid: linear, cosine"


def print_config(name, capsys, *extra):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "experiments" / f"{name}.yaml"), *extra, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


EXPECTED = {
    "cifar10_ddpm": dict(net="ddpm_cifar10", num_timesteps=1000, schedule="linear", mean_type="epsilon",
                         var_type="fixed_large", loss_type="mse", lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                         max_steps=800000, grad_clip=1.0, global_batch_size=128, random_flip=True, data="CIFAR10DataModule"),
    "cifar10_iddpm_linear_simple": dict(net="iddpm_cifar10", num_timesteps=4000, schedule="linear", var_type="fixed_large",
                                        loss_type="mse", lr=1e-4, ema_decay=0.9999, max_steps=500000, global_batch_size=128),
    "cifar10_iddpm_linear_hybrid": dict(net="iddpm_cifar10", num_timesteps=4000, schedule="linear", var_type="learned_range",
                                        loss_type="rescaled_mse", lr=1e-4, ema_decay=0.9999, max_steps=500000, global_batch_size=128),
    "cifar10_iddpm_cosine_simple": dict(net="iddpm_cifar10", num_timesteps=4000, schedule="cosine", var_type="fixed_large",
                                        loss_type="mse", lr=1e-4, ema_decay=0.9999, max_steps=500000, global_batch_size=128),
    "cifar10_iddpm_cosine_hybrid": dict(net="iddpm_cifar10", num_timesteps=4000, schedule="cosine", var_type="learned_range",
                                        loss_type="rescaled_mse", lr=1e-4, ema_decay=0.9999, max_steps=500000, global_batch_size=128),
    "imagenet64_iddpm": dict(net="iddpm_imagenet64", num_timesteps=4000, schedule="cosine", var_type="learned_range",
                             loss_type="rescaled_mse", lr=1e-4, ema_decay=0.9999, global_batch_size=128, data="ImageNet64DataModule"),
    "quickstart": dict(net="small", data="DigitsDataModule", image_size=16),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_print_config_of_every_experiment(name, capsys):
    config = print_config(name, capsys)
    model, trainer, data = config["model"], config["trainer"], config["data"]
    for key, value in EXPECTED[name].items():
        if key in model:
            assert model[key] == value, key
        elif key in trainer:
            assert trainer[key] == value, key
        elif key == "data":
            assert data["class_path"].endswith(value)
        else:
            assert data["init_args"][key] == value, key
    assert trainer["default_root_dir"] == f"runs/{name}"


def test_every_config_file_is_covered():
    leaves = {p.stem for p in (ROOT / "experiments").glob("*.yaml")}
    assert leaves == set(EXPECTED)


def test_command_line_overrides_beat_the_config(capsys):
    config = print_config("cifar10_ddpm", capsys, "--model.schedule=cosine", "--trainer.devices=8")
    assert config["model"]["schedule"] == "cosine" and str(config["trainer"]["devices"]) == "8"


def test_image_size_the_net_cannot_take_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path, "--data.init_args.image_size=12", "--trainer.fast_dev_run=1")
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ddpm: error: preset 'tiny': attention_resolutions [8] never occur for image_size 12; the resolutions are [12, 6]")


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "ddpm sample"):
        assert command in out


def test_sampling_sharded_over_two_processes_gives_the_same_images(trained, tmp_path):
    """`--devices 2` splits the samples over two ranks; per-sample seeds make the result identical."""
    import subprocess
    import sys

    ddpm = str(Path(sys.executable).parent / "ddpm")
    ckpt = trained[0] / "checkpoints" / "last.ckpt"
    common = ["sample", "--ckpt_path", str(ckpt), "--respacing", "3", "--num_samples", "5", "--batch_size", "2",
              "--accelerator", "cpu"]
    for devices, out in (("1", "one"), ("2", "two")):
        subprocess.run([ddpm, *common, "--devices", devices, "--output_dir", str(tmp_path / out)], check=True,
                       capture_output=True, timeout=300)
    one = np.load(tmp_path / "one" / "samples.npz")["arr_0"]
    two = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    assert one.shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(one, two)
    assert not list((tmp_path / "two").glob(".shard-*"))


def test_evaluate_through_the_ddpm_command(trained, tmp_path, capsys):
    ckpt = str(trained[0] / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--ckpt_path", ckpt, "--output_dir", str(tmp_path), "--respacing", "5,x",
              "--reference_stats", str(tmp_path / "stats.npz")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpm: error: ") and "--respacing" in err and len(err.splitlines()) == 1
