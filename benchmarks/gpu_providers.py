"""The providers of the GPU check's kernel benchmarks (``gpu_bench.py``), on any device, with peak-memory
estimates so that a provider that cannot fit is skipped with a line instead of dying.

Inputs are drawn on the target device from a seeded generator of that device (drawing 4M × 512 on the CPU
and copying it would cost more than the kernels), so every provider of a row sees the same values. Each
factory returns a :class:`benchmarks.workloads.Workload` (fwd / bwd / full modes; the timed loss is what a
trainer backpropagates) after one small forward + backward of the same provider (lazy imports, kernel
compilation, ``torch.compile`` tracing of the small shape).
"""

from __future__ import annotations

import functools

import torch

from benchmarks import workloads
from benchmarks.bench_relational import STUDENT_SCALE, TEACHER_SCALE, chunked_distill_clip_loss, model_flops

F4 = 4  # bytes per fp32 element

# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def unit_rows(n: int, d: int, seed: int, device, grad: bool = False) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=g), dim=1)
    return x.requires_grad_(grad)


def optional_missing(provider: str, device) -> str | None:
    """Why a provider cannot run here (a package it needs is absent, a CUDA-only kernel on the CPU), or None."""
    if provider == "fused-cuda" and torch.device(device).type != "cuda":
        return "the CUDA C++ kernel needs a GPU (dry run)"
    if provider == "open_clip":
        try:
            import open_clip.loss  # noqa: F401
        except ImportError as e:
            return f"open_clip is not installed ({e.name})"
    if provider in ("fused-triton",):
        from clipcid_fast import _backend

        if _backend.triton_module() is None:
            return "triton is not installed"
    if provider == "fused-cuda":
        from clipcid_fast import _backend

        if not _backend.cuda_kernels_built():
            return "clipcid_fast._C has no CUDA kernels (no nvcc at build time, or a CPU-only dry run)"
    return None


# --------------------------------------------------------------------------------------------------
# K2: open_clip DistillClipLoss, contrastive + distill (op distill_clip_D<D>, x = B)
# --------------------------------------------------------------------------------------------------


@functools.cache
def _compiled_reference(backend: str):
    from clipcid_fast import reference

    # dynamic=True: one trace serves the warm-up shape and every B of the sweep
    return torch.compile(reference.distill_clip_loss, backend=backend, dynamic=True)


def k2_loss(provider: str, compile_backend: str):
    from clipcid_fast.ops import relational_rows as rr

    if provider == "fused-triton":
        return lambda *a: rr.distill_clip_loss(*a, impl="triton")
    if provider == "open_clip":
        from open_clip.loss import DistillClipLoss

        return DistillClipLoss()
    if provider == "chunked-torch":
        return chunked_distill_clip_loss
    if provider == "compiled-reference":
        return _compiled_reference(compile_backend)
    raise ValueError(f"unknown K2 provider {provider!r}")


def k2_peak_bytes(provider: str, B: int, D: int) -> float:
    """Estimated peak extra memory of one fwd + bwd (open_clip holds about 11 B×B fp32 matrices)."""
    per = {"fused-triton": 0, "open_clip": 11, "compiled-reference": 6, "chunked-torch": 0}[provider]
    return per * B * B * F4 + 20 * B * D * F4 + (16 * 512 * B * F4 if provider == "chunked-torch" else 0)


def k2_workload(provider: str, size: int, D: int, mode: str, device, compile_backend: str, seed: int = 0):
    loss_fn = k2_loss(provider, compile_backend)

    def inputs(n, s):
        feats = [unit_rows(n, D, s + i, device, grad=i < 2) for i in range(4)]
        s_scale = torch.tensor(STUDENT_SCALE, device=device, requires_grad=True)
        return feats[0], feats[1], s_scale, feats[2], feats[3], torch.tensor(TEACHER_SCALE, device=device)

    si, st, ss, ti, tt, ts = inputs(min(size, 64), seed + 100)
    sum(loss_fn(si, st, ss, ti, tt, ts)).backward()
    si, st, ss, ti, tt, ts = inputs(size, seed)

    def forward():
        contrastive, distill = loss_fn(si, st, ss, ti, tt, ts)
        return contrastive + distill

    return workloads.Workload("distill_clip", mode, forward, (si, st, ss), model_flops(mode, size, D))


# --------------------------------------------------------------------------------------------------
# K1: cluster-discrimination margin softmax, ArcFace s = 32, m2 = 0.3, mean (op cluster_discrimination, x = N)
# --------------------------------------------------------------------------------------------------


def _k1_forward(provider: str):
    from benchmarks import bench_cluster

    if provider == "fused-triton":
        from clipcid_fast.ops.margin_softmax import cluster_discrimination_loss

        def make(emb, centres, labels, s, m2):
            return lambda: cluster_discrimination_loss(
                emb, centres, labels, s, (1.0, m2, 0.0), reduction="mean", impl="triton", check_values=False
            )

        return make
    return {
        "chunked": bench_cluster._chunked_forward,
        "partialfc": bench_cluster._partialfc_forward,
        "reference": workloads.cluster_reference_forward,
    }[provider]


def k1_peak_bytes(provider: str, N: int, B: int, D: int) -> float:
    """Estimated peak extra memory of one fwd + bwd: B×N logit copies for the eager forms, N×D copies (the
    normalised centres, the fp32 gradient and the normalisation's temporaries) for every form."""
    logits = {"fused-triton": 0, "chunked": 4 * 64 / B, "partialfc": 6, "reference": 8}[provider]
    return logits * B * N * F4 + 6 * N * D * F4


def k1_workload(provider: str, size: int, B: int, D: int, mode: str, device, seed: int = 0, s=32.0, m2=0.3):
    make = _k1_forward(provider)

    def inputs(n, rows, seed_):
        g = torch.Generator(device=device).manual_seed(seed_ + 7)
        labels = torch.randint(0, n, (rows,), device=device, generator=g)
        return unit_rows(rows, D, seed_, device, True), unit_rows(n, D, seed_ + 1, device, True), labels

    make(*inputs(min(size, 256), min(B, 64), seed + 100), s, m2)().backward()
    emb, centres, labels = inputs(size, B, seed)
    flops = workloads.flops("cluster_discrimination", mode, size, D, B)
    return workloads.Workload("cluster_discrimination", mode, make(emb, centres, labels, s, m2), (emb, centres), flops)


# --------------------------------------------------------------------------------------------------
# K3: masked max similarity of one cluster (op dedup_cluster, x = c, forward only)
# --------------------------------------------------------------------------------------------------


def _k3_run(provider: str):
    from benchmarks import bench_dedup

    if provider in ("fused-triton", "fused-cuda"):
        from clipcid_fast.ops.masked_max_sim import masked_max_similarity

        impl = provider.split("-")[1]
        return lambda a: masked_max_similarity(a, impl, check_values=False)

    def dense(a, form):
        with torch.no_grad():
            xn = bench_dedup._normalised(a)
            sim = xn @ xn.T
            if form == "dense_fair":
                return sim.triu_(diagonal=1).amax(dim=0)
            return torch.triu(sim, diagonal=1).max(dim=0)

    return lambda a: dense(a, provider)


def k3_peak_bytes(provider: str, c: int, D: int) -> float:
    per = {"fused-triton": 0, "fused-cuda": 0, "dense_fair": 1, "semdedup": 2}[provider]
    return per * c * c * F4 + 2 * c * D * F4


def k3_workload(provider: str, size: int, D: int, device, seed: int = 0):
    from benchmarks.bench_dedup import dedup_flops

    run = _k3_run(provider)
    x = unit_rows(size, D, seed, device)
    run(x[:64])
    return workloads.Workload("dedup_cluster", "fwd", lambda: run(x), (), dedup_flops(size, D))
