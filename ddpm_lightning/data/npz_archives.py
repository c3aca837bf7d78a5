"""Downsampled-ImageNet archives (Chrabaszcz et al. 2017): converted once to .npy, then memory-mapped."""
import bisect
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

TRAIN_ARCHIVE = re.compile(r"^train_data_batch_(\d+)(\.npz)?$")
VAL_ARCHIVE = re.compile(r"^val_data(\.npz)?$")
# Rows copied per read while converting: 4096 rows of 64x64 are 50 MB, so conversion needs little RAM.
CONVERT_CHUNK_ROWS = 4096


def expected_layout(image_size: int, num_classes: int) -> str:
    """Describes the archive layout that error messages ask for."""
    return (
        f"expected an npz archive with 'data' [N, {3 * image_size * image_size}] uint8 rows "
        f"(channel-planar 3x{image_size}x{image_size}) and 'labels' [N] in 1..{num_classes}"
    )


def find_archives(data_dir: Path, split: str, owner: str) -> list[Path]:
    """Lists train_data_batch_<k>[.npz] by k (split='train') or val_data[.npz] (split='val')."""
    pattern = TRAIN_ARCHIVE if split == "train" else VAL_ARCHIVE
    found: dict[int, Path] = {}
    for path in sorted(data_dir.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file():
            key = int(match.group(1)) if split == "train" else 0
            # With both 'x' and 'x.npz' present, keep 'x.npz' (sorted order lists it second).
            found[key] = path
    if not found:
        names = "train_data_batch_1 ... train_data_batch_10" if split == "train" else "val_data"
        raise FileNotFoundError(f"{owner}: no {names} archives (with or without .npz) in '{data_dir}'")
    return [found[key] for key in sorted(found)]


def _read_npy_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Reads an .npy header from a stream, leaving it at the first data byte."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


def convert_archive(
    archive: Path, cache_dir: Path, image_size: int, num_classes: int, owner: str
) -> tuple[Path, Path]:
    """Writes archive's images as [N, 3, S, S] uint8 .npy and 0-based int64 labels .npy, once; returns both paths."""
    stem = archive.name.removesuffix(".npz")
    data_path, labels_path = cache_dir / f"{stem}.data.npy", cache_dir / f"{stem}.labels.npy"
    source_time = archive.stat().st_mtime
    if all(path.exists() and path.stat().st_mtime >= source_time for path in (data_path, labels_path)):
        return data_path, labels_path

    layout = expected_layout(image_size, num_classes)
    if not zipfile.is_zipfile(archive):
        raise ValueError(f"{owner}: '{archive}' is not an npz (zip) archive; {layout}")
    # Temporary names, then os.replace: a crash never leaves a half-written cache that looks complete.
    temp_data = data_path.with_name(f"{data_path.name}.tmp-{os.getpid()}")
    temp_labels = labels_path.with_name(f"{labels_path.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(archive) as zip_file:
            keys = sorted(name.removesuffix(".npy") for name in zip_file.namelist())
            if "data" not in keys or "labels" not in keys:
                raise ValueError(f"{owner}: '{archive}' has arrays {keys}, missing 'data' or 'labels'; {layout}")
            with zip_file.open("labels.npy") as stream:
                labels = np.lib.format.read_array(stream, allow_pickle=False)
            _check_labels(labels, archive, num_classes, layout, owner)
            with zip_file.open("data.npy") as stream:
                _copy_rows(stream, temp_data, len(labels), image_size, archive, layout, owner)
        with open(temp_labels, "wb") as handle:
            np.save(handle, labels.astype(np.int64) - 1)
        os.replace(temp_data, data_path)
        os.replace(temp_labels, labels_path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{owner}: '{archive}' is a damaged zip archive ({err})") from err
    finally:
        temp_data.unlink(missing_ok=True)
        temp_labels.unlink(missing_ok=True)
    return data_path, labels_path


def _check_labels(labels: np.ndarray, archive: Path, num_classes: int, layout: str, owner: str) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{owner}: '{archive}' has 'labels' {labels.dtype} {labels.shape}; {layout}")
    if labels.size and (labels.min() < 1 or labels.max() > num_classes):
        bad = labels[(labels < 1) | (labels > num_classes)][0]
        raise ValueError(f"{owner}: '{archive}' has label {bad} outside 1..{num_classes} (labels are 1-based)")


def _copy_rows(
    stream, target: Path, num_rows: int, image_size: int, archive: Path, layout: str, owner: str
) -> None:
    """Streams the 'data' member into an [N, 3, S, S] .npy in chunks, so one archive is never all in RAM."""
    shape, fortran_order, dtype = _read_npy_header(stream)
    row_length = 3 * image_size * image_size
    if len(shape) != 2 or shape[1] != row_length or dtype != np.uint8 or fortran_order:
        raise ValueError(f"{owner}: '{archive}' has 'data' {dtype} {shape}; {layout}")
    if shape[0] != num_rows:
        raise ValueError(f"{owner}: '{archive}' has {shape[0]} 'data' rows but {num_rows} 'labels'")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Channel-planar rows (all red, then green, then blue) are already CHW: a reshape, no transpose.
        shape = (num_rows, 3, image_size, image_size)
        images = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape)
    except OSError as err:
        raise OSError(f"{owner}: cannot write the .npy cache of '{archive}' in '{target.parent}' ({err}); "
                      "pass cache_dir= a writable folder") from err
    rows = images.reshape(num_rows, row_length)
    for start in range(0, num_rows, CONVERT_CHUNK_ROWS):
        count = min(CONVERT_CHUNK_ROWS, num_rows - start)
        chunk = stream.read(count * row_length)
        if len(chunk) != count * row_length:
            raise ValueError(f"{owner}: '{archive}' is truncated inside 'data'")
        rows[start : start + count] = np.frombuffer(chunk, dtype=np.uint8).reshape(count, row_length)
    images.flush()


class MemmapShardDataset(Dataset):
    """Serves (uint8 [3, S, S], int64 label) pairs from several memory-mapped .npy shards as one index."""

    def __init__(self, shards: list[tuple[Path, Path]]) -> None:
        self.data_paths = [str(data_path) for data_path, _ in shards]
        self.labels = np.concatenate([np.load(labels_path) for _, labels_path in shards])
        sizes = [np.load(path, mmap_mode="r").shape[0] for path in self.data_paths]
        self.offsets = np.cumsum([0, *sizes]).tolist()
        if self.offsets[-1] != len(self.labels):
            raise ValueError(f"MemmapShardDataset: {self.offsets[-1]} images but {len(self.labels)} labels")
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._arrays is None:
            # Opened lazily, in each worker process, so that only pages actually read are resident.
            self._arrays = [np.load(path, mmap_mode="r") for path in self.data_paths]
        shard = bisect.bisect_right(self.offsets, index) - 1
        image = np.array(self._arrays[shard][index - self.offsets[shard]])
        return torch.from_numpy(image), torch.tensor(self.labels[index])

    def __getstate__(self) -> dict:
        # A pickled np.memmap would carry its whole contents to each worker.
        return {**self.__dict__, "_arrays": None}
