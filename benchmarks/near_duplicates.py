"""What dedup removes from a Fashion-MNIST corpus, and how many true near-duplicates the corpus has to remove.

``profile(corpus, balance_dir, eps_list)``: in mean-centred pixel space (raw pixels are non-negative, so their
cosines are all high: centring leaves the shape), each row's nearest other row of the corpus, and, per eps of
the balance run, the rows its mask removed against the row each was matched to (``nearest_earlier.npy``: the
earlier row of its cluster it was most similar to): how often they share the true class, their pixel cosine, and
the true classes of the removed rows. ``data_efficiency.py`` prints it beside its table: a corpus with few pixel
near-duplicates gives dedup nothing but similar, distinct images to remove.
"""

from __future__ import annotations

import os

import numpy as np

from clipcid_fast.pipeline.data.fashion_mnist import CLASS_NAMES

NEAR = (0.95, 0.98)
"""Centred pixel cosines counted as near-duplicates (reported at both thresholds)."""


def centred_pixels(corpus) -> np.ndarray:
    """[n, 784] float32: the corpus's images, mean image subtracted, rows unit-norm."""
    x = corpus.images[corpus.ids].reshape(len(corpus.ids), -1).astype(np.float32)
    x -= x.mean(0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nearest_other(x: np.ndarray, block: int = 2000) -> np.ndarray:
    """Each row's highest cosine to another row (blocked: a [block, n] similarity at a time)."""
    best = np.empty(len(x), np.float32)
    for i in range(0, len(x), block):
        s = x[i : i + block] @ x.T
        s[np.arange(len(s)), np.arange(i, i + len(s))] = -np.inf
        best[i : i + block] = s.max(1)
    return best


def profile(corpus, balance_dir: str, eps_list: list[float]) -> dict:
    from clipcid_fast.pipeline.balance import keep_mask_path

    x = centred_pixels(corpus)
    best = nearest_other(x)
    labels = np.asarray(corpus.labels)
    matched = np.load(os.path.join(balance_dir, "nearest_earlier.npy"))
    out = {"rows": len(x), "nearest_other_quantiles": {q: float(np.quantile(best, q)) for q in (0.5, 0.9, 0.99)},
           "rows_with_a_near_duplicate": {c: int((best >= c).sum()) for c in NEAR}, "eps": {}}  # fmt: skip
    for eps in eps_list:
        removed = ~np.load(keep_mask_path(balance_dir, eps))
        pair = matched[removed]
        cos = (x[removed] * x[pair]).sum(1)
        by_class = np.bincount(labels[removed], minlength=labels.max() + 1) / max(int(removed.sum()), 1)
        out["eps"][eps] = {"removed": int(removed.sum()), "same_class": float((labels[removed] == labels[pair]).mean()),
                           "pixel_cos_median": float(np.median(cos)), "pixel_cos_ge_0.95": float((cos >= 0.95).mean()),
                           "removed_by_class": [round(float(v), 3) for v in by_class]}  # fmt: skip
    return out


def lines(p: dict) -> list[str]:
    q = p["nearest_other_quantiles"]
    near = p["rows_with_a_near_duplicate"]
    out = [f"near-duplicates in the corpus (centred pixel cosine to the nearest other image): median {q[0.5]:.3f}, "
           f"90 % {q[0.9]:.3f}, 99 % {q[0.99]:.3f}; rows with one >= 0.95: {near[0.95]} of {p['rows']}, "
           f">= 0.98: {near[0.98]}"]  # fmt: skip
    for eps, e in p["eps"].items():
        top = np.argsort(e["removed_by_class"])[::-1][:3]
        shares = ", ".join(f"{CLASS_NAMES[c]} {e['removed_by_class'][c]:.0%}" for c in top)
        out.append(f"eps {eps:g} removes {e['removed']} rows: same true class as its matched row "
                   f"{e['same_class']:.1%}, pixel cosine to it median {e['pixel_cos_median']:.3f} "
                   f"(>= 0.95: {e['pixel_cos_ge_0.95']:.1%}); "
                   f"most removed: {shares}")  # fmt: skip
    return out
