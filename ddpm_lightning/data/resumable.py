"""Training loaders that resume mid-epoch: their order comes from (seed, epoch), their position from the checkpoint.

Lightning saves the `state_dict()` of every train loader that has one (its `_Stateful` protocol) in the checkpoint's
fit-loop state, and hands it back through `load_state_dict()` before the resumed run iterates. With the order a
function of (seed, epoch) alone (DistributedSampler, whose epoch Lightning sets before every epoch), the position
within the epoch is all a resumed run needs to yield exactly the batches the interrupted one had not reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochPosition:
    """How many batches of which epoch a loader has handed out, and what a restored loader skips."""

    # Counted as batches leave the loader. Lightning does not prefetch from loaders with a length (its fetcher
    # prefetches only to find the end of unsized ones), so at a checkpoint this is the batches trained on.

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0
        self._restored: tuple[int, int] | None = None

    def start(self, epoch: int, num_batches: int) -> int:
        """An iteration over `epoch` begins: returns how many batches to skip (0 unless resuming within it)."""
        skip = 0
        if self._restored is not None:
            saved_epoch, saved_batches = self._restored
            self._restored = None
            # A checkpoint written after an epoch's last batch resumes at the next epoch, from its first batch.
            if saved_epoch == epoch and 0 < saved_batches < num_batches:
                skip = saved_batches
        self.epoch, self.batches = epoch, skip
        return skip

    def advance(self) -> None:
        self.batches += 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = (int(state["epoch"]), int(state["batches"]))


class _SkippingSampler(DistributedSampler):
    """DistributedSampler whose next iteration starts `skip` indices in (its length stays the epoch's)."""

    skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A shuffled training DataLoader that never draws from the global RNG and resumes where a checkpoint stopped.

    A plain DataLoader draws its order (RandomSampler) and its workers' base seed from torch's global generator,
    so a resumed run, whose global generator is restored to the training state, would shuffle differently; it
    also cannot say how far into the epoch it was. Here the order is DistributedSampler's (seed + epoch, sharded
    by rank, as Lightning's own under DDP, which it then leaves in place) and the base seed comes from a private
    generator.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 **kwargs: Any) -> None:
        sampler = _SkippingSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs)
        self.position = EpochPosition()

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing below runs before the first batch is asked for, after Lightning set the epoch.
        skip = self.position.start(self.sampler.epoch, len(self))
        self.sampler.skip = skip * self.batch_size
        for batch in super().__iter__():
            self.position.advance()
            yield batch

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)
