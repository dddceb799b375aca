"""The data-efficiency study on a corpus with planted near-duplicates (``data_efficiency.py``'s arms).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/planted_duplicates.py --seeds 0 1 2 --recipes kd,cid \\
        --teacher-cache-dir runs/teacher-cache

The offline student corpus has few true near-duplicates (``near_duplicates.py``), so dedup there removes similar,
distinct images. Here the corpus is built to have them: ``--originals`` images of the student corpus (a seeded
subset, with their captions, 40 % naming another class), plus ``--copies`` augmented copies of each of a seeded
``--duplicated`` of them (shifted by one pixel in a random direction, contrast scaled by U(0.9, 1.1); the
original's caption) — the rows shuffled, written as PNGs and an open_clip CSV (``id``, ``label`` columns). With the
defaults, 6,000 distinct images + 4,000 copies = 10,000 rows, 40 % planted. The teacher embeds it (CSV source),
one balance pass calibrates the eps removing the planted fraction, and each recipe trains at the demo's steps on
all rows, the balance mask and a random mask of the same size (``train --keep``), evaluated on the clean
Fashion-MNIST test split as in the demo. Printed beside the table: how many of the rows balance removed are
planted copies. Rows in ``--csv`` (``benchmarks/results/planted_duplicates.csv``, ``data_efficiency.csv``'s
columns), plot ``--plot``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import dataclasses
import io
import json
import os
import time

import numpy as np
import torch

from benchmarks import data_efficiency as de
from benchmarks.bench_recipes import add_size_args, regime_config
from clipcid_fast.pipeline import demo
from clipcid_fast.pipeline._io import atomic_bytes, atomic_json
from clipcid_fast.pipeline.config import DataConfig
from clipcid_fast.pipeline.demo_report import headline

RESULTS = de.RESULTS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--originals", type=int, default=6000, help="distinct images (a seeded subset of the corpus)")
    p.add_argument("--duplicated", type=int, default=2000, help="of them, how many get copies")
    p.add_argument("--copies", type=int, default=2, help="augmented copies of each duplicated image")
    p.add_argument("--recipes", default="kd,cid")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--eps-grid", nargs="+", type=float,
                   default=[0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01])  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    add_size_args(p)
    p.add_argument("--out-dir", default="runs/planted_duplicates")
    p.add_argument("--teacher-cache-dir", default=None, help="as data_efficiency.py's")
    p.add_argument("--csv", type=Path, default=RESULTS / "planted_duplicates.csv")
    p.add_argument("--plot", type=Path, default=RESULTS / "planted_duplicates.png")
    p.add_argument("--calibrate-only", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.duplicated <= args.originals or args.copies < 1:
        p.error("need 0 < --duplicated <= --originals and --copies >= 1")
    args.recipe_list = [r.strip() for r in args.recipes.split(",") if r.strip()]
    args.recipes = ",".join(args.recipe_list)
    return args


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A photometric near-duplicate (a re-encode, not a crop): contrast scaled by U(0.9, 1.1), Gaussian noise of
    sigma 4 grey levels. (A one-pixel shift moves the default teacher's 32-px features farther than the
    neighbouring images of the class: SemDeDup then removes copies at no better than the base rate.)"""
    noisy = img.astype(np.float32) * rng.uniform(0.9, 1.1) + rng.normal(0.0, 4.0, img.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def build_corpus(args, out: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(the CSV, planted [rows] bool: a row is an augmented copy, source [rows]: the corpus image each row shows);
    written once (reused when the spec matches)."""
    from PIL import Image

    from clipcid_fast.pipeline.data.fashion_mnist import FashionMnistCorpus

    spec = {"originals": args.originals, "duplicated": args.duplicated, "copies": args.copies, "seed": 0, "aug": 2,
            "student_samples": args.student_samples, "caption_noise": args.caption_noise}  # fmt: skip
    csv_path, planted_path, source_path, stamp = (os.path.join(out, f) for f in ("train.csv", "planted.npy",
                                                                               "source.npy", "spec.json"))  # fmt: skip
    if de.demo._read_json(stamp) == spec:
        return csv_path, np.load(planted_path), np.load(source_path)
    corpus = FashionMnistCorpus(DataConfig(student_samples=args.student_samples, caption_noise=args.caption_noise))
    rng = np.random.default_rng([0, 1])
    originals = np.sort(rng.choice(len(corpus), args.originals, replace=False))
    duplicated = rng.choice(originals, args.duplicated, replace=False)
    src = np.concatenate([originals, np.repeat(duplicated, args.copies)])
    planted = np.concatenate([np.zeros(len(originals), bool), np.ones(len(duplicated) * args.copies, bool)])
    order = rng.permutation(len(src))
    src, planted = src[order], planted[order]
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    aug = np.random.default_rng([0, 2])
    rows = []
    for row, (i, copy) in enumerate(zip(src, planted)):
        img = corpus.images[corpus.ids[i]]
        img = augment(img, aug) if copy else img
        name = os.path.join("images", f"{row:05d}.png")
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
        atomic_bytes(os.path.join(out, name), buf.getvalue())
        rows.append({"filepath": name, "title": corpus.caption(int(i)), "id": row, "label": int(corpus.labels[i])})
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=["filepath", "title", "id", "label"], delimiter="\t")
    w.writeheader()
    w.writerows(rows)
    atomic_bytes(csv_path, text.getvalue().encode())
    for path, arr in ((planted_path, planted), (source_path, src)):
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_bytes(path, buf.getvalue())
    atomic_json(stamp, spec)
    return csv_path, planted, src


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = regime_config(args, "noisy")  # the demo regime: sizes, steps, teacher; its corpus is replaced below
    if args.teacher_cache_dir:
        base = dataclasses.replace(base, models=dataclasses.replace(base.models, cache_dir=args.teacher_cache_dir))
    out_dir = os.path.join(args.out_dir, f"o{args.originals}-d{args.duplicated}x{args.copies}")
    csv_path, planted, source = build_corpus(args, os.path.join(out_dir, "corpus"))
    data = DataConfig(dataset="csv", train_data=os.path.abspath(csv_path))
    cfg = dataclasses.replace(base, out_dir=out_dir, data=data)
    eval_cfg = dataclasses.replace(cfg, data=base.data)  # the clean Fashion-MNIST test split, as the demo's
    root = demo.Layout(out_dir)
    teacher = demo.Teacher(base)  # the default teacher (its key reads the data seed only)
    print(f"\n=== {out_dir}: embed ({len(planted)} rows, {int(planted.sum())} planted copies)", flush=True)
    demo.embed_stage(cfg, root, teacher)
    target = float(planted.mean())
    bdir, n, cal = de.balance_and_calibrate(cfg, root, args.eps_grid, [target])
    from clipcid_fast.pipeline import balance

    lines = []
    for eps in sorted(set(args.eps_grid)):
        removed = ~np.load(balance.keep_mask_path(bdir, eps))
        hit, gone = int((removed & planted).sum()), int(removed.sum())
        kept_src = len(np.unique(source[~removed]))
        rand = len(np.unique(source[de.random_mask(n, n - gone, 0.0, 0)]))
        lines.append(f"eps {eps:g}: removes {gone} rows, {hit} of them planted copies "
                     f"({hit / max(gone, 1):.1%}; {hit / planted.sum():.1%} of the copies); distinct images kept "
                     f"{kept_src} of {args.originals} (a random subset of its size: {rand})")  # fmt: skip
    print("\n".join(lines), flush=True)
    if args.calibrate_only:
        return 0
    e = cal[target][0]
    arms = de.arms_for(cal, bdir, n)
    results = {"arms": arms, "n": n, "teacher": headline(demo.teacher_eval_stage(eval_cfg, root, teacher)),
               "duplicates": [ln for ln in lines if ln.startswith(f"eps {e:g}:")]}  # fmt: skip
    results["runs"] = de.train_arms(cfg, eval_cfg, arms, bdir, args.recipe_list, args.seeds)
    stats = de.analyse(results, args.recipe_list, args.seeds)
    reg = {"student_samples": n, "caption_noise": args.caption_noise}
    de.append_csv(args.csv, de.csv_rows(cfg, results, stats, args.recipe_list, args.seeds, reg), columns=de.COLUMNS)
    de.plot(results, stats, args.recipe_list, args.plot,
            f"planted duplicates ({int(planted.sum())} of {n} rows): dedup vs random removal, {cfg.steps} steps "
            f"of {cfg.batch_size}, seeds {args.seeds}")  # fmt: skip
    print("\n" + de.table(cfg, results, stats, args.recipe_list, args.seeds, reg))
    print(json.dumps({"planted": int(planted.sum()), "rows": n}))
    print(f"\nrows appended to {args.csv}; plot {args.plot}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
