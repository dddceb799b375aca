"""Which output shards one rank of ``embed`` writes, and the batches that fill them.

Output shard k holds rows ``[k·shard_rows, (k+1)·shard_rows)`` of the source's natural order, whatever the world
size; rank r of W writes the shards with ``k % W == r``. So the files on disk are the ones a single process
writes, byte for byte, and a run killed under one world size resumes under any other (a shard is a function of the
source, the model and ``shard_rows`` alone).

- Map-style sources (Fashion-MNIST, CSV): the rows of a shard are indices; a DataLoader (workers allowed: a
  batch sampler keeps their order) serves its batches.
- A webdataset: the tar headers give each tar's sample count (no decoding), hence the global row of each tar's
  first sample; shard k reads the tars its rows fall in, skipping the rows before it (read, not decoded). With
  DataLoader workers, worker w of a rank makes every w-th of that rank's output shards, whole.

Batches never straddle a shard and start at its first row, as one process cuts them. Every batch comes as
``(k, batch, last)``; ``last`` marks the shard's final batch (``batch`` may then be None: nothing was left).
"""

from __future__ import annotations

import itertools

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data import collate


def rank_shards(shards: list[int], rank: int, world: int) -> list[int]:
    """The shards (of ``shards``) that rank ``rank`` of ``world`` writes: those with ``k % world == rank``."""
    return [k for k in shards if k % world == rank]


def as_is(item):
    return item


def map_style_batches(ds, shards: list[int], n: int, shard_rows: int, batch_size: int, workers: int, pin=False):
    """(shard, batch, last) for ``shards`` of a map-style set of ``n`` rows, each shard cut from its first row."""
    index_batches, tags = [], []
    for k in shards:
        hi = min(n, (k + 1) * shard_rows)
        for lo in range(k * shard_rows, hi, batch_size):
            index_batches.append(list(range(lo, min(lo + batch_size, hi))))
            tags.append((k, lo + batch_size >= hi))
    loader = DataLoader(ds, batch_sampler=index_batches, collate_fn=collate, num_workers=workers, pin_memory=pin)
    for (k, last), batch in zip(tags, loader):
        yield k, batch, last


def tar_reads(counts: list[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(tar index, samples to skip, samples to take) covering global rows ``[lo, hi)`` of tars of ``counts``."""
    reads, start = [], 0
    for t, c in enumerate(counts):
        a, b = max(lo, start), min(hi, start + c)
        if a < b:
            reads.append((t, a - start, b - a))
        start += c
    return reads


class WdsShardBatches(IterableDataset):
    """The batches of some output shards of a webdataset ``source`` (a ``WebDatasetSource``), shard after shard;
    under DataLoader workers, worker w of W makes shards ``[w::W]`` (each shard whole in one worker)."""

    def __init__(self, source, counts: list[int], shards: list[int], shard_rows: int, batch_size: int):
        self.source, self.counts, self.shards = source, counts, shards
        self.shard_rows, self.batch_size = shard_rows, batch_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k in self.shards[worker::workers]:
            yield from self._shard(k)

    def _shard(self, k: int):
        n = int(np.sum(self.counts))
        items: list[dict] = []
        for t, skip, take in tar_reads(self.counts, k * self.shard_rows, min(n, (k + 1) * self.shard_rows)):
            url = self.source.shards[t]
            for sample in itertools.islice(self.source.image_samples(url), skip, skip + take):
                item = self.source.decode(sample)
                if item is None:  # skipped (skip_bad): the shard comes out short, counted in the source
                    continue
                items.append(item)
                if len(items) == self.batch_size:
                    yield k, collate(items), False
                    items = []
        yield k, (collate(items) if items else None), True


def wds_batches(source, counts: list[int], shards: list[int], shard_rows: int, batch_size: int, workers: int,
                pin=False):  # fmt: skip
    """(shard, batch, last) for ``shards`` of a webdataset whose tars hold ``counts`` samples."""
    ds = WdsShardBatches(source, counts, shards, shard_rows, batch_size)
    # more workers than shards would leave some idle (and warn); none is needed for an empty list
    workers = min(workers, len(shards))
    yield from DataLoader(ds, batch_size=None, collate_fn=as_is, num_workers=workers, pin_memory=pin)
