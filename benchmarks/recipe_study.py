"""Recipe study: any set of recipes and flag variants over seeds, with paired (same-seed) differences.

    .venv/bin/python benchmarks/recipe_study.py --seeds 0 1 2 3 4 \\
        --variant baseline --variant kd --variant rd \\
        --variant cid:cd_margin=0.5,centre_lr_mult=3 --variant cid:cd_margin=0.2,centre_lr_mult=0

The successor of ``bench_recipes.py`` for claims that rank recipes: it runs the same stages (the demo's embed,
balance, cluster, train, eval, on the same regimes and sizes; ``bench_recipes.regime_config``) for every
``--variant`` (syntax: ``study_variants.py``; ``--recipes`` adds plain recipes) and every seed, and reports
per variant and metric the mean ± standard error over the seeds, the paired difference from ``baseline`` and
from the best variant of another recipe (same seeds; ``paired_stats.py``), with its standard error and t.

Same seed, same student initialisation and data order in every variant: the seed is the trainer's, the corpus
and its order are the regime's; a variant that trains on other rows (cid on the rows dedup kept, or another
dedup setting) draws its batches from those rows with the same seeded generator.

Runs live under ``--out-dir/<regime>/train/steps<S>-b<B>/<recipe>-<digest>/`` (the digest of the variant's
resolved settings, ``Variant.run_key``): a rerun reuses every finished run and evaluation, so a study can be
stopped and extended (more seeds, more variants). Seeds are the outer loop, so a stopped study has every
variant on the same seeds.

Outputs: long-format rows appended to ``--csv`` (``benchmarks/results/recipe_study.csv``; one row per variant ×
seed × metric with ``stat = value``, and per variant × metric ``mean``, ``se``, ``diff`` / ``diff_se`` /
``diff_t`` against ``versus``: baseline, the best other recipe, and ``--versus``), the plot ``--plot``
(paired difference from baseline ± 2 SE per variant and metric), and markdown tables on stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import dataclasses
import datetime as _dt
import math
import os
import time

import torch

from benchmarks._harness import device_name, git_sha, save_figure
from benchmarks.bench_recipes import REGIMES, _version, add_size_args, regime_config
from benchmarks.paired_stats import best_other, paired, summarize, t_value
from benchmarks.study_variants import Variant, parse_variant, parse_variants
from clipcid_fast.pipeline import demo
from clipcid_fast.pipeline.demo_report import METRICS, headline

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"

COLUMNS = (
    "variant", "recipe", "regime", "seed", "stat", "metric", "value", "n_seeds", "versus", "steps", "batch",
    "student_samples", "caption_noise", "balance_eps", "balance_keep", "n_classes", "run_key", "train_seconds",
    "device", "threads", "torch", "clipcid_fast", "git_sha", "timestamp",
)  # fmt: skip
"""The CSV columns of ``recipe_study.csv``, in this order."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], metavar="RECIPE[:KEY=VALUE,...]",
                   help="a recipe with settings (repeatable; study_variants.py)")  # fmt: skip
    p.add_argument("--recipes", default="", help="comma-separated plain recipes, added before the variants")
    p.add_argument("--regimes", nargs="+", default=["noisy"], choices=REGIMES, help="default: noisy (the demo's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="training seeds (default 0-4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: timings comparable)")
    add_size_args(p)  # the sizes bench_recipes.regime_config reads, at the demo's values
    p.add_argument("--out-dir", default="runs/study", help="run directories (reused by a rerun)")
    p.add_argument("--teacher-cache-dir", default=None,
                   help="the default teacher's weight cache (default ~/.cache/clipcid_fast); a private copy "
                        "keeps a study's teacher fixed while other jobs retrain the shared one")  # fmt: skip
    p.add_argument("--csv", type=Path, default=RESULTS / "recipe_study.csv")
    p.add_argument("--plot", type=Path, default=RESULTS / "recipe_study.png")
    p.add_argument("--versus", default=None, metavar="VARIANT",
                   help="also the paired difference of every variant from this one (one of the variants)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the variants and their run folders, run nothing")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    specs = [r for r in args.recipes.split(",") if r.strip()] + args.variant
    if not specs:
        p.error("give at least one --variant or --recipes")
    try:
        args.variants = parse_variants(specs)
        if args.versus is not None:
            args.versus = parse_variant(args.versus).label
    except ValueError as e:
        p.error(str(e))
    if args.versus is not None and args.versus not in [v.label for v in args.variants]:
        p.error(f"--versus {args.versus!r} is not one of the variants")
    return args


def _stage_union(variants: list[Variant], cfg) -> list[float]:
    """Every eps the variants train on, in one grid: balance runs once per keep rule, not once per eps."""
    eps = {float(v.config(cfg).balance_eps) for v in variants if demo.TABLE[v.recipe].labels}
    return sorted(set(map(float, cfg.balance_eps_grid)) | eps)


def run_regime(cfg, variants: list[Variant], seeds: list[int]) -> dict:
    """{(label, seed): {metric: value, "train_seconds": s}}, plus "teacher" and each variant's run key."""
    tag = f"steps{cfg.steps}-b{cfg.batch_size}"
    root = demo.Layout(cfg.out_dir, run_tag=tag)
    teacher = demo.Teacher(cfg)
    print(f"\n=== {cfg.out_dir}: embed", flush=True)
    demo.embed_stage(cfg, root, teacher)
    cfg = dataclasses.replace(cfg, balance_eps_grid=_stage_union(variants, cfg))
    vcfg = {v.label: v.config(cfg) for v in variants}
    keys = {v.label: v.run_key(cfg) for v in variants}
    for v in variants:
        if demo.TABLE[v.recipe].labels:
            demo.balance_stage(vcfg[v.label], root)
            demo.cluster_stage(vcfg[v.label], root)
    out = {"teacher": headline(demo.teacher_eval_stage(cfg, root, teacher)), "runs": {}, "keys": keys}
    for seed in seeds:
        for v in variants:
            layout = demo.Layout(cfg.out_dir, run_tag=os.path.join(tag, keys[v.label]))
            t0 = time.perf_counter()
            run = demo.train_stage(vcfg[v.label], layout, v.recipe, seed)
            ev = demo.student_eval_stage(vcfg[v.label], layout, v.recipe, seed)
            res = headline(ev)
            reused = " (reused)" if run.get("reused") else ""
            took = time.perf_counter() - t0
            print(f"--- {v.label}, seed {seed}: zero-shot {100 * res['zeroshot_top1']:.2f}{reused} [{took:.0f} s]",
                  flush=True)  # fmt: skip
            out["runs"][v.label, seed] = {**res, "train_seconds": run.get("seconds_this_run")}
    return out


def analyse(results: dict, variants: list[Variant], seeds: list[int], versus: str | None = None) -> dict:
    """Per metric and variant: the summary, the paired difference from baseline, from the best other recipe and
    (``versus``: a variant label) from that variant."""
    recipe_of = {v.label: v.recipe for v in variants}
    base = next((v.label for v in variants if v.label == "baseline"), None)
    out = {}
    for metric in METRICS:
        per = {v.label: {s: results["runs"][v.label, s][metric] for s in seeds} for v in variants}
        summ = {label: summarize(vals.values()) for label, vals in per.items()}
        means = {label: s.mean for label, s in summ.items()}
        rows = {}
        for label in per:
            row = {"summary": summ[label]}
            if base is not None and label != base:
                row["baseline"] = (base, paired(per[label], per[base]))
            other = best_other(means, label, recipe_of)
            if other is not None:
                row["best_other"] = (other, paired(per[label], per[other]))
            if versus is not None and label != versus:
                row["versus"] = (versus, paired(per[label], per[versus]))
            rows[label] = row
        out[metric] = rows
    return out


def _pm(s) -> str:
    return f"{100 * s.mean:.2f} ± {'n/a' if math.isnan(s.se) else f'{100 * s.se:.2f}'}"


def _diff(entry, name: bool = True) -> str:
    if entry is None:
        return ""
    other, d = entry
    t = t_value(d)
    out = f"{100 * d.mean:+.2f} ± {'n/a' if math.isnan(d.se) else f'{100 * d.se:.2f}'} (t {t:+.1f})"
    return f"{out} vs {other}" if name else out


def tables(regime: str, cfg, results: dict, stats: dict, seeds: list[int], versus: str | None = None) -> str:
    reg = demo.regime(cfg)
    head = (f"### {regime}: student corpus {reg['student_samples']} images, caption noise {reg['caption_noise']:g}; "
            f"{cfg.steps} steps of {cfg.batch_size}; seeds {seeds} (n = {len(seeds)} per number); "
            f"mean ± SE; Δ = paired same-seed difference ± SE (t, {len(seeds) - 1} dof)")  # fmt: skip
    lines = [head]
    for metric, name in METRICS.items():
        extra = f" Δ vs {versus} |" if versus else ""
        lines += ["", f"**{name}** (%)", "", f"| variant | mean ± SE | Δ vs baseline | Δ vs best other recipe |{extra}",
                  "| --- | --- | --- | --- |" + (" --- |" if versus else "")]  # fmt: skip
        for label, row in stats[metric].items():
            cells = [_pm(row["summary"]), _diff(row.get("baseline")), _diff(row.get("best_other"))]
            if versus:
                cells.append(_diff(row.get("versus"), name=False))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append(f"| teacher | {100 * results['teacher'][metric]:.2f} |" + " |" * (2 + bool(versus)))
    return "\n".join(lines)


def csv_rows(regime: str, cfg, variants: list[Variant], results: dict, stats: dict, seeds: list[int]) -> list[dict]:
    reg = demo.regime(cfg)
    rows = []
    for v in variants:
        c = v.config(cfg)
        common = {"variant": v.label, "recipe": v.recipe, "regime": regime, "steps": cfg.steps,
                  "batch": cfg.batch_size, "student_samples": reg["student_samples"],
                  "caption_noise": reg["caption_noise"], "balance_eps": c.balance_eps,
                  "balance_keep": c.balance_keep, "n_classes": c.n_classes,
                  "run_key": results["keys"][v.label]}  # fmt: skip
        for seed in seeds:
            res = results["runs"][v.label, seed]
            for metric in METRICS:
                rows.append({**common, "seed": seed, "stat": "value", "metric": metric, "value": res[metric],
                             "n_seeds": 1, "train_seconds": res["train_seconds"]})  # fmt: skip
        for metric in METRICS:
            row = stats[metric][v.label]
            s = row["summary"]
            for stat, value in (("mean", s.mean), ("se", s.se)):
                rows.append({**common, "seed": "all", "stat": stat, "metric": metric, "value": value, "n_seeds": s.n})
            for which in ("baseline", "best_other", "versus"):
                if which in row:
                    other, d = row[which]
                    for stat, value in (("diff", d.mean), ("diff_se", d.se), ("diff_t", t_value(d))):
                        rows.append({**common, "seed": "all", "stat": stat, "metric": metric, "value": value,
                                     "n_seeds": d.n, "versus": other})  # fmt: skip
    return rows


def append_csv(path: Path, rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> None:
    """Append rows (creating the file with its header ``columns``); the machine and version columns are filled in
    here (``data_efficiency.py`` writes its own columns through this too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = {
        "device": device_name("cuda") if torch.cuda.is_available() else device_name("cpu"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "clipcid_fast": _version("clipcid_fast"),
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(columns):
            raise ValueError(f"--csv {str(path)!r} has another header ({header}); expected {list(columns)}")
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({**fill, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}})


def plot(panels: dict, path: Path, title: str) -> None:
    """Per regime (row) and metric (column): each variant's paired difference from baseline, ± 2 SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_variants = max(len(next(iter(stats.values()))) for stats in panels.values())
    height = 1.6 + 0.38 * n_variants * len(panels)
    fig, axes = plt.subplots(len(panels), len(METRICS), squeeze=False, figsize=(5.5 * len(METRICS), height))
    for row, (regime, stats) in zip(axes, panels.items()):
        for ax, (metric, name) in zip(row, METRICS.items()):
            labels = [label for label, r in stats[metric].items() if "baseline" in r]
            d = [stats[metric][label]["baseline"][1] for label in labels]
            y = range(len(labels))
            ax.errorbar([100 * s.mean for s in d], y, xerr=[0 if math.isnan(s.se) else 200 * s.se for s in d],
                        fmt="o", capsize=3)  # fmt: skip
            ax.axvline(0, color="grey", lw=0.8)
            ax.set_yticks(list(y), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"Δ {name} vs baseline (points, ± 2 SE)")
            ax.set_title(f"{regime}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.recipes = ",".join(sorted({v.recipe for v in args.variants}))
    t0 = time.perf_counter()
    panels, out_tables, rows = {}, [], []
    for regime in args.regimes:
        cfg = regime_config(args, regime)
        if args.teacher_cache_dir:
            cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, cache_dir=args.teacher_cache_dir))
        if args.dry_run:
            for v in args.variants:
                print(f"{v.label}: {v.run_key(cfg)} {v.resolved(cfg)}")
            continue
        results = run_regime(cfg, args.variants, args.seeds)
        stats = analyse(results, args.variants, args.seeds, args.versus)
        out_tables.append(tables(regime, cfg, results, stats, args.seeds, args.versus))
        rows += csv_rows(regime, cfg, args.variants, results, stats, args.seeds)
        panels[regime] = stats
    if args.dry_run:
        return 0
    append_csv(args.csv, rows)
    plot(panels, args.plot, f"recipe study: {args.steps} steps of {args.batch_size}, seeds {args.seeds}; "
                            "held-out Fashion-MNIST test split")  # fmt: skip
    print("\n" + "\n\n".join(out_tables))
    print(f"\n{len(rows)} rows appended to {args.csv}; plot {args.plot}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
