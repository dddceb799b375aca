"""webdataset source: tar shards in img2dataset's layout, read through the ``webdataset`` package.

A sample is the members sharing a key: an image (``jpg``, ``png``, ``jpeg`` or ``webp``, first found in that order),
a caption ``txt`` and an optional ``json``. Its id is the json's ``id``, else a numeric json ``key`` (img2dataset
writes one), else the member key itself when numeric; anything else is an error, because ids key the caches.
The label is the json's ``label`` (-1 when absent).

Order, all of it a function of (shuffle_seed, epoch, rank, world_size, worker, workers):

1. shards in pattern order, or permuted by ``shuffle_seed`` and the epoch (``set_epoch``), the same permutation
   on every rank;
2. rank r takes shards r, r + world_size, ...; DataLoader worker w of W takes every W-th of those, so the
   union over ranks × workers is every shard, hence every sample, exactly once per epoch (a worker left with
   no shard yields nothing);
3. with a ``shuffle_seed``, a buffer shuffle of ``wds_shuffle_buffer`` samples, its seed drawn from all the
   above; without one, member order.

Bad input: a missing shard is found at build time; an empty shard, a member that does not decode, a sample with
no image / caption / id, when read. Each is a ValueError naming the shard and the member; with ``skip_bad`` it is
skipped and counted in ``ds.skipped`` (samples) / ``ds.skipped_shards`` (shards), and logged at the end of the
pass. Counts made inside DataLoader workers stay in those processes: read them in the log.
"""

from __future__ import annotations

import json
import os
import random
import tarfile

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ._common import IMAGE_EXTENSIONS, NO_LABEL, SHUFFLE_STREAM, TokenMemo, decode_image, log


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def expand_shards(pattern: str | None) -> list[str]:
    """The shard list of a brace pattern ("a/{000..009}.tar", several joined by "::"), as webdataset expands it."""
    if not pattern:
        raise ValueError("train_data must name the shards (a brace pattern) when dataset is 'wds' (got none)")
    shards = wds.shardlists.expand_urls(pattern)
    if not shards:
        raise ValueError(f"train_data {pattern!r}: the pattern names no shard")
    return shards


def _int_id(value, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} is {value!r}, not an integer")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    raise ValueError(f"{what} is {value!r}, not an integer")


class WebDatasetSource(IterableDataset):
    """Iterable dataset over webdataset shards (see the module docstring for order, split and errors)."""

    def __init__(self, cfg, preprocess, tokenizer, *, rank: int = 0, world_size: int = 1, shuffle_seed=None):
        shards = expand_shards(cfg.train_data)
        self.skip_bad = bool(cfg.skip_bad)
        self.skipped_shards = 0
        missing = [s for s in shards if _is_local(s) and not os.path.isfile(_local_path(s))]
        if missing:
            if not self.skip_bad:
                raise ValueError(f"train_data {cfg.train_data!r}: shard {missing[0]!r} not found")
            log.warning("skipping %d missing shards (skip_bad), the first %r", len(missing), missing[0])
            self.skipped_shards = len(missing)
            shards = [s for s in shards if s not in set(missing)]
            if not shards:
                raise ValueError(f"train_data {cfg.train_data!r}: none of the shards exists")
        if int(cfg.wds_shuffle_buffer) < 1:
            raise ValueError(f"wds_shuffle_buffer must be >= 1, got {cfg.wds_shuffle_buffer!r}")
        self.shards = shards
        self.rank, self.world_size = rank, world_size
        self.shuffle_seed = shuffle_seed
        self.shuffle_buffer = int(cfg.wds_shuffle_buffer)
        self.preprocess = preprocess
        self.tokens = TokenMemo(tokenizer)
        self.epoch = 0
        self.skipped = 0
        self._counts: list[int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch mixes into the shard permutation and the buffer seed (only with a shuffle_seed)."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Samples in all shards (every rank together): keys with an image member, counted from the tar headers
        once (no decoding), so it can exceed what a pass yields when bad samples are skipped."""
        return sum(self.sample_counts())

    def sample_counts(self) -> list[int]:
        """Samples in each shard (pattern order), counted from the tar headers once: keys with an image member."""
        if self._counts is None:
            self._counts = [_count_samples(s) for s in self.shards]
        return list(self._counts)

    def shard_order(self) -> list[str]:
        """Every shard in this epoch's order (the same on every rank), before the rank / worker split."""
        if self.shuffle_seed is None:
            return list(self.shards)
        perm = np.random.default_rng([SHUFFLE_STREAM, int(self.shuffle_seed), self.epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards this rank's ``worker`` (of ``num_workers``) reads this epoch."""
        return self.shard_order()[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        my_shards = self.shards_for(worker, num_workers)
        if not my_shards:
            log.warning("rank %d worker %d has no shard (%d shards for %d ranks × %d workers)",
                        self.rank, worker, len(self.shards), self.world_size, num_workers)  # fmt: skip
            return
        samples = self.raw_stream(my_shards, worker, num_workers)
        skipped_before = self.skipped
        for sample in samples:
            item = self.decode(sample)
            if item is not None:
                yield item
        if self.skipped > skipped_before:
            log.warning("rank %d worker %d: skipped %d bad samples this pass (skip_bad)",
                        self.rank, worker, self.skipped - skipped_before)  # fmt: skip

    def raw_stream(self, shards: list[str], worker: int, num_workers: int):
        """Undecoded samples of ``shards`` (this rank's ``worker``'s), buffer-shuffled when there is a shuffle_seed."""
        samples = self._raw_samples(shards)
        if self.shuffle_seed is not None:
            stream = (int(self.shuffle_seed), self.epoch, self.rank, self.world_size, worker, num_workers)
            rng = random.Random(int(np.random.SeedSequence([SHUFFLE_STREAM, *stream]).generate_state(1)[0]))
            samples = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(samples)
        return samples

    def image_samples(self, shard: str):
        """Undecoded samples of one shard that have an image member, in member order: the samples
        ``sample_counts`` counts, so the n-th of them is the shard's n-th row. One without an image is bad."""
        for sample in self._raw_samples([shard]):
            if any(e in sample for e in IMAGE_EXTENSIONS):
                yield sample
            else:
                self.decode(sample)  # raises its error, or counts the skip (skip_bad)

    def decode(self, sample: dict) -> dict | None:
        """The item of an undecoded sample; None when it is bad and ``skip_bad`` counts it as skipped."""
        try:
            return self._decode(sample)
        except ValueError as e:
            if not self.skip_bad:
                raise
            self.skipped += 1
            log.warning("skipping %s", e)
            return None

    def _raw_samples(self, shards: list[str]):
        """Undecoded samples (dicts of member bytes), shard after shard; an empty or unreadable shard is bad."""
        for shard in shards:
            count = 0
            try:
                for sample in wds.tarfile_to_samples()([{"url": shard}]):
                    count += 1
                    yield sample
            except (tarfile.TarError, OSError, ValueError) as e:
                where = f"shard {shard!r}" + (f" after {count} samples" if count else "")
                # webdataset appends " @ <file object>" to the message: the shard is named already.
                reason = str(e.args[0] if e.args else e).split(" @ <")[0]
                self._bad_shard(f"{where}: unreadable tar ({type(e).__name__}: {reason})")
                continue
            if count == 0:
                self._bad_shard(f"shard {shard!r}: empty shard (no samples)")
                continue
            expected = shard_stats_count(shard)
            if expected is not None and count != expected:  # a tar cut on a sample boundary reads as valid
                self._bad_shard(f"shard {shard!r}: holds {count} samples, its {os.path.basename(stats_path(shard))} "
                                f"says {expected} (successes): cut short or rewritten")  # fmt: skip

    def _bad_shard(self, message: str) -> None:
        if not self.skip_bad:
            raise ValueError(message)
        self.skipped_shards += 1
        log.warning("skipping %s", message)

    def _decode(self, sample: dict) -> dict:
        key, url = sample["__key__"], sample["__url__"]
        members = sorted(k for k in sample if not k.startswith("__"))
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise ValueError(f"shard {url!r}: sample {key!r} has no image member ({'/'.join(IMAGE_EXTENSIONS)}); "
                             f"its members: {members}")  # fmt: skip
        if "txt" not in sample:
            raise ValueError(f"shard {url!r}: sample {key!r} has no caption member {key}.txt; its members: {members}")
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"shard {url!r}: member {key}.txt is not UTF-8 ({e})") from None
        meta = sample_meta(sample)
        sample_id = self._sample_id(meta, key, url)
        label = _int_id(meta["label"], f"shard {url!r}: member {key}.json 'label'") if "label" in meta else NO_LABEL
        image = decode_image(sample[ext], f"shard {url!r}: member {key}.{ext}")
        return {
            "image": self.preprocess(image),
            "text": self.tokens(caption),
            "id": sample_id,
            "caption": caption,
            "label": label,
        }

    @staticmethod
    def _sample_id(meta: dict, key: str, url: str) -> int:
        if "id" in meta:
            return _int_id(meta["id"], f"shard {url!r}: member {key}.json 'id'")
        for candidate in (meta.get("key"), os.path.basename(key)):
            if candidate is not None and str(candidate).strip().isdigit():
                return int(str(candidate).strip())
        raise ValueError(f"shard {url!r}: sample {key!r} has no sample id (no 'id' in {key}.json and the key is not "
                         "a number); ids key the feature caches, so every sample needs one")  # fmt: skip


def sample_meta(sample: dict) -> dict:
    """A raw sample's ``.json`` member as a dict ({} without one); bad JSON is one line naming shard and member."""
    if "json" not in sample:
        return {}
    key, url = sample["__key__"], sample["__url__"]
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"shard {url!r}: member {key}.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"shard {url!r}: member {key}.json is not a JSON object")
    return meta


def stats_path(shard: str) -> str:
    """img2dataset's per-shard statistics beside a shard: ``00012.tar`` -> ``00012_stats.json``."""
    return os.path.splitext(shard)[0] + "_stats.json"


def shard_stats_count(shard: str) -> int | None:
    """The sample count a local shard's ``_stats.json`` records (img2dataset's ``successes``), None without one."""
    if not _is_local(shard):
        return None
    path = stats_path(_local_path(shard))
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            n = json.load(f)["successes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"shard {shard!r}: unreadable {os.path.basename(path)} ({type(e).__name__}: {e})") from None
    return _int_id(n, f"{path} 'successes'")


def _count_samples(shard: str) -> int:
    """Keys with an image member in one shard, from its tar headers (seeks past the data)."""
    if not _is_local(shard):
        raise ValueError(f"num_samples: cannot count the members of a remote shard {shard!r}")
    keys = set()
    try:
        with tarfile.open(_local_path(shard), "r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                prefix, suffix = wds.tariterators.base_plus_ext(member.name)
                if prefix is not None and suffix.lower() in IMAGE_EXTENSIONS:
                    keys.add(prefix)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"shard {shard!r}: unreadable tar ({e})") from None
    return len(keys)
