"""scikit-learn's bundled handwritten digits: the built-in quickstart dataset that needs no download."""
import torch
from sklearn.datasets import load_digits

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.tensor_dataset import TensorImageDataset
from ddpm_lightning.data.transforms import resize_uint8_images


class DigitsDataModule(ImageDataModule):
    """The 1,797 8x8 digits of sklearn.datasets.load_digits, resized to image_size, 1 channel, 10 classes."""

    def __init__(
        self,
        image_size: int = 16,
        batch_size: int = 128,
        global_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        # Off: a mirrored digit is usually not the same digit.
        random_flip: bool = False,
        num_val_samples: int = 197,
        in_memory: bool = True,
    ) -> None:
        super().__init__(
            image_size=image_size,
            channels=1,
            num_classes=10,
            batch_size=batch_size,
            global_batch_size=global_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            random_flip=random_flip,
            num_val_samples=num_val_samples,
            in_memory=in_memory,
        )
        self.save_hyperparameters()

    def build_train_dataset(self) -> TensorImageDataset:
        """Loads all 1,797 digits (sklearn has no test split); 197 held out by default leave 1,600 to train."""
        digits = load_digits()
        # The bundled values are 0..16 counts of set pixels in 4x4 blocks; 16 is full intensity.
        images = torch.from_numpy(digits.images).mul(255.0 / 16.0).round().to(torch.uint8)
        images = resize_uint8_images(images[:, None], self.image_size, mode="bilinear")
        return TensorImageDataset(images, torch.from_numpy(digits.target).to(torch.int64))
