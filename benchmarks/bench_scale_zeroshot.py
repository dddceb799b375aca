"""Streamed webdataset training against the map-style default path: the same recipe, samples and steps, then the
zero-shot of each student on the held-out split as class folders (the README's "Your data at scale").

    cd /work/main && .venv/bin/python benchmarks/bench_scale_zeroshot.py --csv benchmarks/results/results.csv

The offline student corpus (10k) is exported to 16 tars and the test split to class folders; the default teacher
embeds it twice (map-style, and the tars under ``torchrun --nproc-per-node 2``); the student trains ``--steps`` of
``--batch`` on each (the tars streamed with ``--workers 2``), 1 thread, the same seed; ``eval --eval-data`` on the
folders. The two runs draw the samples in different orders, so their zero-shot agrees only statistically.
Appended as ``scale_zeroshot`` rows (provider map_style / wds_stream), the top-1 in the note.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

from benchmarks._harness import append_rows


def cli(args: list[str], procs: int = 1) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else []
    res = subprocess.run([sys.executable, *launcher, "-m", "clipcid_fast", *args], env=env, capture_output=True,
                         text=True)  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"clipcid-fast {args[0]} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="benchmarks/results/results.csv")
    ap.add_argument("--recipe", default="rd")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--keep", default=None, help="keep the work folder here instead of a temporary one")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="bench_scale_")
    export = os.path.join(root, "export")
    wds = os.path.join(export, "student-wds", "student-{00000..00015}.tar")
    folders = os.path.join(export, "test-folders")
    cli(["export-data", "--corpus", "student", "--formats", "wds", "--shard-size", "625", "--out-dir", export])
    cli(["export-data", "--corpus", "test", "--formats", "folders", "--out-dir", export])
    paths = {"map_style": [], "wds_stream": ["--dataset", "wds", "--train-data", wds]}
    rows = []
    try:
        for name, data in paths.items():
            cache, run = os.path.join(root, f"embed_{name}"), os.path.join(root, f"train_{name}")
            cli(["embed", "--out-dir", cache, "--no-progress", *data], procs=2 if data else 1)
            t0 = time.perf_counter()
            workers = ["--workers", "2"] if data else []
            cli(["train", "--recipe", args.recipe, "--teacher-cache", cache, "--steps", str(args.steps),
                 "--batch-size", str(args.batch), "--eval-every", "0", "--no-progress", "--out-dir", run, *data,
                 *workers])  # fmt: skip
            seconds = time.perf_counter() - t0
            out = os.path.join(run, "eval.json")
            cli(["eval", "--model", os.path.join(run, "student.pt"), "--eval-data", folders, "--tasks", "zeroshot",
                 "--out", out, "--no-progress"])  # fmt: skip
            with open(out) as f:
                top1 = json.load(f)["zeroshot"]["top1"]
            rows.append(
                {
                    "op": "scale_zeroshot",
                    "provider": name,
                    "mode": "train",
                    "x_name": "steps",
                    "x_value": args.steps,
                    "device": "cpu",
                    "threads": 1,
                    "note": f"zeroshot_top1={100 * top1:.2f}%; recipe={args.recipe}; B={args.batch}; "
                    f"10k student corpus{' in 16 tars, --workers 2' if data else ''}; test split as class "
                    f"folders; train_s={seconds:.0f}; load={os.getloadavg()[0]:.1f} ({os.cpu_count()} cpus)",
                }
            )
            print(name, f"zero-shot top-1 {100 * top1:.2f}%", flush=True)  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    append_rows(args.csv, rows)
    for r in rows:
        print(r["op"], r["provider"], r["note"])


if __name__ == "__main__":
    main()
