"""Sampling, spherical k-means and nearest-centroid assignment (stages 1 and 2 of ``run_balance``; the
pseudo-classes of ``run_cluster`` use the same k-means and the same chunking).

1. **k-means** (rank 0): spherical k-means with faiss (``faiss.Kmeans(d, k, niter=, spherical=True,
   seed=, max_points_per_centroid=)``) on a sample of ``min(n, k · max_points_per_centroid)`` rows drawn
   without replacement with ``numpy.random.default_rng(seed)`` and read in sorted chunks, i.e. the amount
   faiss itself would sample, but without ever loading all rows. ``centroids.npy`` float32 ``[k, D]``.
2. **assignment** (all ranks, row blocks round-robin): every row, streamed in chunks, through
   ``assign_fn(x_chunk_fp32, centroids) -> (sim, idx)`` (default: the fused
   ``clipcid_fast.ops.masked_max_sim.nearest_centroid`` when that module imports, else
   ``reference.nearest_centroid``). ``assign.npy`` int64 ``[n]`` (−1 = invalid), ``assign_sim.npy``
   float32 ``[n]`` (cosine to the assigned centroid; NaN = invalid).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .functions import to_numpy
from .sources import EmbeddingSource, invalid_error, normalize_rows

SIM_BUDGET = 1 << 24  # floats of a [rows, centroids] similarity block (64 MB)


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
        x, valid = normalize_rows(src.take(sample[lo : lo + chunk_rows]))
        if not valid.all():
            if invalid == "error":
                raise invalid_error(sample[lo : lo + chunk_rows][~valid])
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
    c, ok = normalize_rows(c)
    if not ok.all():
        raise ValueError("k-means produced a zero or non-finite centroid")
    return c, {
        "seconds": time.perf_counter() - t0,
        "read_seconds": t_read,
        "sample_rows": len(x),
        "flops": 2.0 * len(x) * k * src.d * niter,
    }


def chunk_for(k: int, chunk_rows: int) -> int:
    """Rows per chunk: at most ``chunk_rows``, and few enough that a ``[rows, k]`` block fits SIM_BUDGET."""
    return max(64, min(chunk_rows, SIM_BUDGET // max(k, 1)))


def assign_block(src, start, stop, centroids_t, assign_fn, chunk_rows, invalid):
    """``(idx int64, sim float32)`` of rows ``[start, stop)``: nearest centroid and its cosine (−1 / NaN invalid)."""
    idx = np.empty(stop - start, np.int64)
    sim = np.empty(stop - start, np.float32)
    step = chunk_for(len(centroids_t), chunk_rows)
    for lo in range(start, stop, step):
        hi = min(stop, lo + step)
        x, valid = normalize_rows(src.read(lo, hi))
        if not valid.all() and invalid == "error":
            raise invalid_error(np.flatnonzero(~valid) + lo)
        s, i = assign_fn(torch.from_numpy(x), centroids_t)
        s, i = to_numpy(s).astype(np.float32), to_numpy(i).astype(np.int64)
        idx[lo - start : hi - start] = np.where(valid, i, -1)
        sim[lo - start : hi - start] = np.where(valid, s, np.float32(np.nan))
    return idx, sim


def topk_centroids(x: torch.Tensor, c: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
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
