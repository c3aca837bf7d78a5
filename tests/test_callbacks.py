"""SampleCallback and FIDCallback in real (tiny) training runs: intervals, files, loggers, checkpoints, errors."""

import csv

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from PIL import Image
from test_metrics import StandInFeatures, one_thread  # noqa: F401  (one_thread: autouse fixture)

from ddpm_lightning.callbacks import FIDCallback, SampleCallback
from ddpm_lightning.data import DigitsDataModule
from ddpm_lightning.image_io import grid_tensor
from ddpm_lightning.metrics import FeatureStats, compute_fid_is
from ddpm_lightning.module import DiffusionModule
from ddpm_lightning.sampling import generate_uint8


class RecordingLogger(Logger):
    """Records log_metrics and log_image calls, as WandbLogger receives them."""

    def __init__(self):
        super().__init__()
        self.metrics, self.images = [], []

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, step, images))


class SummaryWriterLike:
    def __init__(self):
        self.images = []

    def add_image(self, tag, img_tensor, global_step=None):
        self.images.append((tag, global_step, img_tensor))


class BoardLogger(RecordingLogger):
    """A TensorBoard-like logger: images go through experiment.add_image, there is no log_image."""

    log_image = None

    def __init__(self):
        super().__init__()
        self._writer = SummaryWriterLike()

    @property
    def experiment(self):
        return self._writer


def tiny_module():
    L.seed_everything(0)
    return DiffusionModule(net="tiny", image_size=8, in_channels=1, num_timesteps=25, ema_decay=0.9)


def fit(tmp_path, callbacks, loggers, max_steps, devices=1, **trainer_kwargs):
    module = tiny_module()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=devices, logger=loggers, callbacks=callbacks,
                        default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(module, DigitsDataModule(image_size=8, batch_size=16))
    return trainer, module


def test_sample_callback_saves_and_logs_grids_at_its_interval_and_at_the_end(tmp_path):
    recorder, board = RecordingLogger(), BoardLogger()
    callback = SampleCallback(every_n_steps=2, num_samples=4, respacing="5", batch_size=3)
    # Two batches per optimizer step: a step is still one grid.
    trainer, module = fit(tmp_path, [callback], [recorder, board, CSVLogger(tmp_path)], max_steps=5,
                          accumulate_grad_batches=2, enable_checkpointing=False)

    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_0000002.png", "step_0000004.png", "step_0000005.png"]
    assert [(key, step) for key, step, _ in recorder.images] == [("samples/ddpm_5_skip0.0", s) for s in (2, 4, 5)]
    assert [(tag, step) for tag, step, _ in board.experiment.images] == [("samples/ddpm_5_skip0.0", s) for s in (2, 4, 5)]
    # 4 images of 8x8, each enlarged 8x to 64 px for viewing, in a 2x2 grid with 2-pixel padding, RGB.
    last = recorder.images[-1][2][0]
    assert last.shape == (134, 134, 3) and last.dtype == np.uint8
    assert board.experiment.images[-1][2].shape == (3, 134, 134)
    png = np.array(Image.open(tmp_path / "samples" / "step_0000005.png").convert("RGB"))
    np.testing.assert_array_equal(png, last)
    # The last grid is the fixed-seed sample of the final EMA weights.
    images, _ = generate_uint8(module, range(4), 0, 3, respacing="5", use_ema=True)
    np.testing.assert_array_equal(grid_tensor(images).mul(255).add(0.5).to(torch.uint8).permute(1, 2, 0).numpy(), last)
    assert not np.array_equal(recorder.images[0][2][0], last)  # training moved the EMA weights

    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        SampleCallback(sampler="euler")
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        SampleCallback(every_n_steps=0)
    with pytest.raises(ValueError, match=r"skip_fraction must be in \[0, 1\)"):
        SampleCallback(skip_fraction=1.0)


def test_a_bad_respacing_fails_when_fit_starts_not_at_the_first_grid(tmp_path):
    with pytest.raises(ValueError, match="cannot take 500 steps"):
        fit(tmp_path, [SampleCallback(every_n_steps=1000, respacing="500")], [], max_steps=2, enable_checkpointing=False)


def test_fid_callback_logs_fid_and_is_at_its_interval_and_stays_out_of_checkpoints(tmp_path):
    recorder, extractor = RecordingLogger(), StandInFeatures()
    callback = FIDCallback(every_n_steps=2, num_samples=12, respacing="5", batch_size=5, is_splits=3,
                           feature_extractor=extractor, cache_dir=str(tmp_path / "stats"))
    tag = "ddpm_5_skip0.0"
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=f"fid/{tag}", mode="min", save_top_k=1,
                                 every_n_train_steps=2)
    trainer, module = fit(tmp_path, [callback, checkpoint], [recorder, CSVLogger(tmp_path, name="csv")], max_steps=4)

    logged = [(step, metrics) for step, metrics in recorder.metrics if f"fid/{tag}" in metrics]
    assert [step for step, _ in logged] == [2, 4]
    for _, metrics in logged:
        assert set(metrics) == {f"fid/{tag}", f"is_mean/{tag}", f"is_std/{tag}"}
        assert metrics[f"fid/{tag}"] > 0 and 1.0 <= metrics[f"is_mean/{tag}"] <= StandInFeatures.num_classes
    # The logged numbers are those of the EMA samples against the digits' cached reference statistics.
    assert len(list((tmp_path / "stats").glob("DigitsDataModule-train-8px-stand-in-12-*.npz"))) == 1
    again = compute_fid_is(module, callback._reference, extractor, 12, batch_size=5, is_splits=3, respacing="5")
    assert again["fid"] == pytest.approx(logged[-1][1][f"fid/{tag}"], rel=1e-6)
    assert again["is_mean"] == pytest.approx(logged[-1][1][f"is_mean/{tag}"], rel=1e-6)
    # ModelCheckpoint monitored the metric through callback_metrics; the CSV logger got it too.
    assert checkpoint.best_model_score == pytest.approx(min(m[f"fid/{tag}"] for _, m in logged), rel=1e-6)
    (metrics_csv,) = (tmp_path / "csv").rglob("metrics.csv")
    assert f"fid/{tag}" in next(csv.reader(open(metrics_csv)))

    # The feature extractor belongs to the callback: not in the module, not in the checkpoint.
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    assert set(saved["state_dict"]) == set(tiny_module().state_dict())
    assert not any("to_features" in key for key in saved["state_dict"])
    assert all(not state for key, state in saved.get("callbacks", {}).items() if "FIDCallback" in key)


def test_fid_callback_without_weights_fails_before_training(tmp_path):
    callback = FIDCallback(inception_weights=str(tmp_path / "missing.pth"), respacing="5")
    steps = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            steps.append(trainer.global_step)

    with pytest.raises(FileNotFoundError, match="inception_weights: no file at"):
        fit(tmp_path, [callback, Count()], False, max_steps=2, enable_checkpointing=False)
    with pytest.raises(FileNotFoundError, match="reference_stats: no file at"):
        callback = FIDCallback(feature_extractor=StandInFeatures(), reference_stats=str(tmp_path / "missing.npz"),
                               respacing="5")
        fit(tmp_path, [callback, Count()], False, max_steps=2, enable_checkpointing=False)
    FeatureStats(np.zeros(3), np.eye(3), 10).save(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="reference statistics have 3 features, the feature extractor 12"):
        callback = FIDCallback(feature_extractor=StandInFeatures(), reference_stats=str(tmp_path / "other.npz"),
                               respacing="5")
        fit(tmp_path, [callback, Count()], False, max_steps=2, enable_checkpointing=False)
    with pytest.raises(ValueError, match="respacing '100': cannot take 100 steps from a section of 25"):
        fit(tmp_path, [FIDCallback(feature_extractor=StandInFeatures()), Count()], False, max_steps=2,
            enable_checkpointing=False)
    assert steps == []
    with pytest.raises(ValueError, match="num_samples must be >= max"):
        FIDCallback(num_samples=5, is_splits=10)
    with pytest.raises(ValueError, match="unknown reference split 'val'"):
        FIDCallback(reference_split="val")


def test_callbacks_under_ddp_give_the_single_process_numbers(tmp_path):
    # Two CPU processes (gloo): FID/IS all-reduced from both ranks' shards, grids from rank zero, no deadlock.
    fid = FIDCallback(every_n_steps=2, num_samples=12, respacing="5", batch_size=4, is_splits=3,
                      feature_extractor=StandInFeatures(), cache_dir=str(tmp_path / "stats"))
    grids = SampleCallback(every_n_steps=2, num_samples=4, respacing="5")
    trainer, module = fit(tmp_path, [fid, grids], CSVLogger(tmp_path, name="csv"), max_steps=2,
                          strategy="ddp_spawn", devices=2, enable_checkpointing=False)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_0000002.png"]
    (metrics_csv,) = (tmp_path / "csv").rglob("metrics.csv")
    rows = [row for row in csv.DictReader(open(metrics_csv)) if row.get("fid/ddpm_5_skip0.0")]
    assert [row["step"] for row in rows] == ["2"]

    # ddp_spawn hands rank zero's weights back; one process evaluates them to the same numbers.
    from ddpm_lightning.metrics import reference_stats

    extractor = StandInFeatures()
    reference = reference_stats(DigitsDataModule(image_size=8), extractor, cache_dir=tmp_path / "stats")
    assert extractor.images_seen == 0  # the DDP run cached them
    single = compute_fid_is(module, reference, extractor, 12, batch_size=5, is_splits=3, respacing="5")
    assert float(rows[0]["fid/ddpm_5_skip0.0"]) == pytest.approx(single["fid"], rel=1e-5)
    assert float(rows[0]["is_mean/ddpm_5_skip0.0"]) == pytest.approx(single["is_mean"], rel=1e-5)
