"""`ddpm evaluate`: the grid's numbers, tables and plots, resuming, bad input, several checkpoints, released
weights, bits/dim and W&B; tiny 8x8 models and the stand-in feature extractor, nothing downloaded."""

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from test_metrics import StandInFeatures, one_thread  # noqa: F401  (one_thread: autouse fixture)

from ddpm_lightning.checkpoint_io import load_module
from ddpm_lightning.commands.evaluate import run_evaluate
from ddpm_lightning.data import DigitsDataModule
from ddpm_lightning.evaluation import fid_series, grid, read_csv, resolve_labels, runner
from ddpm_lightning.metrics import FeatureStats, compute_fid_is, dataset_feature_stats
from ddpm_lightning.module import DiffusionModule

NUM_TIMESTEPS = 25
# What LightningCLI records of the DataModule in a `ddpm fit` checkpoint.
DIGITS = {"_class_path": "ddpm_lightning.data.DigitsDataModule", "image_size": 8, "_instantiator": "lightning"}


def save_checkpoint(path: Path, schedule: str, seed: int, datamodule: dict | None = DIGITS) -> Path:
    """A `ddpm fit`-style checkpoint of a tiny random network (nonzero output layer, so cells differ)."""
    torch.manual_seed(seed)
    module = DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=NUM_TIMESTEPS, schedule=schedule)
    with torch.no_grad():
        for parameter in module.net.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    module.ema.averages[0].load_state_dict(module.net.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    if datamodule:
        checkpoint["datamodule_hyper_parameters"] = datamodule
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two checkpoints laid out as `ddpm fit` runs (cosine/, linear/) and stand-in reference statistics."""
    root = tmp_path_factory.mktemp("models")
    cosine = save_checkpoint(root / "cosine" / "checkpoints" / "last.ckpt", "cosine", 0)
    linear = save_checkpoint(root / "linear" / "checkpoints" / "last.ckpt", "linear", 1)
    bare = save_checkpoint(root / "bare.ckpt", "cosine", 0, datamodule=None)
    torch.set_num_threads(1)
    dataset = DigitsDataModule(image_size=8).build_train_dataset()
    dataset_feature_stats(dataset, StandInFeatures(), batch_size=600).save(root / "reference.npz")
    return {"cosine": cosine, "linear": linear, "bare": bare, "reference": root / "reference.npz"}


def evaluate(models, out, *extra, ckpts=("cosine",)):
    argv = [arg for name in ckpts for arg in ("--ckpt_path", str(models[name]))]
    argv += ["--output_dir", str(out), "--respacing", "5,25", "--sampler", "ddpm,ddim", "--skip_fraction", "0,0.2",
             "--num_samples", "8", "--batch_size", "8", "--is_splits", "2", "--accelerator", "cpu"]
    if "--data" not in extra and "--no_reference" not in extra:
        argv += ["--reference_stats", str(models["reference"])]
    return run_evaluate(argv + [a for a in extra if a != "--no_reference"], feature_extractor=StandInFeatures())


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class FakeFidIs:
    """Counts compute_fid_is calls; a FID that depends on the cell, and an optional interruption after n calls."""

    def __init__(self, fail_after=None, offset=0.0):
        self.calls, self.fail_after, self.offset = [], fail_after, offset

    def __call__(self, source, reference, extractor, num_samples, seed, batch_size, is_splits, progress=False,
                 **kwargs):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt  # the run is killed mid-grid
        self.calls.append(kwargs)
        steps = int(kwargs["respacing"] or NUM_TIMESTEPS)
        fid = 100.0 / steps + kwargs["skip_fraction"] + (kwargs["sampler"] == "ddim") + self.offset
        return {"fid": fid, "is_mean": 1.0, "is_std": 0.0}


def cell_ids(rows):
    return [(r["label"], r["sampler"], int(r["steps"]), float(r["skip_fraction"])) for r in rows]


# ----------------------------------------------------------------------------------------------- the grid itself
def test_grid_numbers_tables_and_plots(models, tmp_path):
    out = tmp_path / "out"
    rows = evaluate(models, out)
    table = read_csv(out / "results.csv")
    expected = [("cosine", s, n, k) for s in ("ddpm", "ddim") for n in (5, 25) for k in (0.0, 0.2)]
    assert cell_ids(table) == cell_ids(rows) == expected
    assert [r["respacing"] for r in table] == ["5", "5", "full", "full"] * 2  # 25 = T: the full process
    assert [r["eta"] for r in table] == [""] * 4 + ["0.0"] * 4  # DDPM has no eta
    assert {r["num_samples"] for r in table} == {"8"} and {r["schedule"] for r in table} == {"cosine"}
    # Each cell's FID is compute_fid_is's with that cell's settings, and the settings matter.
    direct = compute_fid_is(load_module(str(models["cosine"])).eval(), FeatureStats.load(models["reference"]),
                            StandInFeatures(), 8, 0, 8, 2, respacing="5", sampler="ddim", eta=0.0, skip_fraction=0.2)
    assert float(table[5]["fid"]) == pytest.approx(direct["fid"], rel=1e-9)
    assert len({round(float(r["fid"]), 9) for r in table}) == 8
    markdown = (out / "results.md").read_text().splitlines()
    assert len(markdown) == 2 + 8 and markdown[0].startswith("| label | sampler | steps | respacing |")
    assert "bpd" not in markdown[0]
    # Two panels (one per skip fraction / per step count) of 4.5 x 3.6 inches at 100 dpi.
    assert png_size(out / "fid_vs_steps.png") == png_size(out / "fid_vs_skip.png") == (900, 360)


# --------------------------------------------------------------------------------------------------- resuming
def test_interrupted_run_resumes_without_recomputing(models, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupted = FakeFidIs(fail_after=3)
    monkeypatch.setattr(runner, "compute_fid_is", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(models, out)
    first = read_csv(out / "results.csv")
    assert len(first) == 3 and len(list((out / "cells").glob("*.json"))) == 3
    assert not list(out.rglob("*.partial"))

    resumed = FakeFidIs(offset=1000.0)  # numbers a recomputation would give
    monkeypatch.setattr(runner, "compute_fid_is", resumed)
    evaluate(models, out)
    assert len(resumed.calls) == 5  # only the cells the interruption left
    table = read_csv(out / "results.csv")
    assert len(table) == len(set(cell_ids(table))) == 8
    assert [row["fid"] for row in table[:3]] == [row["fid"] for row in first]  # finished cells kept as they were
    assert all(float(row["fid"]) > 1000 for row in table[3:])

    # A lost cell file is recomputed alone; a finished grid is not touched.
    sorted((out / "cells").glob("*.json"))[0].unlink()
    again = FakeFidIs()
    monkeypatch.setattr(runner, "compute_fid_is", again)
    evaluate(models, out)
    assert len(again.calls) == 1 and cell_ids(read_csv(out / "results.csv")) == cell_ids(table)
    evaluate(models, out)
    assert len(again.calls) == 1

    # Settings that change the numbers are part of a cell's identity: nothing stale is reused.
    evaluate(models, out, "--num_samples", "9")
    assert len(again.calls) == 9
    assert {r["num_samples"] for r in read_csv(out / "results.csv")} == {"9"}


def test_grid_can_grow_and_a_rewritten_checkpoint_is_recomputed(models, tmp_path, monkeypatch):
    fake = FakeFidIs()
    monkeypatch.setattr(runner, "compute_fid_is", fake)
    evaluate(models, tmp_path, "--skip_fraction", "0")
    evaluate(models, tmp_path, "--skip_fraction", "0,0.2", "--labels", "renamed")  # a label is not an identity
    assert len(fake.calls) == 4 + 4
    assert {r["label"] for r in read_csv(tmp_path / "results.csv")} == {"renamed"}
    # last.ckpt is overwritten as training goes on: its results must not survive that.
    copy = tmp_path / "run" / "checkpoints" / "last.ckpt"
    copy.parent.mkdir(parents=True)
    shutil.copy(models["cosine"], copy)
    local = {**models, "cosine": copy}
    evaluate(local, tmp_path / "out", "--skip_fraction", "0")
    evaluate(local, tmp_path / "out", "--skip_fraction", "0")
    assert len(fake.calls) == 8 + 4
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))
    evaluate(local, tmp_path / "out", "--skip_fraction", "0")
    assert len(fake.calls) == 8 + 4 + 4


# ------------------------------------------------------------------------------------------------- bad input
STEPS_HINT = "expected comma-separated step counts >= 1, e.g. 25,50,100,200,1000"
SKIP_HINT = "expected comma-separated fractions in [0, 1), e.g. 0,0.1,0.2,0.3"


@pytest.mark.parametrize("args,message", [
    (("--respacing", "5,ten"), f"--respacing 5,ten: {STEPS_HINT}"),
    (("--respacing", "0"), f"--respacing 0: {STEPS_HINT}"),
    (("--respacing", "5,26"), "--respacing 26: checkpoint 'cosine' has T=25 steps; valid counts: 1..25"),
    (("--sampler", "ddpm,plms"), "--sampler ddpm,plms: unknown sampler 'plms'; valid: ddpm, ddim"),
    (("--skip_fraction", "0,1"), f"--skip_fraction 0,1: {SKIP_HINT}"),
    (("--skip_fraction", "-0.1"), f"--skip_fraction -0.1: {SKIP_HINT}"),
    (("--ddim_spacing", "even"), "--ddim_spacing 'even': valid: uniform, ddim"),
    # No integer stride takes exactly 6 of T=25 steps (Song et al.'s ddimN spacing).
    (("--ddim_spacing", "ddim", "--respacing", "6"), "--respacing: respacing 'ddim6': no integer stride gives exactly "
                                                     "6 steps of T=25 (checkpoint 'cosine', ddim, 6 steps)"),
    (("--reference_split", "val"), "--reference_split 'val': valid: train, test"),
    (("--labels", "a,b"), "--labels: expected 1 different labels, one per --ckpt_path, got a, b"),
    (("--weights_kind", "ckpt"), "--weights_kind 'ckpt': valid: checkpoint, diffusers, iddpm"),
    (("--num_samples", "1"), "--num_samples must be >= 2, got 1"),
])
def test_bad_input_is_one_line_before_any_sampling(models, tmp_path, monkeypatch, args, message):
    never = FakeFidIs(fail_after=0)
    monkeypatch.setattr(runner, "compute_fid_is", never)
    with pytest.raises(ValueError) as error:
        evaluate(models, tmp_path, *args)
    assert str(error.value) == message
    assert never.calls == [] and not (tmp_path / "results.csv").exists()


def test_missing_files_and_missing_data_are_one_line(models, tmp_path):
    missing = tmp_path / "inception.pth"
    with pytest.raises(FileNotFoundError, match=rf"^inception_weights: no file at '{missing}'; download https://\S+ "):
        run_evaluate(["--ckpt_path", str(models["cosine"]), "--output_dir", str(tmp_path),
                      "--inception_weights", str(missing), "--reference_stats", str(models["reference"])])
    with pytest.raises(FileNotFoundError, match=r"^--reference_stats: no file at '.*nowhere.npz'$"):
        evaluate(models, tmp_path, "--reference_stats", str(tmp_path / "nowhere.npz"))
    with pytest.raises(FileNotFoundError, match=r"^checkpoint .*absent.ckpt does not exist$"):
        run_evaluate(["--ckpt_path", str(tmp_path / "absent.ckpt"), "--output_dir", str(tmp_path),
                      "--reference_stats", str(models["reference"]), "--accelerator", "cpu"])
    with pytest.raises(ValueError, match=r"^no data for the FID reference and --bpd: pass --reference_stats PATH"):
        evaluate(models, tmp_path, "--no_reference", "--bpd", ckpts=("bare",))
    with pytest.raises(ValueError, match=r"^no data for --bpd: pass --data \(a DataModule, .*record none$"):
        evaluate(models, tmp_path, "--bpd", ckpts=("bare",))
    with pytest.raises(ValueError, match=r"^DigitsDataModule gives 1x16px images but the checkpoints sample 1x8px; "
                                         r"set --data.image_size 8$"):
        evaluate(models, tmp_path, "--data", "DigitsDataModule")


def test_sampling_precision_is_part_of_a_cells_identity(models, tmp_path, monkeypatch):
    fake = FakeFidIs()
    monkeypatch.setattr(runner, "compute_fid_is", fake)
    evaluate(models, tmp_path, "--respacing", "5", "--sampler", "ddpm", "--skip_fraction", "0")
    evaluate(models, tmp_path, "--respacing", "5", "--sampler", "ddpm", "--skip_fraction", "0")
    assert len(fake.calls) == 1  # the float32 cell is reused
    evaluate(models, tmp_path, "--respacing", "5", "--sampler", "ddpm", "--skip_fraction", "0",
             "--sample_precision", "bf16-mixed")
    assert len(fake.calls) == 2  # a bf16 cell is another cell


def test_checkpoint_without_ema_needs_no_ema(models, tmp_path, monkeypatch):
    checkpoint = torch.load(models["cosine"], weights_only=True)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("ema.")}
    path = tmp_path / "noema" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    models = {**models, "noema": path}
    monkeypatch.setattr(runner, "compute_fid_is", FakeFidIs())
    with pytest.raises(ValueError, match=r"has no EMA weights \(no ema\.\* entries\); use its trained weights with --no_ema$"):
        evaluate(models, tmp_path / "a", ckpts=("noema",))
    rows = evaluate(models, tmp_path / "b", "--no_ema", ckpts=("noema",))
    assert len(rows) == 8 and all(str(row["use_ema"]) == "False" for row in rows)


# --------------------------------------------------------------------------------------- comparing checkpoints
def test_two_checkpoints_are_compared_in_the_table_and_plots(models, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "compute_fid_is", FakeFidIs())
    rows = evaluate(models, tmp_path, "--ckpt_path", f"{models['linear']},{models['bare']}", ckpts=("cosine",))
    table = read_csv(tmp_path / "results.csv")
    assert [r["label"] for r in table] == ["cosine"] * 8 + ["linear"] * 8 + ["bare"] * 8
    schedules = {(r["label"], r["schedule"]) for r in table}
    assert schedules == {("cosine", "cosine"), ("linear", "linear"), ("bare", "cosine")}
    by_skip = fid_series(rows, "steps", "skip_fraction")
    assert sorted(by_skip) == [0.0, 0.2]
    lines = by_skip[0.0]
    assert sorted(lines) == sorted((label, s) for label in ("cosine", "linear", "bare") for s in ("ddpm", "ddim"))
    assert lines[("linear", "ddim")] == [(5.0, 100 / 5 + 1), (25.0, 100 / 25 + 1)]
    assert sorted(fid_series(rows, "skip_fraction", "steps")) == [5, 25]
    assert png_size(tmp_path / "fid_vs_steps.png")[0] > 0


def test_default_labels_name_the_run():
    paths = ["runs/cosine/checkpoints/last.ckpt", "runs/cosine/checkpoints/step=500.ckpt",
             "w/cifar10_uncond_50M_500K.pt",
             "a/last.ckpt", "b/last.ckpt"]
    assert resolve_labels(paths) == ["cosine", "cosine:step=500", "cifar10_uncond_50M_500K", "last", "last#2"]
    with pytest.raises(ValueError, match="expected 2 different labels"):
        resolve_labels(paths[:2], ["x", "x"])


def test_grid_option_parsing():
    assert grid.parse_steps(["25,50", "100"]) == [25, 50, 100]
    assert grid.parse_skip_fractions("0, 0.1,0.3") == [0.0, 0.1, 0.3]
    assert grid.parse_samplers("ddim") == ["ddim"]
    cells = grid.build_grid(["m"], ["ddpm", "ddim"], [25, 1000], [0.0], eta=0.5)
    assert [(c.sampler, c.steps, c.eta) for c in cells] == [("ddpm", 25, None), ("ddpm", 1000, None),
                                                             ("ddim", 25, 0.5), ("ddim", 1000, 0.5)]
    assert [grid.respacing_string(c, 1000, "ddim") for c in cells] == ["25", None, "ddim25", None]
    with pytest.raises(ValueError, match="skip_fraction 0.9 drops all 1 steps"):
        grid.check_grid(grid.build_grid(["m"], ["ddpm"], [1], [0.9]), {"m": 10})


# ---------------------------------------------------------------------------------- data, bits/dim and W&B
def test_reference_and_bpd_from_the_recorded_datamodule(models, tmp_path, monkeypatch):
    argv = ("--respacing", "5", "--sampler", "ddim", "--skip_fraction", "0", "--bpd", "--bpd_num_samples", "4",
            "--stats_cache_dir", str(tmp_path / "stats"), "--no_reference")
    rows = evaluate(models, tmp_path / "out", *argv)
    assert len(list((tmp_path / "stats").glob("DigitsDataModule-train-8px-stand-in-12-*.npz"))) == 1
    table = read_csv(tmp_path / "out" / "results.csv")
    assert table[0]["reference"] == "DigitsDataModule:train" and "bpd" in table[0]
    assert 0 < float(table[0]["bpd"]) == rows[0]["bpd"] < 20
    # bits/dim is stored per checkpoint too: a rerun does not recompute it.
    monkeypatch.setattr(runner, "bits_per_dim", lambda *args, **kwargs: pytest.fail("bpd recomputed"))
    again = evaluate(models, tmp_path / "out", *argv)
    assert again[0]["bpd"] == rows[0]["bpd"]


def test_wandb_run_is_written_offline(models, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(runner, "compute_fid_is", FakeFidIs())
    evaluate(models, tmp_path, "--wandb_project", "ddpm-eval-test", "--skip_fraction", "0")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


# ------------------------------------------------------------------------------------------ released weights
def test_released_iddpm_weights_are_evaluated_untrained(models, tmp_path):
    pytest.importorskip("diffusers")  # test_import_weights, which builds the improved-diffusion layout, needs it
    from test_import_weights import adm_checkpoint

    from ddpm_lightning.models import import_weights
    from ddpm_lightning.pretrained import module_from_pretrained

    torch.manual_seed(0)
    state, _ = adm_checkpoint(1, 32, (1, 2), 1, (2,), True, None, True)  # learned variances, like the releases
    torch.save(state, tmp_path / "cifar_like_uncond.pt")
    module = module_from_pretrained(tmp_path / "cifar_like_uncond.pt", "iddpm", num_timesteps=20, image_size=8)
    hp = module.hparams
    assert (hp.schedule, hp.var_type, hp.num_timesteps) == ("cosine", "learned_range", 20)
    net = import_weights(state, "iddpm", image_size=8).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 19])
    with torch.no_grad():
        expected = net(x, t.float() * 1000 / 20)  # improved-diffusion feeds t rescaled to 0..1000
        torch.testing.assert_close(module.eval_model(use_ema=True)(x, t), expected)
        torch.testing.assert_close(module.eval_model(use_ema=False)(x, t), expected)
    with pytest.raises(ValueError, match="var_type 'fixed_large' does not fit .* its network predicts variances"):
        module_from_pretrained(state, "iddpm", var_type="fixed_large", image_size=8)

    rows = run_evaluate(["--ckpt_path", str(tmp_path / "cifar_like_uncond.pt"), "--weights_kind", "iddpm",
                         "--num_timesteps", "20", "--image_size", "8", "--output_dir", str(tmp_path / "out"),
                         "--respacing", "4,20", "--sampler", "ddpm", "--skip_fraction", "0", "--num_samples", "4",
                         "--is_splits", "2", "--reference_stats", str(models["reference"]), "--accelerator", "cpu"],
                        feature_extractor=StandInFeatures())
    table = read_csv(tmp_path / "out" / "results.csv")
    columns = ("label", "steps", "respacing", "schedule", "var_type", "num_timesteps")
    assert [tuple(r[name] for name in columns) for r in table] == [
        ("cifar_like_uncond", "4", "4", "cosine", "learned_range", "20"),
        ("cifar_like_uncond", "20", "full", "cosine", "learned_range", "20"),
    ]
    assert all(np.isfinite(r["fid"]) for r in rows)


# ------------------------------------------------------------------------------------------------- two ranks
SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_metrics import StandInFeatures
from ddpm_lightning.commands.evaluate import run_evaluate
run_evaluate(sys.argv[1:], feature_extractor=StandInFeatures())
"""


def test_two_ranks_give_the_numbers_of_one(models, tmp_path):
    """--devices 2 shards 7 samples (not a multiple of ranks x batch) and the bpd batches; rank 0 writes once."""
    import subprocess
    import sys

    script = tmp_path / "evaluate_script.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    common = ["--ckpt_path", str(models["cosine"]), "--respacing", "5", "--sampler", "ddpm,ddim",
              "--skip_fraction", "0",
              "--num_samples", "7", "--batch_size", "3", "--is_splits", "2", "--bpd", "--bpd_num_samples", "5",
              "--stats_cache_dir", str(tmp_path / "stats"), "--accelerator", "cpu"]
    one = run_evaluate([*common, "--output_dir", str(tmp_path / "one")], feature_extractor=StandInFeatures())
    subprocess.run([sys.executable, str(script), *common, "--devices", "2", "--output_dir", str(tmp_path / "two")],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    two = read_csv(tmp_path / "two" / "results.csv")
    assert cell_ids(two) == cell_ids(one)
    for row_one, row_two in zip(one, two):
        for name in ("fid", "is_mean", "is_std", "bpd"):
            assert float(row_two[name]) == pytest.approx(row_one[name], rel=1e-7), name
    assert len(list((tmp_path / "two" / "cells").glob("*.json"))) == 2 + 1  # two cells, one bpd
