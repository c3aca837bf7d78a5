"""In-memory mode: the whole set as one uint8 tensor (on the GPU when training there), batched by index."""
import math
import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ddpm_lightning.data.folder import ImageFileDataset, report_corrupt
from ddpm_lightning.data.resumable import EpochPosition
from ddpm_lightning.data.tensor_dataset import TensorImageDataset


class InMemoryLoader:
    """Yields (uint8 NCHW, int64 N) batches gathered by index from a TensorImageDataset, sharded by rank."""

    # Lightning injects a DistributedSampler only into torch DataLoaders, so this loader shards itself with one
    # and exposes it as `.sampler`: Lightning's loops call `sampler.set_epoch(epoch)` before each epoch, which
    # reshuffles deterministically from `seed + epoch`. That order and the position within the epoch (state_dict,
    # which Lightning keeps in checkpoints) let a resumed run yield exactly the batches the stopped one had left.

    def __init__(
        self,
        dataset: TensorImageDataset,
        indices: Sequence[int],
        batch_size: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.dataset = dataset
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.batch_size = batch_size
        self.drop_last = drop_last
        # Pads by repeating a few samples so that every rank gets as many batches (DDP would hang otherwise).
        self.sampler = DistributedSampler(
            range(len(self.indices)), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
        # Lightning inspects loaders that have a `sampler` for a `batch_sampler` too.
        self.batch_sampler = None
        self.position = EpochPosition()

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A generator: nothing below runs before the first batch is asked for, after Lightning set the epoch.
        skip = self.position.start(self.sampler.epoch, len(self))
        device = self.dataset.images.device
        order = self.indices[torch.as_tensor(list(self.sampler), dtype=torch.int64)].to(device)
        for start in range(skip * self.batch_size, len(self) * self.batch_size, self.batch_size):
            batch = order[start : start + self.batch_size]
            self.position.advance()
            yield self.dataset.images.index_select(0, batch), self.dataset.labels.index_select(0, batch)

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state)


class _DecodeOrFlag(Dataset):
    """Wraps a dataset so that a file that fails to decode is flagged instead of raising."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool, str]:
        if not isinstance(self.dataset, ImageFileDataset):
            image, label = self.dataset[index]
            return image, torch.as_tensor(label, dtype=torch.int64), True, ""
        label = torch.tensor(self.dataset.labels[index])
        try:
            return self.dataset.load(index), label, True, ""
        except ValueError as err:
            size = self.dataset.image_size
            return torch.zeros(3, size, size, dtype=torch.uint8), label, False, str(err.__cause__ or err)


def load_into_memory(dataset: Dataset, num_workers: int, on_corrupt: str, owner: str) -> TensorImageDataset:
    """Decodes every sample once into one uint8 tensor; undecodable files follow the on_corrupt policy."""
    if isinstance(dataset, TensorImageDataset):
        return dataset
    if len(dataset) == 0:
        raise ValueError(f"{owner}: the dataset is empty")
    # More decoding processes than cores only adds start-up time.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    num_workers = min(num_workers, cores)
    loader = DataLoader(_DecodeOrFlag(dataset), batch_size=256, num_workers=num_workers)
    images, labels, decoded, corrupt = None, torch.empty(len(dataset), dtype=torch.int64), [], []
    start = 0
    for batch_images, batch_labels, ok, reasons in loader:
        if images is None:
            # Preallocated, so that a large set is never held twice during the copy.
            images = torch.empty((len(dataset), *batch_images.shape[1:]), dtype=torch.uint8)
        stop = start + len(batch_images)
        images[start:stop], labels[start:stop] = batch_images, batch_labels
        decoded.append(ok)
        corrupt.extend(
            (dataset.files[start + offset], reason) for offset, reason in enumerate(reasons) if not ok[offset]
        )
        start = stop
    report_corrupt(corrupt, len(dataset), on_corrupt, owner)
    if corrupt:
        keep = torch.cat(decoded)
        images, labels = images[keep], labels[keep]
    return TensorImageDataset(images, labels)
