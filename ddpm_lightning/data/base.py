"""Shared DataModule base: deterministic split, loaders, and on-device conversion to [-1, 1] with flips."""
import math
import os
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ddpm_lightning.data.folder import check_on_corrupt
from ddpm_lightning.data.in_memory import InMemoryLoader, load_into_memory
from ddpm_lightning.data.resumable import ResumableDataLoader
from ddpm_lightning.data.transforms import random_horizontal_flip, to_signed_unit_range

# Fixed, and independent of the global seed, so that every run and every rank holds out the same images.
SPLIT_SEED = 0


def split_indices(num_samples: int, num_val_samples: int, owner: str) -> tuple[list[int], list[int]]:
    """Splits range(num_samples) into sorted (train, val) index lists with a fixed-seed permutation."""
    if num_val_samples >= num_samples:
        raise ValueError(f"{owner}: num_val_samples={num_val_samples} leaves no training images out of {num_samples}")
    permutation = np.random.default_rng(SPLIT_SEED).permutation(num_samples)
    return sorted(permutation[num_val_samples:].tolist()), sorted(permutation[:num_val_samples].tolist())


class ImageDataModule(L.LightningDataModule):
    """Base for the image DataModules: loaders yield (uint8 NCHW, int64 N); the batch hook makes [-1, 1] floats."""

    # Subclasses pass image_size, channels and num_classes up from __init__ (the CLI links them to the model
    # before setup), and implement build_train_dataset (the validation hold-out included) and, where the data
    # has one, build_test_dataset. Their datasets return (uint8 [C, H, W], int64 label) pairs.

    def __init__(
        self,
        image_size: int,
        channels: int,
        num_classes: int | None,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        random_flip: bool,
        num_val_samples: int,
        in_memory: bool,
        on_corrupt: str = "error",
        global_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value, minimum in (
            ("image_size", image_size, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("num_val_samples", num_val_samples, 0),
        ):
            if value < minimum:
                raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
        check_on_corrupt(on_corrupt, owner)
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.batch_size = batch_size
        # The papers' batch (128) is global: with global_batch_size set, each device takes its share,
        # global / (devices x nodes x accumulate_grad_batches), whatever the GPU count.
        self.global_batch_size = global_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.random_flip = random_flip
        self.num_val_samples = num_val_samples
        self.in_memory = in_memory
        self.on_corrupt = on_corrupt
        self.train_dataset: Subset | None = None
        self.val_dataset: Subset | None = None
        self.test_dataset: Subset | None = None

    @property
    def owner(self) -> str:
        """The class name that prefixes every error message."""
        return type(self).__name__

    def build_train_dataset(self) -> Dataset:
        """Returns the full training split (before the validation hold-out)."""
        raise NotImplementedError

    def build_test_dataset(self) -> Dataset | None:
        """Returns the test split, or None when the data has none."""
        return None

    def setup(self, stage: str | None = None) -> None:
        """Builds the splits that stage needs; validation of the data happens here, not mid-epoch."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            full = self._materialize(self.build_train_dataset())
            train_indices, val_indices = split_indices(len(full), self.num_val_samples, self.owner)
            self.train_dataset, self.val_dataset = Subset(full, train_indices), Subset(full, val_indices)
        if stage == "test" and self.test_dataset is None:
            test = self.build_test_dataset()
            if test is None:
                raise ValueError(f"{self.owner}: this dataset has no test split")
            test = self._materialize(test)
            self.test_dataset = Subset(test, list(range(len(test))))

    def train_dataloader(self) -> DataLoader | InMemoryLoader:
        return self._loader(self.train_dataset, shuffle=True, stage="fit")

    def val_dataloader(self) -> DataLoader | InMemoryLoader | list:
        if self.num_val_samples == 0:
            return []  # Lightning skips validation when the loader list is empty.
        return self._loader(self.val_dataset, shuffle=False, stage="fit")

    def test_dataloader(self) -> DataLoader | InMemoryLoader:
        return self._loader(self.test_dataset, shuffle=False, stage="test")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Converts uint8 images to float32 in [-1, 1] on the device; flips only while training."""
        images, labels = batch
        if images.dtype != torch.uint8:
            raise TypeError(f"{self.owner}: expected uint8 image batches from the loader, got {images.dtype}")
        images = to_signed_unit_range(images)
        if self.random_flip and self.trainer is not None and self.trainer.training:
            images = random_horizontal_flip(images)
        return images, labels.to(torch.int64)

    def _materialize(self, dataset: Dataset) -> Dataset:
        """In in_memory mode, decodes dataset once into a tensor on the trainer's accelerator."""
        if not self.in_memory:
            return dataset
        held = load_into_memory(dataset, self.num_workers, self.on_corrupt, self.owner)
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return held.to(device) if device.type != "cpu" else held

    def device_batch_size(self) -> int:
        """batch_size, or this device's share of global_batch_size."""
        if self.global_batch_size is None:
            return self.batch_size
        world = self.trainer.world_size if self.trainer is not None else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        share, remainder = divmod(self.global_batch_size, world * accumulate)
        if remainder or share == 0:
            raise ValueError(f"{self.owner}: global_batch_size={self.global_batch_size} is not divisible by "
                             f"{world} processes x {accumulate} accumulation steps")
        return share

    def _loader(self, subset: Subset | None, shuffle: bool, stage: str) -> DataLoader | InMemoryLoader:
        if subset is None:
            raise RuntimeError(f"{self.owner}: call setup('{stage}') before asking for its dataloader")
        batch_size = self.device_batch_size()
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        # Training drops each epoch's short last batch, as improved-diffusion's loader does: every step
        # sees the configured batch, and a captured or compiled step keeps one shape. A set smaller than
        # one batch keeps its only (short) batch rather than train on nothing.
        drop_last = shuffle and math.ceil(len(subset) / world_size) >= batch_size
        # The same seed source as Lightning's own DistributedSampler, so seed_everything fixes the order.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if self.in_memory:
            return InMemoryLoader(subset.dataset, subset.indices, batch_size, shuffle, rank, world_size, seed,
                                  drop_last=drop_last)
        workers = dict(
            num_workers=self.num_workers,
            # Pinning helps only for host-to-GPU copies, and warns without a GPU.
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
        if shuffle:  # training: an order from (seed, epoch) and a position in checkpoints, for exact resume
            return ResumableDataLoader(subset, batch_size, rank, world_size, seed, drop_last=drop_last, **workers)
        return DataLoader(subset, batch_size=batch_size, shuffle=False, **workers)
