"""The paper's data-efficiency claim, measured: semantic balance against random removal of the same size.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_efficiency.py --seeds 0 1 2 --fractions 0.1 0.3 0.45 \\
        --recipes cid,kd --teacher-cache-dir runs/teacher-cache

CLIP-CID removes 43.7 % of LAION-400M by semantic balance and reports no loss of accuracy. On the demo's offline
regime (``bench_recipes.regime_config``: the noisy student corpus, the default teacher), at equal steps (the
demo's 300 of 256), every ``--recipes`` recipe trains on

* ``all``: every row (0 % removed; the reference);
* ``balance``: the rows SemDeDup keeps (``balance_keep`` rule, the demo's default) at the eps whose removed
  fraction is nearest each ``--fractions`` target, calibrated on this corpus from one balance pass over
  ``--eps-grid``;
* ``random``: a seeded random subset of exactly the same size (one subset per training seed and fraction, so
  the spread over seeds includes the subset's draw),

through ``train --keep`` (``pipeline/keep_rows.py``); cid's pseudo-classes are k-means of the kept rows (as the
demo clusters balance's kept rows), one clustering per mask. Same seed, same student initialisation and data
generator in every arm; the paired (same-seed) difference balance − random is the claim's test
(``paired_stats.py``).

Runs live under ``--out-dir/<regime>/train/steps<S>-b<B>/<recipe>-<arm>-f<fraction>/`` and are reused by a
rerun (seeds are the outer loop: a stopped study has every arm on the same seeds). Outputs: long-format rows
appended to ``--csv`` (``benchmarks/results/data_efficiency.csv``: one row per recipe × arm × fraction × seed ×
metric with ``stat = value``, then per recipe × arm × fraction × metric ``mean`` / ``se``, and ``diff`` /
``diff_se`` / ``diff_t`` of balance against random and of each arm against all), the plot ``--plot`` (zero-shot
top-1 against the fraction removed, balance and random, ± 2 SE) and a markdown table on stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import math
import os
import time

import numpy as np
import torch

from benchmarks import near_duplicates
from benchmarks._harness import save_figure
from benchmarks.bench_recipes import add_size_args, regime_config
from benchmarks.paired_stats import paired, summarize, t_value
from benchmarks.recipe_study import append_csv
from clipcid_fast.pipeline import demo
from clipcid_fast.pipeline._io import atomic_bytes, atomic_json
from clipcid_fast.pipeline.demo_report import METRICS, headline

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
EPS_GRID = (0.001, 0.0015, 0.00175, 0.002, 0.0025, 0.003, 0.0035, 0.004, 0.0045, 0.005, 0.0055, 0.006, 0.007)
"""The eps of the calibration pass: on the default regime 0.002 removes ~12 %, 0.005 ~42 % (recipe study)."""

COLUMNS = (
    "recipe", "arm", "target_fraction", "removed_fraction", "kept_rows", "balance_eps", "seed", "stat", "metric",
    "value", "n_seeds", "versus", "steps", "batch", "student_samples", "caption_noise", "balance_keep", "n_classes",
    "train_seconds", "device", "threads", "torch", "clipcid_fast", "git_sha", "timestamp",
)  # fmt: skip
"""The CSV columns of ``data_efficiency.csv``, in this order."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 0.45],
                   help="target removed fractions, each in (0, 1) (0 %%, 'all', is always run)")  # fmt: skip
    p.add_argument("--recipes", default="cid,kd", help="comma-separated recipes that read the teacher cache")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--eps-grid", nargs="+", type=float, default=list(EPS_GRID), help="the calibration pass's eps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_size_args(p)
    p.add_argument("--out-dir", default="runs/data_efficiency", help="run directories (reused by a rerun)")
    p.add_argument("--teacher-cache-dir", default=None,
                   help="the default teacher's weight cache (default ~/.cache/clipcid_fast; a private copy keeps "
                        "the teacher fixed while other jobs retrain the shared one)")  # fmt: skip
    p.add_argument("--csv", type=Path, default=RESULTS / "data_efficiency.csv")
    p.add_argument("--plot", type=Path, default=RESULTS / "data_efficiency.png")
    p.add_argument("--calibrate-only", action="store_true", help="print the eps per fraction, train nothing")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    bad = [f for f in args.fractions if not 0 < f < 1]
    if bad:
        p.error(f"--fractions must each be in (0, 1), got {bad[0]}")
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for r in args.recipe_list:
        if r not in demo.TABLE or not demo.TABLE[r].teacher:
            p.error(f"--recipes: {r!r} is not a recipe that reads the teacher cache")
    args.recipes = ",".join(args.recipe_list)
    return args


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str  # all, balance, random
    target: float  # the removed fraction asked for (0 for all)
    eps: float | None  # balance's eps whose mask sets the size (None for all)
    kept: int  # rows kept

    @property
    def tag(self) -> str:
        return "all" if self.name == "all" else f"{self.name}-f{self.target:g}"


def calibrate(summary: dict, targets: list[float]) -> dict[float, tuple[float, float]]:
    """{target: (eps, removed fraction)}: the eps of the pass whose removed fraction is nearest each target."""
    got = demo.removed_fractions(summary)
    return {t: min(((e, f) for e, f in got.items()), key=lambda ef: abs(ef[1] - t)) for t in targets}


def _save_mask(path: str, mask: np.ndarray) -> str:
    """Write a mask once (tmp then rename); an existing file must hold the same mask (the runs trained on it)."""
    if os.path.isfile(path):
        if not np.array_equal(np.load(path), mask):
            raise RuntimeError(f"{path} holds another mask than this study draws: move it away (its runs too)")
        return path
    import io

    buf = io.BytesIO()
    np.save(buf, mask)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_bytes(path, buf.getvalue())
    return path


def random_mask(n: int, kept: int, target: float, seed: int) -> np.ndarray:
    """``kept`` of ``n`` rows, drawn from a generator seeded by (the target in per mille, the training seed)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([round(1000 * target), seed]).choice(n, kept, replace=False)] = True
    return mask


def cluster_on(cfg, layout: demo.Layout, mask_path: str, name: str) -> str:
    """k-means of the kept rows into ``n_classes`` (as the demo's cluster stage; reused when inputs match)."""
    from clipcid_fast.pipeline import balance

    out = os.path.join(layout.root, "cluster_masks", f"{name}-n{cfg.n_classes}")
    inputs = {"image_shards_sha256": demo.embed_digest(layout), "keep_sha256": demo._sha256_file(mask_path),
              "n_classes": cfg.n_classes, "seed": 0}  # fmt: skip
    stamp = os.path.join(out, "demo_inputs.json")
    if demo._read_json(stamp) == inputs and os.path.isfile(balance.pseudo_class_paths(out)[0]):
        return out
    balance.run_cluster(os.path.join(layout.embed, "image"), out, cfg.n_classes, keep=mask_path, seed=0)
    atomic_json(stamp, inputs)
    return out


def arms_for(cal: dict, bdir: str, n: int) -> list[Arm]:
    """all, then per target fraction the balance mask of its eps and a random mask of the same size."""
    from clipcid_fast.pipeline import balance

    arms = [Arm("all", 0.0, None, n)]
    for t, (e, _) in cal.items():
        kept = int(np.load(balance.keep_mask_path(bdir, e)).sum())
        arms += [Arm("balance", t, e, kept), Arm("random", t, e, kept)]
    return arms


def train_arms(cfg, eval_cfg, arms: list[Arm], bdir: str, recipes: list[str], seeds: list[int]) -> dict:
    """{(recipe, arm tag, seed): headline metrics + train_seconds}: every arm trained through ``train --keep``
    (``cfg``: the training corpus) and evaluated (``eval_cfg``: the demo's held-out split); seeds outermost."""
    from clipcid_fast.pipeline import balance

    tag = f"steps{cfg.steps}-b{cfg.batch_size}"
    root = demo.Layout(cfg.out_dir)
    masks_dir = os.path.join(cfg.out_dir, "masks")
    n, runs = arms[0].kept, {}
    for seed in seeds:
        for recipe in recipes:
            for arm in arms:
                if arm.name == "all":
                    mask = np.ones(n, dtype=bool)
                elif arm.name == "balance":
                    mask = np.load(balance.keep_mask_path(bdir, arm.eps))
                else:
                    mask = random_mask(n, arm.kept, arm.target, seed)
                # the random subset is drawn per seed: its file (and clustering) too
                mname = arm.tag + (f"-seed{seed}" if arm.name == "random" else "")
                mask_path = _save_mask(os.path.abspath(os.path.join(masks_dir, f"{mname}.npy")), mask)
                over = {"keep": mask_path, "balance_dir": None}
                if demo.TABLE[recipe].labels:
                    over["cluster_dir"] = os.path.abspath(cluster_on(cfg, root, mask_path, mname))
                layout = demo.Layout(cfg.out_dir, run_tag=os.path.join(tag, f"{recipe}-{arm.tag}"))
                t0 = time.perf_counter()
                tr = demo.train_stage(cfg, layout, recipe, seed, **over)
                res = headline(demo.student_eval_stage(eval_cfg, layout, recipe, seed))
                took, reused = time.perf_counter() - t0, " (reused)" if tr.get("reused") else ""
                print(f"--- {recipe} {arm.tag} ({arm.kept} rows), seed {seed}: zero-shot "
                      f"{100 * res['zeroshot_top1']:.2f}{reused} [{took:.0f} s]", flush=True)  # fmt: skip
                runs[recipe, arm.tag, seed] = {**res, "train_seconds": tr.get("seconds_this_run")}
    return runs


def balance_and_calibrate(cfg, root: demo.Layout, eps_grid: list[float], targets: list[float]):
    """(balance folder, row count, {target: (eps, removed fraction)}) from one balance pass over ``eps_grid``."""
    from clipcid_fast.pipeline import balance

    summary = demo.balance_stage(dataclasses.replace(cfg, balance_eps_grid=sorted(set(eps_grid))), root)
    bdir = root.balance(cfg.balance_k, cfg.balance_keep)
    n = int(np.load(balance.keep_mask_path(bdir, eps_grid[0])).shape[0])
    cal = calibrate(summary, targets)
    print("calibration: " + "; ".join(f"target {t:.0%}: eps {e:g} removes {f:.1%}" for t, (e, f) in cal.items()))
    return bdir, n, cal


def run(cfg, args) -> dict:
    from clipcid_fast.pipeline.data.fashion_mnist import FashionMnistCorpus

    root = demo.Layout(cfg.out_dir)
    teacher = demo.Teacher(cfg)
    print(f"\n=== {cfg.out_dir}: embed", flush=True)
    demo.embed_stage(cfg, root, teacher)
    bdir, n, cal = balance_and_calibrate(cfg, root, args.eps_grid, args.fractions)
    profile = near_duplicates.profile(FashionMnistCorpus(cfg.data), bdir, [e for e, _ in cal.values()])
    dups = near_duplicates.lines(profile)
    print("\n".join(dups), flush=True)
    if args.calibrate_only:
        return {"calibration": cal}
    arms = arms_for(cal, bdir, n)
    out = {"calibration": cal, "arms": arms, "n": n, "duplicates": dups}
    out["teacher"] = headline(demo.teacher_eval_stage(cfg, root, teacher))
    out["runs"] = train_arms(cfg, cfg, arms, bdir, args.recipe_list, args.seeds)
    return out


def analyse(results: dict, recipes: list[str], seeds: list[int]) -> dict:
    """{(recipe, arm tag, metric): {"summary", "vs_random" (balance only), "vs_all"}}."""
    out = {}
    for recipe in recipes:
        for metric in METRICS:
            per = {a.tag: {s: results["runs"][recipe, a.tag, s][metric] for s in seeds} for a in results["arms"]}
            for a in results["arms"]:
                row = {"summary": summarize(per[a.tag].values())}
                if a.name != "all":
                    row["vs_all"] = paired(per[a.tag], per["all"])
                if a.name == "balance":
                    row["vs_random"] = paired(per[a.tag], per[f"random-f{a.target:g}"])
                out[recipe, a.tag, metric] = row
    return out


def _pm(s, signed: bool = False) -> str:
    se = "n/a" if math.isnan(s.se) else f"{100 * s.se:.2f}"
    return f"{100 * s.mean:{'+' if signed else ''}.2f} ± {se}"


def table(cfg, results: dict, stats: dict, recipes: list[str], seeds: list[int], reg: dict | None = None) -> str:
    """``reg``: the corpus's student_samples and caption_noise (default: the demo regime's)."""
    reg = reg or demo.regime(cfg)
    lines = [f"Student corpus {reg['student_samples']} images, caption noise {reg['caption_noise']:g}; "
             f"{cfg.steps} steps of {cfg.batch_size}; seeds {seeds} (n = {len(seeds)}); zero-shot top-1 (%), "
             f"mean ± SE; Δ = paired same-seed difference ± SE (t, {len(seeds) - 1} dof)", "",
             "| recipe | removed (target) | balance eps | kept rows | all / balance | random | "
             "Δ balance − random | Δ balance − all | Δ random − all |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    metric = "zeroshot_top1"
    n = results["n"]
    for recipe in recipes:
        for a in results["arms"]:
            if a.name == "random":
                continue
            s = stats[recipe, a.tag, metric]
            if a.name == "all":
                lines.append(f"| {recipe} | 0 % | – | {n} | {_pm(s['summary'])} | – | – | – | – |")
                continue
            r = stats[recipe, f"random-f{a.target:g}", metric]
            d = s["vs_random"]
            lines.append(f"| {recipe} | {1 - a.kept / n:.1%} ({a.target:.0%}) | {a.eps:g} | {a.kept} | "
                         f"{_pm(s['summary'])} | {_pm(r['summary'])} | {_pm(d, True)} (t {t_value(d):+.1f}) | "
                         f"{_pm(s['vs_all'], True)} | {_pm(r['vs_all'], True)} |")  # fmt: skip
    lines.append(f"| teacher | | | | {100 * results['teacher'][metric]:.2f} | | | | |")
    return "\n".join(lines + [""] + [f"* {line}" for line in results["duplicates"]])


def csv_rows(
    cfg, results: dict, stats: dict, recipes: list[str], seeds: list[int], reg: dict | None = None
) -> list[dict]:
    """``reg``: the corpus's student_samples and caption_noise (default: the demo regime's)."""
    reg = reg or demo.regime(cfg)
    n, rows = results["n"], []
    for recipe in recipes:
        for a in results["arms"]:
            common = {"recipe": recipe, "arm": a.name, "target_fraction": a.target,
                      "removed_fraction": 1 - a.kept / n, "kept_rows": a.kept,
                      "balance_eps": "" if a.eps is None else a.eps, "steps": cfg.steps, "batch": cfg.batch_size,
                      "student_samples": reg["student_samples"], "caption_noise": reg["caption_noise"],
                      "balance_keep": cfg.balance_keep, "n_classes": cfg.n_classes}  # fmt: skip
            for seed in seeds:
                res = results["runs"][recipe, a.tag, seed]
                for metric in METRICS:
                    rows.append({**common, "seed": seed, "stat": "value", "metric": metric, "value": res[metric],
                                 "n_seeds": 1, "train_seconds": res["train_seconds"]})  # fmt: skip
            for metric in METRICS:
                row = stats[recipe, a.tag, metric]
                s = row["summary"]
                for stat, value in (("mean", s.mean), ("se", s.se)):
                    rows.append({**common, "seed": "all", "stat": stat, "metric": metric, "value": value,
                                 "n_seeds": s.n})  # fmt: skip
                for key, versus in (("vs_random", "random"), ("vs_all", "all")):
                    if key in row:
                        d = row[key]
                        for stat, value in (("diff", d.mean), ("diff_se", d.se), ("diff_t", t_value(d))):
                            rows.append({**common, "seed": "all", "stat": stat, "metric": metric, "value": value,
                                         "n_seeds": d.n, "versus": versus})  # fmt: skip
    return rows


def plot(results: dict, stats: dict, recipes: list[str], path: Path, title: str) -> None:
    """Per recipe (column): zero-shot top-1 against the fraction removed, balance and random, 0 % shared (top), and
    the paired difference balance − random (bottom); ± 2 SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = results["n"]
    fig, axes = plt.subplots(2, len(recipes), squeeze=False, figsize=(5.2 * len(recipes), 6.6),
                             gridspec_kw={"height_ratios": [3, 2]})  # fmt: skip
    bar = lambda s: 0 if math.isnan(s.se) else 200 * s.se  # noqa: E731
    for col, recipe in enumerate(recipes):
        ax, dax = axes[0][col], axes[1][col]
        base = stats[recipe, "all", "zeroshot_top1"]["summary"]
        for name, style in (("balance", "o-"), ("random", "s--")):
            arms = [a for a in results["arms"] if a.name == name]
            xs = [0.0] + [100 * (1 - a.kept / n) for a in arms]
            ss = [base] + [stats[recipe, a.tag, "zeroshot_top1"]["summary"] for a in arms]
            ax.errorbar(xs, [100 * s.mean for s in ss], yerr=[bar(s) for s in ss], fmt=style, capsize=3,
                        label=f"{name} removal")  # fmt: skip
        ax.set_ylabel("zero-shot top-1 (%), ± 2 SE")
        ax.set_title(recipe)
        ax.legend(fontsize=8)
        arms = [a for a in results["arms"] if a.name == "balance"]
        ds = [stats[recipe, a.tag, "zeroshot_top1"]["vs_random"] for a in arms]
        dax.errorbar([100 * (1 - a.kept / n) for a in arms], [100 * d.mean for d in ds], yerr=[bar(d) for d in ds],
                     fmt="o", capsize=3)  # fmt: skip
        dax.axhline(0, color="grey", lw=0.8)
        dax.set_xlim(ax.get_xlim())
        dax.set_xlabel("rows removed (%)")
        dax.set_ylabel("Δ balance − random (points,\npaired, ± 2 SE)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = regime_config(args, "noisy")
    if args.teacher_cache_dir:
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, cache_dir=args.teacher_cache_dir))
    results = run(cfg, args)
    if args.calibrate_only:
        return 0
    stats = analyse(results, args.recipe_list, args.seeds)
    append_csv(args.csv, csv_rows(cfg, results, stats, args.recipe_list, args.seeds), columns=COLUMNS)
    plot(results, stats, args.recipe_list, args.plot,
         f"dedup (semantic balance) vs random removal of the same size: {cfg.steps} steps of {cfg.batch_size}, "
         f"seeds {args.seeds}; held-out Fashion-MNIST test split")  # fmt: skip
    print("\n" + table(cfg, results, stats, args.recipe_list, args.seeds))
    print(f"\nrows appended to {args.csv}; plot {args.plot}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
