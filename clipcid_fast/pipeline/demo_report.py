"""The demo's report: report.json, report.md (the table), loss_curves.png and accuracy.png.

Every number here is read from a stage's own files (eval JSONs, train summaries and metrics.jsonl), so
the report of a rerun that reused every stage is the same, but for the stage timings of that rerun.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ._io import atomic_bytes, atomic_json

METRICS = {
    "zeroshot_top1": "zero-shot top-1",
    "retrieval_i2t_r1": "retrieval R@1 (image→text)",
    "linear_probe_top1": "linear probe top-1",
}


def headline(result: dict) -> dict:
    """The report's three numbers from an eval result: zero-shot top-1, image→text R@1, linear-probe top-1."""
    return {
        "zeroshot_top1": result["zeroshot"]["top1"],
        "retrieval_i2t_r1": result["retrieval"]["image_to_text_R@1"],
        "linear_probe_top1": result["linear_probe"]["top1"],
    }


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    arr = np.asarray(list(values), dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)


def build_report(cfg, regime, recipes, runs, evals, teacher_training, balance_summary, cluster_meta, clock) -> dict:
    rows = []
    for recipe in recipes:
        run = runs[recipe]
        rows.append({
            "recipe": recipe,
            **headline(evals[recipe]),
            "train_seconds": run.get("seconds_this_run"),
            "train_samples": run.get("train_samples"),
        })  # fmt: skip
    teacher = {"recipe": "teacher", **headline(evals["teacher"]),
               "train_seconds": (teacher_training or {}).get("seconds")}  # fmt: skip
    balance = None
    if balance_summary is not None:
        balance = {
            "k": balance_summary["k"],
            "n_rows": balance_summary["n_rows"],
            "eps": cfg.balance_eps,
            "removed_fraction": {f"{r['eps']:g}": r["removed_fraction"] for r in balance_summary["thresholds"]},
        }
    cluster = None
    if cluster_meta is not None:
        cluster = {k: cluster_meta[k] for k in ("n_classes", "n_labelled", "n_not_kept", "class_sizes")}
    return {
        "regime": regime,
        "rows": rows,
        "teacher": teacher,
        "balance": balance,
        "cluster": cluster,
        "stage_seconds_this_run": {k: round(v, 2) for k, v in clock.seconds.items()},
        "stage_reused": clock.reused,
    }


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _secs(v) -> str:
    return "—" if v is None else f"{v:.0f} s"


def regime_line(regime: dict) -> str:
    return (f"student corpus: {regime['student_samples']} images, caption noise {regime['caption_noise']:g}; "
            f"teacher: {regime['teacher_corpus']}; eval: {regime['eval']}; {regime['steps']} steps of "
            f"{regime['batch_size']}, seed {regime['seed']}")  # fmt: skip


def markdown_table(report: dict) -> str:
    """The recipes and the teacher: zero-shot, retrieval R@1, linear probe (in %) and train time."""
    head = "| recipe | " + " | ".join(f"{name} (%)" for name in METRICS.values()) + " | train time |"
    lines = [regime_line(report["regime"]), "", head, "|" + " --- |" * (len(METRICS) + 2)]
    for row in [*report["rows"], report["teacher"]]:
        cells = [_pct(row[m]) for m in METRICS]
        lines.append(f"| {row['recipe']} | " + " | ".join(cells) + f" | {_secs(row['train_seconds'])} |")
    bal = report.get("balance")
    if bal:
        fr = bal["removed_fraction"][f"{bal['eps']:g}"]
        n_classes = report["cluster"]["n_classes"]
        lines += ["", f"cid trains on the rows SemDeDup kept at eps={bal['eps']:g} (k={bal['k']}): "
                  f"{100 * fr:.1f} % of {bal['n_rows']} removed; {n_classes} pseudo-classes"]  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_bytes(path, buf.getvalue())


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


SMOOTH = 10  # steps in the running mean of the contrastive term (its batch-to-batch noise hides the trend)


def _running_mean(values: list[float], window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each step (fewer at the start), so the curve starts at step 1."""
    v = np.cumsum(np.asarray(values, dtype=np.float64))
    lo = np.maximum(np.arange(len(v)) - window, -1)
    prev = np.where(lo >= 0, v[np.maximum(lo, 0)], 0.0)
    return (v - prev) / (np.arange(len(v)) - lo)


def plot_loss_curves(curves: dict[str, list[dict]], path: str, title: str) -> None:
    """Per recipe: the total loss (log scale), the student's own contrastive term, the periodic zero-shot."""
    plt = _pyplot()
    # constrained layout and two-line titles: one-line titles ran into each other at this width
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), layout="constrained")
    for recipe, lines in curves.items():
        steps = [r["step"] for r in lines]
        axes[0].plot(steps, [r["loss"] for r in lines], label=recipe)
        task = [r.get("task_loss", r.get("contrastive_loss")) for r in lines]
        if task and all(t is not None for t in task):
            axes[1].plot(steps, _running_mean(task, SMOOTH), label=recipe)
        ev = [(r["step"], r["eval_zeroshot_top1"]) for r in lines if "eval_zeroshot_top1" in r]
        if ev:
            axes[2].plot(*zip(*ev), marker="o", label=recipe)
    axes[0].set(yscale="log", xlabel="step", ylabel="loss (sum of the recipe's terms)")
    axes[0].set_title("total loss", fontsize=10)
    axes[1].set(xlabel="step", ylabel="CLIP loss of the student")
    axes[1].set_title(f"the student's contrastive term\n(running mean of {SMOOTH} steps)", fontsize=10)
    axes[2].set(xlabel="step", ylabel="top-1")
    axes[2].set_title("zero-shot on held-out images\nduring training", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def plot_accuracy(panels: dict[str, tuple[dict, dict]], path: str, title: str) -> None:
    """One row of bars per panel (a regime): per metric one bar per recipe (mean, ± std where > 0), the teacher
    as a dashed line. ``panels``: name -> (``{recipe: {metric: (mean, std)}}``, ``{metric: teacher value}``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), len(METRICS), figsize=(5 * len(METRICS), 4.2 * len(panels)), squeeze=False)
    for row, (panel, (values, teacher)) in zip(axes, panels.items()):
        recipes = list(values)
        x = np.arange(len(recipes))
        for ax, (metric, name) in zip(row, METRICS.items()):
            means = [100 * values[r][metric][0] for r in recipes]
            stds = [100 * values[r][metric][1] for r in recipes]
            bars = ax.bar(x, means, yerr=stds if any(stds) else None, capsize=4, color="tab:blue", alpha=0.8)
            ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], fontsize=8, padding=2)
            if metric in teacher:
                t = 100 * teacher[metric]
                ax.axhline(t, color="tab:red", ls="--", label=f"teacher {t:.1f}")
                ax.legend(fontsize=8, loc="best")
            label = f"{panel}: {name}" if panel else name
            top = max([*(m + s for m, s in zip(means, stds)), 100 * teacher.get(metric, 0)])
            ax.set(xticks=x, xticklabels=recipes, ylabel=f"{name} (%)", title=label, ylim=(0, 1.12 * top))
            ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    plt.close(fig)


def write_report(report: dict, layout, recipes: list[str], seed: int) -> list[str]:
    """report.json, report.md, loss_curves.png, accuracy.png in ``layout.root``; returns their paths."""
    root = layout.root
    paths = {name: os.path.join(root, name) for name in ("report.json", "report.md", "loss_curves.png",
                                                         "accuracy.png")}  # fmt: skip
    report = {**report, "files": {k: os.path.abspath(v) for k, v in paths.items()}}
    atomic_json(paths["report.json"], report)
    atomic_bytes(paths["report.md"], (markdown_table(report) + "\n").encode())
    title = regime_line(report["regime"])
    curves = {r: read_metrics(os.path.join(layout.train(r, seed), "metrics.jsonl")) for r in recipes}
    plot_loss_curves(curves, paths["loss_curves.png"], title)
    values = {row["recipe"]: {m: (row[m], 0.0) for m in METRICS} for row in report["rows"]}
    plot_accuracy({"": (values, {m: report["teacher"][m] for m in METRICS})}, paths["accuracy.png"], title)
    return list(paths.values())
