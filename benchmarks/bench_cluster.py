"""``cluster_discrimination_loss`` benchmark: the fused cluster-discrimination margin softmax against eager
PyTorch, into the results CSV.

    cd /work/main && .venv/bin/python benchmarks/bench_cluster.py               # N = 10k, 30k (a few minutes)
    .venv/bin/python benchmarks/bench_cluster.py --full                         # N = 10k, 100k, 1M (long; ~20 GB)
    .venv/bin/python benchmarks/bench_cluster.py --quick --no-memory            # smoke test
    .venv/bin/python benchmarks/bench_cluster.py --load-library /tmp/k1_build/k1_dev.so   # an uninstalled build

Workload (``benchmarks/workloads.py:cluster``): B = 1024 L2-normalised embeddings against N class centres,
D = 512, ArcFace s = 32, m2 = 0.3 on the target logit only, mean over rows, gradients to embeddings and
centres. Op ``cluster_discrimination``, x = N, modes fwd / bwd / full. Providers:

* ``fused`` — ``clipcid_fast.ops.margin_softmax.cluster_discrimination_loss`` with ``reduction="mean"``,
  what a trainer calls (``impl="auto"``: the C++ kernel on CPU, Triton on CUDA; ``check_values=False``, as
  in a training loop). On CPU this is the single-pass path: the gradients are computed inside the
  forward (6·B·N·D FLOPs) and the backward only scales them by grad_output, so its ``fwd`` rows carry
  the whole cost and its ``bwd`` rows almost none; ``full`` is the comparable number;
* ``reference`` — the eager ``clipcid_fast.reference.cluster_discrimination_loss`` (B×N logits; the loss of
  ``workloads.cluster``);
* ``partialfc`` — insightface/unicom PartialFC-style eager at sample rate 1: ``F.linear`` of the normalised
  features, the margin written into the target entries, ``F.cross_entropy``;
* ``chunked`` — an exact row-chunked PyTorch version (64-row chunks, hand-written backward through the
  margin and the normalisations; normalised copy of W and an fp32 dW accumulator), the baseline
  the fused kernel must beat.

GFLOP/s use the model count of ``workloads.flops`` (6·B·N·D for full), for every provider; the fused
single pass does exactly that (the two-pass path, used for ``reduction="none"``, does 8·B·N·D). The
printed line and the note column give each row's share of the fp32 ``torch.mm`` GFLOP/s measured at the
same run, right before and right after each row's timing (``bench_mm_ceiling.bracket_mm``; the larger
of the two, since this VM's GEMM rate drifts by ±20 % over minutes; the bar is ≥ 75 % at N = 1M),
and the size of the returned gradients (which the peak-memory figure includes: the bar is on
the memory beyond them).

    .venv/bin/python benchmarks/bench_cluster.py --sizes 1000000 --providers fused --modes full   # the 1M bar
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
    plot_unless_disabled,
    time_fn,
    timed_row,
)

OP = "cluster_discrimination"
PROVIDERS = {
    "fused": "benchmarks.bench_cluster:fused",
    "reference": "benchmarks.bench_cluster:reference",
    "partialfc": "benchmarks.bench_cluster:partialfc",
    "chunked": "benchmarks.bench_cluster:chunked",
}
SIZES = (10_000, 30_000)
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 4_000)


def _provider_workload(make_forward, size, D, dtype, mode, seed, device, B, s, m2):
    """Inputs, one small warm-up step, the workload. ``make_forward(emb, centres, labels, s, m2)`` returns
    the loss closure. The warm-up (64 rows x 256 centres, forward + backward, every provider alike) pays the
    one-time costs of a fresh process (lazy imports behind torch.library ops, OpenMP/MKL pools: 60-90 MB)
    before the peak-memory baseline is taken, so the figure is the loss's own memory."""
    small = workloads.cluster_inputs(min(size, 256), D, dtype, seed + 1, device, min(B, 64))
    make_forward(*small, s, m2)().backward()
    emb, centres, labels = workloads.cluster_inputs(size, D, dtype, seed, device, B)
    forward = make_forward(emb, centres, labels, s, m2)
    return workloads.Workload(OP, mode, forward, (emb, centres), workloads.flops(OP, mode, size, D, B))


def _fused_forward(emb, centres, labels, s, m2):
    from clipcid_fast.ops.margin_softmax import cluster_discrimination_loss

    def forward():
        return cluster_discrimination_loss(
            emb, centres, labels, s, (1.0, m2, 0.0), reduction="mean", impl="auto", check_values=False
        )

    return forward


def fused(
    size, D=512, dtype="float32", mode="full", seed=0, device="cpu", B=1024, s=32.0, m2=0.3, library=None
) -> workloads.Workload:
    if library:  # a build of the C++ kernels not installed in the package (before clipcid_fast is imported)
        torch.ops.load_library(library)
    return _provider_workload(_fused_forward, size, D, dtype, mode, seed, device, B, s, m2)


def reference(
    size, D=512, dtype="float32", mode="full", seed=0, device="cpu", B=1024, s=32.0, m2=0.3, **_
) -> workloads.Workload:
    """The eager reference (the loss of ``workloads.cluster``, same inputs), after the common warm-up."""
    return _provider_workload(workloads.cluster_reference_forward, size, D, dtype, mode, seed, device, B, s, m2)


def _partialfc_forward(emb, centres, labels, s, m2):
    ref = workloads._reference()
    rows = torch.arange(emb.shape[0], device=emb.device)
    F = torch.nn.functional

    def forward():
        logits = F.linear(F.normalize(emb), F.normalize(centres))
        target = ref.combined_margin(logits[rows, labels], 1.0, m2, 0.0)
        logits = logits.index_put((rows, labels), target) * s
        return F.cross_entropy(logits, labels)

    return forward


def partialfc(
    size, D=512, dtype="float32", mode="full", seed=0, device="cpu", B=1024, s=32.0, m2=0.3, **_
) -> workloads.Workload:
    return _provider_workload(_partialfc_forward, size, D, dtype, mode, seed, device, B, s, m2)


class _ChunkedArcFace(torch.autograd.Function):
    """Exact row-chunked margin softmax CE (mean over rows): forward keeps only the per-row lse; backward
    recomputes each chunk's logits. Memory: normalised W copy, fp32 dW, one chunk × N logits."""

    CHUNK = 64

    @staticmethod
    def forward(ctx, x, w, labels, s, m2):
        ref = workloads._reference()
        xf, wf = x.float(), w.float()
        xh = xf / xf.norm(dim=1, keepdim=True)
        wh = wf / wf.norm(dim=1, keepdim=True)
        lse = torch.empty(x.shape[0], device=x.device)  # on the inputs' device: the GPU check runs this on CUDA
        tgt = torch.empty(x.shape[0], device=x.device)
        for r0 in range(0, x.shape[0], _ChunkedArcFace.CHUNK):
            r1 = min(r0 + _ChunkedArcFace.CHUNK, x.shape[0])
            rows = torch.arange(r1 - r0, device=x.device)
            lab = labels[r0:r1]
            cos = xh[r0:r1] @ wh.T
            t = s * ref.combined_margin(cos[rows, lab], 1.0, m2, 0.0)
            cos.mul_(s)[rows, lab] = t
            lse[r0:r1] = torch.logsumexp(cos, dim=1)
            tgt[r0:r1] = t
        ctx.save_for_backward(x, w, labels, lse)
        ctx.s, ctx.m2 = s, m2
        return (lse - tgt).mean()

    @staticmethod
    def backward(ctx, g):
        ref = workloads._reference()
        x, w, labels, lse = ctx.saved_tensors
        s, m2 = ctx.s, ctx.m2
        B = x.shape[0]
        xf, wf = x.float(), w.float()
        nx, nw = xf.norm(dim=1, keepdim=True), wf.norm(dim=1, keepdim=True)
        xh, wh = xf / nx, wf / nw
        gr = g / B
        dxh = torch.empty_like(xh)
        dwh = torch.zeros_like(wh)
        for r0 in range(0, B, _ChunkedArcFace.CHUNK):
            r1 = min(r0 + _ChunkedArcFace.CHUNK, B)
            rows = torch.arange(r1 - r0, device=x.device)
            lab = labels[r0:r1]
            cos = xh[r0:r1] @ wh.T
            with torch.enable_grad():
                c = cos[rows, lab].detach().requires_grad_()
                psi = ref.combined_margin(c, 1.0, m2, 0.0)
                (dpsi,) = torch.autograd.grad(psi.sum(), c)
            t = s * psi.detach()
            cos.mul_(s)[rows, lab] = t
            p = cos.sub_(lse[r0:r1, None]).exp_()  # softmax, in place
            d_t = s * dpsi * gr * (p[rows, lab] - 1.0)
            p.mul_(s * gr)[rows, lab] = d_t
            dxh[r0:r1] = p @ wh
            dwh.addmm_(p.T, xh[r0:r1])
        gx = (dxh - xh * (dxh * xh).sum(1, keepdim=True)) / nx
        gw = (dwh - wh * (dwh * wh).sum(1, keepdim=True)) / nw
        return gx.to(x.dtype), gw.to(w.dtype), None, None, None


def _chunked_forward(emb, centres, labels, s, m2):
    return lambda: _ChunkedArcFace.apply(emb, centres, labels, s, m2)


def chunked(
    size, D=512, dtype="float32", mode="full", seed=0, device="cpu", B=1024, s=32.0, m2=0.3, **_
) -> workloads.Workload:
    return _provider_workload(_chunked_forward, size, D, dtype, mode, seed, device, B, s, m2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, parents=[common_args()], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--full", action="store_true", help="N = 10k, 100k, 1M (slow; eager needs ~20 GB at 1M)")
    p.add_argument("--sizes", type=int, nargs="+", help="explicit N values (override the defaults)")
    p.add_argument("--providers", nargs="+", choices=sorted(PROVIDERS), default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=workloads.MODES, default=list(workloads.MODES))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--max-eager-n", type=int, default=100_000, help="skip reference/partialfc above this N")
    p.add_argument("--load-library", default=None, help="a .so with the C++ kernels (dev builds)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-memory runs")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    device = apply_common(args)
    if args.load_library:
        torch.ops.load_library(args.load_library)
    from benchmarks.bench_mm_ceiling import bracket_mm, measure_mm_gflops

    dev_name = device_name(device)
    t_start = time.perf_counter()
    print(f"device {device} ({dev_name}), {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    ceiling = measure_mm_gflops(device, torch.float32, repeats=3)
    print(f"fp32 torch.mm [4096,512]x[512,4096] in this run: {ceiling:.1f} GFLOP/s", flush=True)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES if args.full else SIZES)
    for size in sizes:
        rows = []
        for provider in args.providers:
            if provider in ("reference", "partialfc") and size > args.max_eager_n:
                print(f"skip {provider} at N={size} (> --max-eager-n {args.max_eager_n})", flush=True)
                continue
            for mode in args.modes:
                kwargs = dict(size=size, D=args.D, dtype=args.dtype, device=str(device))
                if provider == "fused" and args.load_library:
                    kwargs["library"] = args.load_library
                t0 = time.perf_counter()
                wl = load_factory(PROVIDERS[provider])(**kwargs, mode=mode)
                t, ceiling = bracket_mm(
                    device, functools.partial(time_fn, wl, warmup=args.warmup, repeats=args.repeats, device=device)
                )
                flops = wl.flops
                del wl
                gc.collect()
                if args.no_memory:
                    mem = {"peak_mb": float("nan"), "method": "not measured"}
                else:
                    mem = peak_memory(PROVIDERS[provider], kwargs, mode, device=device, threads=args.threads)
                gflops = flops / (t["p50"] * 1e-3) / 1e9
                grads_mb = (1024 + size) * args.D * workloads.to_dtype(args.dtype).itemsize / 1e6
                note = (
                    f"{provider}; ArcFace s=32 m2=0.3 B=1024 D={args.D} dtype={args.dtype}; {args.repeats} repeats; "
                    f"{gflops / ceiling:.0%} of fp32 mm ceiling {ceiling:.1f} GFLOP/s (max of before/after)"
                    + (f"; peak includes the returned grads ({grads_mb:.0f} MB)" if mode != "fwd" else "")
                    + f"; peak: {mem['method']}; {load_note()}"
                    + (f" ({mem['error']})" if "error" in mem else "")
                )
                rows.append(
                    timed_row(
                        OP,
                        provider,
                        mode,
                        "N",
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
                    f"{provider:10s} N={size:<8d} {mode:4s}  p50 {t['p50']:10.1f} ms "
                    f"[p20 {t['p20']:.1f}, p80 {t['p80']:.1f}]  "
                    f"peak {'n/a' if math.isnan(peak) else f'{peak:.0f}'} MB  {gflops:6.1f} GFLOP/s "
                    f"({gflops / ceiling:.0%} of mm)"
                    + (f"  beyond grads {peak - grads_mb:.0f} MB" if mode != "fwd" and not math.isnan(peak) else "")
                    + f"  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
        append_rows(args.csv, rows)  # after each size, so an interrupted run keeps what it measured
    plot_unless_disabled(args, OP, device=dev_name)
    print(f"results in {args.csv}; total {time.perf_counter() - t_start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
