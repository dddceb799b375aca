"""The GPU check's sizes, time limits and predicted times, in one place (``scripts/gpu_check.sh``,
``benchmarks/gpu_bench.py``, ``benchmarks/gpu_tests.py``).

``GPU`` is the plan for an H100 / H200-class GPU, ``DRY_RUN`` the CI plan on CPU (tiny sizes, Triton through
the interpreter). Two budgets:

* **Limits** (``Plan.stage_s``): the shell script kills a stage at its limit, and the GPU plan's limits add up
  to ``TOTAL_S`` = 8 minutes, so the check ends in its slot on any machine. Inside the bench stage each section
  stops starting rows at its share (``section_budget``), so a slower GPU shows up as fewer rows (``not measured``,
  with the reason), never as a longer run.
* **Prediction** (:func:`predict`, printed by ``scripts/gpu_check.sh --dry-run``): each stage's wall time on the
  machine the check is sized for (one H100, ``GPU_CORES`` = 16 CPU cores, torch 2.11 / Triton 3.6, offline),
  from what the dry run measured here — its environment and CMake-configure stages, and for the test stage every
  budgeted case's distinct Triton compiles (counted by ``benchmarks/gpu_tests.py`` with Triton's own cache key)
  and host seconds — and the constants below, each with where it comes from. It must stay within
  ``PREDICTED_MAX_S`` = 7 minutes: the dry run (CI) fails otherwise. No GPU has run the check yet: the constants
  are measured on this project's 2-core CPU machines (slower per core than a GPU host's), or taken from
  ``shared/toolchain.md``, never from a GPU.

To change what runs, change this file only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

TOTAL_S = 480  # the 8-minute slot: the GPU plan's stage limits add up to at most this
PREDICTED_MAX_S = 420  # the predicted wall time must leave a minute of the slot unused (issue 18)


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    device: str
    # limit in seconds per stage of scripts/gpu_check.sh; "bench" is split over the sections (section_budget)
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
    # limits: env + build + tests + bench + summary = 480 s (build: one arch, all cores; tests: the budgeted
    # gpu / cuda_target / triton cases in parallel shards; no CPU test stage: CI runs the whole suite on CPU;
    # bench: the sections, their grace and the plots). The predicted times are predict()'s.
    stage_s={"env": 20, "build": 110, "tests_gpu": 150, "bench": 180, "summary": 20},
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
    stage_s={"env": 60, "build": 120, "tests_gpu": 300, "bench": 240, "summary": 30},
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


def plan(name: str) -> Plan:
    if name not in PLANS:
        raise ValueError(f"plan must be one of {sorted(PLANS)}, got {name!r}")
    return PLANS[name]


# --------------------------------------------------------------------------------------------------
# The bench stage: its limit covers the sections, each one's grace past its deadline, and the plots
# --------------------------------------------------------------------------------------------------

SECTION_GRACE_S = 5  # a section past its deadline may finish the row in flight and exit (torch teardown)
BENCH_PLOTS_S = 10  # the plots after the sections (matplotlib import and one PNG per op: ~5 s in the dry run)
BENCH_RESERVE_S = len(SECTION_SHARE) * SECTION_GRACE_S + BENCH_PLOTS_S


def section_budget(p: Plan, section: str) -> float:
    """Seconds of the bench stage given to one section (its process's start, torch's import included, to the
    moment it stops starting rows)."""
    return (p.stage_s["bench"] - BENCH_RESERVE_S) * SECTION_SHARE[section]


# --------------------------------------------------------------------------------------------------
# The test stage: parallel shards, and what the dry run counts but cannot run
# --------------------------------------------------------------------------------------------------

GPU_CORES = 16  # the machine the check is sized for: one H100 with 16 CPU cores (issue 18)
TEST_SHARDS_MAX = 16  # pytest processes at once: one per core (each compiles on one core, see gpu_tests.py)


def shard_count(cores: int) -> int:
    return max(1, min(cores, TEST_SHARDS_MAX))


# Tests that need most of the GPU's memory (rows × stride past 2^31 elements: 12–40 GB each): one shard holds
# them all, so they never run at the same time (benchmarks/gpu_tests.group_key).
GPU_SERIAL_TESTS = ("past_2_31",)

# The dry run counts these tests' Triton launches without running them: their budgeted case is too big for the
# interpreter (1000 × 77 rows at 3 tile sizes, 1000 × 512, 300 × 512: 30–70 s each on the 2-core machine). They are
# reported as xfail there; on the GPU they run as usual.
DRY_RUN_COUNT_ONLY = ("tile_size_independence", "brute_force", "extreme_scales")


# --------------------------------------------------------------------------------------------------
# Prediction (see the module docstring). Every constant: where it comes from.
# -------------------------------------------------------------------------------------------------

# One distinct Triton compile on one core (Triton compiles on the launching thread; ptxas is single-threaded).
# Measured with benchmarks/triton_aot.py's compile_configs (Triton 3.8, sm_90, fresh cache, 2-core machine): 0.57
# CPU-s a compile over the test stage's 84 budgeted configurations (tiny tiles), 0.85 over `triton_aot.py --quick`'s
# 52 (benchmark tiles). Taken as issue 18's 1.3 s: a margin for Triton 3.6 (not measured) and a loaded host.
COMPILE_S = 1.3
# The first CUDA call of a test process (context creation, about 1–3 s on an H100; 16 processes start together).
# Not measurable here: an estimate, rounded up.
CUDA_INIT_S = 5.0
# A case the dry run skips (the CUDA C++ kernels; the GPU-only tests): host seconds allowed for it on the GPU.
# The dry run's measured cases take 0.1–3.5 s of host time each (their references in float64 on the CPU).
SKIPPED_CASE_S = 3.0
# A GPU-only case (marked gpu, not cuda_target: python_tests/test_gpu_launch_hygiene.py, the CUDA training
# recipes) cannot be counted on CPU: distinct Triton compiles allowed for it. Each runs at most two ops forward and
# backward at one dtype (K2: relational_distill and relational_kd_rows; K1: the loss and its shard statistics);
# one op's forward and backward is at most 3 kernels in the dry run's counts (compiles.*.json), so 2 × 3.
GPU_ONLY_COMPILES_PER_CASE = 6
GPU_ONLY_CASE_S = {"test_teacher_recipes_run_on_cuda": 20.0}  # 3 training steps of a tiny CLIP (the CPU form: ~15 s)
# The runner's own start and the shards' wait (benchmarks/gpu_tests.py: no torch import).
TEST_RUNNER_S = 2.0
# A test process's start before its first case: Python, torch's import, clipcid_fast's and collecting the suite.
# Measured: the dry run's shards (compiles.*.json "startup_s"), 2 at once on the 2-core machine: 21 s quiet, 26–32 s
# at a load average of 3–5 (a GPU host's cores are faster, and its 16 processes start on 16 cores).
STARTUP_S = 30.0

# The build: CMake configure (measured: the dry run's build stage runs the same configure: 18 s quiet, 47 s at a
# load average of 3–5, on the 2-core machine); then ninja builds every translation unit at once on 16 cores, so the
# wall time is the slowest unit: a torch-header C++ unit at -O3 -fopenmp, about 40 s on this project's machines
# (shared/toolchain.md; the .cu files take about 2 s), plus the link; then the import check (torch's import, about
# 5 s here).
CONFIGURE_S = 45.0
BUILD_COMPILE_S = 45.0
BUILD_IMPORT_S = 5.0
# The environment report (measured: the dry run's env stage, 3–9 s on the 2-core machine) plus nvidia-smi and
# nvcc --version on the GPU.
ENV_S = 10.0 + 3.0
# The summary: one Python process reading the outputs (about 1 s in the dry run).
SUMMARY_S = 3.0


@dataclasses.dataclass
class Counted:
    """What the dry run's test stage measured (the JSON files of benchmarks/gpu_tests.py --count-compiles)."""

    tests: dict  # nodeid -> {"group", "keys", "seconds", "launch_s", "run", "skipped", "gpu_only"}
    groups: list  # every budgeted case's group, in collection order (what the shard plan is made from)
    startup_s: float  # the slowest shard's start here: Python, torch's import and collection (STARTUP_S's source)
    as_if_gpu: bool  # the launchers chose their sm_90 configurations (else the interpreter's)


def load_counted(out: Path) -> Counted:
    files = sorted(Path(out).glob("compiles.*.json"))
    if not files:
        raise FileNotFoundError(f"no compiles.*.json in {out}: run the dry run's test stage first")
    docs = [json.loads(f.read_text()) for f in files]
    tests = {k: v for d in docs for k, v in d["tests"].items()}
    return Counted(tests, docs[0]["groups"], max(d["startup_s"] for d in docs), all(d["as_if_gpu"] for d in docs))


def case_host_s(t: dict) -> float:
    """Seconds a case needs on the GPU machine besides compiling: what it took here outside the interpreter's
    kernels (their time on a GPU is milliseconds), or the allowance for a case the dry run could not run."""
    if t.get("skipped"):
        return max(SKIPPED_CASE_S, GPU_ONLY_CASE_S.get(t.get("name", ""), 0.0))
    return max(0.0, t["seconds"] - t["launch_s"])


def case_keys(nodeid: str, t: dict) -> set:
    """The distinct compiles a case needs: counted, or, for a GPU-only case, the allowance as placeholders."""
    if t.get("gpu_only"):
        return {f"{nodeid}#{i}" for i in range(GPU_ONLY_COMPILES_PER_CASE)}
    return set(t["keys"])


def predict_tests(c: Counted, cores: int = GPU_CORES) -> dict:
    """The test stage on ``cores`` cores: each shard (benchmarks/gpu_tests.shard_plan, as the GPU run makes it)
    starts, compiles its distinct keys one after another and runs its cases' host work; the stage is the
    slowest shard. A key two shards need is counted in both (each may compile it before the other's copy reaches
    the shared cache)."""
    from benchmarks.gpu_tests import shard_plan

    n = shard_count(cores)
    plan = shard_plan(c.groups, n)
    keys = [set() for _ in range(n)]
    host = [0.0] * n
    for nodeid, t in c.tests.items():
        s = plan[t["group"]]
        keys[s] |= case_keys(nodeid, t)
        host[s] += case_host_s(t)
    walls = [STARTUP_S + CUDA_INIT_S + len(k) * COMPILE_S + h for k, h in zip(keys, host)]
    worst = max(range(n), key=lambda i: walls[i])
    every = set().union(*keys)
    return {
        "seconds": TEST_RUNNER_S + walls[worst],
        "shards": n,
        "cases": len(c.tests),
        "compiles": len({k for k in every if "#" not in k}),
        "gpu_only_allowance": len({k for k in every if "#" in k}),
        "compiles_in_shards": sum(len(k) for k in keys),
        "worst_shard": {"index": worst, "compiles": len(keys[worst]), "host_s": host[worst], "wall_s": walls[worst]},
        "as_if_gpu": c.as_if_gpu,
    }


def _stage_seconds(out: Path) -> dict:
    p = Path(out) / "stages.jsonl"
    lines = p.read_text().splitlines() if p.exists() else []
    return {r["stage"]: float(r.get("seconds", 0)) for r in map(json.loads, filter(None, lines))}


def predict(out: Path, cores: int = GPU_CORES) -> dict:
    """{stage: {"seconds", "how"}} for the GPU plan: the test stage from the dry run's counts in ``out``, the other
    stages from the constants above (the dry run's own stage times on a shared 2-core machine vary with its load;
    they are printed beside, not used, so the verdict does not)."""
    here = _stage_seconds(out)
    tests = predict_tests(load_counted(out), cores)
    w = tests["worst_shard"]
    bench_sections = sum(section_budget(GPU, s) for s in SECTION_SHARE)
    return {
        "env": {"seconds": ENV_S, "how": f"env report + GPU tools (dry run here: {here.get('env', 0):.0f} s)"},
        "build": {
            "seconds": CONFIGURE_S + BUILD_COMPILE_S + BUILD_IMPORT_S,
            "how": f"configure {CONFIGURE_S:.0f} s (dry run here: {here.get('build', 0):.0f} s) + slowest unit "
            f"{BUILD_COMPILE_S:.0f} s (all at once) + import",
        },
        "tests_gpu": {
            "seconds": tests["seconds"],
            "how": (
                f"{tests['cases']} cases, {tests['compiles']} distinct compiles counted "
                f"(+ {tests['gpu_only_allowance']} allowed for GPU-only cases) in {tests['shards']} shards; "
                f"slowest shard: start {STARTUP_S:.0f} s + "
                f"{w['compiles']} compiles × {COMPILE_S} s + {w['host_s']:.0f} s host"
            ),
            "detail": tests,
        },
        "bench": {
            "seconds": float(GPU.stage_s["bench"]),
            "how": f"its limit: sections stop at {bench_sections:.0f} s, + grace and plots",
        },
        "summary": {"seconds": SUMMARY_S, "how": "one Python process"},
    }


def prediction_table(pred: dict) -> str:
    total = sum(v["seconds"] for v in pred.values())
    lines = [f"predicted wall time on one H100 with {GPU_CORES} CPU cores (benchmarks/gpu_sizes.py):"]
    lines += [f"  {k:10s} {v['seconds']:6.0f} s  (limit {GPU.stage_s[k]:3d} s)  {v['how']}" for k, v in pred.items()]
    verdict = "within" if total <= PREDICTED_MAX_S else "OVER"
    lines.append(f"  {'total':10s} {total:6.0f} s  (limit {TOTAL_S} s) — {verdict} the {PREDICTED_MAX_S} s budget")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``python benchmarks/gpu_sizes.py OUT_DIR``: print the prediction, write OUT_DIR/prediction.json; exit 1
    when it is over ``PREDICTED_MAX_S`` (or nothing was counted)."""
    out = Path((sys.argv[1:] if argv is None else argv)[0])
    try:
        pred = predict(out)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"prediction: not made ({e})")
        return 1
    total = sum(v["seconds"] for v in pred.values())
    (out / "prediction.json").write_text(json.dumps({"total_s": total, "max_s": PREDICTED_MAX_S, "stages": pred}))
    print(prediction_table(pred))
    return 0 if math.isfinite(total) and total <= PREDICTED_MAX_S else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
