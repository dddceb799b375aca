"""``masked_max_similarity`` benchmark: the per-cluster SemDeDup op (masked max cosine over earlier rows) against
dense eager forms.

    cd /work/main && .venv/bin/python benchmarks/bench_dedup.py --csv /tmp/k3_dedup.csv     # c = 2048, 8192
    .venv/bin/python benchmarks/bench_dedup.py --full                                       # c = 2k … 32k (long)
    .venv/bin/python benchmarks/bench_dedup.py --load-library /tmp/k3_build/k3_dev.so      # an uninstalled build

Workload: one cluster of c random unit rows, D = 512, fp32 (``--dtype bfloat16`` for bf16 storage); every
provider returns the column max over earlier rows (and its argmax where the form gives one). Op
``dedup_cluster``, x = c, mode fwd. Providers:

* ``fused`` — ``clipcid_fast.ops.masked_max_sim.masked_max_similarity`` (``impl="auto"``: the C++ kernel on
  CPU; ``check_values=False`` as in the pipeline): lower-triangle tiles, never c×c;
* ``dense_fair`` — the fair dense eager form: ``S = X̂X̂ᵀ``, in-place ``triu_(1)``,
  ``amax(dim=0)`` (one c×c matrix, no indices; SemDeDup's zero fill);
* ``semdedup`` — SemDeDup-style dense: ``S = X̂X̂ᵀ``, ``torch.triu`` copy, ``max(dim=0)`` with indices;
* ``reference`` — ``clipcid_fast.reference.masked_max_similarity`` (c×c, a mask, ``masked_fill``, max).

GFLOP/s are credited ``c²·D`` FLOPs for every provider (the lower triangle's GEMM work, which the issue's
bar is stated in; the dense forms really do ``2·c²·D``). The note column gives the ratio to the fp32
``torch.mm`` ceiling measured right before and right after each row (``bench_mm_ceiling.bracket_mm``: the larger) and,
for ``fused``, the time and peak-memory ratios to ``dense_fair`` of the same run. Peak memory is the extra
RSS of one call in a fresh process (harness), over the input.
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

OP = "dedup_cluster"
PROVIDERS = {
    "fused": "benchmarks.bench_dedup:fused",
    "dense_fair": "benchmarks.bench_dedup:dense_fair",
    "semdedup": "benchmarks.bench_dedup:semdedup_dense",
    "reference": "benchmarks.bench_dedup:reference_dense",
}
SIZES = (2048, 8192)
FULL_SIZES = (2048, 4096, 8192, 16384, 32768)
QUICK_SIZES = (2048,)
DENSE = ("dense_fair", "semdedup", "reference")


def dedup_flops(c: int, D: int) -> float:
    """``c²·D``: the lower triangle's GEMM FLOPs (2·D per pair i < j)."""
    return float(c) * c * D


def _rows(size, D, dtype, seed, device):
    return workloads._unit_rows(size, D, torch.Generator().manual_seed(seed), workloads.to_dtype(dtype), device)


def _workload(run, x, mode, size, D):
    """``run(x)`` as a Workload, after one call on 64 rows: one-time process costs (lazy imports of the
    torch.library dispatch, MKL / OpenMP start-up) are not charged to the measured call of any provider."""
    if mode != "fwd":
        raise ValueError("dedup has only mode 'fwd'")
    run(x[:64])
    return workloads.Workload(OP, mode, lambda: run(x), (), dedup_flops(size, D))


def fused(size, D=512, dtype="float32", mode="fwd", seed=0, device="cpu", library=None, tile=0):
    if library:  # a build of the C++ kernels not installed in the package
        torch.ops.load_library(library)
    from clipcid_fast.ops.masked_max_sim import masked_max_similarity

    x = _rows(size, D, dtype, seed, device)

    def run(a):
        return masked_max_similarity(a, "auto", tile=tile, check_values=False)

    return _workload(run, x, mode, size, D)


def _normalised(x):
    xf = x.float()
    return xf / xf.norm(dim=1, keepdim=True)


def dense_fair(size, D=512, dtype="float32", mode="fwd", seed=0, device="cpu", **_):
    x = _rows(size, D, dtype, seed, device)

    def run(a):
        with torch.no_grad():
            xn = _normalised(a)
            sim = xn @ xn.T
            sim.triu_(diagonal=1)  # SemDeDup's zero fill of i ≥ j, in place
            return sim.amax(dim=0)

    return _workload(run, x, mode, size, D)


def semdedup_dense(size, D=512, dtype="float32", mode="fwd", seed=0, device="cpu", **_):
    x = _rows(size, D, dtype, seed, device)

    def run(a):
        with torch.no_grad():
            xn = _normalised(a)
            sim = xn @ xn.T
            tri = torch.triu(sim, diagonal=1)
            return tri.max(dim=0)

    return _workload(run, x, mode, size, D)


def reference_dense(size, D=512, dtype="float32", mode="fwd", seed=0, device="cpu", **_):
    from clipcid_fast import reference

    x = _rows(size, D, dtype, seed, device)

    def run(a):
        with torch.no_grad():
            return reference.masked_max_similarity(a)

    return _workload(run, x, mode, size, D)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, parents=[common_args()], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="c = 2048 … 32768 (the dense forms need ~8.6 GB at 32k)")
    p.add_argument("--sizes", type=int, nargs="+", help="explicit c values (override the defaults)")
    p.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--tile", type=int, default=0, help="fused tile (0 = the kernel's default)")
    p.add_argument("--max-eager-c", type=int, default=32768, help="skip the dense providers above this c")
    p.add_argument("--load-library", default=None, help="a .so with the C++ kernels (dev builds)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    args = p.parse_args(argv)
    device = apply_common(args)
    if args.load_library:
        torch.ops.load_library(args.load_library)
    from benchmarks.bench_mm_ceiling import bracket_mm, measure_mm_gflops
    from clipcid_fast.ops.masked_max_sim import has_cpu_kernel

    t_start = time.perf_counter()
    print(f"device {device} ({device_name(device)}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    if device.type == "cpu" and not has_cpu_kernel():
        print("warning: the C++ op is not registered; 'fused' runs the reference", flush=True)
    ceiling = measure_mm_gflops(device, torch.float32, repeats=3)
    print(f"fp32 mm ceiling [4096,512]x[512,4096]: {ceiling:.1f} GFLOP/s", flush=True)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES if args.full else SIZES)
    for size in sizes:
        rows, res = [], {}
        for provider in args.providers:
            if provider in DENSE and size > args.max_eager_c:
                print(f"skip {provider} at c={size} (> --max-eager-c {args.max_eager_c})", flush=True)
                continue
            kwargs = dict(size=size, D=args.D, dtype=args.dtype, device=str(device))
            if provider == "fused":
                kwargs["tile"] = args.tile
                if args.load_library:
                    kwargs["library"] = args.load_library
            t0 = time.perf_counter()
            wl = load_factory(PROVIDERS[provider])(**kwargs, mode="fwd")
            t, ceiling = bracket_mm(
                device,
                functools.partial(
                    time_fn, wl, warmup=args.warmup, repeats=args.repeats, device=device, max_seconds=120
                ),
            )
            flops = wl.flops
            del wl
            gc.collect()
            if args.no_memory:
                mem = {"peak_mb": float("nan"), "method": "not measured"}
            else:
                mem = peak_memory(PROVIDERS[provider], kwargs, "fwd", device=device, threads=args.threads)
            gflops = flops / (t["p50"] * 1e-3) / 1e9
            res[provider] = (t["p50"], mem["peak_mb"], gflops)
            rows.append(
                timed_row(
                    OP,
                    provider,
                    "fwd",
                    "c",
                    size,
                    t,
                    device=device,
                    note=(
                        f"{provider}; D={args.D} dtype={args.dtype}; FLOPs c^2*D; {t['repeats']} repeats; "
                        f"{gflops / ceiling:.0%} of fp32 mm ceiling {ceiling:.1f} GFLOP/s (max of before/after); "
                        f"peak: {mem['method']}; {load_note()}" + (f" ({mem['error']})" if "error" in mem else "")
                    ),
                    peak_mb=mem["peak_mb"],
                    gflops=gflops,
                )
            )
            peak = mem["peak_mb"]
            print(
                f"{provider:10s} c={size:<6d} p50 {t['p50']:10.1f} ms [p20 {t['p20']:.1f}, p80 {t['p80']:.1f}]  "
                f"peak {'n/a' if math.isnan(peak) else f'{peak:.1f}'} MB  {gflops:6.1f} GFLOP/s "
                f"({gflops / ceiling:.0%} of mm)  ({time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
        if "fused" in res and "dense_fair" in res:
            (tf, mf, _), (td, md, _) = res["fused"], res["dense_fair"]
            ratio = f"fused / dense_fair at c={size}: time {tf / td:.3f}, peak memory {mf / md:.4f}"
            print(ratio, flush=True)
            rows[[r["provider"] for r in rows].index("fused")]["note"] += f"; {ratio}"
        append_rows(args.csv, rows)  # after each size, so an interrupted run keeps what it measured
    print(f"results in {args.csv}; total {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
