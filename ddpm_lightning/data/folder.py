"""Image folders: scanning, a cheap header check, and decoding to uint8 CHW tensors."""
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
ON_CORRUPT_CHOICES = ("error", "skip")
# PIL signals unreadable files with several exception types (SyntaxError for broken PNG chunks).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def require_directory(path: str | os.PathLike, owner: str, what: str = "data_dir") -> Path:
    """Returns path as a Path, or raises a one-line error naming it when it is not a directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{owner}: {what} '{path}' does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{owner}: {what} '{path}' is not a directory")
    return path


def check_on_corrupt(on_corrupt: str, owner: str) -> None:
    """Validates the on_corrupt option once, at construction."""
    if on_corrupt not in ON_CORRUPT_CHOICES:
        raise ValueError(f"{owner}: on_corrupt must be one of {ON_CORRUPT_CHOICES}, got {on_corrupt!r}")


def list_image_files(root: Path, owner: str) -> list[Path]:
    """Lists image files under root recursively, in a sorted (hence rank-independent) order."""
    files = []
    # followlinks: prepared datasets are often symlink farms.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            Path(dirpath, name)
            for name in sorted(filenames)
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
        )
    if not files:
        raise FileNotFoundError(f"{owner}: no images ({', '.join(IMAGE_EXTENSIONS)}) found under '{root}'")
    return files


def list_class_folders(root: Path) -> list[str]:
    """Names of the visible subfolders of root, sorted, which is torchvision's ImageFolder class order."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def report_corrupt(corrupt: list[tuple[Path, str]], total: int, on_corrupt: str, owner: str) -> None:
    """Raises on the first unreadable file, or warns once with the count of skipped files."""
    if not corrupt:
        return
    path, reason = corrupt[0]
    if on_corrupt == "error":
        more = f" (and {len(corrupt) - 1} more)" if len(corrupt) > 1 else ""
        raise ValueError(
            f"{owner}: cannot read image '{path}': {reason}{more}; pass on_corrupt='skip' to skip such files"
        )
    warnings.warn(f"{owner}: skipped {len(corrupt)} of {total} unreadable image files (first: '{path}': {reason})")


def check_image_headers(files: list[Path], on_corrupt: str, owner: str) -> list[Path]:
    """Opens each file's header (PNG: also chunk CRCs) without decoding pixels; returns the readable files."""
    readable, corrupt = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()
            readable.append(path)
        except DECODE_ERRORS as err:
            corrupt.append((path, f"{type(err).__name__}: {err}"))
    report_corrupt(corrupt, len(files), on_corrupt, owner)
    if not readable:
        raise ValueError(f"{owner}: none of the {len(files)} image files could be read (first: '{corrupt[0][0]}')")
    return readable


def decode_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Decodes an image to uint8 [3, image_size, image_size]: shorter side resized (bicubic), centre crop."""
    with Image.open(path) as image:
        # Lets the JPEG decoder downscale by DCT scaling first; it never goes below the requested size.
        image.draft("RGB", (image_size, image_size))
        image = image.convert("RGB")
    width, height = image.size
    if min(width, height) != image_size:
        # PIL's bicubic resize is antialiased (the filter support grows with the scale factor).
        scale = image_size / min(width, height)
        new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        width, height = new_size
    left, top = (width - image_size) // 2, (height - image_size) // 2
    if (width, height) != (image_size, image_size):
        image = image.crop((left, top, left + image_size, top + image_size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


class ImageFileDataset(Dataset):
    """Decodes image files on access into (uint8 [3, S, S], int64 label) pairs."""

    def __init__(self, files: list[Path], labels: list[int], image_size: int, on_corrupt: str, owner: str) -> None:
        if len(files) != len(labels):
            raise ValueError(f"{owner}: {len(files)} files but {len(labels)} labels")
        # Strings and a numpy array, not Path objects, keep worker start-up pickling small.
        self.files = [str(path) for path in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = image_size
        self.on_corrupt = on_corrupt
        self.owner = owner

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        """Decodes one image, raising ValueError naming the file when it cannot be decoded."""
        try:
            return decode_image(self.files[index], self.image_size)
        except DECODE_ERRORS as err:
            reason = f"{type(err).__name__}: {err}"
            raise ValueError(f"{self.owner}: cannot decode image '{self.files[index]}': {reason}") from err

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Headers were checked at setup; a failure here is a file whose pixel data is damaged.
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            try:
                return self.load(current), torch.tensor(self.labels[current])
            except ValueError as err:
                if self.on_corrupt == "error":
                    raise
                warnings.warn(f"{err}; serving the next image in its place (on_corrupt='skip')")
        raise ValueError(f"{self.owner}: no image in the dataset could be decoded")


def labels_from_class_folders(files: list[Path], root: Path, classes: list[str], owner: str) -> list[int]:
    """Labels each file by the first-level subfolder of root that holds it (its index in classes)."""
    class_index = {name: index for index, name in enumerate(classes)}
    labels = []
    for path in files:
        relative = path.relative_to(root).parts
        if len(relative) < 2 or relative[0] not in class_index:
            raise ValueError(f"{owner}: '{path}' is not inside one of the {len(classes)} class subfolders of '{root}'")
        labels.append(class_index[relative[0]])
    return labels
