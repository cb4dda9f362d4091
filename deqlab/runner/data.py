"""Data plumbing every task shares: a data order that survives a kill, and caches that do.

A killed run resumes mid-epoch only if the batches it has not trained on come next, in the
order the uninterrupted run would have used. Three pieces give that:

- :class:`EpochShuffle`: a permutation that is a function of (seed, epoch) alone, sharded
  over DDP ranks, that can start part-way through an epoch;
- :class:`ResumableLoader`: a ``DataLoader`` that counts the batches it has handed out this
  epoch and saves that count in the checkpoint (Lightning saves and restores the state of any
  loader with ``state_dict``/``load_state_dict``); on resume it skips that many batches
  without loading them;
- :class:`ResumableDataModule`: keeps that count in the checkpoint and hands it to the training
  loader it creates. (Lightning's fit loop saves the state of such loaders too, but restores it
  only into a loader created after the restore; ``configure_optimizers`` calling
  ``trainer.estimated_stepping_batches`` creates the loader before it.)

Caches of decoded data are written atomically (:mod:`deqlab.runner.files`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside DDP)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mix_seed(*parts: int) -> int:
    """One seed from several integers (a run's seed, a rank, an epoch, a step), the same on
    every machine and run: what every randomness a resumed run must repeat is drawn from."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (1 << 62)
    return seed


def per_process(batch: int, what: str) -> int:
    """A global batch's share on this process: batch sizes in configs are global (what one
    optimizer step sees, as in the reference scripts), split evenly over the DDP processes."""
    world = rank_and_world()[1]
    if batch % world:
        raise ValueError(
            f"{what}={batch} is the global batch: it must split evenly over the {world} "
            f"processes (make it a multiple of {world})"
        )
    return batch // world


class EpochShuffle(DistributedSampler):
    """A shuffle that depends only on (seed, epoch), split over the DDP ranks.

    Every rank draws the same permutation, drops its tail so that all ranks get the same
    number of samples, and takes every ``world``-th one. Subclassing ``DistributedSampler``
    tells Lightning not to wrap it in a second, differently seeded shuffle. ``skip(n)`` makes
    the next pass start after its first n samples (a resumed epoch).
    """

    def __init__(self, n: int, seed: int):
        rank, world = rank_and_world()
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.n, self.per_rank = n, n // world
        self._skip = 0

    def skip(self, samples: int) -> None:
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g)[: self.per_rank * self.num_replicas]
        mine = order[self.rank :: self.num_replicas].tolist()
        start, self._skip = self._skip, 0
        return iter(mine[start:])

    def __len__(self) -> int:
        return self.per_rank


class ResumableLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in checkpoints and restored.

    ``state_dict()`` holds the number of batches handed out in the current pass and what the
    order depends on (``order``: e.g. seed, sample count, batch size, world size). Restoring a
    count below the epoch's length makes the next pass skip that many batches, through
    ``dataset.skip(batches)`` for an iterable dataset or ``sampler.skip(samples)`` for a
    map-style one, so skipped batches are never loaded. A count from a checkpoint whose order
    differs is refused: skipping by it would train on other samples than the original run.
    """

    def __init__(self, dataset: Any, *args: Any, order: dict[str, Any], **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)
        self.order = order
        self.batches = 0  # handed out in the current pass
        self._resume_at = 0  # batches the next pass starts after (set by load_state_dict)

    def __iter__(self) -> Iterator[Any]:
        inner = super().__iter__()
        self.batches = self._resume_at
        self._resume_at = 0
        for batch in inner:
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "order": self.order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("order") != self.order:
            raise ValueError(
                f"cannot resume mid-epoch: the checkpoint's training data order was "
                f"{state.get('order')}, this run's is {self.order}; resume with the settings "
                "the run was started with"
            )
        batches = int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts afresh
            return
        self._resume_at = batches
        if hasattr(self.dataset, "skip"):
            self.dataset.skip(batches)
        else:
            self.sampler.skip(batches * self.batch_size)


def collate(batch: Any) -> Any:
    """A DataLoader's ``collate_fn`` for data that may serve a whole batch at once: a dataset's
    ``__getitems__`` returning a tuple of batched tensors passes as it is; a list of samples
    (any other dataset) is stacked as usual."""
    return batch if isinstance(batch, tuple) else default_collate(batch)


class Indexed(Dataset):
    """``dataset``'s samples with their index appended: (x, y) -> (x, y, i), what
    ``init=cached`` keys each sample's warm start by; ``dataset.sample_key(i)`` instead where
    it says which samples are the same (one image drawn at every step)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _key(self, i: int) -> int:
        return self.dataset.sample_key(i) if hasattr(self.dataset, "sample_key") else i

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        return (*self.dataset[i], self._key(i))

    def __getitems__(self, indices: list[int]) -> Any:
        """A batch served whole where ``dataset`` serves one (see :func:`collate`)."""
        if not hasattr(self.dataset, "__getitems__"):
            return [self[i] for i in indices]
        x, y = self.dataset.__getitems__(indices)
        return x, y, torch.tensor([self._key(i) for i in indices], device=y.device)


class ResumableDataModule(L.LightningDataModule):
    """A DataModule whose training loader resumes mid-epoch: a subclass builds the loader in
    ``make_train_loader`` (a :class:`ResumableLoader`) instead of ``train_dataloader``, over
    ``self.training_set(its training data)``: with ``indexed`` set (the runner sets it for
    ``init=cached``), each training batch carries its samples' indices."""

    def __init__(self) -> None:
        super().__init__()
        self._train_loader: ResumableLoader | None = None
        self._resume: dict[str, Any] | None = None
        self.indexed = False

    def training_set(self, dataset: Any) -> Any:
        return Indexed(dataset) if self.indexed else dataset

    def make_train_loader(self) -> ResumableLoader:
        raise NotImplementedError

    def train_dataloader(self) -> ResumableLoader:
        loader = self.make_train_loader()
        if self._resume is not None:
            loader.load_state_dict(self._resume)
            self._resume = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        return {} if self._train_loader is None else {"train": self._train_loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = state.get("train")
