"""Tensor image operations shared by the DataModules: scaling, flipping and resizing."""
import torch
import torch.nn.functional as F


def to_signed_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Maps uint8 images in [0, 255] to float32 in [-1, 1] (x / 127.5 - 1, as in Ho et al. 2020)."""
    return images.to(torch.float32) / 127.5 - 1.0


def random_horizontal_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flips each image of an NCHW batch left-right with probability 1/2, on the batch's device."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def resize_uint8_images(
    images: torch.Tensor, image_size: int, mode: str = "bicubic", chunk_size: int = 4096
) -> torch.Tensor:
    """Resizes a uint8 NCHW stack to image_size x image_size with antialiasing."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    # Chunked so that the float copy of a 50k-image set never exists all at once.
    chunks = []
    for start in range(0, images.shape[0], chunk_size):
        chunk = images[start : start + chunk_size].to(torch.float32)
        chunk = F.interpolate(chunk, size=(image_size, image_size), mode=mode, antialias=True, align_corners=False)
        chunks.append(chunk.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks)
