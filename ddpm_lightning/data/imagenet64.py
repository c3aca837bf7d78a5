"""Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017), the Improved DDPM benchmark, from npz archives or a folder."""
from pathlib import Path

from torch.utils.data import Dataset

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.folder import (
    ImageFileDataset,
    check_image_headers,
    labels_from_class_folders,
    list_class_folders,
    list_image_files,
    require_directory,
)
from ddpm_lightning.data.npz_archives import MemmapShardDataset, convert_archive, find_archives

SOURCES = ("npz", "folder")
NUM_CLASSES = 1000


class ImageNet64DataModule(ImageDataModule):
    """ImageNet at 64x64 (Chrabaszcz et al. 2017), 1000 classes, from the npz release or an image folder."""

    # npz source: data_dir holds train_data_batch_1 ... train_data_batch_10 and val_data (with or without .npz).
    # Each archive is converted once into <cache_dir>/<name>.data.npy ([N, 3, S, S] uint8) and <name>.labels.npy
    # (0-based), then memory-mapped, so no rank loads the 15 GB set. The 32x32 release works with image_size=32.
    # folder source: data_dir/train/<class>/* (or class folders directly in data_dir) and data_dir/val/<class>/*.
    # Either way the validation split is held out of train, and val_data (or val/) is the test split.

    def __init__(
        self,
        data_dir: str = "data/imagenet64",
        source: str = "npz",
        image_size: int = 64,
        batch_size: int = 128,
        global_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        # Off, as in Improved DDPM, which trained ImageNet 64x64 without flips.
        random_flip: bool = False,
        num_val_samples: int = 10000,
        in_memory: bool = False,
        cache_dir: str | None = None,
        on_corrupt: str = "error",
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=3,
            num_classes=NUM_CLASSES,
            batch_size=batch_size,
            global_batch_size=global_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            random_flip=random_flip,
            num_val_samples=num_val_samples,
            in_memory=in_memory,
            on_corrupt=on_corrupt,
        )
        if source not in SOURCES:
            raise ValueError(f"{self.owner}: source must be one of {SOURCES}, got {source!r}")
        self.data_dir = data_dir
        self.source = source
        self.cache_dir = cache_dir
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Converts every archive to its cached .npy once, on one process per node, before setup() maps them."""
        if self.source != "npz":
            return
        root = require_directory(self.data_dir, self.owner)
        archives = find_archives(root, "train", self.owner)
        try:
            archives += find_archives(root, "val", self.owner)
        except FileNotFoundError:
            pass  # val_data is only needed by trainer.test, and setup('test') reports it missing.
        for archive in archives:
            self._convert(archive)

    def build_train_dataset(self) -> Dataset:
        """The 1,281,167 training images."""
        return self._build("train")

    def build_test_dataset(self) -> Dataset:
        """The 50,000 ImageNet validation images."""
        return self._build("val")

    def _build(self, split: str) -> Dataset:
        root = require_directory(self.data_dir, self.owner)
        if self.source == "npz":
            return MemmapShardDataset([self._convert(archive) for archive in find_archives(root, split, self.owner)])
        return self._from_folder(root, split)

    def _convert(self, archive: Path) -> tuple[Path, Path]:
        cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir else archive.parent
        return convert_archive(archive, cache_dir, self.image_size, NUM_CLASSES, self.owner)

    def _from_folder(self, root: Path, split: str) -> ImageFileDataset:
        train_dir = root / "train" if (root / "train").is_dir() else root
        classes = list_class_folders(train_dir)
        if not 0 < len(classes) <= NUM_CLASSES:
            raise ValueError(
                f"{self.owner}: expected 1..{NUM_CLASSES} class folders in '{train_dir}', found {len(classes)}"
            )
        split_dir = train_dir if split == "train" else require_directory(root / "val", self.owner, "val folder")
        files = check_image_headers(list_image_files(split_dir, self.owner), self.on_corrupt, self.owner)
        labels = labels_from_class_folders(files, split_dir, classes, self.owner)
        return ImageFileDataset(files, labels, self.image_size, self.on_corrupt, self.owner)
