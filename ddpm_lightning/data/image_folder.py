"""Any folder of images, optionally class-conditional through its class subfolders."""
from torch.utils.data import Dataset

from ddpm_lightning.data.base import ImageDataModule
from ddpm_lightning.data.folder import (
    ImageFileDataset,
    check_image_headers,
    list_class_folders,
    labels_from_class_folders,
    list_image_files,
    require_directory,
)


class ImageFolderDataModule(ImageDataModule):
    """Recursive .jpg/.jpeg/.png/.webp under data_dir, shorter side resized (bicubic) and centre-cropped."""

    # With class_cond the first-level subfolders of data_dir are the classes, in sorted order as in torchvision's
    # ImageFolder; without it every label is 0 and num_classes is None.

    def __init__(
        self,
        data_dir: str,
        image_size: int = 64,
        batch_size: int = 128,
        global_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        random_flip: bool = True,
        num_val_samples: int = 256,
        class_cond: bool = False,
        in_memory: bool = False,
        on_corrupt: str = "error",
    ) -> None:
        # Classes are listed now, not in setup(), because the CLI links num_classes to the model first.
        classes = list_class_folders(require_directory(data_dir, type(self).__name__)) if class_cond else []
        if class_cond and not classes:
            raise ValueError(f"{type(self).__name__}: class_cond=True but '{data_dir}' has no class subfolders")
        super().__init__(
            image_size=image_size,
            channels=3,
            num_classes=len(classes) if class_cond else None,
            batch_size=batch_size,
            global_batch_size=global_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            random_flip=random_flip,
            num_val_samples=num_val_samples,
            in_memory=in_memory,
            on_corrupt=on_corrupt,
        )
        self.data_dir = data_dir
        self.class_cond = class_cond
        self.classes = classes
        self.save_hyperparameters()

    def build_train_dataset(self) -> Dataset:
        """Every image under data_dir; the validation images are held out of it by the base class."""
        root = require_directory(self.data_dir, self.owner)
        files = check_image_headers(list_image_files(root, self.owner), self.on_corrupt, self.owner)
        if not self.class_cond:
            return ImageFileDataset(files, [0] * len(files), self.image_size, self.on_corrupt, self.owner)
        labels = labels_from_class_folders(files, root, self.classes, self.owner)
        return ImageFileDataset(files, labels, self.image_size, self.on_corrupt, self.owner)
