"""The run directory of ``run_balance``: the manifest that makes a rerun resume (or refuse), the finished
work a resumed run skips, and the merge of the per-cluster batches into the outputs (plus the plot).

Every file is written to a temporary name and moved into place (``.._io``). The manifest holds the run's
fingerprint: the input's shapes, dtypes and sizes and the parameters that change results. The eps list is
not part of it for ``semdedup`` (the batches store ``M``), so new thresholds only redo the merge; the delta
list is (the batches store representatives per delta).
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os

import numpy as np

from .._io import atomic_bytes, atomic_json, atomic_npy, clean_tmp


def run_manifest(src, plan, k, niter, seed, mppc, keep, invalid, c_given) -> dict:
    """What ``manifest.json`` must hold for a rerun in the same directory to count as the same run."""
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
    return {"version": 1, "input": src.fingerprint(), "params": params}


def prepare_run_dir(out: str, parts_dir: str, batch_dir: str, manifest: dict) -> None:
    """Create the directories, drop a killed run's temporaries, and write the manifest, or check that the
    one there is this run's (a ValueError otherwise: resuming it would mix two runs' results)."""
    os.makedirs(parts_dir, exist_ok=True)
    os.makedirs(batch_dir, exist_ok=True)
    clean_tmp(out, parts_dir, batch_dir)
    path = os.path.join(out, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != manifest:
            raise ValueError(
                f"{out} holds a different run (manifest.json differs: was {old}, now {manifest}); "
                "use a new output directory"
            )
    else:
        atomic_json(path, manifest)


def load_timings(out: str) -> dict:
    """The stage timings of an earlier run in ``out`` (a resumed run adds to them), else ``{}``."""
    path = os.path.join(out, "timings.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def finished_clusters(batch_dir: str) -> set[int]:
    """The clusters whose batch files are already written (by any rank, in any batch size)."""
    done = set()
    for f in glob.glob(os.path.join(batch_dir, "batch_c*.npz")):
        with np.load(f) as z:
            done.update(z["clusters"].tolist())
    return done


def _label(kind: str, t: float) -> str:
    """The threshold's part of a file name: ``eps0.05``, ``delta0.3``."""
    return f"{kind}{t:g}"


def keep_mask_path(out_dir: str, eps: float) -> str:
    """The keep mask ``run_balance`` writes in ``out_dir`` for threshold ``eps`` (semdedup)."""
    return os.path.join(out_dir, f"keep_{_label('eps', eps)}.npy")


def find_keep_mask(out_dir: str, threshold: float) -> str:
    """The keep mask of ``threshold`` in the balance output ``out_dir``: SemDeDup's ``keep_eps<t>.npy`` or the
    union-find method's ``keep_delta<t>.npy``, whichever the run wrote (a ValueError naming what the folder
    holds when neither or both are there)."""
    paths = (keep_mask_path(out_dir, threshold), os.path.join(out_dir, f"keep_{_label('delta', threshold)}.npy"))
    found = [p for p in paths if os.path.isfile(p)]
    if len(found) == 1:
        return found[0]
    have = sorted(f for f in os.listdir(out_dir) if f.startswith("keep_")) if os.path.isdir(out_dir) else []
    if not found:
        raise ValueError(
            f"--balance-dir: no keep_eps{threshold:g}.npy or keep_delta{threshold:g}.npy in {out_dir!r} (has {have})"
        )
    raise ValueError(f"--balance-dir: {out_dir!r} holds both {[os.path.basename(p) for p in found]}; "
                     "--balance-eps cannot tell which to use (one balance run per folder)")  # fmt: skip


def load_keep_mask(out_dir: str, threshold: float, n_rows: int) -> np.ndarray:
    """The bool ``[n_rows]`` keep mask of ``threshold`` (SemDeDup's eps or union-find's delta,
    :func:`find_keep_mask`) in the balance output ``out_dir``, checked to cover the ``n_rows`` rows of the
    embeddings it is applied to (a ValueError naming the file otherwise)."""
    mask_path = find_keep_mask(out_dir, threshold)
    keep = np.load(mask_path)
    if keep.shape != (n_rows,):
        raise ValueError(f"--balance-dir: {mask_path} has {keep.shape[0]} rows, the teacher cache {n_rows}")
    return keep


def merge_outputs(plan, src, ids_arr, out, k, keep, offsets, order_arr, fn_names, plot) -> dict:
    """Stage 5 (rank 0): every batch into the per-row outputs, the keep masks and ids per threshold,
    ``clusters.csv``, ``summary.json`` and the plot; returns the summary."""
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
        atomic_npy(p("max_sim.npy"), m_row)
        atomic_npy(p("nearest_earlier.npy"), nn_row)
        keeps = [valid & ~(m_row > (np.float32(1) - np.float32(e))) for e in plan.thresholds]
    else:
        keeps = []
        for t, d in enumerate(plan.thresholds):
            atomic_npy(p(f"rep_{_label('delta', d)}.npy"), rep_row[t])
            keeps.append(valid & (rep_row[t] == np.arange(n)))
    atomic_npy(p("invalid_rows.npy"), np.flatnonzero(~valid).astype(np.int64))

    sizes = np.bincount(assign[valid], minlength=k)
    sim_sum = np.bincount(assign[valid], weights=sim[valid].astype(np.float64), minlength=k)
    n_valid, n_invalid = int(valid.sum()), int(n - valid.sum())
    rows_out, per_t = [], []
    for thr, kp in zip(plan.thresholds, keeps):
        lab = _label(plan.kind, thr)
        atomic_npy(p(f"keep_{lab}.npy"), kp)
        atomic_npy(p(f"kept_ids_{lab}.npy"), ids_arr[kp])
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
    atomic_bytes(p("clusters.csv"), buf.getvalue().encode())

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
    atomic_json(p("summary.json"), summary)
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
    atomic_bytes(path, buf.getvalue())
