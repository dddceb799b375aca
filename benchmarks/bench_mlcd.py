"""``mlcd_loss`` benchmark: the fused MLCD multi-label cluster loss against the eager reference, into the results CSV.

    cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mlcd.py --threads 1   # N = 100k
    .venv/bin/python benchmarks/bench_mlcd.py --quick --no-memory                             # smoke test

Workload: B = 1024 embeddings against N class centres, D = 384, K = 8 positives per row (distinct, drawn from
one seeded generator), s = 32, ArcFace m2 = 0.5 on the positives, mean over rows, forward + backward to
embeddings and centres (mode ``full``). Op ``mlcd``, x = N. Providers:

* ``fused`` — ``clipcid_fast.ops.mlcd.mlcd_loss`` (``impl="auto"``: the C++ kernel on CPU, Triton on CUDA;
  ``check_values=False``, as in a training loop): the negatives' lse streamed over class tiles (forward
  2·B·N·D FLOPs, backward 6·B·N·D: it recomputes the logits), the positives B×K×D in torch;
* ``reference`` — the eager ``clipcid_fast.reference.mlcd_loss`` (B×N logits and masks).

GFLOP/s are credited with the eager count 6·B·N·D (forward GEMM + two gradient GEMMs) for both providers.
Peak memory: extra resident memory of one call in a fresh process (``_harness.peak_memory``), returned gradients
included.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
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
    time_fn,
    timed_row,
)

OP = "mlcd"
PROVIDERS = {"fused": "benchmarks.bench_mlcd:fused", "reference": "benchmarks.bench_mlcd:reference"}
SIZES = (100_000,)
QUICK_SIZES = (5_000,)


def _inputs(size, D, K, dtype, seed, device, B):
    g = torch.Generator().manual_seed(seed)
    dt = workloads.to_dtype(dtype)
    emb = torch.randn(B, D, generator=g).to(device=device, dtype=dt).requires_grad_()
    centres = torch.randn(size, D, generator=g).to(device=device, dtype=dt).requires_grad_()
    # K distinct centres per row: a random start and K evenly spaced steps (K·step < N)
    start = torch.randint(0, size, (B, 1), generator=g)
    labels = (start + torch.arange(K) * max(1, size // K)) % size
    return emb, centres, labels.to(device)


def _workload(make, size, D, K, dtype, mode, seed, device, B, s, m2):
    small = _inputs(min(size, 256), D, min(K, 4), dtype, seed + 1, device, min(B, 64))
    make(*small, s, m2)().backward()  # one small warm-up step: one-time costs before the memory baseline
    emb, centres, labels = _inputs(size, D, K, dtype, seed, device, B)
    return workloads.Workload(OP, mode, make(emb, centres, labels, s, m2), (emb, centres), 6.0 * B * size * D)


def _fused_forward(emb, centres, labels, s, m2):
    from clipcid_fast.ops.mlcd import mlcd_loss

    return lambda: mlcd_loss(emb, centres, labels, s, (1.0, m2, 0.0), reduction="mean", check_values=False)


def _reference_forward(emb, centres, labels, s, m2):
    ref = workloads._reference()
    return lambda: ref.mlcd_loss(emb, centres, labels, s, 1.0, m2, 0.0).mean()


def fused(size, D=384, K=8, dtype="float32", mode="full", seed=0, device="cpu", B=1024, s=32.0, m2=0.5):
    return _workload(_fused_forward, size, D, K, dtype, mode, seed, device, B, s, m2)


def reference(size, D=384, K=8, dtype="float32", mode="full", seed=0, device="cpu", B=1024, s=32.0, m2=0.5):
    return _workload(_reference_forward, size, D, K, dtype, mode, seed, device, B, s, m2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, parents=[common_args()], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", help="N values (default 100k; --quick 5k)")
    p.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=workloads.MODES, default=["full"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--D", type=int, default=384)
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    args = p.parse_args(argv)
    device = apply_common(args)
    from benchmarks.bench_mm_ceiling import bracket_mm

    dev_name = device_name(device)
    print(f"device {device} ({dev_name}), {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    for size in args.sizes or (QUICK_SIZES if args.quick else SIZES):
        rows = []
        for provider in args.providers:
            for mode in args.modes:
                kwargs = dict(size=size, D=args.D, K=args.K, dtype=args.dtype, device=str(device))
                t0 = time.perf_counter()
                wl = load_factory(PROVIDERS[provider])(**kwargs, mode=mode)
                t, ceiling = bracket_mm(
                    device, functools.partial(time_fn, wl, warmup=args.warmup, repeats=args.repeats, device=device)
                )
                gflops = wl.flops / (t["p50"] * 1e-3) / 1e9
                del wl
                gc.collect()
                mem = (
                    {"peak_mb": float("nan"), "method": "not measured"}
                    if args.no_memory
                    else peak_memory(PROVIDERS[provider], kwargs, mode, device=device, threads=args.threads)
                )
                note = (
                    f"{provider}; MLCD s=32 m2=0.5 B=1024 K={args.K} D={args.D} dtype={args.dtype}; "
                    f"{args.repeats} repeats; {gflops / ceiling:.0%} of fp32 mm ceiling {ceiling:.1f} GFLOP/s; "
                    f"peak: {mem['method']}; {load_note()}"
                )
                rows.append(timed_row(OP, provider, mode, "N", size, t, device=device, note=note,
                                      peak_mb=mem["peak_mb"], gflops=gflops))  # fmt: skip
                peak = mem["peak_mb"]
                print(
                    f"{provider:10s} N={size:<8d} {mode:4s}  p50 {t['p50']:10.1f} ms [p20 {t['p20']:.1f}, "
                    f"p80 {t['p80']:.1f}]  peak {'n/a' if math.isnan(peak) else f'{peak:.0f}'} MB  "
                    f"{gflops:6.1f} GFLOP/s ({gflops / ceiling:.0%} of mm)  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
        append_rows(args.csv, rows)
    print(f"results in {args.csv}", flush=True)


if __name__ == "__main__":
    main()
