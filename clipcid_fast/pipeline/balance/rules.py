"""The per-cluster rules (stage 4 of ``run_balance``): what one cluster's ordered rows keep.

* ``method="semdedup"``: one pass per cluster with ``max_sim_fn(x) -> (M, idx)``,
  ``M_j = max_{i<j} cos(x_i, x_j)`` over the ordered rows (default: the fused op's
  ``masked_max_similarity`` if it imports, else ``reference.masked_max_similarity``). Row j is removed
  for threshold eps when ``M_j > 1 − eps`` (compared in float32, exactly as ``reference.semdedup_keep``),
  so every eps comes from the same pass; earlier rows count whether kept or not (SemDeDup's rule).
* ``method="unionfind"`` (CLIP-CID's variant; a reconstruction): rows i, j
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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .functions import to_numpy


def semdedup_pass(x: np.ndarray, rows: np.ndarray, max_sim_fn) -> tuple[np.ndarray, np.ndarray]:
    """``(M float32, nearest earlier global row int64, −1 none)`` of one cluster's ordered rows ``x``."""
    m, i = max_sim_fn(torch.from_numpy(x))
    m, i = to_numpy(m).astype(np.float32), to_numpy(i).astype(np.int64)
    return m, np.where(i >= 0, rows[np.maximum(i, 0)], -1)


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
            vals = to_numpy(s[ii, jj])
            ii, jj = to_numpy(ii) + i0, to_numpy(jj) + j0
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


def unionfind_representatives(x: np.ndarray, rows: np.ndarray, cos_thresholds: Sequence[float], tile: int):
    """``[T, c]`` int64: per threshold, the global row of each member's group representative."""
    roots = unionfind_groups(x, cos_thresholds, tile)
    return np.stack([group_representatives(x, r, rows) for r in roots])
