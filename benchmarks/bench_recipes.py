"""Recipe quality: every recipe with the same student, data and steps, over seeds, plus the teacher.

    cd /work/main && .venv/bin/python benchmarks/bench_recipes.py                       # the full run (~1 h)
    .venv/bin/python benchmarks/bench_recipes.py --steps 10 --seeds 0 --student-samples 500  # a smoke run

Not a timed benchmark: it measures what each recipe buys, zero-shot top-1, linear-probe top-1 and
image→text retrieval R@1 on the held-out Fashion-MNIST test split, as mean ± std over ``--seeds`` (the
training seed: student init and data order; the data, the teacher and the pseudo-classes stay fixed).

Regimes (``--regimes``):

* ``noisy`` (the offline default): the student's corpus is ``--student-samples`` train images (10k) with
  ``--caption-noise`` (40 %) of their captions naming another class; the teacher learned from the clean 60k.
* ``clean``: the student trains on all 60k train images with clean captions (``corpus = teacher``; the caption
  noise does not apply), the regime where the student alone is already supervised classification.

Every stage is ``clipcid_fast.pipeline.demo``'s (embed, balance, cluster, train, eval), run into
``--out-dir/<regime>/`` with the training runs under ``train/steps<S>-b<B>/``: a rerun with the same arguments
reuses every finished run and evaluation and only computes what is missing. cid trains on the rows SemDeDup
kept at ``--balance-eps``, the other recipes on the whole corpus.

Outputs: long-format rows appended to ``--csv`` (default ``benchmarks/results/recipes.csv``; one row per
recipe × seed × metric with ``stat = value``, one ``mean`` and one ``std`` row per recipe × metric with
``seed = all``, and the teacher's rows), the plot ``--plot`` (``benchmarks/results/recipes.png``: mean ± std
bars per recipe per metric, one row per regime, the teacher as a dashed line), and a markdown table on stdout
with the claim checks (computed, not asserted):

* ``cid``, ``rd``, ``kd`` each beat ``baseline`` by more than 2 σ, with σ the pooled seed standard deviation
  sqrt((s_recipe² + s_baseline²) / 2) (undefined with one seed);
* ``cid`` (trained on the balanced subset) ≥ ``baseline`` on every metric (means).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import datetime as _dt
import importlib.metadata
import math
import os
import time

import torch

from benchmarks._harness import device_name, git_sha
from clipcid_fast.pipeline import demo
from clipcid_fast.pipeline.config import DataConfig, DemoConfig
from clipcid_fast.pipeline.demo_report import METRICS, headline, mean_std, plot_accuracy
from clipcid_fast.recipes import RECIPES

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
REGIMES = ("noisy", "clean")
CHECKED = ("cid", "rd", "kd")  # the recipes the "beats baseline by 2 σ" claim is about

COLUMNS = (
    "recipe",
    "regime",
    "seed",
    "stat",
    "metric",
    "value",
    "n_seeds",
    "steps",
    "batch",
    "student_samples",
    "caption_noise",
    "balance_eps",
    "n_classes",
    "train_seconds",
    "device",
    "threads",
    "torch",
    "open_clip",
    "clipcid_fast",
    "git_sha",
    "timestamp",
    "note",
)
"""The CSV columns of ``recipes.csv``, in this order (benchmarks/README.md, section "Recipe quality")."""


def add_size_args(p: argparse.ArgumentParser) -> None:
    """The flags of every size ``regime_config`` reads, at the demo's values (shared with ``recipe_study.py``)."""
    p.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps of every run")
    p.add_argument("--batch-size", type=int, default=DemoConfig.batch_size)
    p.add_argument(
        "--student-samples",
        type=int,
        default=DataConfig.student_samples,
        help="noisy regime: images in the student corpus (default %(default)s)",
    )
    p.add_argument(
        "--caption-noise",
        type=float,
        default=DataConfig.caption_noise,
        help="noisy regime: fraction of its captions naming another class (default %(default)s)",
    )
    p.add_argument("--balance-k", type=int, default=DemoConfig.balance_k)
    p.add_argument("--balance-eps", type=float, default=DemoConfig.balance_eps)
    p.add_argument("--n-classes", type=int, default=DemoConfig.n_classes)
    p.add_argument("--eval-samples", type=int, default=0, help="held-out images per eval (0 = all 10k)")
    p.add_argument("--probe-train-samples", type=int, default=DemoConfig.probe_train_samples)
    p.add_argument("--no-progress", action="store_true")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES, help="default: both")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument(
        "--clean-seeds", nargs="+", type=int, default=None, help="seeds of the clean regime (default: --seeds)"
    )
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated (default: all five)")
    add_size_args(p)
    p.add_argument("--out-dir", default="runs/bench_recipes", help="run directories (reused by a rerun)")
    p.add_argument("--csv", type=Path, default=RESULTS / "recipes.csv")
    p.add_argument("--plot", type=Path, default=RESULTS / "recipes.png")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def regime_config(args: argparse.Namespace, regime: str) -> DemoConfig:
    """The demo's config of one regime; it carries every size the runs depend on."""
    data = {"corpus": "student", "student_samples": args.student_samples, "caption_noise": args.caption_noise}
    if regime == "clean":
        data = {"corpus": "teacher"}
    overrides = {
        "out_dir": os.path.join(args.out_dir, regime_dir(args, regime)),
        "recipes": args.recipes,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "balance_k": args.balance_k,
        "balance_eps": args.balance_eps,
        "n_classes": args.n_classes,
        "eval_samples": args.eval_samples,
        "probe_train_samples": args.probe_train_samples,
        "progress": not args.no_progress,
        "data": data,
    }
    cfg = demo.build_demo_config(None, overrides)
    demo.check_demo_config(cfg)
    return cfg


def regime_dir(args: argparse.Namespace, regime: str) -> str:
    """One folder per corpus: runs that share it share its embed / balance / cluster stages."""
    if regime == "clean":
        return "clean"
    return f"noisy-n{args.student_samples}-noise{args.caption_noise:g}"


def run_regime(cfg: DemoConfig, recipes: list[str], seeds: list[int]) -> dict:
    """Every stage of one regime through demo's stage functions; eval results per (recipe, seed) + teacher."""
    layout = demo.Layout(cfg.out_dir, run_tag=f"steps{cfg.steps}-b{cfg.batch_size}")
    teacher = demo.Teacher(cfg)
    print(f"\n=== {cfg.out_dir}: embed", flush=True)
    demo.embed_stage(cfg, layout, teacher)
    balance = None
    if any(RECIPES[r].labels for r in recipes):  # cid and its composites train on balance's rows and cluster's labels
        balance = demo.balance_stage(cfg, layout)
        fractions = demo.removed_fractions(balance)
        print(f"balance (k={cfg.balance_k}): "
              + ", ".join(f"eps={e:g} removed {f:.3f}" for e, f in fractions.items()), flush=True)  # fmt: skip
        demo.cluster_stage(cfg, layout)
    results: dict = {"teacher": headline(demo.teacher_eval_stage(cfg, layout, teacher)), "runs": {}}
    for seed in seeds:
        for recipe in recipes:
            print(f"--- {recipe}, seed {seed}", flush=True)
            run = demo.train_stage(cfg, layout, recipe, seed)
            ev = demo.student_eval_stage(cfg, layout, recipe, seed)
            results["runs"][recipe, seed] = {**headline(ev), "train_seconds": run.get("seconds_this_run")}
    if balance is not None:
        results["removed_fraction"] = demo.removed_fractions(balance)[float(cfg.balance_eps)]
    return results


def aggregate(results: dict, recipes: list[str], seeds: list[int]) -> dict:
    """{recipe: {metric: (mean, std)}} over the seeds."""
    return {r: {m: mean_std(results["runs"][r, s][m] for s in seeds) for m in METRICS} for r in recipes}


def claim_checks(agg: dict, n_seeds: int) -> list[str]:
    lines = []
    if "baseline" not in agg:
        return ["(no baseline: no claim checks)"]
    base = agg["baseline"]
    for recipe in [r for r in CHECKED if r in agg]:
        for metric, name in METRICS.items():
            (m, s), (mb, sb) = agg[recipe][metric], base[metric]
            margin = m - mb
            sigma = math.sqrt((s * s + sb * sb) / 2)
            if n_seeds < 2:
                verdict = "n/a (one seed)"
            else:
                z = margin / sigma if sigma > 0 else math.inf if margin > 0 else -math.inf
                verdict = f"{'PASS' if margin > 2 * sigma else 'FAIL'} ({z:+.1f} σ)"
            lines.append(f"| {recipe} > baseline + 2σ | {name} | {100 * margin:+.2f} pts | {verdict} |")
    if "cid" in agg:
        worse = [METRICS[m] for m in METRICS if agg["cid"][m][0] < base[m][0]]
        verdict = "PASS" if not worse else f"FAIL ({', '.join(worse)})"
        lines.append(f"| cid (balanced subset) ≥ baseline on every metric | all | | {verdict} |")
    return ["| claim | metric | margin | verdict |", "| --- | --- | --- | --- |", *lines]


def table(regime: str, cfg: DemoConfig, results: dict, agg: dict, seeds: list[int]) -> str:
    reg = demo.regime(cfg)
    head = (f"### {regime}: student corpus {reg['student_samples']} images, caption noise {reg['caption_noise']:g}; "
            f"teacher: {reg['teacher_corpus']}; {cfg.steps} steps of {cfg.batch_size}; seeds {seeds}")  # fmt: skip
    if "removed_fraction" in results:
        head += f"; cid on the {100 * (1 - results['removed_fraction']):.1f} % kept at eps={cfg.balance_eps:g}"
    lines = [head, "", "| recipe | " + " | ".join(f"{n} (%)" for n in METRICS.values()) + " |",
             "|" + " --- |" * (len(METRICS) + 1)]  # fmt: skip
    for recipe, stats in agg.items():
        lines.append(f"| {recipe} | " + " | ".join(f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in stats.values()) + " |")
    lines.append("| teacher | " + " | ".join(f"{100 * results['teacher'][m]:.2f}" for m in METRICS) + " |")
    return "\n".join([*lines, "", *claim_checks(agg, len(seeds))])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def csv_rows(regime: str, cfg: DemoConfig, results: dict, agg: dict, seeds: list[int]) -> list[dict]:
    reg = demo.regime(cfg)
    common = {
        "regime": regime,
        "steps": cfg.steps,
        "batch": cfg.batch_size,
        "student_samples": reg["student_samples"],
        "caption_noise": reg["caption_noise"],
        "balance_eps": cfg.balance_eps,
        "n_classes": cfg.n_classes,
        "note": f"eval {reg['eval']}; probe on {cfg.probe_train_samples} train images; teacher {reg['teacher_corpus']}",
    }
    rows = []
    for (recipe, seed), res in results["runs"].items():
        for metric in METRICS:
            rows.append({**common, "recipe": recipe, "seed": seed, "stat": "value", "metric": metric,
                         "value": res[metric], "n_seeds": 1, "train_seconds": res["train_seconds"]})  # fmt: skip
    for recipe, stats in agg.items():
        for metric, (m, s) in stats.items():
            for stat, value in (("mean", m), ("std", s)):
                rows.append({**common, "recipe": recipe, "seed": "all", "stat": stat, "metric": metric,
                             "value": value, "n_seeds": len(seeds)})  # fmt: skip
    for metric in METRICS:
        rows.append({**common, "recipe": "teacher", "seed": cfg.models.teacher_seed, "stat": "value",
                     "metric": metric, "value": results["teacher"][metric], "n_seeds": 1})  # fmt: skip
    return rows


def append_csv(path: Path, rows: list[dict]) -> None:
    """Append rows (creating the file with its header); the machine and version columns are filled in here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = {
        "device": device_name("cpu") if not torch.cuda.is_available() else device_name("cuda"),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": _version("open_clip_torch"),
        "clipcid_fast": _version("clipcid_fast"),
        "git_sha": git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    new = not path.exists()
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(COLUMNS):
            raise ValueError(f"--csv {str(path)!r} has another header ({header}); expected {list(COLUMNS)}")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({**fill, **row})


def _fmt_value(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    panels, tables, rows = {}, [], []
    for regime in args.regimes:
        cfg = regime_config(args, regime)
        recipes = demo.recipe_list(cfg)
        seeds = args.clean_seeds if regime == "clean" and args.clean_seeds else args.seeds
        results = run_regime(cfg, recipes, seeds)
        agg = aggregate(results, recipes, seeds)
        tables.append(table(regime, cfg, results, agg, seeds))
        rows += csv_rows(regime, cfg, results, agg, seeds)
        panels[regime] = (agg, results["teacher"])
    append_csv(args.csv, [{k: _fmt_value(v) for k, v in r.items()} for r in rows])
    title = f"recipes: {args.steps} steps of {args.batch_size}, seeds {args.seeds}; held-out Fashion-MNIST test split"
    plot_accuracy(panels, str(args.plot), title)
    print("\n" + "\n\n".join(tables))
    print(f"\n{len(rows)} rows appended to {args.csv}; plot {args.plot}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
