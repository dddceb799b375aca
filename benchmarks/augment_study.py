"""Is an augmentation-aware teacher cache worth it on the offline regime? Recipes with and without views, paired.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/augment_study.py --seeds 0 1 2 \\
        --teacher-cache-dir runs/teacher-cache --out-dir runs/augment_study

The regime and sizes are the recipe study's (``bench_recipes.regime_config``: the demo's teacher on the clean 60k,
the student on the 10k noisy corpus, 300 steps of 256). Every recipe of ``--recipes`` runs twice per seed: as
today (K = 1, the eval transform, the plain cache) and with ``--augment SPEC --views K`` (each sample of each
epoch on one of K views; the teacher recipes read the K-view cache, embedded once here into
``<regime>/embed-views<K>``; baseline has no teacher and draws the same views). cid's balance and cluster are the
plain cache's in both (a K-view cache's ``image/`` is those bytes). Same seed, same student initialisation and
sample order: the pair differs by the views alone.

It also measures the cost: the K-view embed's seconds and bytes beside the plain one's, and training samples/s of
kd with and without views in a short run with no periodic eval or checkpoint (``--speed-steps``).

Outputs: rows appended to ``--csv`` (``benchmarks/results/augment_study.csv``; per variant × seed × metric,
then per variant × metric the mean, SE and the paired difference from the same recipe without views, and the
cost rows), and a markdown table on stdout. Runs live under ``--out-dir`` and are reused by a rerun.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import dataclasses
import datetime as _dt
import hashlib
import math
import os
import shutil
import time

import torch

from benchmarks._harness import device_name, git_sha
from benchmarks.bench_recipes import add_size_args, regime_config
from benchmarks.paired_stats import paired, summarize, t_value
from clipcid_fast.pipeline import demo, embed, train
from clipcid_fast.pipeline.augment import parse_spec, views_of
from clipcid_fast.pipeline.config import EmbedConfig
from clipcid_fast.pipeline.demo_report import METRICS, headline

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SPEC = "scale=0.5:1,ratio=0.75:1.333,hflip=0.5"
COLUMNS = ("variant", "recipe", "views", "augment", "seed", "stat", "metric", "value", "n_seeds", "versus",
           "steps", "batch", "student_samples", "caption_noise", "device", "threads", "torch", "git_sha",
           "timestamp")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="baseline,kd,rd,cid", help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--views", type=int, default=8, help="K of the augmented runs (default %(default)s)")
    p.add_argument("--augment", default=SPEC, help="the views' SPEC (default %(default)s)")
    p.add_argument("--augment-seed", type=int, default=0)
    p.add_argument("--speed-steps", type=int, default=30, help="steps of the samples/s runs (0: skip them)")
    p.add_argument("--threads", type=int, default=1)
    add_size_args(p)
    p.add_argument("--out-dir", default="runs/augment_study")
    p.add_argument("--teacher-cache-dir", default=None, help="the default teacher's weight cache (a private copy)")
    p.add_argument("--csv", type=Path, default=RESULTS / "augment_study.csv")
    args = p.parse_args(argv)
    try:
        views_of(args.augment, args.views, args.augment_seed)
    except ValueError as e:
        p.error(str(e))
    return args


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def views_tag(args) -> str:
    """The folder suffix of a view setting: ``views<K>`` for the default SPEC and seed 0, else with a digest of
    the setting (another SPEC never resumes, or is refused in, the folders of the first)."""
    spec = parse_spec(args.augment).canonical()
    if spec == parse_spec(SPEC).canonical() and args.augment_seed == 0:
        return f"views{args.views}"
    digest = hashlib.sha256(f"{spec}|{args.augment_seed}".encode()).hexdigest()[:8]
    return f"views{args.views}-{digest}"


def views_cache(cfg, args, teacher: demo.Teacher) -> tuple[str, dict]:
    out = os.path.join(cfg.out_dir, f"embed-{views_tag(args)}")
    ecfg = EmbedConfig(out_dir=out, progress=cfg.progress, data=cfg.data, models=cfg.models, views=args.views,
                       augment=args.augment, augment_seed=args.augment_seed)  # fmt: skip
    return out, embed.run_embed(ecfg, loaded=teacher.get())


def aug_config(tcfg, args, views_dir: str):
    return dataclasses.replace(tcfg, out_dir=f"{tcfg.out_dir}-{views_tag(args)}", views=args.views,
                               augment=args.augment, augment_seed=args.augment_seed,
                               teacher_cache=views_dir if tcfg.teacher_cache else None)  # fmt: skip


def speed(cfg, layout, args, views_dir: str) -> dict:
    """Training samples/s of kd, plain and with views: a short run, no periodic eval, one checkpoint at the end."""
    out = {}
    for name, aug in (("plain", False), ("views", True)):
        tcfg = demo.train_config(cfg, layout, "kd", 0)
        tcfg = dataclasses.replace(tcfg, out_dir=os.path.join(cfg.out_dir, f"speed-{name}"), steps=args.speed_steps,
                                   eval_every=0, ckpt_every=args.speed_steps, resume=False)  # fmt: skip
        if aug:
            tcfg = aug_config(tcfg, args, views_dir)
        shutil.rmtree(tcfg.out_dir, ignore_errors=True)
        out[name] = train.run_train(tcfg)["samples_per_second_this_run"]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipes = [r for r in args.recipes.split(",") if r]
    args.recipes = ",".join(recipes)
    cfg = regime_config(args, "noisy")
    if args.teacher_cache_dir:
        cfg = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, cache_dir=args.teacher_cache_dir))
    layout = demo.Layout(cfg.out_dir, run_tag=f"steps{cfg.steps}-b{cfg.batch_size}")
    teacher = demo.Teacher(cfg)
    demo.embed_stage(cfg, layout, teacher)
    plain_meta = embed.load_embeddings(layout.embed)["meta"]
    views_dir, views_meta = views_cache(cfg, args, teacher)
    if "cid" in recipes:
        demo.balance_stage(cfg, layout)
        demo.cluster_stage(cfg, layout)
    teacher_res = headline(demo.teacher_eval_stage(cfg, layout, teacher))

    labels = [(r, False) for r in recipes] + [(r, True) for r in recipes]
    name = lambda r, aug: f"{r}+{views_tag(args)}" if aug else r  # noqa: E731
    runs: dict = {}
    for seed in args.seeds:  # the outer loop: a stopped study has every variant on the same seeds
        for recipe, aug in labels:
            tcfg = demo.train_config(cfg, layout, recipe, seed)
            if aug:
                tcfg = aug_config(tcfg, args, views_dir)
            t0 = time.perf_counter()
            run = train.run_train(tcfg)
            student = os.path.join(tcfg.out_dir, "student.pt")
            out = layout.eval_json(f"{name(recipe, aug)}-seed{seed}")
            ev = demo.eval_stage(cfg, out, student, demo._sha256_file(student))
            runs[name(recipe, aug), seed] = {**headline(ev), "samples_per_second": run["samples_per_second_this_run"]}
            z = 100 * runs[name(recipe, aug), seed]["zeroshot_top1"]
            print(f"--- {name(recipe, aug)}, seed {seed}: zero-shot {z:.2f} [{time.perf_counter() - t0:.0f} s]",
                  flush=True)  # fmt: skip
    rates = speed(cfg, layout, args, views_dir) if args.speed_steps else {}

    rows, lines = [], []
    common = {"steps": cfg.steps, "batch": cfg.batch_size, "student_samples": cfg.data.student_samples,
              "caption_noise": cfg.data.caption_noise}  # fmt: skip
    seeds = args.seeds
    lines += [f"{cfg.steps} steps of {cfg.batch_size}; seeds {seeds}; mean ± SE (%); Δ = paired same-seed "
              f"difference from the same recipe without views ± SE (t, {len(seeds) - 1} dof); views: --views "
              f"{args.views} --augment {args.augment}", "",
              "| recipe | views | " + " | ".join(f"{METRICS[m]}" for m in METRICS) + " |",
              "| --- | --- |" + " --- |" * len(METRICS)]  # fmt: skip
    for recipe, aug in labels:
        label = name(recipe, aug)
        cells = []
        for metric in METRICS:
            per = {s: runs[label, s][metric] for s in seeds}
            summ = summarize(per.values())
            cell = f"{100 * summ.mean:.2f} ± {'n/a' if math.isnan(summ.se) else f'{100 * summ.se:.2f}'}"
            base = {"variant": label, "recipe": recipe, "views": args.views if aug else 1,
                    "augment": args.augment if aug else "", "metric": metric, **common}  # fmt: skip
            rows += [{**base, "seed": s, "stat": "value", "value": v, "n_seeds": 1} for s, v in per.items()]
            rows += [{**base, "seed": "all", "stat": k, "value": v, "n_seeds": summ.n}
                     for k, v in (("mean", summ.mean), ("se", summ.se))]  # fmt: skip
            if aug:
                d = paired(per, {s: runs[recipe, s][metric] for s in seeds})
                se = "n/a" if math.isnan(d.se) else f"{100 * d.se:.2f}"
                cell += f" (Δ {100 * d.mean:+.2f} ± {se}, t {t_value(d):+.1f})"
                rows += [{**base, "seed": "all", "stat": k, "value": v, "n_seeds": d.n, "versus": recipe}
                         for k, v in (("diff", d.mean), ("diff_se", d.se), ("diff_t", t_value(d)))]  # fmt: skip
            cells.append(cell)
        lines.append(f"| {recipe} | {args.views if aug else 1} | " + " | ".join(cells) + " |")
    lines.append("| teacher | - | " + " | ".join(f"{100 * teacher_res[m]:.2f}" for m in METRICS) + " |")

    cost = {
        "embed_seconds_plain": plain_meta["seconds"],
        "embed_seconds_views": views_meta["seconds"],
        "embed_bytes_plain": folder_bytes(layout.embed),
        "embed_bytes_views": folder_bytes(views_dir),
        "image_views_bytes": folder_bytes(os.path.join(views_dir, embed.VIEWS_DIR)),
        **{f"train_samples_per_second_{k}": v for k, v in rates.items()},
    }
    for k, v in cost.items():
        rows.append({"variant": "cost", "recipe": "kd" if "train" in k else "", "views": args.views,
                     "seed": "", "augment": args.augment, "stat": k, "metric": "", "value": v, "n_seeds": "",
                     **common})  # fmt: skip
    lines += ["", "cost: " + ", ".join(f"{k} {v:.6g}" for k, v in cost.items())]
    append_csv(args.csv, rows)
    print("\n" + "\n".join(lines))
    return 0


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = {"device": device_name("cuda") if torch.cuda.is_available() else device_name("cpu"),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "git_sha": git_sha(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({**fill, **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}})


if __name__ == "__main__":
    sys.exit(main())
