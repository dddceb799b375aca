"""Streaming image semantic balance (SemDeDup / CLIP-CID union-find) and pseudo-class clustering.

CLIP-CID's first step drops semantically redundant images before distillation; the second clusters the
kept teacher embeddings into N pseudo-classes for the cluster-discrimination loss. Both run here on
embeddings that may be larger than RAM, in one process or under ``torchrun``.

Input
-----
* ``embeddings``: a ``.npy`` file ``[n, D]`` (float16 / float32 / float64), opened with
  ``np.load(mmap_mode="r")``, or a directory of such shards (``*.npy``, concatenated in file-name order;
  all shards must have the same D). Rows are used L2-normalised (cosine geometry), computed in float32.
* ``ids`` (optional): a ``.npy`` of n integers (or a directory of 1-D shards); default ``arange(n)``.

Rows with a NaN / inf or a zero norm are *invalid*. ``invalid="error"`` (default) raises a ValueError
naming the first such row; ``invalid="remove"`` removes them (never kept for any threshold, cluster −1,
listed in ``invalid_rows.npy``, counted as ``n_invalid``). Either way every input row is accounted for:
``kept + removed_duplicates + n_invalid == n_rows`` for every threshold.

Pipeline of ``run_balance`` (each stage reads the embeddings once)
-------------------------------------------------------------------
1. **k-means** (rank 0): spherical k-means with faiss (``faiss.Kmeans(d, k, niter=, spherical=True,
   seed=, max_points_per_centroid=)``) on a sample of ``min(n, k · max_points_per_centroid)`` rows drawn
   without replacement with ``numpy.random.default_rng(seed)`` and read in sorted chunks, i.e. the amount
   faiss itself would sample, but without ever loading all rows. ``centroids.npy`` float32 ``[k, D]``.
2. **assignment** (all ranks, row blocks round-robin): every row, streamed in chunks, through
   ``assign_fn(x_chunk_fp32, centroids) -> (sim, idx)`` (default: the fused
   ``clipcid_fast.ops.masked_max_sim.nearest_centroid`` when that module imports, else
   ``reference.nearest_centroid``). ``assign.npy`` int64 ``[n]`` (−1 = invalid), ``assign_sim.npy``
   float32 ``[n]`` (cosine to the assigned centroid; NaN = invalid).
3. **ordering** (rank 0): inside each cluster, SemDeDup's keep options (its ``which_to_keep``):

   * ``"hard"`` (SemDeDup's default, ``keep_hard=True``): rows sorted by *decreasing* cosine distance
     ``1 − cos(x, centroid)``, i.e. farthest from the centroid first, so of a duplicate group the member
     farthest from the centroid (the "hardest") is kept;
   * ``"easy"``: the reverse, nearest to the centroid first, so the most prototypical member is kept;
   * ``"random"``: a random order (``default_rng([seed, 1])``), so a random member is kept.

   Ties go to the smaller row index. ``order.npy`` int64 (valid rows grouped by cluster, each cluster in
   that order) and ``offsets.npy`` int64 ``[k + 1]`` (cluster c is ``order[offsets[c]:offsets[c+1]]``).
4. **per-cluster rule** (all ranks, cluster ``c`` on rank ``c % world``), in batches of clusters; a
   cluster with ``c²·D`` below ``SMALL_CLUSTER_FLOPS`` (c < 4096 at D = 512) runs on one intra-op thread,
   several such clusters at a time on worker threads (as many as torch's intra-op threads); larger ones run
   one at a time on all the intra-op threads. A given ``max_sim_fn`` is only called from the calling thread,
   one cluster at a time (one intra-op thread below ``SERIAL_SMALL_CLUSTER_FLOPS``, c < 512 at D = 512):

   * ``method="semdedup"``: one pass per cluster with ``max_sim_fn(x) -> (M, idx)``,
     ``M_j = max_{i<j} cos(x_i, x_j)`` over the ordered rows (default: the fused op's
     ``masked_max_similarity`` if it imports, else ``reference.masked_max_similarity``). Row j is removed
     for threshold eps when ``M_j > 1 − eps`` (compared in float32, exactly as ``reference.semdedup_keep``),
     so every eps comes from the same pass; earlier rows count whether kept or not (SemDeDup's rule).
   * ``method="unionfind"`` (CLIP-CID's variant, ``shared/seeds-math.md`` §1; a reconstruction): rows i, j
     of one cluster are linked when ``‖x_i − x_j‖ < delta``; for unit vectors ``‖a − b‖² = 2 − 2 cos``, so
     the test is ``cos > 1 − delta²/2``. Links are joined by union-find into groups (connected components)
     and one representative per group is kept: the member nearest the group's mean (squared distances
     within ``TIE_D2`` = 1e-9 tie, e.g. the two members of a pair, and ties go to the smaller row index).
     The pair search streams: the cluster's rows are cut
     into tiles of ``tile`` rows and only tile pairs ``(I, J)`` with ``J ≥ I`` are formed
     (``tile × tile`` similarities at a time, never ``c × c``); the links of a tile are merged into the
     union-find forest (vectorised hooking of the larger root onto the smaller, path compression) and
     dropped. Several deltas share the similarity tiles. Pairs across k-means clusters are not searched
     (as in SemDeDup; the paper's exact search scope is not public).

5. **merge** (rank 0) writes the outputs below.

Streaming and resume
--------------------
Every file is written to a temporary name and moved into place with ``os.replace`` (atomic). The
manifest (``manifest.json``) holds the run's fingerprint (input shapes / dtypes / sizes and the
parameters that change results); restarting in the same directory with different parameters is a
ValueError. Restarting the same run reuses ``centroids.npy``, finished assignment blocks
(``parts/assign_<start>_<stop>.npz``), ``assign.npy`` / ``order.npy`` and every finished cluster batch
(``batches/batch_c<first cluster>.npz``, listing its clusters); a run killed at any point therefore redoes
at most the one batch (per rank) that was in flight, and the final outputs are byte-identical to an
uninterrupted run, whatever ``batch_clusters`` or the number of ranks. The eps list is not part of the
fingerprint for ``semdedup`` (the batches store ``M``), so new thresholds only redo the merge.

Scale-out
---------
Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment, or an already initialised process group) the
ranks join a gloo group: k-means on rank 0, centroids broadcast, assignment blocks and clusters split
round-robin (cluster ``c`` on rank ``c % world``), rank 0 merges. Results equal one process's. The output
directory must be visible to every rank (one machine, or a shared file system).

Outputs of ``run_balance`` (directory ``out_dir``)
--------------------------------------------------
``keep_<t>.npy`` bool ``[n]`` per threshold (``t`` = ``eps0.05`` or ``delta0.3``), ``kept_ids_<t>.npy``
int64 (ids of kept rows, in row order), ``max_sim.npy`` float32 ``[n]`` (semdedup: ``M`` per row, −inf for
the first row of a cluster, NaN invalid) and ``nearest_earlier.npy`` int64 ``[n]`` (the row achieving ``M``,
−1 none), or ``rep_<t>.npy`` int64 ``[n]`` (unionfind: row of the group's representative, −1 invalid),
``clusters.csv`` (per cluster: size, mean cosine to centroid, kept per threshold), ``summary.json``
(counts, removed fraction per threshold, cluster size statistics; deterministic), ``balance.png``
(removed fraction vs threshold; cluster size histogram), ``timings.json`` (seconds and throughput per
stage; the only output that differs between runs), plus the intermediates above.

Pseudo-classes: ``run_cluster`` / ``clipcid-fast cluster``
---------------------------------------------------------
k-means of the kept embeddings (``keep`` = a bool ``[n]`` mask such as ``keep_eps0.05.npy``; default all
rows) into N pseudo-classes. Output directory, in the format the cluster-discrimination loss
(``reference.cluster_discrimination_loss(embeddings, centres, labels)``) loads:

* ``centroids.npy`` float32 ``[N, D]``, rows L2-normalised (the class centres);
* ``labels.npy`` int64 ``[n]``, aligned with the *input* rows: the nearest centre (max cosine) of each
  kept row, ``−1`` for rows not kept (or invalid), which is the loss's "no target" label;
* ``topk.npy`` int64 ``[n, k]`` and ``topk_sim.npy`` float32 ``[n, k]`` (only with ``topk=k``): the k
  nearest centres by decreasing cosine (``topk[:, 0] == labels``), rows of ``−1`` / NaN for rows not kept
  (MLCD-style multi-label targets);
* ``cluster.json``: N, D, counts, class size statistics, parameters.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import hashlib
import inspect
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import reference

__all__ = [
    "KEEP_OPTIONS",
    "METHODS",
    "EmbeddingSource",
    "resolve_fns",
    "run_balance",
    "run_cluster",
    "spherical_kmeans",
]

KEEP_OPTIONS = ("hard", "easy", "random")
METHODS = ("semdedup", "unionfind")
INVALID_POLICIES = ("error", "remove")
_SIM_BUDGET = 1 << 24  # floats of a [rows, centroids] similarity block (64 MB)
# Clusters with c²·D below this (c < 4096 at D = 512) run with one intra-op thread each, several clusters at
# a time on a pool of as many worker threads as torch has intra-op threads; larger clusters run one at a
# time with all the intra-op threads. Small ops split over OpenMP threads stall at barriers on a shared CPU
# (measured here, load ≈ 4 on 2 cores, clusters of 512-1023 rows: 4.6 GFLOP/s with 2 threads, 41 with 1;
# 1024-2047 rows: 35 vs 50), and one thread per cluster alone would leave the other cores idle. The choice
# depends only on (c, D), so results stay deterministic.
SMALL_CLUSTER_FLOPS = 1 << 33
# Without the worker pool (a given max_sim_fn, which may not be thread-safe), clusters run one at a time and
# only those with c²·D below this run with one intra-op thread (at 200k × 512 into 1024 clusters, load ≈ 5:
# dedup 31 s with 2 threads, 4.3 s with 1).
SERIAL_SMALL_CLUSTER_FLOPS = 1 << 27


# --------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------


def _load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # numpy cannot memory-map a zero-byte data region
        return np.load(path, allow_pickle=False)


def _npy_files(path: str, what: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.npy")))
        if not files:
            raise ValueError(f"{what}: directory {path!r} holds no .npy files")
        return files
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path!r} is neither a .npy file nor a directory of .npy shards")
    return [path]


class EmbeddingSource:
    """Rows ``[n, D]`` of one .npy or a directory of shards, memory-mapped; reads return float32."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.files = _npy_files(path, "embeddings")
        self.shards: list[np.ndarray] = []
        dims = set()
        for f in self.files:
            a = _load_npy(f)
            if a.ndim != 2:
                raise ValueError(f"embeddings must be 2-D [n, D]; {f!r} has shape {a.shape}")
            if a.dtype not in (np.float16, np.float32, np.float64):
                raise ValueError(f"embeddings must be float16/float32/float64; {f!r} has dtype {a.dtype}")
            dims.add(a.shape[1])
            self.shards.append(a)
        if len(dims) != 1:
            raise ValueError(f"all embedding shards must have the same D, got {sorted(dims)}")
        self.d = dims.pop()
        if self.d < 1:
            raise ValueError("embeddings have D = 0")
        self.starts = np.cumsum([0] + [len(a) for a in self.shards]).astype(np.int64)
        self.n = int(self.starts[-1])
        self.dtypes = sorted({str(a.dtype) for a in self.shards})
        self.itemsize = max(a.dtype.itemsize for a in self.shards)

    def fingerprint(self) -> dict:
        return {
            "files": [[os.path.basename(f), os.path.getsize(f)] for f in self.files],
            "n": self.n,
            "d": self.d,
            "dtypes": self.dtypes,
        }

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a new float32 array."""
        out = np.empty((stop - start, self.d), dtype=np.float32)
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            a, base = self.shards[s], int(self.starts[s])
            hi = min(stop, base + len(a))
            _cast_rows(out[pos - start : hi - start], a[pos - base : hi - base])
            pos, s = hi, s + 1
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the given indices (any order) as a new float32 array, read in ascending row order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d), dtype=np.float32)
        if len(rows) == 0:
            return out
        perm = np.argsort(rows, kind="stable")
        srt = rows[perm]
        shard = np.searchsorted(self.starts, srt, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(srt)]):
            s = int(shard[lo])
            out[perm[lo:hi]] = self.shards[s][srt[lo:hi] - self.starts[s]]
        return out


def _cast_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for a float32 ``dst``. float16 blocks are copied as they are (a memcpy out of the
    memory map) and widened by torch (exact, vectorised, threaded): numpy's float16 → float32 cast took
    1.5-1.7 µs a 512-wide row here against 0.7-0.9 µs, i.e. ~8 % of the assignment stage at k = 1024."""
    if src.dtype != np.float16 or not len(src):
        dst[...] = src
        return
    buf = np.empty(src.shape, src.dtype)
    buf[...] = src
    torch.from_numpy(dst).copy_(torch.from_numpy(buf))


def _load_ids(path: str | None, n: int) -> np.ndarray:
    if path is None:
        return np.arange(n, dtype=np.int64)
    parts = []
    for f in _npy_files(path, "ids"):
        a = _load_npy(f)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"ids must be 1-D integers; {f!r} has shape {a.shape} and dtype {a.dtype}")
        parts.append(np.asarray(a, dtype=np.int64))
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but the embeddings have {n} rows")
    return ids


def _normalize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise float32 rows in place; returns ``(x, valid)``. Invalid rows (non-finite or zero
    norm) are set to e_0 so that downstream matmuls stay finite; callers mask them out."""
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    valid = np.isfinite(norms) & (norms > 0)
    x /= np.where(valid, norms, 1.0)[:, None]
    if not valid.all():
        x[~valid] = 0.0
        x[~valid, 0] = 1.0
    return x, valid


def _invalid_error(rows: np.ndarray) -> ValueError:
    return ValueError(
        f"embeddings row {int(rows[0])} is NaN/inf or all zeros ({len(rows)} such rows seen so far, "
        f"first ones {rows[:8].tolist()}); clean them or pass invalid='remove' to remove and report them"
    )


# --------------------------------------------------------------------------------------------------
# Pluggable per-chunk / per-cluster functions
# --------------------------------------------------------------------------------------------------


def resolve_fns(assign_fn=None, max_sim_fn=None) -> tuple[Callable, Callable, dict]:
    """The fused op's ``nearest_centroid`` / ``masked_max_similarity`` when
    ``clipcid_fast.ops.masked_max_sim`` imports and has them, else the reference ones; given ones win."""
    fused = None
    if assign_fn is None or max_sim_fn is None:
        try:
            from .ops import masked_max_sim as fused
        except Exception:  # absent or broken: the reference is the documented fallback
            fused = None

    def pick(given, attr):
        if given is not None:
            return given
        if fused is not None and callable(getattr(fused, attr, None)):
            fn = getattr(fused, attr)
            try:  # rows reaching it are already checked and normalised: skip its value check (a host sync)
                if "check_values" in inspect.signature(fn).parameters:
                    return functools.wraps(fn)(functools.partial(fn, check_values=False))
            except (TypeError, ValueError):
                pass
            return fn
        return getattr(reference, attr)

    assign_fn, max_sim_fn = pick(assign_fn, "nearest_centroid"), pick(max_sim_fn, "masked_max_similarity")
    name = lambda fn: f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"  # noqa: E731
    return assign_fn, max_sim_fn, {"assign_fn": name(assign_fn), "max_sim_fn": name(max_sim_fn)}


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


# --------------------------------------------------------------------------------------------------
# Files: atomic writes
# --------------------------------------------------------------------------------------------------


def _tmp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _atomic_bytes(path: str, data: bytes) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_npy(path: str, arr: np.ndarray) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_npz(path: str, **arrays) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_json(path: str, obj) -> None:
    _atomic_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _clean_tmp(*dirs: str) -> None:
    for d in dirs:
        for f in glob.glob(os.path.join(d, "*.tmp-*")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)


def _label(kind: str, t: float) -> str:
    return f"{kind}{t:g}"


# --------------------------------------------------------------------------------------------------
# Process group (gloo) for torchrun
# --------------------------------------------------------------------------------------------------


class _Comm:
    """Rank / world and the few collectives the pipeline needs (gloo, CPU tensors)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.group, self.owned = dist, None, False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("gloo")
            self.owned = True
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
        else:
            self.rank, self.world = 0, 1

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier(group=self.group)

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (so no rank waits forever)."""
        if self.world > 1:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
            self.dist.all_reduce(flag, group=self.group)
            if error is None and int(flag) > 0:
                raise RuntimeError("another rank failed; see its error")
        if error is not None:
            raise error

    def broadcast(self, arr: np.ndarray | None, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        if self.world == 1:
            return arr
        t = torch.from_numpy(np.ascontiguousarray(arr)) if self.rank == 0 else torch.empty(shape, dtype=torch.float32)
        self.dist.broadcast(t, src=0, group=self.group)
        return t.numpy().astype(dtype, copy=False)

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def _run_stage(comm: _Comm, fn: Callable, *, root_only: bool):
    """Run ``fn`` (on rank 0 only if ``root_only``), then agree on success across ranks."""
    result, err = None, None
    if not root_only or comm.rank == 0:
        try:
            result = fn()
        except Exception as e:
            err = e
    comm.agree(err)
    comm.barrier()
    return result


# --------------------------------------------------------------------------------------------------
# k-means and assignment
# --------------------------------------------------------------------------------------------------


def spherical_kmeans(
    src: EmbeddingSource,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    candidates: np.ndarray | None = None,
    invalid: str = "error",
    chunk_rows: int = 65536,
) -> tuple[np.ndarray, dict]:
    """faiss spherical k-means on ``min(#candidates, k · max_points_per_centroid)`` sampled rows.

    ``candidates``: row indices to sample from (default all rows). Returns ``(centroids float32 [k, D]
    L2-normalised, info)``.
    """
    import faiss

    t0 = time.perf_counter()
    pool = np.arange(src.n, dtype=np.int64) if candidates is None else np.asarray(candidates, np.int64)
    n_sample = min(len(pool), k * max_points_per_centroid)
    rng = np.random.default_rng(seed)
    sample = np.sort(pool[rng.choice(len(pool), n_sample, replace=False)]) if n_sample < len(pool) else pool
    parts = []
    for lo in range(0, len(sample), chunk_rows):
        x, valid = _normalize(src.take(sample[lo : lo + chunk_rows]))
        if not valid.all():
            if invalid == "error":
                raise _invalid_error(sample[lo : lo + chunk_rows][~valid])
            x = x[valid]
        parts.append(x)
    x = np.concatenate(parts) if parts else np.zeros((0, src.d), np.float32)
    t_read = time.perf_counter() - t0
    if len(x) < k:
        raise ValueError(f"k-means needs at least k={k} valid rows to sample, got {len(x)}")
    gpu = bool(getattr(faiss, "get_num_gpus", lambda: 0)())  # faiss GPU when present (faiss-cpu: 0 GPUs)
    km = faiss.Kmeans(
        src.d, k, niter=niter, spherical=True, seed=seed, max_points_per_centroid=max_points_per_centroid,
        verbose=False, gpu=gpu,
    )  # fmt: skip
    km.train(x)
    c = np.ascontiguousarray(km.centroids, dtype=np.float32)
    c, ok = _normalize(c)
    if not ok.all():
        raise ValueError("k-means produced a zero or non-finite centroid")
    return c, {
        "seconds": time.perf_counter() - t0,
        "read_seconds": t_read,
        "sample_rows": len(x),
        "flops": 2.0 * len(x) * k * src.d * niter,
    }


def _chunk_for(k: int, chunk_rows: int) -> int:
    return max(64, min(chunk_rows, _SIM_BUDGET // max(k, 1)))


def _assign_block(src, start, stop, centroids_t, assign_fn, chunk_rows, invalid):
    idx = np.empty(stop - start, np.int64)
    sim = np.empty(stop - start, np.float32)
    step = _chunk_for(len(centroids_t), chunk_rows)
    for lo in range(start, stop, step):
        hi = min(stop, lo + step)
        x, valid = _normalize(src.read(lo, hi))
        if not valid.all() and invalid == "error":
            raise _invalid_error(np.flatnonzero(~valid) + lo)
        s, i = assign_fn(torch.from_numpy(x), centroids_t)
        s, i = _np(s).astype(np.float32), _np(i).astype(np.int64)
        idx[lo - start : hi - start] = np.where(valid, i, -1)
        sim[lo - start : hi - start] = np.where(valid, s, np.float32(np.nan))
    return idx, sim


def _topk_centroids(x: torch.Tensor, c: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest ``x · cᵀ`` per row, tiled over centre blocks; ``(sim [r, k], idx [r, k])``."""
    best_s = best_i = None
    for lo in range(0, len(c), block):
        s = x @ c[lo : lo + block].T
        ts, ti = s.topk(min(k, s.shape[1]), dim=1)
        ti = ti + lo
        if best_s is not None:
            ts, ti = torch.cat([best_s, ts], 1), torch.cat([best_i, ti], 1)
            ts, sel = ts.topk(k, dim=1)
            ti = ti.gather(1, sel)
        best_s, best_i = ts, ti
    return best_s, best_i


# --------------------------------------------------------------------------------------------------
# Per-cluster rules
# --------------------------------------------------------------------------------------------------


def _find(parent: np.ndarray, a: np.ndarray) -> np.ndarray:
    r = parent[a]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            break
        r = rr
    parent[a] = r  # path compression
    return r


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of every pair (a[i], b[i]); roots are the smallest member (parent[x] ≤ x)."""
    while len(a):
        ra, rb = _find(parent, a), _find(parent, b)
        diff = ra != rb
        ra, rb = ra[diff], rb[diff]
        if not len(ra):
            return
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        a, b = ra, rb


def unionfind_groups(x: np.ndarray, cos_thresholds: Sequence[float], tile: int = 1024) -> np.ndarray:
    """Connected components of ``cos(x_i, x_j) > thr`` over tiles, for each threshold.

    ``x [c, D]`` float32 L2-normalised rows. Returns roots ``[T, c]`` int64 (root = smallest member index).
    Only ``tile × tile`` similarity blocks with column block ≥ row block are formed.
    """
    c = len(x)
    parents = np.tile(np.arange(c, dtype=np.int64), (len(cos_thresholds), 1))
    thr = [np.float32(t) for t in cos_thresholds]
    lowest = min(thr) if thr else np.float32(np.inf)
    xt = torch.from_numpy(x)
    for i0 in range(0, c, tile):
        i1 = min(c, i0 + tile)
        for j0 in range(i0, c, tile):
            j1 = min(c, j0 + tile)
            s = xt[i0:i1] @ xt[j0:j1].T
            if j0 == i0:  # diagonal block: strict upper triangle only (pairs i < j)
                s.masked_fill_(~torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
            ii, jj = torch.nonzero(s > float(lowest), as_tuple=True)
            if not len(ii):
                continue
            vals = _np(s[ii, jj])
            ii, jj = _np(ii) + i0, _np(jj) + j0
            for t, th in enumerate(thr):
                sel = vals > th
                if sel.any():
                    _union(parents[t], ii[sel], jj[sel])
    for t in range(len(thr)):
        p = parents[t]
        while True:
            q = p[p]
            if np.array_equal(q, p):
                break
            p = q
        parents[t] = p
    return parents


TIE_D2 = 1e-9  # squared distances to the group mean closer than this count as a tie


def group_representatives(x: np.ndarray, roots: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each member, the global row of its group's representative: the member nearest the group's
    mean ``μ`` (Euclidean; rows renormalised in float64). Members whose ``‖x − μ‖²`` is within
    ``TIE_D2`` of the group's smallest count as tied (a two-member group is always an exact tie, and
    exact duplicates tie), and ties go to the smaller global row."""
    perm = np.argsort(roots, kind="stable")
    r = roots[perm]
    starts = np.r_[0, np.flatnonzero(np.diff(r)) + 1]
    size = np.diff(np.r_[starts, len(r)])
    gid = np.repeat(np.arange(len(starts)), size)
    xp = x[perm].astype(np.float64)
    xp /= np.linalg.norm(xp, axis=1, keepdims=True)
    mean = np.add.reduceat(xp, starts, axis=0) / size[:, None]
    d2 = ((xp - mean[gid]) ** 2).sum(axis=1)
    tied = d2 <= np.minimum.reduceat(d2, starts)[gid] + TIE_D2
    cand = np.where(tied, rows[perm], np.iinfo(np.int64).max)
    out = np.empty(len(x), np.int64)
    out[perm] = np.minimum.reduceat(cand, starts)[gid]
    return out


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    method: str
    thresholds: list[float]
    kind: str  # "eps" | "delta"
    stage_seconds: dict = field(default_factory=dict)


def _check_params(k, niter, method, eps, delta, keep, invalid, batch_clusters, chunk_rows, max_points_per_centroid):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if keep not in KEEP_OPTIONS:
        raise ValueError(f"keep must be one of {KEEP_OPTIONS}, got {keep!r}")
    if invalid not in INVALID_POLICIES:
        raise ValueError(f"invalid must be one of {INVALID_POLICIES}, got {invalid!r}")
    for name, v in (("k", k), ("niter", niter), ("batch_clusters", batch_clusters), ("chunk_rows", chunk_rows)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1, got {max_points_per_centroid}")
    if method == "semdedup":
        ts = [float(e) for e in eps]
        if not ts:
            raise ValueError("eps must hold at least one threshold")
        bad = [e for e in ts if not (0.0 < e < 2.0)]
        if bad:
            raise ValueError(f"every eps must be in (0, 2) (remove j when max cos > 1 − eps), got {bad}")
        return _Plan(method, sorted(set(ts)), "eps")
    ts = [float(d) for d in delta]
    if not ts:
        raise ValueError("delta must hold at least one threshold")
    bad = [d for d in ts if not (0.0 < d <= 2.0)]
    if bad:
        raise ValueError(f"every delta must be in (0, 2] (Euclidean distance of unit vectors), got {bad}")
    return _Plan(method, sorted(set(ts)), "delta")


def run_balance(
    embeddings: str,
    out_dir: str,
    *,
    ids: str | None = None,
    k: int = 1024,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    method: str = "semdedup",
    eps: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    delta: Sequence[float] = (0.2, 0.3, 0.4, 0.5),
    keep: str = "hard",
    batch_clusters: int = 64,
    chunk_rows: int = 65536,
    assign_block_rows: int = 1 << 20,
    tile: int = 1024,
    invalid: str = "error",
    centroids: str | np.ndarray | None = None,
    assign_fn: Callable | None = None,
    max_sim_fn: Callable | None = None,
    hook: Callable[..., None] | None = None,
    progress: bool = True,
    plot: bool = True,
) -> dict:
    """Semantic balance of ``embeddings`` into ``out_dir`` (see the module docstring). Returns the summary.

    ``centroids``: skip k-means and use these ``[k, D]`` centres (array or .npy path).
    ``hook(event, **info)`` is called after each unit of work (``"kmeans"``, ``"assign_block"``,
    ``"assign"``, ``"order"``, ``"batch_start"``, ``"batch_done"``, ``"merge"``); an exception raised
    from it stops the run there, as a kill would (the tests use it).
    """
    plan = _check_params(
        k, niter, method, eps, delta, keep, invalid, batch_clusters, chunk_rows, max_points_per_centroid
    )
    src = EmbeddingSource(embeddings)
    if src.n == 0:
        raise ValueError(f"embeddings {embeddings!r} hold no rows")
    ids_arr = _load_ids(ids, src.n)
    c_given = None
    if centroids is not None:
        c_given = np.array(_load_npy(centroids) if isinstance(centroids, str) else centroids, dtype=np.float32)
        if c_given.ndim != 2 or c_given.shape[1] != src.d:
            raise ValueError(f"centroids must be [k, {src.d}], got shape {c_given.shape}")
        c_given, ok = _normalize(c_given)
        if not ok.all():
            raise ValueError("centroids hold a zero or non-finite row")
        k = len(c_given)
    elif k > src.n:
        raise ValueError(f"k={k} clusters for only {src.n} rows")
    max_sim_builtin = max_sim_fn is None
    assign_fn, max_sim_fn, fn_names = resolve_fns(assign_fn, max_sim_fn)
    hook = hook or (lambda event, **info: None)

    comm = _Comm()
    try:
        return _pipeline(
            comm, plan, src, ids_arr, out_dir, k, niter, seed, max_points_per_centroid, keep, batch_clusters,
            chunk_rows, assign_block_rows, tile, invalid, c_given, assign_fn, max_sim_fn, max_sim_builtin, fn_names,
            hook, progress, plot,
        )  # fmt: skip
    finally:
        comm.close()


def _pipeline(
    comm, plan, src, ids_arr, out_dir, k, niter, seed, mppc, keep, batch_clusters, chunk_rows, block_rows, tile,
    invalid, c_given, assign_fn, max_sim_fn, max_sim_builtin, fn_names, hook, progress, plot,
):  # fmt: skip
    out = os.path.abspath(out_dir)
    parts_dir, batch_dir = os.path.join(out, "parts"), os.path.join(out, "batches")
    p = lambda name: os.path.join(out, name)  # noqa: E731
    params = {
        "k": k,
        "niter": niter,
        "seed": seed,
        "max_points_per_centroid": mppc,
        "keep": keep,
        "method": plan.method,
        "invalid": invalid,
        "centroids_sha256": None if c_given is None else hashlib.sha256(c_given.tobytes()).hexdigest(),
    }
    if plan.method == "unionfind":
        params["delta"] = plan.thresholds
    manifest = {"version": 1, "input": src.fingerprint(), "params": params}

    def prepare():
        os.makedirs(parts_dir, exist_ok=True)
        os.makedirs(batch_dir, exist_ok=True)
        _clean_tmp(out, parts_dir, batch_dir)
        if os.path.exists(p("manifest.json")):
            with open(p("manifest.json")) as f:
                old = json.load(f)
            if old != manifest:
                raise ValueError(
                    f"{out} holds a different run (manifest.json differs: was {old}, now {manifest}); "
                    "use a new output directory"
                )
        else:
            _atomic_json(p("manifest.json"), manifest)

    _run_stage(comm, prepare, root_only=True)
    timings = {}
    if comm.rank == 0 and os.path.exists(p("timings.json")):
        with open(p("timings.json")) as f:
            timings = json.load(f)

    # 1. k-means (rank 0), centroids broadcast
    def kmeans():
        if os.path.exists(p("centroids.npy")):
            return np.load(p("centroids.npy"))
        if c_given is not None:
            c, info = c_given, {"seconds": 0.0, "given": True}
        else:
            c, info = spherical_kmeans(
                src, k, niter=niter, seed=seed, max_points_per_centroid=mppc, invalid=invalid, chunk_rows=chunk_rows
            )
        _atomic_npy(p("centroids.npy"), c)
        timings["kmeans"] = info
        hook("kmeans")
        return c

    cent = _run_stage(comm, kmeans, root_only=True)
    cent = comm.broadcast(cent, (k, src.d))
    cent_t = torch.from_numpy(np.ascontiguousarray(cent, dtype=np.float32))

    # 2. assignment: row blocks round-robin over ranks, each block a resumable part
    blocks = [(lo, min(src.n, lo + block_rows)) for lo in range(0, src.n, block_rows)]
    done_assign = os.path.exists(p("assign.npy")) and os.path.exists(p("assign_sim.npy"))

    def assign_mine():
        if done_assign:
            return
        t0, rows = time.perf_counter(), 0
        for b, (lo, hi) in enumerate(blocks):
            part = os.path.join(parts_dir, f"assign_{lo:012d}_{hi:012d}.npz")
            if b % comm.world != comm.rank or os.path.exists(part):
                continue
            idx, sim = _assign_block(src, lo, hi, cent_t, assign_fn, chunk_rows, invalid)
            _atomic_npz(part, idx=idx, sim=sim)
            rows += hi - lo
            hook("assign_block", block=b)
        return time.perf_counter() - t0, rows

    res = _run_stage(comm, assign_mine, root_only=False)

    def assign_merge():
        if done_assign:
            return
        t0 = time.perf_counter()
        idx = np.empty(src.n, np.int64)
        sim = np.empty(src.n, np.float32)
        for lo, hi in blocks:
            with np.load(os.path.join(parts_dir, f"assign_{lo:012d}_{hi:012d}.npz")) as z:
                idx[lo:hi], sim[lo:hi] = z["idx"], z["sim"]
        _atomic_npy(p("assign_sim.npy"), sim)
        _atomic_npy(p("assign.npy"), idx)
        for f in glob.glob(os.path.join(parts_dir, "assign_*.npz")):
            os.remove(f)
        secs, rows = res if res else (0.0, 0)
        timings["assign"] = {
            "seconds_rank0": secs,
            "rows_rank0": rows,
            "merge_seconds": time.perf_counter() - t0,
            "world": comm.world,
            "flops_rank0": 2.0 * rows * k * src.d,
        }
        hook("assign")

    _run_stage(comm, assign_merge, root_only=True)

    # 3. order inside clusters (rank 0)
    def order():
        if os.path.exists(p("order.npy")) and os.path.exists(p("offsets.npy")):
            return
        t0 = time.perf_counter()
        a = np.load(p("assign.npy"))
        s = np.load(p("assign_sim.npy"))
        rows = np.flatnonzero(a >= 0)
        if keep == "hard":  # farthest from the centroid (smallest cosine) first
            key = s[rows]
        elif keep == "easy":
            key = -s[rows]
        else:
            key = np.random.default_rng([seed, 1]).permutation(src.n)[rows]
        o = rows[np.lexsort((rows, key, a[rows]))]
        offsets = np.r_[0, np.cumsum(np.bincount(a[rows], minlength=k))].astype(np.int64)
        _atomic_npy(p("offsets.npy"), offsets)
        _atomic_npy(p("order.npy"), o)
        timings["order"] = {"seconds": time.perf_counter() - t0}
        hook("order")

    _run_stage(comm, order, root_only=True)
    order_arr = np.load(p("order.npy"), mmap_mode="r")
    offsets = np.load(p("offsets.npy"))

    # 4. per-cluster rule, batches of clusters, cluster c on rank c % world
    cos_thr = [float(np.float32(1) - np.float32(d) ** 2 / np.float32(2)) for d in plan.thresholds]

    threads0 = torch.get_num_threads()

    def one_cluster(c):
        rows = np.asarray(order_arr[offsets[c] : offsets[c + 1]])
        x, _ = _normalize(src.take(rows))
        if plan.method == "semdedup":
            m, i = max_sim_fn(torch.from_numpy(x))
            m, i = _np(m).astype(np.float32), _np(i).astype(np.int64)
            return m, np.where(i >= 0, rows[np.maximum(i, 0)], -1)
        roots = unionfind_groups(x, cos_thr, tile)
        return np.stack([group_representatives(x, r, rows) for r in roots])

    def run_batch(batch, pool):
        """Results of the non-empty clusters of ``batch``, in batch order (see SMALL_CLUSTER_FLOPS)."""
        sizes = {c: int(offsets[c + 1] - offsets[c]) for c in batch}
        limit = SMALL_CLUSTER_FLOPS if pool is not None else SERIAL_SMALL_CLUSTER_FLOPS
        small = {c for c in batch if 0 < sizes[c] and float(sizes[c]) ** 2 * src.d < limit}
        out = {}
        with _threads(threads0):
            for c in batch:
                if sizes[c] and c not in small:
                    out[c] = one_cluster(c)
        with _threads(1):
            todo = sorted(small, key=lambda c: (-sizes[c], c))  # largest first: the shortest tail
            if pool is not None and len(todo) > 1:
                out.update(zip(todo, pool.map(one_cluster, todo)))
            else:
                out.update((c, one_cluster(c)) for c in todo)
        return [out[c] for c in batch if sizes[c]]

    def dedup_mine():
        done = set()
        for f in glob.glob(os.path.join(batch_dir, "batch_c*.npz")):
            with np.load(f) as z:
                done.update(z["clusters"].tolist())
        todo = [c for c in range(k) if c % comm.world == comm.rank and c not in done]
        t0, rows_done, flops = time.perf_counter(), 0, 0.0
        bar = _progress(progress, len(todo), comm.rank)
        # worker threads for small clusters; only for the built-in functions (a given max_sim_fn may not be
        # thread-safe, so it is called from this thread only)
        workers = threads0 if threads0 > 1 and (plan.method == "unionfind" or max_sim_builtin) else 0
        with contextlib.ExitStack() as stack:
            pool = stack.enter_context(ThreadPoolExecutor(workers)) if workers else None
            for j in range(0, len(todo), batch_clusters):
                batch = todo[j : j + batch_clusters]
                hook("batch_start", clusters=batch)
                tb = time.perf_counter()
                res = run_batch(batch, pool)
                sizes = np.diff(offsets)[batch].astype(np.float64)
                rows_done += int(sizes.sum())
                flops += float((sizes**2).sum()) * src.d
                arrays = {"clusters": np.asarray(batch, np.int64), "seconds": np.float64(time.perf_counter() - tb)}
                if plan.method == "semdedup":
                    arrays["m"] = np.concatenate([r[0] for r in res]) if res else np.zeros(0, np.float32)
                    arrays["nn"] = np.concatenate([r[1] for r in res]) if res else np.zeros(0, np.int64)
                else:
                    T = len(plan.thresholds)
                    arrays["rep"] = np.concatenate(res, axis=1) if res else np.zeros((T, 0), np.int64)
                _atomic_npz(os.path.join(batch_dir, f"batch_c{batch[0]:08d}.npz"), **arrays)
                bar.update(len(batch))
                hook("batch_done", clusters=batch)
        bar.close()
        return time.perf_counter() - t0, rows_done, flops

    res = _run_stage(comm, dedup_mine, root_only=False)
    if comm.rank == 0:
        secs, rows_done, flops = res
        timings["dedup"] = {"seconds_rank0": secs, "rows_rank0": rows_done, "flops_rank0": flops, "world": comm.world}

    # 5. merge (rank 0)
    def merge():
        t0 = time.perf_counter()
        summary = _merge(plan, src, ids_arr, out, k, keep, offsets, np.asarray(order_arr), fn_names, plot)
        timings["merge"] = {"seconds": time.perf_counter() - t0}
        _atomic_json(p("timings.json"), timings)
        hook("merge")
        return summary

    summary = _run_stage(comm, merge, root_only=True)
    return summary if comm.rank == 0 else {}


@contextlib.contextmanager
def _threads(n: int):
    """Torch intra-op threads for a block of work (only switched when it changes)."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _progress(enabled: bool, total: int, rank: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"clusters (rank {rank})", unit="cluster", disable=not enabled, position=rank)


def _merge(plan, src, ids_arr, out, k, keep, offsets, order_arr, fn_names, plot) -> dict:
    p = lambda name: os.path.join(out, name)  # noqa: E731
    n = src.n
    assign = np.load(p("assign.npy"))
    sim = np.load(p("assign_sim.npy"))
    valid = assign >= 0
    seen = np.zeros(k, bool)
    T = len(plan.thresholds)
    if plan.method == "semdedup":
        m_row = np.full(n, np.nan, np.float32)
        nn_row = np.full(n, -1, np.int64)
    else:
        rep_row = np.full((T, n), -1, np.int64)
    for f in sorted(glob.glob(os.path.join(out, "batches", "batch_c*.npz"))):
        with np.load(f) as z:
            clusters = z["clusters"]
            segs = [np.arange(offsets[c], offsets[c + 1]) for c in clusters]
            rows = order_arr[np.concatenate(segs)] if segs else np.zeros(0, np.int64)
            if plan.method == "semdedup":
                m_row[rows], nn_row[rows] = z["m"], z["nn"]
            else:
                rep_row[:, rows] = z["rep"]
        seen[clusters] = True
    if not seen.all():
        raise RuntimeError(f"clusters without results: {np.flatnonzero(~seen)[:10].tolist()}")

    if plan.method == "semdedup":
        _atomic_npy(p("max_sim.npy"), m_row)
        _atomic_npy(p("nearest_earlier.npy"), nn_row)
        keeps = [valid & ~(m_row > (np.float32(1) - np.float32(e))) for e in plan.thresholds]
    else:
        keeps = []
        for t, d in enumerate(plan.thresholds):
            _atomic_npy(p(f"rep_{_label('delta', d)}.npy"), rep_row[t])
            keeps.append(valid & (rep_row[t] == np.arange(n)))
    _atomic_npy(p("invalid_rows.npy"), np.flatnonzero(~valid).astype(np.int64))

    sizes = np.bincount(assign[valid], minlength=k)
    sim_sum = np.bincount(assign[valid], weights=sim[valid].astype(np.float64), minlength=k)
    n_valid, n_invalid = int(valid.sum()), int(n - valid.sum())
    rows_out, per_t = [], []
    for thr, kp in zip(plan.thresholds, keeps):
        lab = _label(plan.kind, thr)
        _atomic_npy(p(f"keep_{lab}.npy"), kp)
        _atomic_npy(p(f"kept_ids_{lab}.npy"), ids_arr[kp])
        kept = int(kp.sum())
        per_t.append(np.bincount(assign[kp], minlength=k))
        rows_out.append(
            {
                plan.kind: thr,
                "kept": kept,
                "removed_duplicates": n_valid - kept,
                "removed_invalid": n_invalid,
                "removed_fraction": (n - kept) / n,
                "removed_fraction_of_valid": (n_valid - kept) / n_valid if n_valid else 0.0,
                "keep_file": f"keep_{lab}.npy",
                "kept_ids_file": f"kept_ids_{lab}.npy",
            }
        )
        assert rows_out[-1]["kept"] + rows_out[-1]["removed_duplicates"] + n_invalid == n

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    labels = [_label(plan.kind, t) for t in plan.thresholds]
    w.writerow(["cluster", "size", "mean_cos_to_centroid", *[f"kept_{lab}" for lab in labels]])
    for c in range(k):
        mean = f"{sim_sum[c] / sizes[c]:.6f}" if sizes[c] else ""
        w.writerow([c, int(sizes[c]), mean, *[int(pt[c]) for pt in per_t]])
    _atomic_bytes(p("clusters.csv"), buf.getvalue().encode())

    summary = {
        "method": plan.method,
        "keep_order": keep,
        "threshold_kind": plan.kind,
        "n_rows": n,
        "n_valid": n_valid,
        "n_invalid": n_invalid,
        "dim": src.d,
        "dtypes": src.dtypes,
        "k": k,
        "thresholds": rows_out,
        "cluster_sizes": {
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "mean": float(sizes.mean()),
            "median": float(np.median(sizes)),
            "empty": int((sizes == 0).sum()),
        },
        "functions": fn_names,
        "timings_file": "timings.json",  # seconds per stage live there: they differ from run to run
    }
    _atomic_json(p("summary.json"), summary)
    if plot:
        _plot(p("balance.png"), plan, rows_out, sizes)
    return summary


def _plot(path, plan, rows_out, sizes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r[plan.kind] for r in rows_out], [r["removed_fraction"] for r in rows_out], "o-")
    a.set_xlabel(plan.kind + (" (remove when max cos > 1 − eps)" if plan.kind == "eps" else " (‖a − b‖ < delta)"))
    a.set_ylabel("removed fraction")
    a.set_title(f"{plan.method}: removed fraction")
    a.grid(alpha=0.3)
    b.hist(sizes, bins=min(50, max(1, len(sizes))))
    b.set_xlabel("cluster size")
    b.set_ylabel("clusters")
    b.set_title(f"cluster sizes (k = {len(sizes)})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    _atomic_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# Pseudo-classes for the cluster-discrimination loss
# --------------------------------------------------------------------------------------------------


def run_cluster(
    embeddings: str,
    out_dir: str,
    n_classes: int,
    *,
    keep: str | np.ndarray | None = None,
    topk: int = 0,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    chunk_rows: int = 65536,
    invalid: str = "error",
    assign_fn: Callable | None = None,
) -> dict:
    """k-means of the kept rows into ``n_classes`` pseudo-classes; writes the files of the module docstring."""
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    if not isinstance(topk, (int, np.integer)) or topk < 0 or topk > n_classes:
        raise ValueError(f"topk must be in [0, n_classes={n_classes}], got {topk!r}")
    if invalid not in INVALID_POLICIES:
        raise ValueError(f"invalid must be one of {INVALID_POLICIES}, got {invalid!r}")
    src = EmbeddingSource(embeddings)
    if src.n == 0:
        raise ValueError(f"embeddings {embeddings!r} hold no rows")
    if keep is None:
        mask = np.ones(src.n, bool)
    else:
        mask = np.asarray(_load_npy(keep) if isinstance(keep, str) else keep)
        if mask.dtype != np.bool_ or mask.shape != (src.n,):
            raise ValueError(f"keep must be a bool mask of shape ({src.n},), got {mask.dtype} {mask.shape}")
    cand = np.flatnonzero(mask)
    if len(cand) < n_classes:
        raise ValueError(f"n_classes={n_classes} for only {len(cand)} kept rows")
    assign_fn, _, names = resolve_fns(assign_fn, None)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    cent, info = spherical_kmeans(
        src, n_classes, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid, candidates=cand,
        invalid=invalid, chunk_rows=chunk_rows,
    )  # fmt: skip
    t_km = time.perf_counter() - t0
    p = lambda name: os.path.join(out_dir, name)  # noqa: E731
    labels_path, topk_path, topk_sim_path = p("labels.npy"), p("topk.npy"), p("topk_sim.npy")
    tmp_l = _tmp_name(labels_path)
    labels = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.int64, shape=(src.n,))
    if topk:
        tmp_k, tmp_ks = _tmp_name(topk_path), _tmp_name(topk_sim_path)
        tk = np.lib.format.open_memmap(tmp_k, mode="w+", dtype=np.int64, shape=(src.n, topk))
        tks = np.lib.format.open_memmap(tmp_ks, mode="w+", dtype=np.float32, shape=(src.n, topk))
    cent_t = torch.from_numpy(cent)
    step = _chunk_for(n_classes, chunk_rows)
    n_bad = 0
    for lo in range(0, src.n, step):
        hi = min(src.n, lo + step)
        x, valid = _normalize(src.read(lo, hi))
        use = mask[lo:hi] & valid
        bad = mask[lo:hi] & ~valid
        if bad.any():
            if invalid == "error":
                raise _invalid_error(np.flatnonzero(bad) + lo)
            n_bad += int(bad.sum())
        xt = torch.from_numpy(x)
        if topk:
            s, i = _topk_centroids(xt, cent_t, topk, max(1, _SIM_BUDGET // step))
            s, i = _np(s), _np(i).astype(np.int64)
            tk[lo:hi] = np.where(use[:, None], i, -1)
            tks[lo:hi] = np.where(use[:, None], s, np.float32(np.nan))
            labels[lo:hi] = np.where(use, i[:, 0], -1)
        else:
            _, i = assign_fn(xt, cent_t)
            labels[lo:hi] = np.where(use, _np(i).astype(np.int64), -1)
    labels.flush()
    lab = np.asarray(labels)
    sizes = np.bincount(lab[lab >= 0], minlength=n_classes)
    del labels
    os.replace(tmp_l, labels_path)
    if topk:
        tk.flush()
        tks.flush()
        del tk, tks
        os.replace(tmp_k, topk_path)
        os.replace(tmp_ks, topk_sim_path)
    _atomic_npy(p("centroids.npy"), cent)
    meta = {
        "n_classes": n_classes,
        "dim": src.d,
        "n_rows": src.n,
        "n_labelled": int(sizes.sum()),
        "n_not_kept": int((~mask).sum()),
        "n_invalid_removed": n_bad,
        "topk": topk,
        "niter": niter,
        "seed": seed,
        "max_points_per_centroid": max_points_per_centroid,
        "class_sizes": {"min": int(sizes.min()), "max": int(sizes.max()), "empty": int((sizes == 0).sum())},
        "files": {
            "centroids": "centroids.npy float32 [N, D] L2-normalised",
            "labels": "labels.npy int64 [n] (-1 = not kept / invalid)",
            **({"topk": "topk.npy int64 [n, k]; topk_sim.npy float32 [n, k]"} if topk else {}),
        },
        "assign_fn": names["assign_fn"],
        "seconds": {"kmeans": t_km, "labels": time.perf_counter() - t0 - t_km, "kmeans_info": info},
    }
    _atomic_json(p("cluster.json"), meta)
    return meta
