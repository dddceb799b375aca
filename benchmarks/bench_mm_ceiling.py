"""Matmul ceiling of this machine: GFLOP/s of torch.mm [4096,512]×[512,4096] (the logit GEMM shape).

Rows: op="mm_ceiling", provider="torch.mm", mode = layout ("nn": B stored [k, n] row-major;
"nt": B stored transposed as [n, k] and used as B.T), x_name="dtype", x_value = the dtype,
gflops = 2·m·k·n / p50. fp32 is the ceiling the CPU kernels are compared with; bf16 is recorded
for reference (on CPUs without bf16 instructions it is far slower, 0.5 GFLOP/s for "nn", so there
"nn" bf16 uses a [1024,512]×[512,1024] shape unless --full; the note column gives the shape).

    cd /work/main && .venv/bin/python benchmarks/bench_mm_ceiling.py [--device cpu|cuda] [--full]

Other scripts call :func:`measure_mm_gflops` to put the ceiling of the same run beside their numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import time

import torch

from benchmarks._harness import append_rows, apply_common, common_args, load_note, time_fn, timed_row

SHAPE = (4096, 512, 4096)  # m, k, n
SMALL_SHAPE = (1024, 512, 1024)


def _operands(m: int, k: int, n: int, dtype: torch.dtype, layout: str, device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    if layout == "nn":
        b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    elif layout == "nt":
        b = torch.randn(n, k, generator=g).to(device=device, dtype=dtype).T  # a view of [n, k] storage
    else:
        raise ValueError(f"layout must be 'nn' or 'nt', got {layout!r}")
    return a, b


def measure_mm(
    device,
    dtype: torch.dtype = torch.float32,
    *,
    layout: str = "nn",
    shape: tuple[int, int, int] = SHAPE,
    warmup: int = 1,
    repeats: int = 5,
) -> dict:
    """Time ``torch.mm`` for ``shape = (m, k, n)``; returns time_fn's dict plus ``gflops`` (from p50)."""
    m, k, n = shape
    a, b = _operands(m, k, n, dtype, layout, device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    t = time_fn(lambda: torch.mm(a, b, out=out), warmup=warmup, repeats=repeats, device=device)
    t["gflops"] = 2.0 * m * k * n / (t["p50"] * 1e-3) / 1e9
    return t


def measure_mm_gflops(device, dtype: torch.dtype = torch.float32, *, layout: str = "nn", repeats: int = 5) -> float:
    """GFLOP/s (from the median of ``repeats`` calls) of ``torch.mm`` [4096,512]×[512,4096] on ``device``."""
    return measure_mm(device, dtype, layout=layout, repeats=repeats)["gflops"]


def bracket_mm(device, timed, *, repeats: int = 15):
    """``(timed(), ceiling)``: runs ``timed()`` between two :func:`measure_mm_gflops` calls and returns the
    larger of the two fp32 GFLOP/s. This VM's GEMM rate drifts by ±20 % over minutes, so a ratio against
    one reading taken at the start of a long run can flatter or wrong a kernel; the larger is the
    conservative ceiling."""
    before = measure_mm_gflops(device, torch.float32, repeats=repeats)
    result = timed()
    return result, max(before, measure_mm_gflops(device, torch.float32, repeats=repeats))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, parents=[common_args()], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="default: float32 bfloat16")
    p.add_argument("--full", action="store_true", help="bf16 'nn' at the full 4096 shape too (≈35 s a call on CPU)")
    args = p.parse_args(argv)
    device = apply_common(args)
    t_start = time.perf_counter()
    rows = []
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for layout in ("nn", "nt"):
            slow = device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and layout == "nn"
            shape = SMALL_SHAPE if (slow and not args.full) or args.quick else SHAPE
            reps = min(args.repeats, 3) if slow else args.repeats
            t = measure_mm(device, dtype, layout=layout, shape=shape, warmup=args.warmup, repeats=reps)
            m, k, n = shape
            b_store = f"[{k},{n}]" if layout == "nn" else f"[{n},{k}] used as .T"
            note = f"A [{m},{k}] x B [{k},{n}], B stored {b_store}; {reps} repeats; {load_note()}"
            print(f"mm {dname:9s} {layout}: p50 {t['p50']:9.2f} ms  {t['gflops']:8.2f} GFLOP/s  ({note})", flush=True)
            rows.append(
                timed_row(
                    "mm_ceiling",
                    "torch.mm",
                    layout,
                    "dtype",
                    dname,
                    t,
                    device=device,
                    note=note,
                    gflops=t["gflops"],
                )
            )
    append_rows(args.csv, rows)
    print(f"wrote {len(rows)} rows to {args.csv}; total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
