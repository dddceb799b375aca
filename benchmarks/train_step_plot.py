"""The plot of ``bench_train_step.py``'s CSV rows: per pair, distill samples/s against B by provider, every recipe at
one B, and the memory series with its fit and its 24 GB crossing."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from benchmarks._harness import latest_rows, read_rows
from benchmarks.memory_fit import LIMIT_MB

PROVIDERS = ("fused", "reference", "open_clip_train")
# (a) with the student's switches (--grad-checkpointing, --torchcompile): asked for by name, not in the default set
SWITCHED = ("fused+gc", "fused+compile")
PROVIDER_LETTER = {"fused": "a", "reference": "b", "open_clip_train": "c", "fused+gc": "a+gc",
                   "fused+compile": "a+compile"}  # fmt: skip
RECIPES = ("distill", "baseline", "kd", "rd", "cid", "cid+rd")  # the order of the benchmark's rows, tables and bars


def parse_note(note: str) -> dict:
    """A CSV note ``k=v; k=v`` as a dict."""
    out = {}
    for part in note.split("; "):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip()] = v
    return out


def number(x) -> float:
    """``float(x)``, NaN for what is not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def make_plot(csv_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Per pair: distill samples/s against B for (a), (b), (c); every recipe's samples/s (and loss share) at one B;
    the memory series, the fit and its 24 GB crossing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path) if r["op"].startswith("train_step_")]
    rows = latest_rows(rows, ("op", "provider", "mode", "x_name", "x_value"))
    known = ["train_step_default", "train_step_vit"]
    ops = sorted({r["op"] for r in rows}, key=lambda o: (known.index(o) if o in known else 9, o))
    fig, axes = plt.subplots(len(ops), 3, figsize=(18, 4.8 * len(ops)), squeeze=False, constrained_layout=True,
                             gridspec_kw={"width_ratios": [1, 1, 1.1]})  # fmt: skip
    for i, op in enumerate(ops):
        steps = [r for r in rows if r["op"] == op and r["mode"] == "step"]
        _plot_distill(axes[i][0], op, steps)
        _plot_recipes(axes[i][1], op, steps)
        _plot_memory(axes[i][2], op, [r for r in rows if r["op"] == op and r["mode"] in ("memory", "max_batch")])
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


COLORS = {"fused": "tab:green", "reference": "tab:orange", "open_clip_train": "tab:red"}


def _label(base: str) -> str:
    return f"({PROVIDER_LETTER.get(base, '?')}) {base}"


def _plot_distill(ax, op: str, steps: list[dict]) -> None:
    for base in PROVIDERS:
        rs = sorted([r for r in steps if r["provider"] == f"{base}:distill"], key=lambda r: number(r["x_value"]))
        if not rs:
            continue
        x = [number(r["x_value"]) for r in rs]
        y = [number(parse_note(r["note"]).get("samples_s")) for r in rs]
        lo = [1000 * xi / number(r["p80_ms"]) for xi, r in zip(x, rs)]
        hi = [1000 * xi / number(r["p20_ms"]) for xi, r in zip(x, rs)]
        (line,) = ax.plot(x, y, "-o", color=COLORS[base], label=_label(base))
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        for xi, yi in zip(x, y):
            ax.annotate(f"{yi:,.1f}" if yi < 100 else f"{yi:,.0f}", (xi, yi), textcoords="offset points",
                        xytext=(4, 5), fontsize=7, color=line.get_color())  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch B")
    ax.set_ylabel("samples / s (from p50; band p20–p80)")
    dev = sorted({r["device"] for r in steps}) or ["?"]
    thr = sorted({r["threads"] for r in steps})
    ax.set_title(f"{op.removeprefix('train_step_')}: distill step, samples/s — {', '.join(dev)}, "
                 f"{'/'.join(thr)} thread(s)", fontsize=9)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_recipes(ax, op: str, steps: list[dict]) -> None:
    others = [r for r in steps if not r["provider"].endswith(":distill")]
    if not others:
        ax.set_axis_off()
        return
    counts: dict = {}
    for r in others:
        counts[r["x_value"]] = counts.get(r["x_value"], 0) + 1
    batch = max(counts, key=lambda b: (counts[b], number(b)))
    at = {r["provider"]: r for r in steps if r["x_value"] == batch}
    recipes = [rc for rc in RECIPES if any(p.endswith(f":{rc}") for p in at)]
    width = 0.8 / len(PROVIDERS)
    for j, base in enumerate(PROVIDERS):
        for k, recipe in enumerate(recipes):
            r = at.get(f"{base}:{recipe}")
            if r is None:
                continue
            n = parse_note(r["note"])
            y = number(n.get("samples_s"))
            xk = k + (j - 1) * width
            ax.bar(xk, y, width, color=COLORS[base], label=_label(base) if k == recipes.index(
                next(rc for rc in recipes if f"{base}:{rc}" in at)) else None)  # fmt: skip
            value = f"{y:,.0f}" if y >= 10 else f"{y:.2f}"
            ax.text(xk, y, f"{value}\n{100 * number(n.get('loss_share')):.0f} %", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(recipes)))
    ax.set_xticklabels(recipes)
    ax.set_ylabel("samples / s (p50); above each bar: the loss's share of the step")
    ax.set_title(f"{op.removeprefix('train_step_')}: every recipe at B = {batch}", fontsize=9)
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_memory(ax, op: str, mems: list[dict]) -> None:
    for prov in sorted({r["provider"] for r in mems}):
        base = prov.split(":")[0]
        col = COLORS.get(base, "k")
        series = sorted([r for r in mems if r["provider"] == prov and r["mode"] == "memory"],
                        key=lambda r: number(r["x_value"]))  # fmt: skip
        x = [number(r["x_value"]) for r in series]
        y = [number(r["peak_mb"]) for r in series]
        micro = parse_note(series[0]["note"]).get("micro_batch") if series else None
        how = f"accumulation, micro-batch {micro}" if base == "fused" else "accum_freq 1"
        ax.plot(x, y, "o", color=col, label=f"{_label(base)}, {how} (measured)")
        pred = [r for r in mems if r["provider"] == prov and r["x_name"] == "B_pred"]
        ver = [r for r in mems if r["provider"] == prov and r["x_name"] == "B_verified"]
        for r in ver:
            ax.plot([number(r["x_value"])], [number(r["peak_mb"])], "D", ms=8, mfc="none", color=col)
            xy = (number(r["x_value"]), number(r["peak_mb"]))
            ax.annotate(f"verified B={r['x_value']}: {xy[1]:,.0f} MB", xy, textcoords="offset points", xytext=(6, -12),
                        fontsize=7, color=col)  # fmt: skip
        if not pred:
            continue
        fit = parse_note(pred[-1]["note"]).get("fit", "")
        try:
            c = [float(t.split("*")[0]) for t in fit.replace(" MB", "").split(" + ")]
        except ValueError:
            c = []
        b_pred = number(pred[-1]["x_value"])
        fit_points = [number(v) for v in parse_note(pred[-1]["note"]).get("fit_points", "").split(",") if v]
        lo = min(fit_points) if fit_points else min(x, default=float("nan"))
        if len(c) == 3 and math.isfinite(lo):  # the model over the points it was fitted on, up to 24 GB
            xs = np.geomspace(lo, b_pred if math.isfinite(b_pred) else lo * 64, 200)
            ax.plot(xs, c[0] + c[1] * xs + c[2] * xs * xs, "-", color=col, alpha=0.6)
        if math.isfinite(b_pred):
            ax.plot([b_pred], [LIMIT_MB], "*", ms=14, color=col)
            ax.annotate(f"B ≈ {b_pred:,.0f}", (b_pred, LIMIT_MB), textcoords="offset points", xytext=(-40, 8),
                        fontsize=8, color=col)  # fmt: skip
    ax.axhline(LIMIT_MB, color="k", ls="--", lw=0.8)
    ax.text(0.01, 0.97, "24 GB", transform=ax.transAxes, va="top", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch B")
    ax.set_ylabel("total memory of one step (MB, peak RSS)")
    ax.set_title(f"{op.removeprefix('train_step_')}: memory of one distill step, fit c0 + c1·B + c2·B², "
                 "largest batch in 24 GB (★)", fontsize=9)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
