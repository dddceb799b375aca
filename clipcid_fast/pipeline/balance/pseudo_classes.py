"""``run_cluster``: k-means of the kept embeddings into N pseudo-classes for the cluster-discrimination
loss; labels (and optionally the top-k centres) of every input row, streamed into memory-mapped outputs.
The file formats are in the package docstring ("Pseudo-classes"); ``load_pseudo_classes`` reads them back."""

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


def pseudo_class_paths(out_dir: str) -> tuple[str, str]:
    """(labels.npy, centroids.npy) of a ``run_cluster`` output directory."""
    return os.path.join(out_dir, "labels.npy"), os.path.join(out_dir, "centroids.npy")


def load_pseudo_classes(out_dir: str, image) -> tuple[np.ndarray, str]:
    """(labels [n] int64, centroids path) of the ``run_cluster`` output ``out_dir``, checked against the image
    embeddings ``image`` [n, D] it must have been clustered from (one ValueError line otherwise): the row count,
    the width, every label in ``[-1, N)``, every centre finite and non-zero, and the labels those of the nearest
    centres (``check_labels_fit``)."""
    labels_path, cent_path = pseudo_class_paths(out_dir)
    for p in (labels_path, cent_path):
        if not os.path.isfile(p):
            raise ValueError(f"--cluster-dir {out_dir!r}: {os.path.basename(p)} is missing")
    labels = np.load(labels_path)
    n = len(image)
    if labels.shape != (n,):
        raise ValueError(
            f"--cluster-dir {out_dir!r}: labels.npy has {labels.shape[0]} rows, the teacher cache {n}: "
            "it was clustered from other embeddings"
        )
    check_labels_fit(out_dir, image, labels, cent_path)
    return labels, cent_path


def load_pseudo_topk(out_dir: str, labels: np.ndarray, k: int) -> np.ndarray:
    """Each row's ``k`` nearest centres, ``[n, k]`` int64 (−1 on rows without a label), from ``topk.npy`` of the
    ``run_cluster`` output ``out_dir`` whose ``labels.npy`` gave ``labels`` (``load_pseudo_classes``): written by
    ``--topk K`` with ``K >= k``, its first column the labels (one ValueError line otherwise)."""
    path = os.path.join(out_dir, "topk.npy")
    if not os.path.isfile(path):
        raise ValueError(
            f"--cd-topk {k}: --cluster-dir {out_dir!r} has no topk.npy; rerun clipcid-fast cluster with --topk {k}"
        )
    tk = np.load(path, mmap_mode="r")
    if tk.ndim != 2 or tk.shape[0] != labels.shape[0] or tk.shape[1] < k:
        raise ValueError(
            f"--cd-topk {k}: {path} is {tk.shape}, expected [{labels.shape[0]}, >= {k}]; "
            f"rerun clipcid-fast cluster with --topk {k}"
        )
    out = np.array(tk[:, :k], dtype=np.int64)  # a copy: the memory map is read-only (and k may be all of it)
    out[labels < 0] = -1  # rows without a label (not kept, invalid) have no positive either
    if not np.array_equal(out[:, 0], labels):
        row = int(np.flatnonzero(out[:, 0] != labels)[0])
        raise ValueError(f"--cd-topk {k}: {path} row {row} starts with {out[row, 0]}, labels.npy says {labels[row]}")
    return out


def check_labels_fit(cluster_dir: str, image, labels: np.ndarray, cent_path: str, sample: int = 1024) -> None:
    """labels.npy and centroids.npy do not say which embeddings they came from, and a cluster run of another cache
    with the same row count (another teacher, or another corpus of that size) fits every shape check: it trained
    silently on wrong pseudo-classes. ``run_cluster`` labels every row with its nearest centroid, so on up to
    ``sample`` labelled rows of these embeddings (evenly spaced) most labels must be the nearest centroid; the cut
    (90 %) leaves room for near-ties, other embeddings agree by chance (~1/N)."""
    cent = np.load(cent_path, mmap_mode="r")
    dim = image.shape[1]
    if cent.ndim != 2 or cent.shape[1] != dim:
        raise ValueError(
            f"--cluster-dir {cluster_dir!r}: centroids.npy is {cent.shape}, the teacher cache's D is {dim}"
        )
    # the values, once, as they enter: the cluster loss does not scan them every step (check_values=False)
    bad = np.flatnonzero((labels < -1) | (labels >= cent.shape[0]))
    if bad.size:
        raise ValueError(
            f"--cluster-dir {cluster_dir!r}: labels.npy row {bad[0]} is {labels[bad[0]]}, outside [-1, "
            f"{cent.shape[0]}) (centroids.npy has {cent.shape[0]} rows)"
        )
    for s in range(0, cent.shape[0], 65536):
        block = np.asarray(cent[s : s + 65536], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1)
        broken = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if broken.size:
            raise ValueError(
                f"--cluster-dir {cluster_dir!r}: centroids.npy row {s + broken[0]} is not finite or has zero norm"
            )
    rows = np.flatnonzero(labels >= 0)
    if rows.size == 0:
        return
    rows = rows[np.linspace(0, rows.size - 1, min(sample, rows.size)).round().astype(np.int64)]
    c = np.asarray(cent, dtype=np.float32)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)  # cosine, as run_cluster assigns
    nearest = (np.asarray(image[rows], dtype=np.float32) @ c.T).argmax(axis=1)
    agree = float(np.mean(nearest == labels[rows]))
    if agree < 0.9:
        raise ValueError(
            f"--cluster-dir {cluster_dir!r}: labels.npy does not match the teacher cache (only {agree:.0%} of "
            f"{rows.size} sampled rows carry their nearest centroid's label): it was clustered from other embeddings"
        )
