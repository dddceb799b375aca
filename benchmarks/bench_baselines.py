"""Eager-reference baselines (clipcid_fast.reference) for the three workloads, into the results CSV.

    cd /work/main && .venv/bin/python benchmarks/bench_baselines.py            # modest sizes, < ~4 min
    .venv/bin/python benchmarks/bench_baselines.py --full                      # toolchain.md sizes (hours, ~20 GB)
    .venv/bin/python benchmarks/bench_baselines.py --quick --no-memory         # smoke test

Ops (provider "reference"): distill_clip (x = B; fwd, bwd, full), cluster_discrimination (x = N, B = 1024,
ArcFace s = 32, m2 = 0.3; fwd, bwd, full), semdedup_max_sim (x = c; fwd). Each row: time quantiles in
this process, peak extra memory of one call in a fresh process, and model GFLOP/s (FLOP conventions
in benchmarks/workloads.py:flops and the README). The fp32 matmul ceiling is measured at the start of
the run and each row's note gives its GFLOP/s as a fraction of it. Plots go to <csv folder>/<op>.png.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import math
import time

import torch

from benchmarks import workloads
from benchmarks._harness import (
    append_rows,
    apply_common,
    common_args,
    device_name,
    load_factory,
    load_note,
    peak_memory,
    plot_unless_disabled,
    time_fn,
    timed_row,
)
from benchmarks.bench_mm_ceiling import measure_mm_gflops

OPS = {
    "distill_clip": dict(
        factory="benchmarks.workloads:distill_clip",
        x_name="B",
        modes=("fwd", "bwd", "full"),
        sizes=(1024, 2048, 4096),
        full_sizes=(1024, 4096, 8192, 16384),
        quick_sizes=(256, 512),
    ),
    "cluster_discrimination": dict(
        factory="benchmarks.workloads:cluster",
        x_name="N",
        modes=("fwd", "bwd", "full"),
        sizes=(10_000, 30_000),
        full_sizes=(10_000, 100_000, 1_000_000),
        quick_sizes=(2_000, 4_000),
    ),
    "semdedup_max_sim": dict(
        factory="benchmarks.workloads:dedup",
        x_name="c",
        modes=("fwd",),
        sizes=(2048, 8192),
        full_sizes=(2048, 8192, 16384, 32768),
        quick_sizes=(512, 1024),
    ),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, parents=[common_args()], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="the full sizes (slow, needs ~20 GB)")
    p.add_argument("--ops", nargs="+", choices=sorted(OPS), default=list(OPS), help="default: all")
    p.add_argument("--modes", nargs="+", choices=workloads.MODES, default=list(workloads.MODES))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--D", type=int, default=512)
    p.add_argument(
        "--max-row-seconds",
        type=float,
        default=12.0,
        help="budget for one row's timed calls: slow rows get fewer repeats, at least 3 (default 12; 0 = off)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    device = apply_common(args)
    if not args.max_row_seconds:
        args.max_row_seconds = None
    t_start = time.perf_counter()
    dev_name = device_name(device)
    print(f"device {device} ({dev_name}), {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)

    ceiling = measure_mm_gflops(device, torch.float32, repeats=3)
    print(f"fp32 mm ceiling [4096,512]x[512,4096]: {ceiling:.1f} GFLOP/s", flush=True)

    for op in args.ops:
        spec = OPS[op]
        sizes = spec["quick_sizes"] if args.quick else spec["full_sizes"] if args.full else spec["sizes"]
        for size in sizes:
            rows = []
            for mode in (m for m in spec["modes"] if m in args.modes):
                kwargs = dict(size=size, D=args.D, dtype=args.dtype, device=str(device))
                t0 = time.perf_counter()
                wl = load_factory(spec["factory"])(**kwargs, mode=mode)
                t = time_fn(
                    wl, warmup=args.warmup, repeats=args.repeats, device=device, max_seconds=args.max_row_seconds
                )
                flops = wl.flops
                del wl
                gc.collect()
                if args.no_memory:
                    mem = {"peak_mb": float("nan"), "method": "not measured"}
                else:
                    mem = peak_memory(spec["factory"], kwargs, mode, device=device, threads=args.threads)
                gflops = flops / (t["p50"] * 1e-3) / 1e9
                note = (
                    f"eager clipcid_fast.reference; dtype={args.dtype} D={args.D}"
                    + (" B=1024" if op == "cluster_discrimination" else "")
                    + f"; {t['repeats']} repeats; {gflops / ceiling:.0%} of fp32 mm ceiling {ceiling:.1f} GFLOP/s"
                    + f"; peak: {mem['method']}; {load_note()}"
                    + (f" ({mem['error']})" if "error" in mem else "")
                )
                rows.append(
                    timed_row(
                        op,
                        "reference",
                        mode,
                        spec["x_name"],
                        size,
                        t,
                        device=device,
                        note=note,
                        peak_mb=mem["peak_mb"],
                        gflops=gflops,
                    )
                )
                peak = mem["peak_mb"]
                print(
                    f"{op:24s} {spec['x_name']}={size:<8d} {mode:4s}  p50 {t['p50']:10.1f} ms "
                    f"[p20 {t['p20']:.1f}, p80 {t['p80']:.1f}]  "
                    f"peak {'n/a' if math.isnan(peak) else f'{peak:.0f}'} MB  {gflops:6.1f} GFLOP/s  "
                    f"({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
            append_rows(args.csv, rows)  # after each size, so an interrupted run keeps what it measured
        plot_unless_disabled(args, op, device=dev_name)
    print(f"results in {args.csv}; total {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
