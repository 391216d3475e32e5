"""A stage's micro-batches as a pure function of their position: the sample order is a seeded
permutation per epoch, and a sample that fails to load is replaced by a later one deterministically
(``on_bad_sample: skip``) or stops the run naming it (``error``). A resumed run, or one whose batches
are prepared by DataLoader workers, sees exactly the batches of an uninterrupted run. On several
processes each builds only its share of every micro-batch (``mmlm/train/processes.py``)."""

from __future__ import annotations

import torch

from mmlm.data.dataset import StageDataset
from mmlm.errors import DataError, SampleError
from mmlm.train.seeds import derive_seed

_RETRY_STRIDE = 7919  # a bad sample at position p is replaced by the one at p + k * stride


class StageBatches:
    def __init__(
        self,
        data: StageDataset,
        batch_size: int,
        run_seed: int,
        stage: str,
        stage_index: int,
        where: str,
        policy: str,
        share: tuple[int, int] | None = None,
        pack_tokens: int | None = None,
    ):
        self.data = data
        self.batch_size = batch_size
        # this process's part of each global micro-batch: (first position in it, count); all of it by default
        self.first, self.count = share or (0, batch_size)
        self.pack_tokens = pack_tokens  # pack each micro-batch into rows of this many tokens (None: one per sample)
        self.run_seed = run_seed
        self.stage = stage
        self.stage_index = stage_index
        self.where = where
        self.policy = policy
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation)

    def sample_index(self, pos: int) -> int:
        """The dataset index at global sample position ``pos``."""
        n = len(self.data)
        epoch, k = divmod(pos, n)
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.run_seed, self.stage_index, epoch, "order"))
            self._order = (epoch, torch.randperm(n, generator=g))
        return int(self._order[1][k])

    def load_sample(self, pos: int, skipped: list[tuple[int, str]]):
        for attempt in range(len(self.data)):
            i = self.sample_index(pos + attempt * _RETRY_STRIDE)
            try:
                return self.data.load(i)
            except SampleError as err:
                if self.policy == "error":
                    rec = self.data.records[i]
                    raise SampleError(err.detail, err.reason, i, where=self.data.where(rec, i)) from None
                skipped.append((i, err.reason))
        raise DataError(f"{self.where} ({self.stage}): every sample failed to load")

    def __call__(self, micro_index: int) -> dict:
        """This process's share of the micro-batch at ``micro_index``, with ``_position`` and the samples
        skipped on the way (``_skipped``: index and reason of each)."""
        skipped: list[tuple[int, str]] = []
        base = micro_index * self.batch_size + self.first
        samples = [self.load_sample(base + j, skipped) for j in range(self.count)]
        batch = self.data.collate(samples, self.pack_tokens)
        batch["_skipped"] = skipped
        batch["_position"] = micro_index
        return batch


class _MicroBatches(torch.utils.data.Dataset):
    def __init__(self, fn, start: int, stop: int):
        self.fn, self.start, self.stop = fn, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> dict:
        return self.fn(self.start + j)


def iter_batches(fn, start: int, stop: int, num_workers: int):
    """Micro-batches ``start..stop-1`` in order; with ``num_workers`` they are prepared ahead in
    worker processes (image decoding and tokenisation overlap the model's step)."""
    if num_workers <= 0:
        return (fn(m) for m in range(start, stop))
    loader = torch.utils.data.DataLoader(
        _MicroBatches(fn, start, stop), batch_size=None, shuffle=False, num_workers=num_workers, prefetch_factor=4
    )
    return iter(loader)
