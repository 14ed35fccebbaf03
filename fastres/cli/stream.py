"""Which images each step of a ``fastres train`` run loads, and the DataLoaders that load them.

A run's order is a function of its seed and the step alone: epoch ``e`` visits
the training set in the order ``randperm(n)`` drawn from ``seed`` and ``e``,
in ``n // batch_size`` full batches (the remainder is left for the next
epoch's shuffle, as ``drop_last=True``). So a run resumed at step ``s``
loads exactly the batches an uninterrupted run loads from ``s`` on, with no
sampler state to save. Under ``world`` processes each global batch is cut
into ``world`` contiguous shares, rank ``r`` taking the ``r``-th: the shares
concatenated are the one-process batch, whatever the world size, so a run
can resume at another world size and ``--batch-size`` is the global batch.
"""

import torch

from .data import readable


def steps_per_epoch(train_size: int, batch_size: int) -> int:
    return train_size // batch_size


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class RunBatches(torch.utils.data.Sampler):
    """Steps ``[start, stop)`` of a run as lists of dataset keys ``(epoch, index)``: this rank's share of each batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not a multiple of the {world} processes")
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch size {batch_size} must be in [1, {n}] (the training set's size)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.stop, self.rank, self.share = start, stop, rank, batch_size // world

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self):
        per_epoch = steps_per_epoch(self.n, self.batch_size)
        epoch, order = None, None
        for step in range(self.start, self.stop):
            e, i = divmod(step, per_epoch)
            if e != epoch:
                epoch, order = e, epoch_order(self.n, self.seed, e)
            first = i * self.batch_size + self.rank * self.share
            yield [(e, j) for j in order[first:first + self.share].tolist()]


def _loader(dataset, batch_sampler, workers: int, seed: int):
    # An explicit generator: a DataLoader otherwise draws its workers' base seed from the global
    # RNG, which would then depend on when loaders were made (a resumed run makes one mid-epoch).
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed))


def train_batches(data, batch_size: int, seed: int, start: int, stop: int, workers: int, rank: int = 0, world: int = 1):
    """This rank's ``(images, labels)`` for steps ``[start, stop)``."""
    sampler = RunBatches(data.train_size, batch_size, seed, start, stop, rank, world)
    return readable(_loader(data.train, sampler, workers, seed), data.root)


def test_batches(data, batch_size: int, workers: int):
    """The held-out set in order, ``batch_size`` at a time."""
    n = data.test_size
    keys = [[(0, i) for i in range(j, min(j + batch_size, n))] for j in range(0, n, batch_size)]
    return readable(_loader(data.test, keys, workers, 0), data.root)
