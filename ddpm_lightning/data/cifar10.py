"""CIFAR-10 from torchvision's python archive or from an image folder of the same images."""
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.folder import ImageFileDataset, check_image_headers, list_image_files, require_directory
from ddpm_lightning.data.tensor_dataset import TensorImageDataset
from ddpm_lightning.data.transforms import resize_uint8_images

# torchvision's label order, which is also alphabetical, so class folders map to the same labels.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SOURCES = ("torchvision", "folder")


def cifar10_label(path: Path, owner: str) -> int:
    """Label from the class folder (train/<class>/x.png) or from improved-diffusion's '<class>_<n>.png' names."""
    for name in (path.parent.name, path.name.split("_")[0]):
        if name in CIFAR10_CLASSES:
            return CIFAR10_CLASSES.index(name)
    raise ValueError(
        f"{owner}: cannot tell the class of '{path}': expected a class folder or a '<class>_' file name prefix, "
        f"with class one of {', '.join(CIFAR10_CLASSES)}"
    )


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 (Krizhevsky 2009), 32x32 RGB, 10 classes; the DDPM and Improved DDPM benchmark."""

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        source: str = "torchvision",
        image_size: int = 32,
        batch_size: int = 128,
        global_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        # Ho et al. (2020) found flips improve CIFAR-10 sample quality slightly.
        random_flip: bool = True,
        num_val_samples: int = 1000,
        in_memory: bool = False,
        download: bool = True,
        on_corrupt: str = "error",
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=3,
            num_classes=10,
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
        self.download = download
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Downloads torchvision's archive into data_dir (once per node) when download=True."""
        if self.source != "torchvision" or not self.download:
            return
        try:
            for train in (True, False):
                torchvision.datasets.CIFAR10(self.data_dir, train=train, download=True)
        except (urllib.error.URLError, OSError) as err:
            raise RuntimeError(
                f"{self.owner}: could not download CIFAR-10 into '{self.data_dir}' ({err}); "
                "without network, copy cifar-10-python.tar.gz there or use source='folder'"
            ) from err

    def build_train_dataset(self) -> Dataset:
        """The 50,000 training images."""
        return self._build("train")

    def build_test_dataset(self) -> Dataset:
        """The 10,000 test images (torchvision's test batch, or a test/ folder)."""
        return self._build("test")

    def _build(self, split: str) -> Dataset:
        if self.source == "torchvision":
            return self._from_torchvision(split)
        return self._from_folder(split)

    def _from_torchvision(self, split: str) -> TensorImageDataset:
        try:
            dataset = torchvision.datasets.CIFAR10(self.data_dir, train=split == "train", download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"{self.owner}: no verified CIFAR-10 batches in '{Path(self.data_dir) / 'cifar-10-batches-py'}'; "
                "run prepare_data() with download=True (needs network) or use source='folder'"
            ) from err
        # torchvision already holds the set as one HWC uint8 array: no per-image decoding is needed.
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        images = resize_uint8_images(images, self.image_size)
        return TensorImageDataset(images, torch.tensor(dataset.targets, dtype=torch.int64))

    def _from_folder(self, split: str) -> ImageFileDataset:
        root = require_directory(self.data_dir, self.owner)
        split_dir = next((root / name for name in (split, f"cifar_{split}") if (root / name).is_dir()), None)
        if split_dir is None:
            if split == "test" or any((root / name).is_dir() for name in ("test", "cifar_test")):
                raise FileNotFoundError(f"{self.owner}: no {split}/ or cifar_{split}/ folder in '{root}'")
            split_dir = root  # Class folders directly inside data_dir.
        files = check_image_headers(list_image_files(split_dir, self.owner), self.on_corrupt, self.owner)
        labels = [cifar10_label(path, self.owner) for path in files]
        return ImageFileDataset(files, labels, self.image_size, self.on_corrupt, self.owner)
