"""Streamed-training benchmarks: train start-up on a 10M-row teacher cache (the persisted id index against the
in-memory rebuild), and streamed webdataset training samples/s against the map-style path at the same batch.

    cd /work/main && .venv/bin/python benchmarks/bench_stream.py --csv benchmarks/results/results.csv
    .venv/bin/python benchmarks/bench_stream.py --only startup --rows 1000000     # smaller, quicker

Rows appended (long-format CSV, ``_harness.append_rows``):

* ``train_startup``, x = cache rows: ``persisted_index`` (``load_embeddings`` of a cache with ``id_index/``, then
  one lookup of a 256-id batch, the trainer's start-up on the cache) and ``rebuilt_index`` (the same cache without
  ``id_index/``: the argsort fallback), plus ``read_ids`` (only reading every ids shard: the floor). Each in a fresh
  process, p50 of ``--repeats`` (the page cache is warm after the first: this times the work, not the disk).
* ``train_samples_s``, x = batch: ``map_style`` (the offline default corpus, fashion-mnist: images from arrays in
  memory), ``map_style_csv`` (the same 10k samples exported as PNG files + CSV: the same decode as the shards) and
  ``wds_stream`` (exported to 10 shards, ``--workers 2``), recipe baseline (no teacher: the data path and the
  student step only), the same steps; the note holds samples/s from the run's summary. p50_ms is ms per step.
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

STARTUP_CHILD = """
import os, sys, time
import numpy as np
from clipcid_fast.pipeline.embed import load_embeddings  # imported before the clock starts: not the cache's cost
mode, path = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "read_ids":
    d = os.path.join(path, "ids")
    ids = np.concatenate([np.load(os.path.join(d, f)) for f in sorted(os.listdir(d))])
else:
    emb = load_embeddings(path)
    query = np.asarray(emb["ids"][:: max(1, len(emb["ids"]) // 256)][:256])
    emb["row_of"](query)
print(time.perf_counter() - t0)
"""


def synthetic_cache(root: str, rows: int, shard_rows: int = 1_000_000, dim: int = 4) -> None:
    """An embed directory of ``rows`` unique ids in random order (the layout and embed.json ``load_embeddings``
    reads), with its id index written as embed writes it."""
    from clipcid_fast.pipeline.id_index import write_index

    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(rows, dtype=np.int64) * 7 + 3)
    shards = (rows + shard_rows - 1) // shard_rows
    for sub in ("image", "text", "ids", "labels"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for k in range(shards):
        a, b = k * shard_rows, min(rows, (k + 1) * shard_rows)
        feats = np.zeros((b - a, dim), np.float16)
        np.save(os.path.join(root, "image", f"{k:05d}.npy"), feats)
        np.save(os.path.join(root, "text", f"{k:05d}.npy"), feats)
        np.save(os.path.join(root, "ids", f"{k:05d}.npy"), ids[a:b])
        np.save(os.path.join(root, "labels", f"{k:05d}.npy"), np.full(b - a, -1, np.int64))
    write_index(root, ids)
    meta = {"format": 1, "model": {"fingerprint": "synthetic"}, "dataset": {}, "shard_rows": shard_rows,
            "count": rows, "dim": dim, "dtype": "float16", "shards": shards, "normalized": True}  # fmt: skip
    with open(os.path.join(root, "embed.json"), "w") as f:
        json.dump(meta, f)


def startup(rows: int, repeats: int) -> list[dict]:
    root = tempfile.mkdtemp(prefix="bench_stream_")
    try:
        synthetic_cache(root, rows)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        times: dict[str, list[float]] = {"read_ids": [], "persisted_index": [], "rebuilt_index": []}
        for mode in times:
            if mode == "rebuilt_index":
                shutil.rmtree(os.path.join(root, "id_index"))
            for _ in range(repeats):
                out = subprocess.run([sys.executable, "-c", STARTUP_CHILD, mode, root], env=env, check=True,
                                     capture_output=True, text=True).stdout  # fmt: skip
                times[mode].append(float(out.strip().splitlines()[-1]) * 1e3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = []
    for mode, ts in times.items():
        p20, p50, p80 = np.percentile(ts, [20, 50, 80])
        out.append({"op": "train_startup", "provider": mode, "mode": "startup", "x_name": "rows", "x_value": rows,
                    "p20_ms": round(p20, 1), "p50_ms": round(p50, 1), "p80_ms": round(p80, 1), "device": "cpu",
                    "threads": 1, "note": f"repeats={repeats}; fresh process each, imports not timed; "
                    "load_embeddings + one 256-id lookup (read_ids: only reading the ids shards)"})  # fmt: skip
    return out


def throughput(batch: int, steps: int, workers: int) -> list[dict]:
    import torch

    from clipcid_fast.pipeline import train
    from clipcid_fast.pipeline.config import DataConfig, TrainConfig
    from clipcid_fast.pipeline.data import export_corpus

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="bench_stream_")
    try:
        manifest = export_corpus(DataConfig(), os.path.join(root, "export"), shard_size=1000)
        runs = {
            "map_style": DataConfig(),
            "map_style_csv": DataConfig(dataset="csv", train_data=manifest["csv"]),
            "wds_stream": DataConfig(dataset="wds", train_data=manifest["wds"], workers=workers),
        }
        out = []
        for name, data in runs.items():
            t0 = time.perf_counter()
            s = train.run_train(TrainConfig(out_dir=os.path.join(root, name), recipe="baseline", steps=steps,
                                            batch_size=batch, eval_every=0, ckpt_every=steps, progress=False,
                                            data=data))  # fmt: skip
            wall = time.perf_counter() - t0
            rate = s["samples_per_second_this_run"]
            out.append({"op": "train_samples_s", "provider": name, "mode": "train", "x_name": "B", "x_value": batch,
                        "p50_ms": round(1e3 * batch / rate, 2), "device": "cpu", "threads": 1,
                        "note": f"samples_s={rate:.1f}; steps={steps}; recipe=baseline; 10k student corpus; "
                        f"workers={data.workers if name == 'wds_stream' else 0}; wall_s={wall:.1f} (start-up "
                        f"included); load={os.getloadavg()[0]:.2f} ({os.cpu_count()} cpus)"})  # fmt: skip
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="benchmarks/results/results.csv")
    ap.add_argument("--only", choices=("startup", "throughput"), default=None)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    rows = []
    if args.only in (None, "startup"):
        rows += startup(args.rows, args.repeats)
    if args.only in (None, "throughput"):
        rows += throughput(args.batch, args.steps, args.workers)
    append_rows(args.csv, rows)
    for r in rows:
        print(r["op"], r["provider"], r["x_value"], r["p50_ms"], "ms", r.get("note", ""))


if __name__ == "__main__":
    main()
