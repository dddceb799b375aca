"""The static GPU report (benchmarks/triton_aot.py, issue 18 item 4): every Triton kernel configuration the
launch code picks compiles for sm_80 and sm_90, and the report's rules hold.

The unit tests (recorder coverage, the specialisation against Triton's own runtime, the ptxas parser, occupancy,
the FLOP models) are quick. The compile of every configuration is ``slow`` (about 3 minutes on 2 cores): CI runs
it, the GPU check's ``-m "not slow"`` stages do not (it needs no GPU)."""

import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import triton_aot as aot

ARCHS = (80, 90)


def _launched_kernels() -> dict:
    """Every Triton kernel defined in clipcid_fast.ops: a @jit function that reads its program id and that no other
    @jit function calls (those are device helpers, e.g. ``dot_rows``)."""
    import triton

    import clipcid_fast.ops as ops

    jitted = {}
    for info in pkgutil.iter_modules(ops.__path__):
        mod = importlib.import_module(f"clipcid_fast.ops.{info.name}")
        for name, obj in vars(mod).items():
            fn = getattr(obj, "fn", None)
            if isinstance(obj, triton.runtime.KernelInterface) and fn is not None and fn.__module__ == mod.__name__:
                jitted[f"{mod.__name__}.{name}"] = (name, obj, inspect.getsource(fn))
    called = {
        name
        for name, _, _ in jitted.values()
        for other, _, src in jitted.values()
        if other != name and re.search(rf"\b{re.escape(name)}\s*\(", src)
    }
    return {full: obj for full, (name, obj, src) in jitted.items() if name not in called and "program_id" in src}


@pytest.fixture(scope="module")
def quick_recorded():
    return {arch: aot.record_configs(arch, quick=True) for arch in ARCHS}


def test_recorder_sees_every_kernel(quick_recorded):
    kernels = _launched_kernels()
    modules = {k.rsplit(".", 1)[0].rsplit(".", 1)[1] for k in kernels}
    assert {"margin_triton", "mlcd_triton", "relational_triton", "masked_max_sim", "row_logsumexp"} <= modules, sorted(
        kernels
    )
    for arch, recs in quick_recorded.items():
        seen = {f"{r.config.module}.{r.config.kernel}" for r in recs}
        missing = sorted(set(kernels) - seen)
        assert not missing, f"sm_{arch}: kernels no report case launches (add a case to triton_aot.cases): {missing}"


def test_every_launch_has_a_flop_model(quick_recorded):
    """A kernel added or restructured without updating its FLOP model fails here (the model checks its grid)."""
    for recs in quick_recorded.values():
        for r in recs:
            aot.kernel_flops(r.config.kernel, r.grid, r.args)  # raises aot.ModelError


def test_kernels_execute_at_least_the_necessary_flops(quick_recorded):
    """A FLOP model that undercounts (a forgotten grid axis or loop) shows up as a kernel doing less than eager."""
    rows = aot.build_rows(quick_recorded[90], {})
    for r in rows:
        if r["necessary_flops"] and r["op_kernel_flops"] is not None:  # None: no model (the test above)
            assert r["op_kernel_flops"] >= r["necessary_flops"], r


def test_flop_models_degrade_visibly(quick_recorded):
    """An unknown kernel raises, and every model with dots checks its grid: one more grid axis (a restructured
    launch) raises instead of counting the old structure."""
    with pytest.raises(aot.ModelError, match="no FLOP model"):
        aot.kernel_flops("_no_such_kernel", (1,), {})
    first = {}
    for r in quick_recorded[90]:
        first.setdefault(r.config.kernel, r)
    for name, r in first.items():
        if aot.kernel_flops(name, r.grid, r.args):
            with pytest.raises(aot.ModelError):
                aot.kernel_flops(name, (*r.grid, 2), r.args)


# --------------------------------------------------------------------------------------------------
# The specialisation against Triton's runtime: JITFunction.run itself, stopped at its compile hook
# --------------------------------------------------------------------------------------------------


class _FakeDriver:
    """What JITFunction.run asks the active driver for, on a machine without a GPU."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0


def _fresh_jit(kernel):
    """A JITFunction of ``kernel``'s function and @jit options (under the interpreter kernels are interpreted)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        opts = {"do_not_specialize": kernel.do_not_specialize, "debug": kernel.debug}
        return JITFunction(kernel.fn, **opts, do_not_specialize_on_alignment=kernel.do_not_specialize_on_alignment)
    return JITFunction(kernel.fn, **kernel.kwargs)


def _runtime_compile_request(kernel, args, meta, arch) -> dict:
    """What Triton 3.8's JITFunction.run would hand its compiler for ``kernel[grid](*args, **meta)``."""
    from triton import knobs
    from triton.runtime import driver

    seen = {}

    def hook(*, compile, **_):
        seen.update(compile)
        return True  # handled: run skips the compile

    prev_driver, prev_hook = driver._active, knobs.runtime.jit_cache_hook
    driver.set_active(_FakeDriver(arch))
    knobs.runtime.jit_cache_hook = hook
    try:
        _fresh_jit(kernel).run(*args, grid=(1,), warmup=True, **meta)
    finally:
        driver._active, knobs.runtime.jit_cache_hook = prev_driver, prev_hook
    return seen


def _one_launch_per_kernel(arch):
    """The first recorded launch of every kernel (the live launch arguments, meta tensors included)."""
    from clipcid_fast.ops import _triton

    out = {}
    for case in aot.cases(quick=True):
        with _triton.recording((arch // 10, arch % 10)) as rec:
            case.run()
        for launch in rec:
            out.setdefault(launch.kernel.fn.__name__, launch)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_specialization_matches_triton_runtime(arch):
    for name, launch in _one_launch_per_kernel(arch).items():
        cfg, _ = aot.specialize(launch.kernel, launch.args, launch.meta, arch)
        ref = _runtime_compile_request(launch.kernel, launch.args, launch.meta, arch)
        assert ref, f"{name}: JITFunction.run did not reach its compile hook"
        assert cfg.key.endswith(":" + ref["key"]), name
        assert cfg.signature == ref["signature"], name
        assert cfg.constexprs == ref["constants"], name
        assert cfg.attrs == ref["configs"][0], name
        assert cfg.num_warps == ref["num_warps"] and cfg.num_stages == ref["num_stages"], name


def test_specialization_rules_by_hand():
    """The rules the report relies on, on a toy kernel: ints equal to 1 become constexprs, multiples of 16 get a
    divisibility hint, do_not_specialize ints get neither, big ints are i64, floats fp32, bools i1 (u1)."""
    import torch
    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    def toy(p, q, one, sixteen, seventeen, big, free, f, flag, BLOCK: tl.constexpr):
        pass

    toy.__module__ = __name__
    kernel = JITFunction(toy, do_not_specialize=["free"])
    x = torch.empty(64, 3, dtype=torch.bfloat16, device="meta")
    cfg, _ = aot.specialize(kernel, (x, x[1], 1, 32, 17, 2**31, 32, 0.5, True), {"BLOCK": 64}, 90)
    sig = cfg.signature
    assert sig["p"] == "*bf16" and sig["q"] == "*bf16"
    assert sig["one"] == "constexpr" and cfg.constexprs[(2,)] == 1
    assert sig["sixteen"] == "i32" and cfg.attrs[(3,)] == [["tt.divisibility", 16]]
    assert sig["seventeen"] == "i32" and not cfg.attrs.get((4,))
    assert sig["big"] == "i64"
    assert sig["free"] == "i32" and not cfg.attrs.get((6,))
    assert sig["f"] == "fp32" and sig["flag"] == "u1"
    assert cfg.attrs[(0,)] == [["tt.divisibility", 16]]  # allocation start: 16-byte aligned
    assert not cfg.attrs.get((1,))  # x[1] starts 6 bytes in
    assert cfg.constexprs[(9,)] == 64 and triton.__version__


# --------------------------------------------------------------------------------------------------
# ptxas, PTX and occupancy
# --------------------------------------------------------------------------------------------------

# Captured from Triton 3.8's make_cubin (TRITON_DUMP_PTXAS_LOG) for the K2 backward, bf16, sm_90, before issue 18
PTXAS_SPILLING = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_rel_bwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _rel_bwd_kernel
    1112 bytes stack frame, 1620 bytes spill stores, 2420 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1112 bytes cumulative stack size
ptxas info    : Compile time = 767.323 ms
"""

PTXAS_CLEAN = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_row_lse_kernel' for 'sm_80'
ptxas info    : Function properties for _row_lse_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers, 64 bytes smem, 380 bytes cmem[0]
"""


def test_parse_ptxas():
    assert aot.parse_ptxas(PTXAS_SPILLING) == {
        "registers": 255,
        "spill_stores": 1620,
        "spill_loads": 2420,
        "stack_bytes": 1112,
        "static_smem": 0,
    }
    got = aot.parse_ptxas(PTXAS_CLEAN)
    assert (got["registers"], got["spill_stores"], got["spill_loads"], got["static_smem"]) == (26, 0, 0, 64)
    with pytest.raises(ValueError, match="registers"):
        aot.parse_ptxas("ptxas fatal   : Unresolved extern function 'foo'")


def test_mma_kind():
    assert aot.mma_kind("\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, ...") == "wgmma"
    assert aot.mma_kind("\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, ...") == "mma"
    assert aot.mma_kind("\tfma.rn.f32 %f3, %f1, %f2, %f3;\n\t// mma comment-free") == "none"


def test_occupancy():
    # 255 registers x 8 warps: one block of 8 warps per SM (the registers), 1/8 of 64 warps
    assert aot.occupancy(90, 255, 81920, 8) == pytest.approx(8 / 64)
    # 32 registers, 4 warps, no shared memory: 16 blocks of 4 warps fill the 64 warps
    assert aot.occupancy(80, 32, 0, 4) == pytest.approx(1.0)
    # shared memory bound: 100 KB blocks, one per A100 SM (164 KB), two per H100 SM (228 KB)
    assert aot.occupancy(80, 64, 100_000, 4) == pytest.approx(4 / 64)
    assert aot.occupancy(90, 64, 100_000, 4) == pytest.approx(8 / 64)


def test_violations_rules():
    base = {
        "kernel": "k", "family": "K2", "op": "relational_rows", "mode": "fwd", "arch": "sm_90", "dtype": "bf16",
        "sizes": "B=16384 D=512", "constexprs": "", "num_warps": 4, "registers": 128, "spill_stores": 0,
        "spill_loads": 0, "shared_bytes": 1024, "mma_kind": "wgmma", "programs": 512, "kernel_flops": 10,
        "flop_ratio": 2.0, "step_flop_ratio": 2.0, "error": "",
    }  # fmt: skip
    assert aot.violations([base]) == []
    bad = [
        {**base, "mma_kind": "none"},
        {**base, "spill_stores": 8},
        {**base, "shared_bytes": 232449},
        {**base, "programs": 256},
        {**base, "flop_ratio": 2.6},
        {**base, "step_flop_ratio": 2.6},
        {**base, "error": "compile failed: x"},
    ]
    for row in bad:
        assert len(aot.violations([row])) == 1, row
    assert aot.violations([{**base, "mma_kind": "none", "kernel_flops": 0}]) == []  # no dots: no tensor cores due
    assert aot.violations([{**base, "dtype": "fp32", "mma_kind": "none"}]) == []  # fp32 "ieee": CUDA cores
    assert aot.violations([{**base, "sizes": "B=65536 D=512", "programs": 256}]) == []  # rule is at B = 16,384


# --------------------------------------------------------------------------------------------------
# The report itself: every configuration, both archs (compiles in a pool of clean processes)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_report():
    return aot.report(ARCHS, quick=False)


@pytest.mark.slow
def test_every_configuration_compiles(full_report):
    rows, stats = full_report
    failed = sorted({f"{r['arch']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in rows if r["error"]})
    assert not failed, "\n".join(failed)
    assert stats["compiles"] == len({(r["arch"], r["key"]) for r in rows})
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS}


# What is left, stated exactly so that anything else fails: the fp32 (IEEE, CUDA-core) relational backward on
# sm_90 at D = 768 (six 128-column accumulator slices) spills 28 B (its operand tiles carry a 64-bit pointer per
# element). Every 16-bit configuration is spill-free and on tensor cores, every grid reaches 264 programs, every
# relational op stays within 2.5x its necessary FLOPs. Remove the allowance once
# `python benchmarks/triton_aot.py --check` passes.
FP32_SPILL_ALLOWANCE = 32  # bytes of spill stores or loads that configuration may still have


def _tolerated(row, line):
    return (
        "spills" in line
        and row["kernel"] == "_rel_bwd_kernel"
        and row["arch"] == "sm_90"
        and row["dtype"] == "fp32"
        and max(row["spill_stores"], row["spill_loads"]) <= FP32_SPILL_ALLOWANCE
    )


@pytest.mark.slow
def test_no_violations_beyond_one_small_fp32_spill(full_report):
    rows, _ = full_report
    left = []
    for row in rows:
        left += [line for line in aot.violations([row]) if not _tolerated(row, line)]
    left = sorted(set(left))
    assert not left, f"{len(left)} violations:\n" + "\n".join(left)
