"""``embed`` scaling: images/s of 1 process against 2 processes under torchrun, 1 intra-op thread each.

    cd /work/main && .venv/bin/python benchmarks/bench_embed.py --csv benchmarks/results/results.csv

Each run is ``torchrun --standalone --nproc-per-node N -m clipcid_fast embed`` (the default teacher on the offline
student corpus, ``OMP_NUM_THREADS=1``) into a fresh folder; the rate is embed.json's ``images_per_second``: every
rank's rows over the slowest rank's encoding seconds (start-up, model load and the summary not counted; wall_s in
the note counts them). The two runs alternate ``--repeats`` times (the machine is shared: load drifts); the row
holds the median. Appended as ``embed_images_s``, x = processes; p50_ms = ms per image.
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

import numpy as np

from benchmarks._harness import append_rows


def embed_once(root: str, procs: int, samples: int, shard_rows: int, batch: int) -> tuple[float, float]:
    """(images/s from embed.json, wall seconds) of one torchrun embed with ``procs`` processes."""
    out = os.path.join(root, f"embed-{procs}")
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
           "-m", "clipcid_fast", "embed", "--out-dir", out, "--no-progress", "--student-samples", str(samples),
           "--shard-rows", str(shard_rows), "--batch-size", str(batch)]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "embed.json")) as f:
        return float(json.load(f)["images_per_second"]), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="benchmarks/results/results.csv")
    ap.add_argument("--samples", type=int, default=4096, help="student-corpus images embedded per run")
    ap.add_argument("--shard-rows", type=int, default=256, help="16 shards of 4096: 8 per rank")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="bench_embed_")
    rates: dict[int, list[float]] = {1: [], 2: []}
    walls: dict[int, list[float]] = {1: [], 2: []}
    loads = []
    try:
        for _ in range(args.repeats):
            for procs in rates:
                loads.append(os.getloadavg()[0])
                rate, wall = embed_once(root, procs, args.samples, args.shard_rows, args.batch)
                rates[procs].append(rate)
                walls[procs].append(wall)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = float(np.median(rates[1]))
    rows = []
    for procs, rs in rates.items():
        rate = float(np.median(rs))
        rows.append({"op": "embed_images_s", "provider": f"torchrun_{procs}proc", "mode": "embed",
                     "x_name": "procs", "x_value": procs, "p50_ms": round(1e3 / rate, 3), "device": "cpu",
                     "threads": 1, "note": f"images_s={rate:.1f} (runs {', '.join(f'{r:.1f}' for r in rs)}); "
                     f"speedup={rate / base:.2f}x vs 1 process; default teacher, student corpus {args.samples} "
                     f"images, shard_rows={args.shard_rows}, batch={args.batch}, OMP_NUM_THREADS=1 per process; "
                     f"wall_s={np.median(walls[procs]):.1f} (start-up included); load1 {min(loads):.1f}-"
                     f"{max(loads):.1f} ({os.cpu_count()} cpus, shared)"})  # fmt: skip
    append_rows(args.csv, rows)
    for r in rows:
        print(r["op"], r["provider"], r["p50_ms"], "ms/image", r["note"])


if __name__ == "__main__":
    main()
