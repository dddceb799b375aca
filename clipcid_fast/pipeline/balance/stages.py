"""``run_balance``: the five stages in order (package docstring), each resumable, split over the ranks.

Stage 3, **ordering** (rank 0): inside each cluster, SemDeDup's keep options (its ``which_to_keep``):

* ``"hard"`` (SemDeDup's default, ``keep_hard=True``): rows sorted by *decreasing* cosine distance
  ``1 − cos(x, centroid)``, i.e. farthest from the centroid first, so of a duplicate group the member
  farthest from the centroid (the "hardest") is kept;
* ``"easy"``: the reverse, nearest to the centroid first, so the most prototypical member is kept;
* ``"random"``: a random order (``default_rng([seed, 1])``), so a random member is kept.

Ties go to the smaller row index. ``order.npy`` int64 (valid rows grouped by cluster, each cluster in
that order) and ``offsets.npy`` int64 ``[k + 1]`` (cluster c is ``order[offsets[c]:offsets[c+1]]``).

Stage 4, **per-cluster rule** (all ranks, cluster ``c`` on rank ``c % world``; the rules are in ``rules``),
in batches of clusters; a cluster with ``c²·D`` below ``SMALL_CLUSTER_FLOPS`` (c < 4096 at D = 512) runs on
one intra-op thread, several such clusters at a time on worker threads (as many as torch's intra-op
threads); larger ones run one at a time on all the intra-op threads. A given ``max_sim_fn`` is only called
from the calling thread, one cluster at a time (one intra-op thread below ``SERIAL_SMALL_CLUSTER_FLOPS``,
c < 512 at D = 512).
"""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import preempt
from .._io import atomic_json, atomic_npy, atomic_npz
from ..comm import Comm, run_stage
from ..config import BALANCE_EPS_GRID
from .functions import resolve_fns
from .kmeans import assign_block, spherical_kmeans
from .outputs import finished_clusters, load_timings, merge_outputs, prepare_run_dir, run_manifest
from .rules import semdedup_pass, unionfind_representatives
from .sources import INVALID_POLICIES, EmbeddingSource, load_ids, load_npy, normalize_rows

KEEP_OPTIONS = ("hard", "easy", "random")
METHODS = ("semdedup", "unionfind")
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
    eps: Sequence[float] = BALANCE_EPS_GRID,
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
    device: str | None = None,
) -> dict:
    """Semantic balance of ``embeddings`` into ``out_dir`` (see the package docstring). Returns the summary.

    ``centroids``: skip k-means and use these ``[k, D]`` centres (array or .npy path).
    ``device`` (e.g. ``"cuda"``): assignment and the per-cluster rule run the built-in fused ops there, one
    chunk / cluster at a time from this thread (``functions.resolve_fns``); k-means, ordering and the merge
    stay on the CPU. Results equal a CPU run's up to fp32 rounding of the cosines.
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
    ids_arr = load_ids(ids, src.n)
    c_given = None
    if centroids is not None:
        c_given = np.array(load_npy(centroids) if isinstance(centroids, str) else centroids, dtype=np.float32)
        if c_given.ndim != 2 or c_given.shape[1] != src.d:
            raise ValueError(f"centroids must be [k, {src.d}], got shape {c_given.shape}")
        c_given, ok = normalize_rows(c_given)
        if not ok.all():
            raise ValueError("centroids hold a zero or non-finite row")
        k = len(c_given)
    elif k > src.n:
        raise ValueError(f"k={k} clusters for only {src.n} rows")
    on_cpu = device is None or torch.device(device).type == "cpu"
    max_sim_builtin = max_sim_fn is None and on_cpu  # off the CPU: no worker pool (one device queue)
    assign_fn, max_sim_fn, fn_names = resolve_fns(assign_fn, max_sim_fn, device)
    hook = hook or (lambda event, **info: None)

    comm = Comm()
    try:
        with preempt.Preemption() as signals:
            return _pipeline(
                comm, plan, src, ids_arr, out_dir, k, niter, seed, max_points_per_centroid, keep, batch_clusters,
                chunk_rows, assign_block_rows, tile, invalid, c_given, assign_fn, max_sim_fn, max_sim_builtin,
                fn_names, hook, progress, plot, signals,
            )  # fmt: skip
    except preempt.Stopped as e:  # the parts and batches written so far are kept; a rerun does the rest
        preempt.leave("balance", e, say=comm.rank == 0)
    finally:
        comm.close()


def _pipeline(
    comm, plan, src, ids_arr, out_dir, k, niter, seed, mppc, keep, batch_clusters, chunk_rows, block_rows, tile,
    invalid, c_given, assign_fn, max_sim_fn, max_sim_builtin, fn_names, hook, progress, plot, signals,
):  # fmt: skip
    out = os.path.abspath(out_dir)
    parts_dir, batch_dir = os.path.join(out, "parts"), os.path.join(out, "batches")
    p = lambda name: os.path.join(out, name)  # noqa: E731
    manifest = run_manifest(src, plan, k, niter, seed, mppc, keep, invalid, c_given)
    run_stage(comm, lambda: prepare_run_dir(out, parts_dir, batch_dir, manifest), root_only=True)
    timings = load_timings(out) if comm.rank == 0 else {}

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
        atomic_npy(p("centroids.npy"), c)
        timings["kmeans"] = info
        hook("kmeans")
        return c

    cent = run_stage(comm, kmeans, root_only=True)
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
            idx, sim = assign_block(src, lo, hi, cent_t, assign_fn, chunk_rows, invalid)
            atomic_npz(part, idx=idx, sim=sim)
            rows += hi - lo
            hook("assign_block", block=b)
            if signals.signum:
                raise preempt.Stopped(signals.signum, f"assignment block {b + 1} of {len(blocks)}")
        return time.perf_counter() - t0, rows

    res = run_stage(comm, assign_mine, root_only=False)

    def assign_merge():
        if done_assign:
            return
        t0 = time.perf_counter()
        idx = np.empty(src.n, np.int64)
        sim = np.empty(src.n, np.float32)
        for lo, hi in blocks:
            with np.load(os.path.join(parts_dir, f"assign_{lo:012d}_{hi:012d}.npz")) as z:
                idx[lo:hi], sim[lo:hi] = z["idx"], z["sim"]
        atomic_npy(p("assign_sim.npy"), sim)
        atomic_npy(p("assign.npy"), idx)
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

    run_stage(comm, assign_merge, root_only=True)

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
        atomic_npy(p("offsets.npy"), offsets)
        atomic_npy(p("order.npy"), o)
        timings["order"] = {"seconds": time.perf_counter() - t0}
        hook("order")

    run_stage(comm, order, root_only=True)
    order_arr = np.load(p("order.npy"), mmap_mode="r")
    offsets = np.load(p("offsets.npy"))

    # 4. per-cluster rule, batches of clusters, cluster c on rank c % world
    cos_thr = [float(np.float32(1) - np.float32(d) ** 2 / np.float32(2)) for d in plan.thresholds]

    threads0 = torch.get_num_threads()

    def one_cluster(c):
        rows = np.asarray(order_arr[offsets[c] : offsets[c + 1]])
        x, _ = normalize_rows(src.take(rows))
        if plan.method == "semdedup":
            return semdedup_pass(x, rows, max_sim_fn)
        return unionfind_representatives(x, rows, cos_thr, tile)

    def run_batch(batch, pool):
        """Results of the non-empty clusters of ``batch``, in batch order (see SMALL_CLUSTER_FLOPS)."""
        sizes = {c: int(offsets[c + 1] - offsets[c]) for c in batch}
        limit = SMALL_CLUSTER_FLOPS if pool is not None else SERIAL_SMALL_CLUSTER_FLOPS
        small = {c for c in batch if 0 < sizes[c] and float(sizes[c]) ** 2 * src.d < limit}
        out = {}
        with intra_op_threads(threads0):
            for c in batch:
                if sizes[c] and c not in small:
                    out[c] = one_cluster(c)
        with intra_op_threads(1):
            todo = sorted(small, key=lambda c: (-sizes[c], c))  # largest first: the shortest tail
            if pool is not None and len(todo) > 1:
                out.update(zip(todo, pool.map(one_cluster, todo)))
            else:
                out.update((c, one_cluster(c)) for c in todo)
        return [out[c] for c in batch if sizes[c]]

    def dedup_mine():
        done = finished_clusters(batch_dir)
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
                atomic_npz(os.path.join(batch_dir, f"batch_c{batch[0]:08d}.npz"), **arrays)
                bar.update(len(batch))
                hook("batch_done", clusters=batch)
                if signals.signum:
                    raise preempt.Stopped(signals.signum, f"dedup batch of clusters {batch[0]}..{batch[-1]}")
        bar.close()
        return time.perf_counter() - t0, rows_done, flops

    res = run_stage(comm, dedup_mine, root_only=False)
    if comm.rank == 0:
        secs, rows_done, flops = res
        timings["dedup"] = {"seconds_rank0": secs, "rows_rank0": rows_done, "flops_rank0": flops, "world": comm.world}

    # 5. merge (rank 0)
    def merge():
        t0 = time.perf_counter()
        summary = merge_outputs(plan, src, ids_arr, out, k, keep, offsets, np.asarray(order_arr), fn_names, plot)
        timings["merge"] = {"seconds": time.perf_counter() - t0}
        atomic_json(p("timings.json"), timings)
        hook("merge")
        return summary

    summary = run_stage(comm, merge, root_only=True)
    return summary if comm.rank == 0 else {}


@contextlib.contextmanager
def intra_op_threads(n: int):
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
    from ..progress import tqdm

    return tqdm(total=total, desc=f"clusters (rank {rank})", unit="cluster", disable=not enabled, position=rank)
