"""The GPU check's sizes and time budget, in one place (``scripts/gpu_check.sh``, ``benchmarks/gpu_bench.py``).

``GPU`` is the plan for an H100 / H200-class GPU, ``DRY_RUN`` the CI plan on CPU (tiny sizes, Triton through
the interpreter). The whole check must fit ``TOTAL_S`` = 8 minutes. Every budget below is an estimate that no
GPU run has confirmed yet: each stage enforces its own (the shell script kills a stage at its budget; a
benchmark section skips, with a line saying so, every row its warm-up call says would not fit what is left),
so the total holds on any machine, and a faster or slower GPU shows up as more or fewer rows, never as a
longer run. To change what runs, change this file only.
"""

from __future__ import annotations

import dataclasses

TOTAL_S = 480  # the 8-minute slot


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    device: str
    # seconds per stage of scripts/gpu_check.sh; "bench" is split over the sections by SECTION_SHARE
    stage_s: dict
    repeats: int  # timed calls per benchmark row (fewer when the warm-up call says they do not fit)
    warmup: int
    mm_shape: tuple  # (m, k, n) of the torch.mm ceiling, measured in bf16 and fp32
    k2_sizes: tuple  # B of DistillClipLoss, fwd + bwd
    k2_dims: tuple  # D
    k2_providers: tuple
    k1_sizes: tuple  # N classes
    k1_batch: int  # B rows
    k1_dim: int
    k1_providers: tuple
    k3_sizes: tuple  # c rows of one cluster
    k3_dim: int
    k3_providers: tuple
    balance_rows: int
    balance_k: int
    balance_niter: int
    compile_backend: str  # torch.compile backend of the "compiled-reference" provider
    memory_fraction: float = 0.85  # a provider is skipped when its estimated peak exceeds this share of free memory


# How the "bench" stage's seconds are shared out (mm first: every other row is a share of it).
SECTION_SHARE = {"mm": 0.04, "k2": 0.42, "k1": 0.24, "k3": 0.10, "balance": 0.20}

GPU = Plan(
    name="gpu",
    device="cuda",
    # env + build + tests + bench + plots/summary = 480 s (build: one arch, all cores; tests: the CUDA
    # targets first, then the CPU rest; see benchmarks/README.md "GPU check")
    stage_s={"env": 20, "build": 100, "tests_gpu": 120, "tests_cpu": 60, "bench": 160, "summary": 20},
    repeats=3,
    warmup=1,
    mm_shape=(8192, 8192, 8192),
    k2_sizes=(16384, 32768, 65536),
    k2_dims=(512, 768),
    k2_providers=("fused-triton", "open_clip", "chunked-torch", "compiled-reference"),
    k1_sizes=(1_000_000, 4_000_000),
    k1_batch=4096,
    k1_dim=512,
    k1_providers=("fused-triton", "chunked", "partialfc", "reference"),
    k3_sizes=(16384, 65536),
    k3_dim=512,
    k3_providers=("fused-triton", "fused-cuda", "dense_fair", "semdedup"),
    balance_rows=1_000_000,
    balance_k=1024,
    balance_niter=10,
    compile_backend="inductor",
)

DRY_RUN = Plan(
    name="dry-run",
    device="cpu",
    # limits, not estimates: a 2-core CI machine takes about 10 s to import torch in each process; the dry
    # run's real time is what it is (its sizes are tiny), these only stop a hang
    stage_s={"env": 60, "build": 120, "tests_gpu": 300, "tests_cpu": 0, "bench": 240, "summary": 30},
    repeats=1,
    warmup=1,
    mm_shape=(256, 256, 256),
    k2_sizes=(64, 128),  # two sizes: the second is skipped or run by the budget's prediction from the first
    k2_dims=(32,),
    k2_providers=("fused-triton", "open_clip", "chunked-torch", "compiled-reference"),
    k1_sizes=(256,),
    k1_batch=32,
    k1_dim=32,
    k1_providers=("fused-triton", "chunked", "partialfc", "reference"),
    k3_sizes=(128,),
    k3_dim=32,
    k3_providers=("fused-triton", "fused-cuda", "dense_fair", "semdedup"),
    balance_rows=20_000,
    balance_k=16,
    balance_niter=2,
    compile_backend="aot_eager",  # inductor would spend minutes compiling C++ on the 2-core CI machine
)

PLANS = {p.name: p for p in (GPU, DRY_RUN)}

# The dry run's test selection: the CUDA-target cases (conftest.CLIPCID_CUDA_TARGETS_ON_CPU) without the ones whose
# first cases are too big for Triton's interpreter (c = 1000 × 5 tiles, 1000 × 512, 300 × 512 rows: minutes each).
DRY_RUN_TEST_FILTER = "not tile_size_independence and not brute_force and not extreme_scales"


def plan(name: str) -> Plan:
    if name not in PLANS:
        raise ValueError(f"plan must be one of {sorted(PLANS)}, got {name!r}")
    return PLANS[name]


def section_budget(p: Plan, section: str) -> float:
    """Seconds of the bench stage given to one section."""
    return p.stage_s["bench"] * SECTION_SHARE[section]
