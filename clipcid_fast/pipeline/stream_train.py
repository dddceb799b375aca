"""The trainer's batches from webdataset shards (``--dataset wds``): ``stream.RankStream`` plus the teacher cache.

``StreamedBatches`` stands where ``SampleStream`` + ``BatchBuilder`` stand on the map-style path: ``batch(step)``
is this rank's ``--batch-size / W`` next samples with their teacher features and pseudo-classes (read by the cache
row the worker looked up from the sample id); steps are drawn in order, from the start or from a checkpoint's data
position (``state`` / ``resume``). The shards are shuffled with ``--seed`` (shard order per epoch and the buffer).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from . import data
from .data.wds_source import _count_samples
from .stream import CHUNK, KIND, RankStream, _Lookup, check_resumable


class StreamedBatches:
    def __init__(self, cfg, comm, student, cache: dict | None, labels: np.ndarray | None,
                 keep_row: np.ndarray | None) -> None:  # fmt: skip
        self.comm = comm
        self.source = data.build_dataset(cfg.data, student.preprocess, student.tokenizer, rank=comm.rank,
                                         world_size=comm.world, shuffle_seed=cfg.seed)  # fmt: skip
        self.workers = int(cfg.data.workers)
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        self.cache, self.labels = cache, labels
        self.lookup = _Lookup(cache["row_of"] if cache is not None else None, keep_row)
        self.local = cfg.batch_size // comm.world
        self.batch_size = cfg.batch_size
        self.dataset_samples = _count(self.source)
        # the samples an epoch trains on: cid's kept rows of the cache (the shards' samples it covers), else all
        self.train_samples = int(keep_row.sum()) if keep_row is not None else self.dataset_samples
        if self.train_samples < 1:
            raise ValueError(f"--train-data {cfg.data.train_data!r}: no training samples")
        self.stream = RankStream(self.source, self.workers, self.lookup)
        self.next_step = 0

    def resume(self, saved: dict | None, step: int) -> None:
        check_resumable(saved, self.comm.world, self.workers)
        self.stream.close()
        self.stream = RankStream(self.source, self.workers, self.lookup, state=saved["ranks"][self.comm.rank])
        self.next_step = step

    def batch(self, step: int) -> dict:
        if step != self.next_step:
            raise RuntimeError(f"a streamed run draws its steps in order: step {step} asked, {self.next_step} next")
        got = self.stream.take(self.local)
        self.next_step += 1
        out = {"image": got["image"], "text": got["text"], "id": got["id"]}
        if self.cache is not None:
            rows = got["row"]
            out["dist_image"] = torch.from_numpy(np.asarray(self.cache["image"][rows], dtype=np.float32))
            out["dist_text"] = torch.from_numpy(np.asarray(self.cache["text"][rows], dtype=np.float32))
            if self.labels is not None:
                out["cluster_label"] = torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.train_samples

    def state(self) -> dict:
        """Every rank's data position (collective: every rank calls it; all get the same dict)."""
        mine = self.stream.state()
        ranks = [mine]
        if self.comm.world > 1:
            ranks = [None] * self.comm.world
            dist.all_gather_object(ranks, mine, group=self.comm.group)
        return {"kind": KIND, "world": self.comm.world, "workers": max(1, self.workers), "chunk": CHUNK,
                "ranks": ranks}  # fmt: skip

    def skipped(self, state: dict) -> dict:
        return {
            "samples": sum(r["skipped_samples"] for r in state["ranks"]),
            "shards": sum(r["skipped_shards"] for r in state["ranks"]),
        }

    def close(self) -> None:
        self.stream.close()


def _count(source) -> int:
    """Samples in every shard (the epoch length of the metrics' ``epoch``), from the tar headers; with --skip-bad a
    shard that cannot be read counts none (reading it is then a counted skip), else it is the error naming it."""
    if not source.skip_bad:
        return int(source.num_samples)
    total = 0
    for shard in source.shards:
        try:
            total += _count_samples(shard)
        except ValueError:
            continue
    return total
