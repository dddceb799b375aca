"""The trainer's streamed sample source: webdataset shards read in order, never indexed, resumable to the sample.

Order (every piece a function of the seed, the epoch, the rank, the world size and the worker count):

1. per rank and epoch, ``WebDatasetSource``'s shard order (seeded by ``--seed`` and the epoch) and split: rank r
   of W takes every W-th shard, and its logical worker w of N (N = ``max(1, --workers)``) every N-th of those;
2. worker w reads its shards through the seeded shuffle buffer (``--wds-shuffle-buffer``), drops the samples cid's
   balance / cluster left out (looked up by id in the teacher cache), and numbers the rest: their *positions*
   0, 1, ... in its stream. Positions ``[k·CHUNK, (k+1)·CHUNK)`` form its chunk k;
3. the rank's stream takes the chunks round-robin over the workers in a fixed order (0, 1, ..., N-1, 0, ...;
   a worker whose epoch is over drops out of the cycle), whatever order the DataLoader's processes finish them
   in: the main process holds each worker's chunks until their turn;
4. step s takes the next ``--batch-size / W`` samples of the rank's stream; epochs follow one another inside a
   batch, as on the map-style path.

The data position after any sample is (epoch, each worker's position, the worker whose chunk is current, which
workers are done, the skip counts): ``RankStream.state()``, saved in the checkpoint. A resumed run's worker w
re-reads its shards from their start to position ``pos[w]`` without decoding an image (the shuffle buffer needs
the prefix), then goes on: it draws exactly the samples the uninterrupted run would, in the same order, none lost
or repeated. Exact for the same world size and worker count (both fix the split and the cycle); the trainer
refuses a resume with others (``check_resumable``).

Teacher features and pseudo-classes are read by cache row, which the worker looks up from the sample id (the
``id_index`` of the teacher cache). Bad input while reading (a shard gone or cut mid-sample, an image that does not
decode, an id the cache lacks) is one ValueError naming the shard; with ``--skip-bad`` it is skipped and counted,
each skip exactly once across a resume.
"""

from __future__ import annotations

import collections

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data._common import log
from .data.wds_source import WebDatasetSource, sample_meta

CHUNK = 16  # positions per worker chunk: the unit of the round-robin (a fixed part of the order)
KIND = "wds-stream"


def _first_line(e: BaseException) -> str:
    return str(e.args[0] if e.args else e).splitlines()[0] if str(e) else type(e).__name__


class _Lookup:
    """Sample id -> (cache row, kept): the teacher cache's index and cid's keep mask by cache row (None: no cache)."""

    def __init__(self, row_of=None, keep_row: np.ndarray | None = None):
        self.row_of, self.keep_row = row_of, keep_row

    def __call__(self, sample_id: int, where: str) -> tuple[int, bool]:
        if self.row_of is None:
            return -1, True
        pos, found = self.row_of.find(np.asarray([sample_id], dtype=np.int64))
        if not found[0]:
            raise ValueError(
                f"{where}: sample id {sample_id} is not in --teacher-cache (embed the corpus that holds it)"
            )
        row = int(self.row_of.order[int(pos[0])])
        return row, True if self.keep_row is None else bool(self.keep_row[row])


class WorkerChunks(IterableDataset):
    """One epoch of one rank: what each DataLoader worker yields (its chunks, then an end marker; or an error)."""

    def __init__(self, source: WebDatasetSource, workers: int, epoch: int, start: list[int], done: list[bool],
                 lookup: _Lookup) -> None:  # fmt: skip
        self.source, self.workers, self.epoch = source, workers, epoch
        self.start, self.done, self.lookup = start, done, lookup

    def __iter__(self):
        info = get_worker_info()
        w = info.id if info is not None else 0
        try:
            yield from self._chunks(w)
        except ValueError as e:  # one line to the main process (the DataLoader would wrap it in a traceback)
            yield {"worker": w, "error": _first_line(e)}

    def _chunks(self, w: int):
        if self.done[w]:
            yield {"worker": w, "end": True, "bad": (0, 0)}
            return
        src = self.source
        src.set_epoch(self.epoch)
        start = self.start[w]
        # Skips are counted by position, so that each is counted once across a resume: bad[0] / bad[1] are the bad
        # samples / shards between the last good sample and the next one at positions >= start; a bad shard found
        # before position q (the next one to give) counts at q.
        bad, shards_seen, shard_events = [0, 0], src.skipped_shards, 0
        items, bad_before, pos = [], [], 0

        def emit(stop: int) -> dict:
            out = _stack(w, items, bad_before, bad, stop)
            items.clear()
            bad_before.clear()
            bad[0] = bad[1] = 0
            return out

        for sample in src.raw_stream(src.shards_for(w, self.workers), w, self.workers):
            shard_events += src.skipped_shards - shards_seen
            shards_seen = src.skipped_shards
            where = f"shard {sample.get('__url__')!r}: sample {sample.get('__key__')!r}"
            try:
                row, kept = self.lookup(_sample_id(sample), where)
            except ValueError as e:
                if pos >= start and not src.skip_bad:
                    raise
                row, kept, why = None, True, e  # a bad sample: it holds a position, and is skipped there
            if not kept:
                continue  # not a training sample (cid's balance or cluster dropped it): no position
            p, pos = pos, pos + 1
            if p < start:  # given before the resume, skips counted then: no decoding
                shard_events = 0
                continue
            bad[1] += shard_events
            shard_events = 0
            item = None
            if row is not None:
                try:
                    item = src._decode(sample)
                except ValueError as e:
                    if not src.skip_bad:
                        raise
                    why = e
            if item is None:
                log.warning("skipping %s (--skip-bad)", why)
                bad[0] += 1
            else:
                items.append((item, row, p))
                bad_before.append(tuple(bad))
                bad[0] = bad[1] = 0
            if (p + 1) % CHUNK == 0:
                yield emit(p + 1)
        shard_events += src.skipped_shards - shards_seen
        if pos > start and pos % CHUNK:
            yield emit(pos)  # the last, short chunk
        yield {"worker": w, "end": True, "bad": (bad[0], bad[1] + shard_events)}


def _sample_id(sample: dict) -> int:
    return WebDatasetSource._sample_id(sample_meta(sample), sample["__key__"], sample["__url__"])


def _stack(w: int, items: list, bad_before: list, bad_tail, end: int) -> dict:
    out = {"worker": w, "end": False, "stop": end, "bad_tail": tuple(bad_tail), "n": len(items)}
    if items:
        out["image"] = torch.stack([it["image"] for it, _, _ in items])
        out["text"] = torch.stack([it["text"] for it, _, _ in items])
        out["id"] = torch.tensor([it["id"] for it, _, _ in items], dtype=torch.int64)
        out["row"] = np.asarray([r for _, r, _ in items], dtype=np.int64)
        out["pos"] = np.asarray([p for _, _, p in items], dtype=np.int64)
        out["bad_before"] = np.asarray(bad_before, dtype=np.int64).reshape(-1, 2)
    return out


def _as_is(x):
    return x


class RankStream:
    """This rank's sample stream over epochs (module docstring), drawn ``take(n)`` samples at a time.

    ``state()`` after any ``take`` is the data position; ``RankStream(..., state=that)`` continues from it."""

    def __init__(self, source: WebDatasetSource, workers: int, lookup: _Lookup, state: dict | None = None) -> None:
        self.source, self.loader_workers = source, int(workers)
        self.workers = max(1, int(workers))
        self.lookup = lookup
        st = state or {"epoch": 0, "pos": [0] * self.workers, "done": [False] * self.workers, "next": 0,
                       "skipped_samples": 0, "skipped_shards": 0}  # fmt: skip
        self.epoch, self.pos, self.done = int(st["epoch"]), list(st["pos"]), list(st["done"])
        self.pointer = int(st["next"])
        self.skipped = [int(st["skipped_samples"]), int(st["skipped_shards"])]
        self._samples = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": list(self.pos), "done": list(self.done), "next": self.pointer,
                "skipped_samples": self.skipped[0], "skipped_shards": self.skipped[1]}  # fmt: skip

    def close(self) -> None:
        """Stop the DataLoader workers of the epoch in progress (a run that ends mid-epoch)."""
        if self._samples is not None:
            self._samples.close()
            self._samples = None

    def take(self, n: int) -> dict:
        """The next ``n`` samples: image [n,...], text [n, L], id int64 [n], row int64 [n] (teacher cache rows)."""
        if self._samples is None:
            self._samples = self._forever()
        parts = []
        need = n
        while need:
            chunk, a, b = next(self._samples)  # samples a..b-1 of a chunk, all of them consumed now
            b = min(b, a + need)
            self._consume(chunk, a, b)
            parts.append((chunk, a, b))
            need -= b - a
        return {
            "image": torch.cat([c["image"][a:b] for c, a, b in parts]),
            "text": torch.cat([c["text"][a:b] for c, a, b in parts]),
            "id": torch.cat([c["id"][a:b] for c, a, b in parts]),
            "row": np.concatenate([c["row"][a:b] for c, a, b in parts]),
        }

    def _consume(self, chunk: dict, a: int, b: int) -> None:
        w = chunk["worker"]
        self.skipped[0] += int(chunk["bad_before"][a:b, 0].sum())
        self.skipped[1] += int(chunk["bad_before"][a:b, 1].sum())
        self.pos[w] = int(chunk["pos"][b - 1]) + 1
        chunk["taken"] = b
        if b == chunk["n"]:
            self._finish(chunk)
        else:
            self.pointer = w

    def _finish(self, chunk: dict) -> None:
        w = chunk["worker"]
        self.skipped[0] += chunk["bad_tail"][0]
        self.skipped[1] += chunk["bad_tail"][1]
        self.pos[w] = chunk["stop"]
        self.pointer = (w + 1) % self.workers

    def _forever(self):
        """(chunk, first untaken sample, its sample count) in the rank's order, epoch after epoch."""
        while True:
            fresh, given = not any(self.pos) and not any(self.done), 0
            for chunk in self._epoch():
                given += 1
                yield chunk
            if fresh and not given:  # a whole epoch without a sample: the next ones would be empty too
                src = self.source
                mine = len(src.shard_order()[src.rank :: src.world_size])
                raise ValueError(
                    f"--train-data: rank {src.rank} of {src.world_size} has no training sample in its {mine} of "
                    f"{len(src.shards)} shards (fewer shards than ranks, or all its samples bad or not kept)"
                )
            self.epoch += 1
            self.pos, self.done, self.pointer = [0] * self.workers, [False] * self.workers, 0

    def _epoch(self):
        data = WorkerChunks(self.source, self.workers, self.epoch, list(self.pos), list(self.done), self.lookup)
        loader = iter(DataLoader(data, batch_size=None, collate_fn=_as_is, num_workers=self.loader_workers))
        held = collections.defaultdict(collections.deque)
        while not all(self.done):
            w = self.pointer
            if self.done[w]:
                self.pointer = (w + 1) % self.workers
                continue
            while not held[w]:
                item = next(loader)
                if "error" in item:
                    raise ValueError(item["error"])
                held[item["worker"]].append(item)
            item = held[w].popleft()
            if item["end"]:
                self.skipped[0] += item["bad"][0]
                self.skipped[1] += item["bad"][1]
                self.done[w] = True
                self.pointer = (w + 1) % self.workers
                continue
            if item["n"] == 0:  # every sample of the chunk was bad (skipped)
                self._finish(item)
                continue
            item["taken"] = 0
            while item["taken"] < item["n"]:
                yield item, item["taken"], item["n"]
        for _ in loader:  # the workers' end: nothing is left to read
            pass


def check_resumable(saved: dict | None, world: int, workers: int) -> None:
    """Refuse (one line) to resume a streamed run's data position on another world size or worker count."""
    if saved is None or saved.get("kind") != KIND:
        raise ValueError("--resume: the checkpoint holds no webdataset stream position (written by the map-style "
                         "trainer?): resume it with the dataset it was trained on")  # fmt: skip
    have = (saved["world"], saved["workers"], saved["chunk"])
    if have != (world, max(1, workers), CHUNK):
        raise ValueError(
            f"--resume: the checkpoint's webdataset stream ran on {saved['world']} ranks x {saved['workers']} "
            f"workers; this run has {world} x {max(1, workers)}, which splits the shards another way: resume "
            "with the same torchrun size and --workers (or train into a new --out-dir)"
        )
