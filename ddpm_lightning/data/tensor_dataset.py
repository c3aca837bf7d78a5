"""A map-style dataset over images already held as one uint8 tensor."""
import torch
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """Serves (uint8 CHW image, int64 label) pairs from an [N, C, H, W] uint8 tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            shape = tuple(images.shape)
            raise ValueError(f"TensorImageDataset: expected uint8 [N, C, H, W] images, got {images.dtype} {shape}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"TensorImageDataset: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def to(self, device: torch.device) -> "TensorImageDataset":
        """Returns a copy whose tensors live on device (the in-memory mode keeps data on the GPU)."""
        return TensorImageDataset(self.images.to(device), self.labels.to(device))
