"""The GPU check's test stage: which cases run on the GPU (a budget), in how many pytest processes at once, and
how many distinct Triton compiles they need (counted on CPU).

Why a budget: on a GPU every distinct specialisation of a Triton kernel (argument dtypes, divisibility hints,
constexprs, warps, stages) is a compile of about a CPU-second, and the full ``(gpu or cuda_target or triton)``
selection needs hundreds. One case per kernel family and dtype is enough there: the interpreter tests on CPU (CI)
cover ragged shapes, tiles and data patterns. So ``--gpu-budget`` keeps the first case of each test per value of
:data:`VARIANT_PARAMS` (implementation, dtype, kernel variant); every other parameter (sizes, tiles, data
patterns, margins, reductions) collapses onto that first case.

Why several processes: Triton compiles in the launching process, one kernel at a time, and its on-disk cache
(``TRITON_CACHE_DIR``) is safe to share between processes. So the stage runs N pytest processes, each on one
shard of the budgeted cases (``--gpu-shard I/N``, :func:`group_key`: a test's cases stay together since they
share kernels; a GPU-only case is a unit of its own; the ones needing most of the GPU's memory share one).

pytest plugin (``-p benchmarks.gpu_tests``), options:

* ``--gpu-budget``: the budget above;
* ``--gpu-shard I/N``: only shard I (0-based) of N;
* ``--count-compiles PATH`` (CPU, Triton's interpreter): write to PATH (JSON) each test's seconds, its seconds
  inside Triton launches and the distinct compile keys of its launches, specialised as on an sm_90 GPU by
  Triton's own binder (``benchmarks/triton_aot.specialize``). The launchers are made to pick their GPU path
  (tiles, grids) with the interpreter's widened 16-bit dots (:func:`as_if_gpu`), so the kernels still
  compute right; ``benchmarks/gpu_sizes.py`` turns these counts into the stage's predicted time;
* ``--count-only NAME,...`` (with ``--count-compiles``): in the tests whose name contains one of the NAMEs the
  launches are counted but not run (cases too big for the interpreter); they are marked xfail, since their
  outputs are then never computed.

Runner (what ``scripts/gpu_check.sh`` runs)::

    python benchmarks/gpu_tests.py --out OUT_DIR --shards N [--count-compiles] -- PYTEST_ARGS

runs the N shards at once (default: one per core, at most ``gpu_sizes.TEST_SHARDS_MAX``), each logging to
``OUT_DIR/tests_gpu.<I>.log`` with JUnit XML ``OUT_DIR/junit_gpu.<I>.xml`` (and, counting, ``OUT_DIR/compiles.<I>.json``
with ``--count-only`` set to ``gpu_sizes.DRY_RUN_COUNT_ONLY``), prints each shard's closing line and exits non-zero
when a shard failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import json
import os
import subprocess
import time

import pytest

REPO = Path(__file__).resolve().parents[1]
# Parameters whose values pick different kernels or kernel variants (constexpr branches): kept apart by the budget.
VARIANT_PARAMS = ("target", "impl", "dtype", "mode", "kind", "direction", "cls", "recipe")
ARCH = 90  # the compile keys are counted as an H100 (sm_90) would specialise the launches


# --------------------------------------------------------------------------------------------------
# Selection: the budget and the shards (pure functions of the collected items, in collection order)
# --------------------------------------------------------------------------------------------------


def _param_key(value) -> str:
    if isinstance(value, tuple | list):
        return "(" + ",".join(_param_key(v) for v in value) + ")"
    return getattr(value, "__name__", None) or str(value)


def budget_key(item) -> tuple:
    """(file, test, its variant parameters): the cases that share a key are one case on the GPU."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    variant = tuple((k, _param_key(params[k])) for k in VARIANT_PARAMS if k in params)
    return (str(item.path), item.originalname or item.name, variant)


def budget(items: list) -> tuple[list, list]:
    """(kept, dropped): the first case of each :func:`budget_key`."""
    seen, keep, drop = set(), [], []
    for item in items:
        key = budget_key(item)
        (drop if key in seen else keep).append(item)
        seen.add(key)
    return keep, drop


def group_key(item) -> str:
    """The unit of sharding: a test function's cases, which share kernels. A GPU-only case (the slowest kind: a
    few training steps, ops at 2^31 elements) is a group of its own, except that those needing most of the GPU's
    memory (``gpu_sizes.GPU_SERIAL_TESTS``) form one group per file, so they never run at the same time."""
    from benchmarks.gpu_sizes import GPU_SERIAL_TESTS

    name = item.originalname or item.name
    if not is_gpu_only(item):
        return f"{item.path}::{name}"
    if any(s in name for s in GPU_SERIAL_TESTS):
        return f"{item.path}::{'|'.join(GPU_SERIAL_TESTS)}"
    return item.nodeid


def is_gpu_only(item) -> bool:
    """Marked gpu but not a CUDA-target case: it needs a real GPU and skips in the dry run."""
    return item.get_closest_marker("gpu") is not None and item.get_closest_marker("cuda_target") is None


def shard_plan(groups: list[str], n: int) -> dict[str, int]:
    """{group: shard} from every case's group in collection order: groups by size (cases), largest first, each
    onto the least loaded shard (ties: the lower shard, then the group seen first). Deterministic, so every shard
    process, and the dry run's prediction, make the same plan."""
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    load = [0] * max(1, n)
    plan = {}
    for g in sorted(sizes, key=lambda g: -sizes[g]):  # sorted() is stable: first-seen order breaks ties
        s = min(range(len(load)), key=lambda i: load[i])
        plan[g] = s
        load[s] += sizes[g]
    return plan


def parse_shard(text: str) -> tuple[int, int]:
    i, n = (int(v) for v in text.split("/"))
    if not 0 <= i < n:
        raise ValueError(f"--gpu-shard wants I/N with 0 <= I < N, got {text!r}")
    return i, n


# --------------------------------------------------------------------------------------------------
# pytest plugin
# --------------------------------------------------------------------------------------------------


def pytest_addoption(parser):
    g = parser.getgroup("gpu_check", "the GPU check's test stage (benchmarks/gpu_tests.py)")
    g.addoption("--gpu-budget", action="store_true", help="first case per test and variant (VARIANT_PARAMS)")
    g.addoption("--gpu-shard", default=None, metavar="I/N", help="run shard I (0-based) of N")
    g.addoption("--count-compiles", default=None, metavar="PATH", help="write compile keys per test (CPU)")
    g.addoption("--count-only", default="", metavar="NAME,...", help="count these tests' launches, run none")


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(config, items):
    dropped = []
    if config.getoption("--gpu-budget"):
        items[:], drop = budget(items)
        dropped += drop
    config.gpu_tests_groups = [group_key(it) for it in items]  # before sharding: the prediction's plan needs all
    shard = config.getoption("--gpu-shard")
    if shard:
        i, n = parse_shard(shard)
        plan = shard_plan(config.gpu_tests_groups, n)
        keep = [it for it in items if plan[group_key(it)] == i]
        dropped += [it for it in items if plan[group_key(it)] != i]
        items[:] = keep
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    if config.getoption("--count-compiles"):
        why = "dry run: its Triton launches are counted, not run (too big for the interpreter)"
        for item in items:
            if count_only(item, config):
                item.add_marker(pytest.mark.xfail(reason=why, strict=False))


def count_only(item, config) -> bool:
    names = [n for n in config.getoption("--count-only").split(",") if n]
    return any(n in item.name for n in names)


def pytest_configure(config):
    path = config.getoption("--count-compiles")
    if path:
        counter = CompileCounter(Path(path))
        config.pluginmanager.register(counter, "gpu_tests_counter")
        config.add_cleanup(counter.stack.close)


@contextlib.contextmanager
def counted_launches(on_launch, on_ran=None):
    """Every Triton launch under the interpreter first calls ``on_launch(config)`` (``config``: the
    ``triton_aot.Config`` an sm_90 GPU would compile for it, Triton's cache key included) and runs only if that
    returns True; ``on_ran(seconds)`` gets the time of each launch that ran."""
    from triton.runtime.interpreter import InterpretedFunction

    from benchmarks.triton_aot import specialize

    run = InterpretedFunction.run

    def counted_run(fn, *args, grid, warmup, **kwargs):
        if not on_launch(specialize(fn, args, kwargs, ARCH)[0]):
            return None
        t0 = time.perf_counter()
        try:
            return run(fn, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            if on_ran is not None:
                on_ran(time.perf_counter() - t0)

    InterpretedFunction.run = counted_run
    try:
        yield
    finally:
        InterpretedFunction.run = run


@contextlib.contextmanager
def as_if_gpu(capability: tuple = (ARCH // 10, ARCH % 10)):
    """Make the launchers choose what they choose on a GPU of ``capability`` (tiles, grids, dot precision) while
    the interpreter still runs the kernels, with its widened 16-bit dots (its bf16 dots are wrong: see
    shared/toolchain.md), so tests still pass. The compile keys then differ from a GPU's only in that constexpr,
    which changes no count. Yields False, changing nothing (the interpreter's own choices are counted), when
    ``clipcid_fast.ops._triton`` has no such hook (``Target``, ``target()``, ``_RECORD_TARGET``)."""
    from clipcid_fast.ops import _triton

    base = getattr(_triton, "Target", None)
    if base is None or not hasattr(_triton, "_RECORD_TARGET") or not hasattr(_triton, "target"):
        yield False
        return

    class AsIfGPU(base):
        @property
        def upcast(self) -> bool:
            return True

    prev = _triton._RECORD_TARGET
    sms = getattr(_triton, "SMS_BY_CAPABILITY", {}).get(tuple(capability), 132)
    _triton._RECORD_TARGET = AsIfGPU(tuple(capability), None, sms)  # None: follow torch's fp32 precision
    try:
        import torch

        got = _triton.target(torch.empty(0))
        yield got.capability == tuple(capability) and got.upcast
    finally:
        _triton._RECORD_TARGET = prev


class CompileCounter:
    """Records, per test, the distinct compile keys of its Triton launches and its time (see the module docstring).
    Only under Triton's interpreter: every launch reaches ``InterpretedFunction.run`` (:func:`counted_launches`)."""

    def __init__(self, path: Path):
        self.path = path
        self.tests: dict[str, dict] = {}
        self.configs: dict[str, dict] = {}
        self.current: dict | None = None
        self.run_kernels = True
        self.t_start = time.time()
        self.first_test: float | None = None
        self.stack = contextlib.ExitStack()
        self.as_if_gpu = self.stack.enter_context(as_if_gpu())
        self.stack.enter_context(counted_launches(self.launched, self.ran))

    def launched(self, cfg) -> bool:
        if cfg.key not in self.configs:
            self.configs[cfg.key] = {
                "kernel": cfg.kernel,
                "signature": cfg.signature_text(),
                "constexprs": cfg.constexpr_text(),
                "num_warps": cfg.num_warps,
                "num_stages": cfg.num_stages,
            }
        if self.current is not None:
            self.current["launches"] += 1
            if cfg.key not in self.current["keys"]:
                self.current["keys"].append(cfg.key)
        return self.run_kernels

    def ran(self, seconds: float) -> None:
        if self.current is not None:
            self.current["launch_s"] += seconds

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.first_test = self.first_test or time.time()
        self.current = self.tests.setdefault(item.nodeid, {
            "name": item.originalname or item.name, "group": group_key(item), "gpu_only": is_gpu_only(item),
            "keys": [], "launches": 0, "launch_s": 0.0, "seconds": 0.0,
        })  # fmt: skip
        self.run_kernels = not count_only(item, item.config)
        self.current["run"] = self.run_kernels
        yield
        self.current, self.run_kernels = None, True

    def pytest_runtest_logreport(self, report):
        if report.nodeid in self.tests:
            self.tests[report.nodeid]["seconds"] += report.duration
            if report.skipped and report.when in ("setup", "call"):
                self.tests[report.nodeid]["skipped"] = True

    def pytest_sessionfinish(self, session):
        kept = {it.nodeid for it in session.items}
        out = {
            "arch": ARCH,
            "as_if_gpu": self.as_if_gpu,
            "startup_s": (self.first_test or time.time()) - _process_start(self.t_start),
            "groups": getattr(session.config, "gpu_tests_groups", []),
            "tests": {k: v for k, v in self.tests.items() if k in kept},
            "configs": self.configs,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(out, indent=1))


def _process_start(fallback: float) -> float:
    """When this process started (Linux /proc), so startup counts Python, torch's import and collection."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return fallback


# --------------------------------------------------------------------------------------------------
# Runner: the shards at once
# --------------------------------------------------------------------------------------------------


def shard_cmd(out: Path, i: int, n: int, count: bool, pytest_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-p", "benchmarks.gpu_tests", "--gpu-budget", f"--gpu-shard={i}/{n}"]
    cmd += [f"--junitxml={out / f'junit_gpu.{i}.xml'}"]
    if count:
        from benchmarks.gpu_sizes import DRY_RUN_COUNT_ONLY

        cmd += [f"--count-compiles={out / f'compiles.{i}.json'}", f"--count-only={','.join(DRY_RUN_COUNT_ONLY)}"]
    return cmd + pytest_args


def _closing_line(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def run_shards(out: Path, n: int, count: bool, pytest_args: list[str]) -> int:
    """The n shards as n processes at once; the worst exit status (5, an empty shard, counts as 0)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # the test processes share the cores: each gets its share for torch's CPU-side references
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    procs = []
    for i in range(n):
        log = out / f"tests_gpu.{i}.log"
        with open(log, "w") as f:
            cmd = shard_cmd(out, i, n, count, pytest_args)
            procs.append((i, log, time.monotonic(), subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)))
    worst = 0
    for i, log, t0, p in procs:
        rc = p.wait()
        rc = 0 if rc == 5 else rc
        worst = max(worst, rc)
        print(f"[shard {i}/{n}] exit {rc} after {time.monotonic() - t0:.0f} s: {_closing_line(log)}", flush=True)
    return worst


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shards", type=int, default=None, help="processes at once (default: gpu_sizes.shard_count())")
    ap.add_argument("--count-compiles", action="store_true", help="write OUT/compiles.<I>.json (CPU only)")
    args = ap.parse_args(argv)
    from benchmarks import gpu_sizes

    n = args.shards or gpu_sizes.shard_count(os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_tests: {n} pytest processes at once (budgeted cases, sharded by test): pytest {' '.join(rest)}")
    return run_shards(args.out, n, args.count_compiles, rest)


if __name__ == "__main__":
    sys.exit(main())
