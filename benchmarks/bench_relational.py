"""``relational_kd_rows`` benchmark: open_clip ``DistillClipLoss`` (contrastive + distill, fwd / full) by four
providers, into the CSV.

    cd /work/main && .venv/bin/python benchmarks/bench_relational.py            # B = 1024, 2048, 4096 (~5 min)
    .venv/bin/python benchmarks/bench_relational.py --full                      # adds 8192, 16384 and 65536 (fused)
    .venv/bin/python benchmarks/bench_relational.py --quick --no-memory         # smoke test (B = 256, 512)

Providers (op ``distill_clip``, x = B, D = 512, student scale 1/0.07 and teacher scale 100, frozen teacher; the
inputs are those of ``benchmarks.workloads.distill_clip`` with the same seed):

* ``fused-cpu`` — ``clipcid_fast.ops.relational_rows.distill_clip_loss(impl="cpu")``: one C++ pass,
  2 B×B×D GEMMs forward and 4 backward, O(B) saved state.
* ``reference`` — the eager spec ``clipcid_fast.reference.distill_clip_loss`` (dense B×B matrices).
* ``open_clip`` — ``open_clip.loss.DistillClipLoss()`` itself (8 B×B×D GEMMs, about 11 B×B fp32 matrices).
* ``chunked-torch`` — exact PyTorch over 512-row blocks, two passes, no B×B matrix: pass 1 (no grad) takes the
  teacher's column log-sum-exps block by block; pass 2 runs every block under ``torch.utils.checkpoint``
  (non-reentrant) and returns the block's row-loss sums, its soft column term Σ p_t,col·z_s and its student
  column log-sum-exps [B]; the column LSEs are merged with ``logsumexp`` over blocks (differentiable, O(B·B/512)).
  Autograd does the backward (the checkpoint recomputes each block: 7 GEMMs in all). This is the "plain exact
  two-pass PyTorch version" the issue asks the fused kernel to beat.

Columns: p20/p50/p80 ms in this process; peak extra memory of one call in a fresh process (harness); GFLOP/s with
the **minimal model count** for every provider: fwd = 2 GEMMs = 4·B²·D, full = 6 GEMMs = 12·B²·D. The fp32
``torch.mm`` ceiling (``bench_mm_ceiling.measure_mm_gflops``) is measured at the start and the end of the run;
each note gives the row's share of it and the ratios to the other providers at the same (B, mode), which are
measured back to back (compare those ratios, not absolute times across runs: the machine is shared).

The fused provider needs a C++ extension with ``relational_distill_fwd``. If ``clipcid_fast._C`` lacks it,
``csrc/cpu/relational_rows.cpp`` is JIT-built with ``torch.utils.cpp_extension.load`` into
``$CLIPCID_K2_BUILD_DIR`` (default ``/tmp/k2_build``; a built, unchanged source loads in seconds).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import math
import os
import time

import torch
from torch.utils.checkpoint import checkpoint

from benchmarks import workloads
from benchmarks._harness import (
    REPO_ROOT,
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

OP = "distill_clip"
SIZES = (1024, 2048, 4096)
FULL_SIZES = (8192, 16384)
FUSED_ONLY_SIZES = (65536,)
QUICK_SIZES = (256, 512)
MODES = ("fwd", "bwd", "full")
CHUNK = 512
STUDENT_SCALE, TEACHER_SCALE = 1 / 0.07, 100.0

PROVIDERS = {
    "fused-cpu": "benchmarks.bench_relational:fused_workload",
    "reference": "benchmarks.bench_relational:reference_workload",
    "open_clip": "benchmarks.bench_relational:open_clip_workload",
    "chunked-torch": "benchmarks.bench_relational:chunked_workload",
}


def model_flops(mode: str, B: int, D: int) -> float:
    """Minimal model FLOPs of DistillClipLoss: 2 B×B×D GEMMs forward, 6 forward + backward."""
    g = 2.0 * B * B * D
    return {"fwd": 2 * g, "bwd": 4 * g, "full": 6 * g}[mode]


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------


def ensure_fused_kernel() -> None:
    """Make ``torch.ops.clipcid_fast_C.relational_distill_fwd`` available (JIT-build the source if needed)."""
    from clipcid_fast.ops import relational_rows as rr

    if rr.has_cpu_distill_kernel():
        return
    import torch.utils.cpp_extension as ce

    build = Path(os.environ.get("CLIPCID_K2_BUILD_DIR", "/tmp/k2_build"))
    build.mkdir(parents=True, exist_ok=True)
    ce.load(
        name="k2_dev",
        sources=[str(REPO_ROOT / "csrc" / "cpu" / "relational_rows.cpp")],
        extra_include_paths=[str(REPO_ROOT / "csrc")],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c++20"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    if not rr.has_cpu_distill_kernel():
        raise RuntimeError("the C++ distill kernel is not available (clipcid_fast._C missing?)")


def _inputs(size, D, dtype, seed, device):
    """The inputs of workloads.distill_clip (same generator order)."""
    dt = workloads.to_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    s_img = workloads._unit_rows(size, D, g, dt, device, grad=True)
    s_txt = workloads._unit_rows(size, D, g, dt, device, grad=True)
    t_img = workloads._unit_rows(size, D, g, dt, device)
    t_txt = workloads._unit_rows(size, D, g, dt, device)
    s_scale = torch.tensor(STUDENT_SCALE, dtype=dt, device=device, requires_grad=True)
    t_scale = torch.tensor(TEACHER_SCALE, dtype=dt, device=device)
    return s_img, s_txt, s_scale, t_img, t_txt, t_scale


def _workload(loss_fn, size, D, dtype, mode, seed, device):
    s_img, s_txt, s_scale, t_img, t_txt, t_scale = _inputs(size, D, dtype, seed, device)
    # One forward + backward on 64 rows first, for every provider alike: the first call of a process pays
    # one-time costs (lazy imports behind torch.library ops, OpenMP/MKL pools, about 60-90 MB) that are
    # not the loss's memory. Peak memory is measured in a fresh process, so without this it counts them.
    w = [t[:64].detach().requires_grad_(t.requires_grad) for t in (s_img, s_txt)]
    c, d = loss_fn(w[0], w[1], s_scale.detach().requires_grad_(), t_img[:64], t_txt[:64], t_scale)
    (c + d).backward()

    def forward():
        contrastive, distill = loss_fn(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
        return contrastive + distill

    return workloads.Workload(OP, mode, forward, (s_img, s_txt, s_scale), model_flops(mode, size, D))


def fused_workload(size, D=512, dtype="float32", mode="full", seed=0, device="cpu"):
    ensure_fused_kernel()
    from clipcid_fast.ops import relational_rows as rr

    return _workload(lambda *a: rr.distill_clip_loss(*a, impl="cpu"), size, D, dtype, mode, seed, device)


def reference_workload(size, D=512, dtype="float32", mode="full", seed=0, device="cpu"):
    from clipcid_fast import reference

    return _workload(reference.distill_clip_loss, size, D, dtype, mode, seed, device)


def open_clip_workload(size, D=512, dtype="float32", mode="full", seed=0, device="cpu"):
    from open_clip.loss import DistillClipLoss

    return _workload(DistillClipLoss(), size, D, dtype, mode, seed, device)


def _chunk_terms(q, k, s, qt, kt, t, lse_t_col, r0):
    """One 512-row block: sums of its hard / soft row losses, its soft column term Σ p_t,col·z_s, the sum of its
    diagonal logits, and its student column log-sum-exps [B]."""
    zs = (s * q) @ k.T
    zt = (t * qt) @ kt.T
    rows = torch.arange(q.shape[0], device=q.device)
    diag = zs[rows, rows + r0]
    lse_r = torch.logsumexp(zs, 1)
    hard_rows = (lse_r - diag).sum()
    soft_rows = (lse_r - (torch.softmax(zt, 1) * zs).sum(1)).sum()
    soft_cols = (torch.exp(zt - lse_t_col) * zs).sum()
    return hard_rows, soft_rows, soft_cols, diag.sum(), torch.logsumexp(zs, 0)


def chunked_distill_clip_loss(img, txt, s, t_img, t_txt, t, chunk=CHUNK):
    """Exact DistillClipLoss over ``chunk``-row blocks, never a B×B matrix (see the module docstring)."""
    B = img.shape[0]
    with torch.no_grad():  # pass 1: the teacher's column log-sum-exps (the teacher is frozen)
        parts = [torch.logsumexp((t * t_img[r0 : r0 + chunk]) @ t_txt.T, 0) for r0 in range(0, B, chunk)]
        lse_t_col = torch.logsumexp(torch.stack(parts), 0)
    hr = sr = sc = dg = 0
    col_lse = []
    for r0 in range(0, B, chunk):  # pass 2
        h, a, c, d, lc = checkpoint(
            _chunk_terms, img[r0 : r0 + chunk], txt, s, t_img[r0 : r0 + chunk], t_txt, t, lse_t_col, r0,
            use_reentrant=False,
        )  # fmt: skip
        hr, sr, sc, dg = hr + h, sr + a, sc + c, dg + d
        col_lse.append(lc)
    lse_col_sum = torch.logsumexp(torch.stack(col_lse), 0).sum()
    contrastive = (hr + lse_col_sum - dg) / (2 * B)
    distill = (sr + lse_col_sum - sc) / (2 * B)
    return contrastive, distill


def chunked_workload(size, D=512, dtype="float32", mode="full", seed=0, device="cpu"):
    return _workload(chunked_distill_clip_loss, size, D, dtype, mode, seed, device)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _check_providers_agree(device) -> None:
    """All providers give the same loss and student gradients on a small batch (guards the benchmark)."""
    res = {}
    for name, factory in PROVIDERS.items():
        wl = load_factory(factory)(size=300, D=64, mode="full", device=str(device))
        wl.setup()
        loss = wl._forward()
        loss.backward()
        res[name] = [loss.detach(), *(p.grad.clone() for p in wl._params)]
    base = res["reference"]
    for name, vals in res.items():
        for a, b in zip(vals, base):
            torch.testing.assert_close(a, b, atol=2e-4 * (1 + b.abs().max().item()), rtol=1e-4, msg=name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, parents=[common_args()], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="also B = 8192, 16384 (all) and 65536 (fused only)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="override the B list")
    p.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    device = apply_common(args)
    if "fused-cpu" in args.providers:
        ensure_fused_kernel()
    t_start = time.perf_counter()
    dev_name = device_name(device)
    print(f"device {device} ({dev_name}), {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    _check_providers_agree(device)
    print("providers agree on B=300, D=64 (loss and student gradients)", flush=True)
    ceiling0 = measure_mm_gflops(device, torch.float32, repeats=3)
    print(f"fp32 mm ceiling [4096,512]x[512,4096]: {ceiling0:.1f} GFLOP/s", flush=True)

    if args.sizes:
        sizes = [(b, args.providers) for b in args.sizes]
    elif args.quick:
        sizes = [(b, args.providers) for b in QUICK_SIZES]
    else:
        sizes = [(b, args.providers) for b in SIZES]
        if args.full:
            sizes += [(b, args.providers) for b in FULL_SIZES]
            sizes += [(b, [q for q in args.providers if q == "fused-cpu"]) for b in FUSED_ONLY_SIZES]
    measured = []  # (size, mode, provider, time dict, peak dict, gflops)
    for size, providers in sizes:
        for mode in args.modes:
            for prov in providers:
                kwargs = dict(size=size, D=args.D, dtype="float32", device=str(device))
                t0 = time.perf_counter()
                wl = load_factory(PROVIDERS[prov])(**kwargs, mode=mode)
                t = time_fn(wl, warmup=args.warmup, repeats=args.repeats, device=device)
                flops = wl.flops
                del wl
                gc.collect()
                if args.no_memory:
                    mem = {"peak_mb": float("nan"), "method": "not measured"}
                else:
                    mem = peak_memory(PROVIDERS[prov], kwargs, mode, device=device, threads=args.threads)
                gflops = flops / (t["p50"] * 1e-3) / 1e9
                measured.append((size, mode, prov, t, mem, gflops))
                peak = mem["peak_mb"]
                print(
                    f"{prov:14s} B={size:<6d} {mode:4s} p50 {t['p50']:10.1f} ms"
                    f" [p20 {t['p20']:.1f}, p80 {t['p80']:.1f}]"
                    f"  peak {'n/a' if math.isnan(peak) else f'{peak:.0f}'} MB  {gflops:6.1f} GFLOP/s"
                    f" ({gflops / ceiling0:.0%} of mm)  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
    ceiling1 = measure_mm_gflops(device, torch.float32, repeats=3)
    ceiling = max(ceiling0, ceiling1)
    print(f"fp32 mm ceiling at the end: {ceiling1:.1f} GFLOP/s; using the higher, {ceiling:.1f}", flush=True)

    by_key = {(s, m, pv): (t, mem, gf) for s, m, pv, t, mem, gf in measured}
    rows = []
    for size, mode, prov, t, mem, gflops in measured:
        ratios = []
        for other in PROVIDERS:
            if other != prov and (size, mode, other) in by_key:
                ratios.append(f"time/{other} {t['p50'] / by_key[(size, mode, other)][0]['p50']:.2f}")
        note = (
            f"D={args.D}; model FLOPs {'4' if mode == 'fwd' else '12'}·B²·D; {args.repeats} repeats; "
            f"{gflops / ceiling:.0%} of fp32 mm ceiling {ceiling:.1f} GFLOP/s (start {ceiling0:.1f}, end "
            f"{ceiling1:.1f}); {', '.join(ratios)}; peak: {mem['method']}; {load_note()}"
            + (f" ({mem['error']})" if "error" in mem else "")
        )
        rows.append(
            timed_row(
                OP,
                prov,
                mode,
                "B",
                size,
                t,
                device=device,
                note=note,
                peak_mb=mem["peak_mb"],
                gflops=gflops,
            )
        )
    append_rows(args.csv, rows)
    print("\nratios (p50 time, same run):")
    for size, mode, prov, t, _, gflops in measured:
        if prov != "fused-cpu":
            continue
        parts = [f"{gflops / ceiling:.0%} of mm"]
        for other in ("reference", "open_clip", "chunked-torch"):
            if (size, mode, other) in by_key:
                parts.append(f"fused/{other} {t['p50'] / by_key[(size, mode, other)][0]['p50']:.2f}")
                o_peak = by_key[(size, mode, other)][1]["peak_mb"]
                f_peak = by_key[(size, mode, prov)][1]["peak_mb"]
                # a tiny --quick size can leave open_clip's fresh-process peak at 0 MB above its baseline
                if other == "open_clip" and not (math.isnan(o_peak) or math.isnan(f_peak)) and o_peak > 0:
                    parts.append(f"peak/open_clip {f_peak / o_peak:.1%}")
        print(f"  B={size:<6d} {mode:4s} " + ", ".join(parts))
    plot_unless_disabled(args, OP, device=dev_name, png_name="distill_clip_fused.png")
    print(f"wrote {len(rows)} rows to {args.csv}; total {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
