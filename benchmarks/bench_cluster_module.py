"""``cluster_discrimination_loss`` through the module, as a trainer calls it: ``ClusterDiscriminationLoss``
forward + backward, into the CSV.

    cd /work/main && .venv/bin/python benchmarks/bench_cluster_module.py            # N = 10k, 100k, 1M (~10 min)
    .venv/bin/python benchmarks/bench_cluster_module.py --sizes 1000000 --dtypes bfloat16   # one size, one dtype
    .venv/bin/python benchmarks/bench_cluster_module.py --quick                      # smoke test (seconds)

Workload: B = 1024 fp32 embeddings (requires grad, as a student's output) against the module's N × D = 512
centres (an ``nn.Parameter``; fp32, or bf16 after ``module.to(torch.bfloat16)``), ArcFace s = 32, m2 = 0.3,
labels uniform in [0, N); one training step = ``module(emb, labels).backward()`` (mode ``full``).
Op ``cluster_module_fp32`` / ``cluster_module_bf16`` (the centres' dtype), x = N. Providers:

* ``module`` — ``ClusterDiscriminationLoss(...)`` with its default (``check_values=False``: the hot path);
* ``module-checked`` — the same with ``check_values=True``, the debug flag (formerly the default:
  it reads the labels and every centre each step, with N × D temporaries);
* ``op`` — the bare functional ``cluster_discrimination_loss(..., reduction="mean", check_values=False)`` on the
  same tensors, for comparison.

``--tag T`` appends ``@T`` to every provider name, so rows of another build of the kernels (e.g. ``--tag old``,
measured before a change) stay beside the current ones in the CSV and the plot.

Peak memory is ``_harness.peak_memory``'s (a fresh spawned process, VmHWM − VmRSS around one step after a small
warm-up step); it includes the returned gradients (B·D fp32 + N·D in the centres' dtype), so the printed line
and the note also give the memory **beyond** them, the figure of its bar (≤ 512 MB at N = 1M). Times are one
step in this process after the same warm-up (``--repeats`` steps below N = 500k, one at and above it: a 1M
step is 30-60 s on the 2-core CPU). Never two 1M processes at once: the timing process frees its tensors
before the memory child starts.
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
    load_note,
    peak_memory,
    plot_unless_disabled,
    time_fn,
    timed_row,
)

PROVIDERS = ("module", "module-checked", "op")
SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 4_000)
DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
B, S, M2 = 1024, 32.0, 0.3


def op_name(dtype: str) -> str:
    return f"cluster_module_{SHORT[dtype]}"


def _build(provider: str, size: int, D: int, dtype: str, device: str, seed: int):
    """``(forward, params)``: the module (or the op) over fresh inputs; ``forward()`` returns the loss."""
    from clipcid_fast.losses import ClusterDiscriminationLoss
    from clipcid_fast.ops.margin_softmax import cluster_discrimination_loss

    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B if size > 256 else 64, D, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, size, (emb.shape[0],), generator=g).to(device)
    torch.manual_seed(seed)  # the module's centres: N(0, 0.01), as unicom's PartialFC
    mod = ClusterDiscriminationLoss(size, D, margin=(1.0, M2, 0.0), scale=S, check_values=provider == "module-checked")
    mod = mod.to(device=device, dtype=workloads.to_dtype(dtype))
    if provider == "op":
        centres = mod.centres

        def forward():
            return cluster_discrimination_loss(
                emb, centres, labels, S, (1.0, M2, 0.0), reduction="mean", check_values=False
            )

    else:

        def forward():
            return mod(emb, labels)

    return forward, [emb, mod.centres]


def step(size, D=512, dtype="float32", mode="full", seed=0, device="cpu", provider="module") -> workloads.Workload:
    """Harness factory: a small warm-up step (pays a fresh process's one-time costs before the memory baseline),
    then the workload of one training step at N = ``size``."""
    fw, _ = _build(provider, min(size, 256), D, dtype, device, seed + 1)
    fw().backward()
    forward, params = _build(provider, size, D, dtype, device, seed)
    return workloads.Workload(op_name(dtype), mode, forward, params, workloads.flops("cluster", mode, size, D, B))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, parents=[common_args()], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", help="N values (default 10k 100k 1M; --quick: 2k 4k)")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="the centres' dtype")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--tag", default="", help="suffix '@TAG' on the provider names (e.g. 'old' for a build before)")
    p.add_argument("--note", default="", help="free text appended to every row's note (e.g. which build)")
    p.add_argument("--no-timing", action="store_true", help="peak memory only")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    device = apply_common(args)
    dev_name = device_name(device)
    t_start = time.perf_counter()
    print(f"device {device} ({dev_name}), {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    for dtype in args.dtypes:
        op = op_name(dtype)
        for size in sizes:
            rows = []
            for provider in args.providers:
                name = provider + (f"@{args.tag}" if args.tag else "")
                kwargs = dict(size=size, D=args.D, dtype=dtype, device=str(device), provider=provider)
                t0 = time.perf_counter()
                timing = {"p20": math.nan, "p50": math.nan, "p80": math.nan, "repeats": 0}
                if not args.no_timing:
                    wl = step(**kwargs, mode="full")
                    reps = args.repeats if size < 500_000 else 1
                    timing = time_fn(wl, warmup=0 if size >= 500_000 else args.warmup, repeats=reps, device=device)
                    del wl
                    gc.collect()
                mem = peak_memory("benchmarks.bench_cluster_module:step", kwargs, "full", device=device,
                                  threads=args.threads)  # fmt: skip
                itemsize = workloads.to_dtype(dtype).itemsize
                grads_mb = (B * args.D * 4 + size * args.D * itemsize) / 1e6
                beyond = mem["peak_mb"] - grads_mb
                note = (
                    f"{provider}; ArcFace s=32 m2=0.3 B={B} D={args.D} fp32 embeddings, {dtype} centres; "
                    f"{timing['repeats']} timed steps; peak includes the returned grads ({grads_mb:.0f} MB), "
                    f"beyond them {beyond:.0f} MB; peak: {mem['method']}; {load_note()}"
                    + (f" ({mem['error']})" if "error" in mem else "")
                    + (f"; {args.note}" if args.note else "")
                )
                gflops = workloads.flops("cluster", "full", size, args.D, B) / (timing["p50"] * 1e-3) / 1e9
                peak = mem["peak_mb"]
                rows.append(
                    timed_row(
                        op, name, "full", "N", size, timing, device=device, note=note, peak_mb=peak, gflops=gflops
                    )
                )
                print(
                    f"{op} {name:22s} N={size:<8d} p50 {timing['p50']:10.1f} ms  peak {mem['peak_mb']:7.0f} MB  "
                    f"beyond grads {beyond:7.0f} MB  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
            append_rows(args.csv, rows)  # after each size, so an interrupted run keeps what it measured
        plot_unless_disabled(args, op, device=dev_name)
    print(f"results in {args.csv}; total {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
