"""FIDCallback: FID against the training set and Inception Score of EMA samples every N steps, over DDP ranks."""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning as L
import torch
from torch import nn

from ddpm_lightning.diffusion.gaussian_diffusion import check_option
from ddpm_lightning.metrics.fid import FeatureStats
from ddpm_lightning.metrics.fid_is import compute_fid_is, sampler_tag
from ddpm_lightning.metrics.inception import build_inception
from ddpm_lightning.metrics.reference_stats import REFERENCE_SPLITS, cached_feature_stats
from ddpm_lightning.metrics.reference_stats import reference_stats as split_reference_stats
from ddpm_lightning.sampling import check_respacing, check_sampling_options


class FIDCallback(L.Callback):
    """Every every_n_steps optimizer steps, FID against the training set and Inception Score of EMA samples.

    Logged as fid/<tag>, is_mean/<tag> and is_std/<tag>, where <tag> names the sampler settings
    (sampler_tag: ddpm_100_skip0.0). Every rank generates a contiguous shard of the sample indices with
    per-sample seeds (the images do not depend on the number of ranks), runs Inception on it, and all ranks
    all-reduce the float64 sums; the numbers reach the loggers from rank zero and trainer.callback_metrics
    on every rank (so that ModelCheckpoint can monitor them).

    The callback owns the feature extractor and the reference statistics: neither is part of the
    LightningModule, so Inception never lands in its state_dict or in checkpoints. Both are set up in
    setup("fit"), so a missing weights file fails before training starts. The reference statistics of the
    DataModule's split are computed once and cached (see metrics.reference_stats).

    Args:
        every_n_steps: optimizer steps between evaluations.
        num_samples: generated images per evaluation (10k during training; 50k for final numbers).
        sampler, respacing, eta, skip_fraction: as in DiffusionModule.sample.
        use_ema: sample with the EMA weights.
        seed: the run seed of the per-sample noise (the same images' noise at every evaluation).
        batch_size: images per sampling and Inception batch, per rank.
        is_splits: groups of the Inception Score (10, as improved-gan and torch-fidelity).
        inception_weights: a local torch-fidelity (or pytorch-fid) Inception weights file; default:
            torch.hub's cache, downloaded on first use.
        feature_extractor: another extractor following the protocol of metrics.inception (tests use a stand-in).
        reference_stats: an npz with mu and sigma to compare against, instead of the DataModule's split.
        reference_split: "train" (the whole training set, as the papers) or "test".
        reference_num_images: use only the first N images of the split (e.g. of ImageNet's 1.28M).
        cache_dir: where reference statistics are cached (default ~/.cache/ddpm_lightning/fid_stats).
    """

    def __init__(
        self,
        every_n_steps: int = 10000,
        num_samples: int = 10000,
        sampler: str = "ddpm",
        respacing: Optional[str] = "100",
        eta: float = 0.0,
        skip_fraction: float = 0.0,
        use_ema: bool = True,
        seed: int = 0,
        batch_size: int = 256,
        is_splits: int = 10,
        inception_weights: Optional[str] = None,
        feature_extractor: Optional[nn.Module] = None,
        reference_stats: Optional[str] = None,
        reference_split: str = "train",
        reference_num_images: Optional[int] = None,
        cache_dir: Optional[str] = None,
    ):
        super().__init__()
        check_sampling_options(sampler, skip_fraction, eta)
        check_option("reference split", reference_split, REFERENCE_SPLITS)
        for name, value in (("every_n_steps", every_n_steps), ("batch_size", batch_size), ("is_splits", is_splits)):
            if value < 1:
                raise ValueError(f"FIDCallback: {name} must be >= 1, got {value}")
        if num_samples < max(2, is_splits):
            raise ValueError(f"FIDCallback: num_samples must be >= max(2, is_splits={is_splits}), got {num_samples}")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.sample_kwargs = dict(sampler=sampler, respacing=respacing, eta=eta, skip_fraction=skip_fraction,
                                  use_ema=use_ema)
        self.seed = seed
        self.batch_size = batch_size
        self.is_splits = is_splits
        self.inception_weights = inception_weights
        self.feature_extractor = feature_extractor
        self.reference_stats = reference_stats
        self.reference_split = reference_split
        self.reference_num_images = reference_num_images
        self.cache_dir = cache_dir
        self.tag = sampler_tag(sampler, respacing, skip_fraction, eta)
        self._reference: Optional[FeatureStats] = None
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tag=self.tag, num_samples=self.num_samples, seed=self.seed)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._reference is not None:
            return
        check_respacing(self.sample_kwargs["respacing"], pl_module.diffusion.num_timesteps)
        if self.feature_extractor is None:
            self.feature_extractor = build_inception(self.inception_weights)
        # The module is not on its device yet; the strategy already knows the device.
        self.feature_extractor.to(trainer.strategy.root_device).eval()
        if self.reference_stats is not None:
            self._reference = cached_feature_stats(self.reference_stats, _missing(self.reference_stats))
        else:
            self._reference = split_reference_stats(trainer.datamodule, self.feature_extractor, self.reference_split,
                                                    self.cache_dir, self.reference_num_images, self.batch_size)
        if self._reference.mu.shape[0] != self.feature_extractor.num_features:
            raise ValueError(f"FIDCallback: the reference statistics have {self._reference.mu.shape[0]} features, "
                             f"the feature extractor {self.feature_extractor.num_features}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        # On every rank alike (global_step agrees), since the evaluation all-reduces.
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Runs one evaluation (call on every rank) and logs it; returns {"fid/<tag>": ..., "is_mean/<tag>": ...}."""
        if self._reference is None:
            raise RuntimeError("FIDCallback.evaluate before setup('fit'): no reference statistics yet")
        step = self._last_step = trainer.global_step
        results = compute_fid_is(pl_module, self._reference, self.feature_extractor, self.num_samples, seed=self.seed,
                                 batch_size=self.batch_size, is_splits=self.is_splits, **self.sample_kwargs)
        metrics = {f"{name}/{self.tag}": value for name, value in results.items()}
        # Straight to the loggers: self.log from this hook would reach them only on log_every_n_steps boundaries.
        # callback_metrics, on every rank, is what ModelCheckpoint(monitor="fid/...") reads.
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        return metrics


def _missing(path: str) -> Callable[[], FeatureStats]:
    """A compute() for cached_feature_stats that fails, on every rank alike, when a given file is absent."""

    def compute() -> FeatureStats:
        raise FileNotFoundError(f"reference_stats: no file at '{path}'")
    return compute
