"""FID reference statistics of a dataset split: computed once per dataset, split, resolution and feature
extractor, cached on disk as an npz (mu, sigma, count), and reused by every later run.

The reference is the whole split as distributed: "train" is the training set before the validation hold-out
(the 50k CIFAR-10 images the papers' FID tables use), "test" the test set. Images come straight from the
DataModule's datasets as uint8, before any flip or [-1, 1] conversion. Cache files live in
`~/.cache/ddpm_lightning/fid_stats/<key>.npz` ($XDG_CACHE_HOME is honoured), or under $DDPM_FID_STATS_DIR,
or the directory passed as cache_dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, Optional, Union

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.tensor_dataset import TensorImageDataset
from ddpm_lightning.diffusion.gaussian_diffusion import check_option
from ddpm_lightning.metrics.distributed import broadcast_from_rank_zero, rank_and_world_size, shard
from ddpm_lightning.metrics.fid import FeatureStats, RunningFeatureStats
from ddpm_lightning.metrics.inception import extract_features, module_device

CACHE_DIR_ENV = "DDPM_FID_STATS_DIR"
REFERENCE_SPLITS = ("train", "test")
# DataModule arguments that change how images are loaded or labelled, not which pixels: not in the key.
_LOADER_ARGS = frozenset({"batch_size", "num_workers", "pin_memory", "random_flip", "in_memory", "on_corrupt",
                          "num_val_samples", "download", "class_cond"})


def stats_cache_dir(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """cache_dir, else $DDPM_FID_STATS_DIR, else ~/.cache/ddpm_lightning/fid_stats."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ddpm_lightning" / "fid_stats"


def _check_datamodule(datamodule: object) -> None:
    if not isinstance(datamodule, ImageDataModule):
        raise ValueError(f"FID reference statistics need an ImageDataModule, got {type(datamodule).__name__}; "
                         "pass reference_stats=PATH to an npz of mu and sigma instead")


def reference_key(datamodule: ImageDataModule, split: str, feature_name: str, num_images: Optional[int] = None) -> str:
    """A file name for one dataset, split, resolution and feature space, e.g. CIFAR10DataModule-train-32px-...."""
    check_option("reference split", split, REFERENCE_SPLITS)
    _check_datamodule(datamodule)
    hparams = {k: v for k, v in dict(getattr(datamodule, "hparams", {})).items() if k not in _LOADER_ARGS}
    # Existing paths are made absolute: "data/cifar10" names different data from different working dirs.
    hparams = {k: os.path.abspath(v) if isinstance(v, str) and os.path.exists(v) else v for k, v in hparams.items()}
    digest = hashlib.sha1(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()[:10]
    first = f"-first{num_images}" if num_images else ""
    return f"{type(datamodule).__name__}-{split}-{datamodule.image_size}px{first}-{feature_name}-{digest}"


def reference_dataset(datamodule: ImageDataModule, split: str) -> Dataset:
    """The whole split of (uint8 [C, H, W], label) pairs, reusing the one decoded during fit when there is one."""
    check_option("reference split", split, REFERENCE_SPLITS)
    _check_datamodule(datamodule)
    if split == "train":
        held = datamodule.train_dataset
        # During fit the Subset's parent is the whole training split, already decoded (in memory mode).
        return held.dataset if isinstance(held, Subset) else datamodule.build_train_dataset()
    test = datamodule.build_test_dataset()
    if test is None:
        raise ValueError(f"{datamodule.owner}: no test split to compute FID reference statistics on")
    return test


def _image_batches(dataset: Dataset, indices: range, batch_size: int, num_workers: int) -> Iterator[Tensor]:
    """uint8 [N, C, H, W] batches of dataset[indices], in order."""
    if isinstance(dataset, TensorImageDataset):
        # Held as one tensor (maybe on the GPU): slice it instead of collating item by item.
        for start in range(indices.start, indices.stop, batch_size):
            yield dataset.images[start:min(start + batch_size, indices.stop)]
        return
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for images, _ in loader:
        yield images


def dataset_feature_stats(
    dataset: Dataset, feature_extractor: nn.Module, batch_size: int = 256, num_images: Optional[int] = None,
    num_workers: int = 0,
) -> FeatureStats:
    """FeatureStats of the first num_images (default all) images of dataset; call on every rank, each takes a shard."""
    total = len(dataset) if num_images is None else min(num_images, len(dataset))
    rank, world_size = rank_and_world_size()
    stats = RunningFeatureStats(feature_extractor.num_features).to(module_device(feature_extractor))
    for images in _image_batches(dataset, shard(total, rank, world_size), batch_size, num_workers):
        features, _ = extract_features(feature_extractor, images)
        stats.update(features)
    return stats.compute()


def cached_feature_stats(path: Union[str, Path], compute: Callable[[], FeatureStats]) -> FeatureStats:
    """path's statistics if the file exists, else compute() saved there; call on every rank.

    Rank 0 alone reads and writes (the cache may be node-local) and broadcasts what it read; compute()
    runs on every rank, so that it can shard its work.
    """
    path = Path(path)
    rank, _ = rank_and_world_size()
    if broadcast_from_rank_zero(path.is_file()):
        return broadcast_from_rank_zero(FeatureStats.load(path) if rank == 0 else None)
    if rank == 0:
        # Minutes for a large split on one GPU: say what is happening, once.
        print(f"computing FID reference statistics into {path}", file=sys.stderr, flush=True)
    stats = compute()
    if rank == 0:
        stats.save(path)
    return stats


def reference_stats(
    datamodule: ImageDataModule, feature_extractor: nn.Module, split: str = "train",
    cache_dir: Optional[Union[str, Path]] = None, num_images: Optional[int] = None, batch_size: int = 256,
) -> FeatureStats:
    """The cached reference FeatureStats of a DataModule's split, computed (sharded over ranks) on a miss."""
    key = reference_key(datamodule, split, feature_extractor.cache_name, num_images)

    def compute() -> FeatureStats:
        dataset = reference_dataset(datamodule, split)
        return dataset_feature_stats(dataset, feature_extractor, batch_size, num_images, datamodule.num_workers)

    return cached_feature_stats(stats_cache_dir(cache_dir) / f"{key}.npz", compute)
