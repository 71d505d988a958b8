"""The training sampler: a shuffle that is a function of (seed, epoch), sharded over ranks, and resumable mid-epoch.

A resumed run must see the batches the interrupted run had not trained on yet, in the same order, so that kill +
resume gives the uninterrupted run's loss curve. ``torch``'s ``RandomSampler`` draws each epoch's order from a
generator that advanced through the earlier epochs, and Lightning restarts an interrupted epoch's loader from its
first batch; this sampler instead derives epoch ``e``'s order from ``(seed, e)`` alone and can skip the batches an
epoch already trained on (:meth:`resume_at`). :class:`ResumableLoader` saves that position in Lightning's checkpoints
and restores it before a resumed fit draws its first batch.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler


def _world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``: shuffled by ``(seed, epoch)`` (or in order), padded to a multiple of ``num_replicas``
    (as ``DistributedSampler`` does), and this rank's share ``rank::num_replicas``. Lightning calls
    :meth:`set_epoch` at every epoch start."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, rank: Optional[int] = None,
                 num_replicas: Optional[int] = None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._rank, self._replicas = rank, num_replicas
        self.epoch = 0
        self.skip: tuple[int, int] = (0, 0)  # (epoch, samples): where a resumed run continues

    @property
    def replicas(self) -> int:
        return self._replicas if self._replicas is not None else _world()[1]

    @property
    def rank(self) -> int:
        return self._rank if self._rank is not None else _world()[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, samples: int) -> None:
        """Epoch ``epoch`` continues ``samples`` indices into this rank's share (once; other epochs start at 0). Tied
        to the epoch: Lightning may create an iterator it never draws from before moving on to the next epoch."""
        self.skip = (epoch, samples)

    def order(self, epoch: int) -> list[int]:
        """This rank's full share of epoch ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        else:
            idx = list(range(self.n))
        total = math.ceil(self.n / self.replicas) * self.replicas
        idx += idx[: total - self.n]
        return idx[self.rank::self.replicas]

    def __iter__(self) -> Iterator[int]:
        epoch, samples = self.skip
        if epoch != self.epoch:
            return iter(self.order(self.epoch))
        self.skip = (0, 0)
        return iter(self.order(self.epoch)[samples:])

    def __len__(self) -> int:
        return math.ceil(self.n / self.replicas)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` that Lightning treats as stateful: its position (epoch, and
    batches of that epoch trained on) goes into every checkpoint, and a resumed fit loads it before the first batch
    is drawn, so the interrupted epoch continues where it stopped (also with worker processes, which draw ahead)."""

    progress: Optional[Callable[[], int]] = None  # batches of the current epoch trained on (set by ResumeData)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self.progress() if self.progress is not None else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.resume_at(int(state["epoch"]), int(state["batches"]) * int(self.batch_size or 1))


class ResumeData(L.Callback):
    """Tells the train :class:`ResumableLoader` how many batches of the current epoch the model trained on
    (Lightning's batch progress), which it saves in checkpoints."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loop = trainer.fit_loop.epoch_loop
            loader.progress = lambda: loop.batch_progress.current.processed
