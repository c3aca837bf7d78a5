"""DataModules: loaders yield uint8 images; on_after_batch_transfer turns them into [-1, 1] floats on the device."""
from ddpm_lightning.data.cifar10 import CIFAR10DataModule
from ddpm_lightning.data.digits import DigitsDataModule
from ddpm_lightning.data.image_folder import ImageFolderDataModule
from ddpm_lightning.data.imagenet64 import ImageNet64DataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageFolderDataModule", "ImageNet64DataModule"]
