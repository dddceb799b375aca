"""cid with the single-label cluster term against cid with MLCD's multi-label term (``--cd-topk k``), same seeds.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mlcd_recipe.py --seeds 0 --topk 0 4

Not a timed benchmark: zero-shot top-1, linear-probe top-1 and image→text R@1 on the held-out Fashion-MNIST test
split after ``--steps`` steps of ``--batch-size`` (the demo's offline regime and budget). Every stage is
``clipcid_fast.pipeline.demo``'s, run into ``--out-dir`` (a rerun reuses finished stages); the pseudo-classes are
one ``run_cluster`` with ``--topk max(k)`` (its ``labels.npy`` is the single-label run's labels: ``topk[:, 0]``),
so ``k = 0`` and ``k > 0`` differ only in the cluster term. Rows appended to ``--csv``
(``benchmarks/results/mlcd_recipe.csv``: one per k × seed × metric, and the paired difference from k = 0).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import csv
import dataclasses
import datetime as _dt
import os
import time

import torch

from benchmarks._harness import device_name, git_sha
from clipcid_fast.pipeline import demo
from clipcid_fast.pipeline.demo_report import METRICS, headline

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/mlcd_recipe")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--topk", type=int, nargs="+", default=[0, 4], help="cd_topk values (0 = single-label)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--csv", type=Path, default=RESULTS / "mlcd_recipe.csv")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from clipcid_fast.pipeline import balance, train

    cfg = demo.build_demo_config(overrides={"out_dir": args.out_dir, "steps": args.steps,
                                            "batch_size": args.batch_size, "progress": False})  # fmt: skip
    layout = demo.Layout(args.out_dir, f"steps{args.steps}-b{args.batch_size}")
    teacher = demo.Teacher(cfg)
    t0 = time.perf_counter()
    demo.embed_stage(cfg, layout, teacher)
    demo.balance_stage(cfg, layout)
    kmax = max(args.topk)
    cluster = layout.cluster(cfg.balance_k, cfg.balance_eps, cfg.n_classes) + f"-topk{kmax}"
    if not os.path.isfile(os.path.join(cluster, "cluster.json")):
        keep = balance.keep_mask_path(layout.balance(cfg.balance_k), cfg.balance_eps)
        balance.run_cluster(os.path.join(layout.embed, "image"), cluster, cfg.n_classes, keep=keep, seed=0, topk=kmax)
    print(f"embed / balance / cluster ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    results: dict[tuple[int, int], dict] = {}
    for seed in args.seeds:
        for k in args.topk:
            name = f"cid-topk{k}"
            tcfg = demo.train_config(cfg, layout, "cid", seed)
            tcfg = dataclasses.replace(tcfg, out_dir=layout.train(name, seed), cluster_dir=cluster,
                                       weights=dataclasses.replace(cfg.weights, cd_topk=k))  # fmt: skip
            t1 = time.perf_counter()
            if demo._finished_run(tcfg) is None:
                train.run_train(tcfg)
            student = os.path.join(tcfg.out_dir, "student.pt")
            res = headline(demo.eval_stage(cfg, layout.eval_json(f"{name}-seed{seed}"), student,
                                           demo._sha256_file(student)))  # fmt: skip
            results[(k, seed)] = res
            shown = ", ".join(f"{m} {res[m] * 100:.1f}" for m in METRICS if m in res)
            print(f"k={k} seed={seed}: {shown} ({time.perf_counter() - t1:.0f} s)", flush=True)
    rows = []
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for (k, seed), res in results.items():
        for m in METRICS:
            if m not in res:
                continue
            base = results.get((0, seed), {}).get(m)
            rows.append({"k": k, "seed": seed, "metric": m, "value": res[m],
                         "diff_vs_k0": "" if base is None else res[m] - base, "steps": args.steps,
                         "batch_size": args.batch_size, "device": device_name("cpu"), "threads": args.threads,
                         "git_sha": git_sha(), "timestamp": stamp})  # fmt: skip
    new = not args.csv.exists()
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} rows appended to {args.csv}", flush=True)


if __name__ == "__main__":
    main()
