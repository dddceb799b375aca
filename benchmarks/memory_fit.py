"""The largest batch that fits: a memory model total = c0 + c1·B + c2·B² fitted to measured peaks, solved for a limit
(``bench_train_step.py``'s "fits in 24 GB" column)."""

from __future__ import annotations

import math

import numpy as np

from benchmarks._harness import MB

LIMIT_MB = 24e9 / MB  # "fits in 24 GB": 24e9 bytes


def fit_memory(batches, totals_mb) -> tuple[float, float, float]:
    """Least squares c0 + c1·B + c2·B² (c2 and c1 kept ≥ 0: memory does not shrink with B)."""
    x = np.asarray(batches, dtype=np.float64)
    y = np.asarray(totals_mb, dtype=np.float64)
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) >= 3:
        c = np.linalg.lstsq(np.stack([np.ones_like(x), x, x * x], 1), y, rcond=None)[0]
        if c[2] >= 0 and c[1] >= 0:
            return float(c[0]), float(c[1]), float(c[2])
    if len(x) >= 2:
        c = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)[0]
        if c[1] >= 0:
            return float(c[0]), float(c[1]), 0.0
    return float(np.max(y)) if len(y) else float("nan"), 0.0, 0.0


def predict_mb(c: tuple[float, float, float], batch: float) -> float:
    return c[0] + c[1] * batch + c[2] * batch * batch


def solve_batch(c: tuple[float, float, float], limit_mb: float = LIMIT_MB) -> float:
    """The largest B with predict_mb(c, B) ≤ limit_mb (real, not rounded)."""
    c0, c1, c2 = c
    if c2 > 0:
        return (-c1 + math.sqrt(c1 * c1 + 4 * c2 * (limit_mb - c0))) / (2 * c2)
    return (limit_mb - c0) / c1 if c1 > 0 else math.inf


def _lstsq(x, y, degree: int) -> tuple[float, float, float] | None:
    """c0 + c1·B (+ c2·B²) by least squares, or None when a coefficient comes out negative."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    cols = [np.ones_like(x), x] + ([x * x] if degree == 2 else [])
    c = np.linalg.lstsq(np.stack(cols, 1), y, rcond=None)[0]
    if c[1] < 0 or (degree == 2 and c[2] < 0):
        return None
    return float(c[0]), float(c[1]), float(c[2]) if degree == 2 else 0.0


def fit_candidates(batches, totals_mb) -> list[dict]:
    """Every model of the series' tails: linear on its largest k ≥ 2 points, quadratic on its largest k ≥ 3.

    Why tails: in the first step of a fresh process AdamW creates its state, so at small B the peak is the
    optimiser's (the same for every B) and the batch-dependent peak only shows past a knee."""
    pts = sorted((b, y) for b, y in zip(batches, totals_mb) if math.isfinite(y))
    out = []
    for start in range(len(pts) - 1):
        x, y = [b for b, _ in pts[start:]], [v for _, v in pts[start:]]
        for degree in (1, 2):
            if len(x) < degree + 1:
                continue
            c = _lstsq(x, y, degree)
            if c is not None:
                out.append({"model": ("linear", "quadratic")[degree - 1], "points": x, "c": c})
    return out


def choose_fit(batches, totals_mb, verified: tuple[int, float] | None = None) -> dict:
    """The memory model of the largest batch: ``{"model", "points", "c", "series_c", "series_points", "error_pct"}``.

    Without a verified point: the quadratic on every point (c1, c2 ≥ 0), else the line (``fit_memory``). With one:
    of every tail model of the series (``fit_candidates``), the one that predicted the verified point best (ties:
    more points), refitted with that point included; ``error_pct`` is that model's error at the point."""
    if verified is None or not math.isfinite(verified[1]):
        c = fit_memory(batches, totals_mb)
        return {"model": "quadratic" if c[2] > 0 else "linear", "points": sorted(batches), "c": c,
                "series_c": c, "series_points": sorted(batches), "error_pct": None}  # fmt: skip
    b_v, y_v = verified
    cands = fit_candidates(batches, totals_mb)
    if not cands:
        return choose_fit(batches, totals_mb)
    best = min(cands, key=lambda k: (round(abs(predict_mb(k["c"], b_v) - y_v) / y_v, 3), -len(k["points"])))
    pts = [*best["points"], b_v]
    ys = [y for b, y in sorted(zip(batches, totals_mb)) if b in best["points"]] + [y_v]
    degree = 2 if best["model"] == "quadratic" else 1
    c = _lstsq(pts, ys, degree) or _lstsq(pts, ys, 1) or best["c"]
    err = 100 * (y_v - predict_mb(best["c"], b_v)) / predict_mb(best["c"], b_v)
    return {"model": best["model"] if c[2] > 0 or degree == 1 else "linear", "points": pts, "c": c,
            "series_c": best["c"], "series_points": best["points"], "error_pct": err}  # fmt: skip


def fit_txt(c) -> str:
    """The model as the CSV note writes it."""
    return f"{c[0]:.4g} + {c[1]:.4g}*B + {c[2]:.4g}*B^2 MB"
