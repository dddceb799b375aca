"""``run_cluster``: k-means of the kept embeddings into N pseudo-classes for the cluster-discrimination
loss; labels (and optionally the top-k centres) of every input row, streamed into memory-mapped outputs.
The file formats are in the package docstring ("Pseudo-classes")."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch

from .._io import atomic_json, atomic_npy, tmp_name
from .functions import resolve_fns, to_numpy
from .kmeans import SIM_BUDGET, chunk_for, spherical_kmeans, topk_centroids
from .sources import INVALID_POLICIES, EmbeddingSource, invalid_error, load_npy, normalize_rows


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
    """k-means of the kept rows into ``n_classes`` pseudo-classes; writes the files of the package docstring."""
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
        mask = np.asarray(load_npy(keep) if isinstance(keep, str) else keep)
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
    tmp_l = tmp_name(labels_path)
    labels = np.lib.format.open_memmap(tmp_l, mode="w+", dtype=np.int64, shape=(src.n,))
    if topk:
        tmp_k, tmp_ks = tmp_name(topk_path), tmp_name(topk_sim_path)
        tk = np.lib.format.open_memmap(tmp_k, mode="w+", dtype=np.int64, shape=(src.n, topk))
        tks = np.lib.format.open_memmap(tmp_ks, mode="w+", dtype=np.float32, shape=(src.n, topk))
    cent_t = torch.from_numpy(cent)
    step = chunk_for(n_classes, chunk_rows)
    n_bad = 0
    for lo in range(0, src.n, step):
        hi = min(src.n, lo + step)
        x, valid = normalize_rows(src.read(lo, hi))
        use = mask[lo:hi] & valid
        bad = mask[lo:hi] & ~valid
        if bad.any():
            if invalid == "error":
                raise invalid_error(np.flatnonzero(bad) + lo)
            n_bad += int(bad.sum())
        xt = torch.from_numpy(x)
        if topk:
            s, i = topk_centroids(xt, cent_t, topk, max(1, SIM_BUDGET // step))
            s, i = to_numpy(s), to_numpy(i).astype(np.int64)
            tk[lo:hi] = np.where(use[:, None], i, -1)
            tks[lo:hi] = np.where(use[:, None], s, np.float32(np.nan))
            labels[lo:hi] = np.where(use, i[:, 0], -1)
        else:
            _, i = assign_fn(xt, cent_t)
            labels[lo:hi] = np.where(use, to_numpy(i).astype(np.int64), -1)
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
    atomic_npy(p("centroids.npy"), cent)
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
    atomic_json(p("cluster.json"), meta)
    return meta
