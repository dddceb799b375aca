"""Static GPU report: every Triton kernel configuration the launch code picks, compiled ahead of time for
A100 (sm_80) and H100 (sm_90) on a machine without a GPU (issue 18, item 4).

How it cannot drift from what runs: the real launchers (``margin_softmax._triton_fwd`` / ``_triton_bwd``,
``relational_triton.triton_fwd`` / ``triton_bwd``, the distill op's Triton body, ``masked_max_sim._triton_max_sim``,
``row_logsumexp._triton_fwd``) are called with ``device="meta"`` tensors at GPU sizes inside
``clipcid_fast.ops._triton.recording(capability)``, which records every ``launch(kernel, grid, *args, **meta)``
instead of running it and makes the launchers choose their GPU path. Each recorded launch is specialised exactly
as Triton 3.8's ``JITFunction.run`` would (Triton's own binder, ``create_function_from_signature``, and
``JITFunction._pack_args``: dtypes, ints equal to 1 as constexprs, divisibility-by-16 hints, ``do_not_specialize``;
meta tensors report ``data_ptr() = storage offset × element size``, i.e. a 16-byte-aligned allocation, as CUDA's
caching allocator gives), deduplicated by Triton's own cache key, and compiled with ``triton.compile`` for
``GPUTarget("cuda", 80 | 90, 32)`` in a pool of clean processes (no ``TRITON_INTERPRET``), with a fresh Triton
cache so compile times are real.

Per configuration: ``ptxas -v`` as Triton runs it when it makes the cubin (its own flags; its log is captured,
or ptxas is rerun with the same flags when the cubin came from a cache): registers, spill stores / loads, stack;
shared memory (``metadata.shared`` plus ptxas's static smem); ``mma`` / ``wgmma`` in the PTX (tensor cores);
theoretical occupancy; compile seconds. Per launch: programs (grid product) and programs per SM.

FLOPs (dot FLOPs only, 2 per multiply-add; elementwise work is not counted):

* ``kernel_flops``: what one launch executes, from its grid, loops and tile sizes, padding included
  (:func:`kernel_flops`, one small model per kernel name). A model checks the grid it assumes and raises
  :class:`ModelError` for an unknown kernel or a grid it does not recognise: the row then carries no FLOPs and
  ``--check`` names it, so a kernel rewrite never leaves a stale model silently lying.
* ``op_kernel_flops``: the sum over the launches of one op call (e.g. K1's dx and dW launches).
* ``necessary_flops``: what an eager implementation of the same op call must execute (:func:`necessary_flops`):
  K1 forward 2·B·N·D (the logits); K1 backward the logits recompute plus each wanted gradient GEMM
  (2·B·N·D each: dX = dcos·Ŵ, dW = dcosᵀ·X̂); K2 forward 2·R·C·D per similarity matrix (student, and teacher
  2·R·C·D_t when soft), once whatever the directions; K2 backward the matrices' recompute plus the gradient
  GEMMs dq = G·k and dk = Gᵀ·q (2·R·C·D each); the distill op the same with student and teacher matrices
  once; dedup the strict lower triangle c·(c−1)·D, nearest centroid 2·n·k·D; row log-sum-exp 0.
* ``flop_ratio`` = op_kernel_flops / necessary_flops (empty where necessary is 0); ``step_flop_ratio`` the same over
  the op's forward and backward together at that size (a training step; issue 18's "3.7×" for K2 before).

Rules (``--check``, :func:`violations`): every configuration compiles and has a FLOP model; a 16-bit one (bf16 /
fp16 feature tensors handed to a kernel with dots; the ``dtype`` column says what the kernel gets, e.g.
``fp16->fp32`` where the public op widens first) has ``mma`` / ``wgmma``; no spill bytes; shared memory within the
arch's per-block limit; ≥ 264 programs (2 per H100 SM) for every launch with dots of K1's forward at B = 1024,
N = 1M and of K2 at B = 16,384; K2's flop_ratio and step_flop_ratio ≤ 2.5.

Occupancy: resident warps per SM / 64, limited by registers (65,536 per SM, allocated per warp in units of
256), shared memory per SM (A100 164 KB, H100 228 KB, 1 KB reserved per block), 32 blocks and 64 warps per SM.

Run: ``python benchmarks/triton_aot.py [--arch 80,90] [--quick] [--jobs N] [--check]`` (appends to
``benchmarks/results/triton_aot.csv``; see benchmarks/README.md). Functions for tests and other tools:
:func:`record_configs`, :func:`compile_config`, :func:`compile_configs`, :func:`report`, :func:`violations`,
:func:`compile_stats` and :func:`compile_budget` (distinct compiles and their CPU seconds for a set of cases).

Triton and clipcid_fast are imported lazily: a process that compiles must not have Triton's interpreter on, and
the pool's workers switch it off before their first import.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as _dt
import functools
import hashlib
import importlib
import io
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping

import torch

from benchmarks import _harness

DEFAULT_CSV = _harness.REPO_ROOT / "benchmarks" / "results" / "triton_aot.csv"

COLUMNS = (
    "kernel",
    "family",
    "op",
    "mode",
    "arch",
    "dtype",
    "fp32_precision",
    "sizes",
    "signature",
    "constexprs",
    "num_warps",
    "num_stages",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack_bytes",
    "shared_bytes",
    "occupancy",
    "tensor_cores",
    "mma_kind",
    "programs",
    "programs_per_sm",
    "kernel_flops",
    "op_kernel_flops",
    "necessary_flops",
    "flop_ratio",
    "step_flop_ratio",
    "compile_s",
    "compile_cpu_s",
    "key",
    "error",
    "torch",
    "triton",
    "git_sha",
    "timestamp",
)
"""The CSV columns (benchmarks/README.md "Static GPU report" says what each means)."""


@dataclasses.dataclass(frozen=True)
class Arch:
    cc: int  # 80, 90
    gpu: str
    sms: int
    smem_per_block: int  # bytes a block may opt in to
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32


ARCHS = {
    80: Arch(80, "A100", sms=108, smem_per_block=166912, smem_per_sm=167936),
    90: Arch(90, "H100", sms=132, smem_per_block=232448, smem_per_sm=233472),
}

MIN_PROGRAMS = 2 * ARCHS[90].sms  # 264: two programs per SM of an H100 (issue 18)
MAX_K2_FLOP_RATIO = 2.5  # FlashAttention-2's kernel / necessary ratio for the same structure (issue 18)
SMEM_RESERVED_PER_BLOCK = 1024  # the CUDA runtime's per-block shared-memory reservation on sm_80+

# --------------------------------------------------------------------------------------------------
# Cases: one launcher call (an op's forward or backward at one size and dtype) with meta tensors
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    family: str  # K1, K2, K3, LSE
    op: str
    mode: str  # fwd / bwd
    dtype: str  # the feature tensors' dtype ("fp32/bf16": x fp32, W bf16)
    sizes: dict
    run: Callable[[], object]  # calls the launcher(s); inside recording() nothing runs

    @property
    def sizes_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.sizes.items())


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_META = torch.device("meta")


def _t(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=_META)


# ArcFace margins and scale, as the public defaults
_K1_MARGIN = (1.0, 0.5, 0.0)
_K1_SCALE = 32.0


def _k1_cases(quick: bool) -> list[Case]:
    from clipcid_fast.ops import margin_softmax as ms

    sizes = (
        [(1024, 1_000_000)] if quick else [(1024, 1_000_000), (1024, 4_000_000), (4096, 1_000_000), (4096, 4_000_000)]
    )
    dtypes = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16")]  # (x, W): mixed is allowed
    D = 512
    out = []
    for (B, N), (dx, dw) in ((s, d) for s in sizes for d in dtypes):
        label = dx if dx == dw else f"{dx}/{dw}"

        def fwd(B=B, N=N, dx=dx, dw=dw):
            x, w, lab = _t(B, D, dtype=DTYPES[dx]), _t(N, D, dtype=DTYPES[dw]), _t(B, dtype=torch.int64)
            ms._triton_fwd(x, w, lab, _K1_SCALE, *_K1_MARGIN)

        def bwd(B=B, N=N, dx=dx, dw=dw):
            x, w, lab = _t(B, D, dtype=DTYPES[dx]), _t(N, D, dtype=DTYPES[dw]), _t(B, dtype=torch.int64)
            ms._triton_bwd(_t(B), _t(B), x, w, lab, _t(B), _K1_SCALE, *_K1_MARGIN, True, True)

        sz = {"B": B, "N": N, "D": D}
        out += [
            Case("K1", "margin_softmax", "fwd", label, sz, fwd),
            Case("K1", "margin_softmax", "bwd", label, sz, bwd),
        ]
    return out


# MLCD's positives per row (``cluster --topk``; the README's example)
_MLCD_K = 4


def _mlcd_cases(quick: bool) -> list[Case]:
    """MLCD's negatives-lse kernels (``mlcd_triton``): K1's grids and tiles with K positives masked per row, so the
    same sizes and dtypes as K1 (the op's scale is a runtime argument; the margin is applied outside the kernels)."""
    from clipcid_fast.ops import mlcd_triton as mt

    sizes = [(1024, 1_000_000)] if quick else [(1024, 1_000_000), (4096, 1_000_000)]
    dtypes = [("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "bf16")]
    D, K = 512, _MLCD_K
    out = []
    for (B, N), (dx, dw) in ((s, d) for s in sizes for d in dtypes):
        label = dx if dx == dw else f"{dx}/{dw}"

        def inputs(B=B, N=N, dx=dx, dw=dw):
            return _t(B, D, dtype=DTYPES[dx]), _t(N, D, dtype=DTYPES[dw]), _t(B, K, dtype=torch.int64)

        def fwd(inputs=inputs):
            mt.neg_lse(*inputs(), _K1_SCALE)

        def bwd(inputs=inputs, B=B):
            x, w, lab = inputs()
            mt.neg_lse_grads(_t(B), x, w, lab, _t(B), _K1_SCALE, True, True)

        sz = {"B": B, "N": N, "D": D, "K": K}
        out += [Case("K1", "mlcd", "fwd", label, sz, fwd), Case("K1", "mlcd", "bwd", label, sz, bwd)]
    return out


def _k2_inputs(B, D, DT, dt, soft):
    q, k, s = _t(B, D, dtype=DTYPES[dt]), _t(B, D, dtype=DTYPES[dt]), _t(())
    if not soft:
        return q, k, s, None, None, None
    return q, k, s, _t(B, DT, dtype=DTYPES[dt]), _t(B, DT, dtype=DTYPES[dt]), _t(())


def _k2_rows_cases(B, D, DT, dt, kind, direction) -> list[Case]:
    from clipcid_fast.ops import relational_triton as rt

    soft = kind != "hard"
    rows, cols = direction in ("rows", "both"), direction in ("cols", "both")
    op_kind = "ce" if kind == "hard" else kind
    R = B

    def fwd():
        rt.triton_fwd(*_k2_inputs(B, D, DT, dt, soft), op_kind, 0, rows, cols)

    def bwd():
        # the op's backward hands empty grads / stats for a direction it did not compute
        g_r, s_r = (_t(R), _t(2, R)) if rows else (_t(0), _t(2, 0))
        g_c, s_c = (_t(R), _t(2, R)) if cols else (_t(0), _t(2, 0))
        q, k, s, qt, kt, st = _k2_inputs(B, D, DT, dt, soft)
        rt.triton_bwd(g_r, g_c, q, k, s, qt, kt, st, s_r, s_c, 0, rows, cols)

    sz = {"B": B, "D": D, **({"DT": DT} if soft else {}), "kind": kind, "dir": direction}
    return [Case("K2", "relational_rows", "fwd", dt, sz, fwd), Case("K2", "relational_rows", "bwd", dt, sz, bwd)]


def _k2_distill_cases(B, D, DT, dt, kind) -> list[Case]:
    """The distill op (hard + soft losses, both directions) through the op's own Triton body (``_init_fn``: the
    Python function behind the custom op; meta tensors would otherwise dispatch to its fake)."""
    from clipcid_fast.ops import relational_rows as rr

    def fwd():
        rr.relational_distill_op._init_fn(*_k2_inputs(B, D, DT, dt, True), kind, "triton")

    def bwd():
        g = [_t(B) for _ in range(4)]
        rr.relational_distill_bwd_op._init_fn(*g, *_k2_inputs(B, D, DT, dt, True), _t(2, B), _t(2, B), "triton")

    sz = {"B": B, "D": D, "DT": DT, "kind": kind, "dir": "both"}
    return [Case("K2", "relational_distill", "fwd", dt, sz, fwd), Case("K2", "relational_distill", "bwd", dt, sz, bwd)]


def _k2_cases(quick: bool) -> list[Case]:
    """Both directions (the distill losses) at every size; one direction alone (``relational_kd_rows``'s default
    "rows", and "cols": the backward's one-sided variants) at the smallest size."""
    batches = [16384] if quick else [16384, 65536]
    dims = [(512, 768)] if quick else [(512, 512), (768, 768), (512, 768)]  # (student D, teacher D_t)
    out = []
    for B in batches:
        for dt in DTYPES:
            for D in sorted({d for d, _ in dims}):  # hard targets: no teacher dimension
                out += _k2_rows_cases(B, D, D, dt, "hard", "both")
            for D, DT in dims:
                for kind in ("ce", "kl"):
                    out += _k2_rows_cases(B, D, DT, dt, kind, "both")
                out += _k2_distill_cases(B, D, DT, dt, "kl")
            if B == batches[0]:
                D, DT = dims[-1]
                for kind in ("hard", "ce", "kl"):
                    for direction in ("rows", "cols"):
                        out += _k2_rows_cases(B, D, D if kind == "hard" else DT, dt, kind, direction)
    return out


def _k3_dtype(*tensors) -> torch.dtype:
    """The dtype the public K3 functions hand the Triton kernel (they widen some input dtypes first): the rule of
    ``masked_max_sim._backend_for`` for the Triton backend (which refuses meta tensors, so it is read here)."""
    from clipcid_fast.ops import masked_max_sim as mms

    dtypes = {t.dtype for t in tensors}
    return next(iter(dtypes)) if len(dtypes) == 1 and next(iter(dtypes)) in mms._TRITON_DTYPES else torch.float32


def _k3_cases(quick: bool) -> list[Case]:
    from clipcid_fast.ops import masked_max_sim as mms

    D, c, n = 512, 32768, 1_000_000
    ks = [1024] if quick else [1024, 65536]
    out = []
    for dt in DTYPES:
        want = _k3_dtype(_t(1, D, dtype=DTYPES[dt]))
        label = dt if want == DTYPES[dt] else f"{dt}->{_SHORT[want]}"  # e.g. "fp16->fp32": widened before the op

        def dedup(want=want):
            x = _t(c, D, dtype=want)
            mms._triton_max_sim(x, x, True, 0)  # tile 0: the public functions' default

        out.append(Case("K3", "masked_max_sim", "fwd", label, {"c": c, "D": D}, dedup))
        for k in ks:

            def assign(k=k, want=want):
                mms._triton_max_sim(_t(k, D, dtype=want), _t(n, D, dtype=want), False, 0)

            out.append(Case("K3", "nearest_centroid", "fwd", label, {"n": n, "k": k, "D": D}, assign))
    return out


def _lse_cases(quick: bool) -> list[Case]:
    from clipcid_fast.ops import row_logsumexp as rl

    shapes = [(65536, 65536)] if quick else [(65536, 65536), (4096, 1_000_000)]
    out = []
    for (rows, cols), dt in ((s, d) for s in shapes for d in DTYPES):

        def fwd(rows=rows, cols=cols, dt=dt):
            rl._triton_fwd(_t(rows, cols, dtype=DTYPES[dt]))

        out.append(Case("LSE", "row_logsumexp", "fwd", dt, {"rows": rows, "cols": cols}, fwd))
    return out


def cases(quick: bool = False) -> list[Case]:
    """Every launcher call of the report (``quick``: the smallest benchmark size of each family)."""
    return _k1_cases(quick) + _mlcd_cases(quick) + _k2_cases(quick) + _k3_cases(quick) + _lse_cases(quick)


# --------------------------------------------------------------------------------------------------
# Specialisation: the key, signature, constexprs and attributes Triton's runtime would compile
# --------------------------------------------------------------------------------------------------

_JIT_CACHE: dict = {}


def jit_function(kernel):
    """``kernel`` as a JITFunction. Under the interpreter (``TRITON_INTERPRET=1``, the test session) kernels are
    InterpretedFunctions: the same Python function and ``@jit`` options make the JITFunction a GPU would run."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if id(kernel) not in _JIT_CACHE:
        _JIT_CACHE[id(kernel)] = (kernel, JITFunction(kernel.fn, **getattr(kernel, "kwargs", {})))
    return _JIT_CACHE[id(kernel)][1]


@dataclasses.dataclass
class Config:
    """One distinct compile: what ``triton.compile`` receives (picklable: handed to the pool's workers)."""

    module: str
    kernel: str
    arch: int
    signature: dict
    constexprs: dict  # {(param index,): value}
    attrs: dict
    options: dict
    key: str  # Triton's runtime cache key (specialization + options), plus the arch
    param_names: tuple

    @property
    def num_warps(self) -> int:
        return self.options["num_warps"]

    @property
    def num_stages(self) -> int:
        return self.options["num_stages"]

    @property
    def short_key(self) -> str:
        return hashlib.sha1(self.key.encode()).hexdigest()[:10]

    def constexpr_text(self) -> str:
        return " ".join(f"{self.param_names[p[0]]}={_fmt_const(v)}" for p, v in sorted(self.constexprs.items()))

    def signature_text(self) -> str:
        """Argument types in order, runs collapsed (``*bf16x4 *fp32x10 i32x9``), then the divisibility hints."""
        types = [t for t in self.signature.values() if t != "constexpr"]
        runs = []
        for t in types:
            if runs and runs[-1][0] == t:
                runs[-1][1] += 1
            else:
                runs.append([t, 1])
        text = " ".join(t if n == 1 else f"{t}x{n}" for t, n in runs)
        return f"{text} div16:{sum(1 for v in self.attrs.values() if v)}"


def _fmt_const(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


@functools.cache
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


_BINDERS: dict = {}


def _binder(jf, arch: int):
    """Triton's argument binder for ``jf`` on sm_``arch`` (cached: building it execs generated code)."""
    from triton.runtime.jit import create_function_from_signature

    key = (id(jf), arch)
    if key not in _BINDERS:
        _BINDERS[key] = (jf, create_function_from_signature(jf.signature, jf.params, _backend(arch)))
    return _BINDERS[key][1]


def specialize(kernel, args: tuple, meta: Mapping, arch: int) -> tuple[Config, dict]:
    """(Config, bound arguments by name) of ``kernel[grid](*args, **meta)`` on an sm_``arch`` GPU, built by
    Triton's own runtime helpers exactly as ``JITFunction.run`` builds them."""
    import types

    from triton import knobs
    from triton.runtime.jit import JITFunction, compute_cache_key

    jf = jit_function(kernel)
    backend = _backend(arch)
    binder = _binder(jf, arch)
    kwargs = dict(meta)
    # JITFunction.run adds these two before binding
    kwargs["debug"] = kwargs.get("debug", jf.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = JITFunction._pack_args(
        types.SimpleNamespace(params=jf.params), backend, kwargs, bound, specialization, options
    )
    cfg = Config(
        module=jf.fn.__module__,
        kernel=jf.fn.__name__,
        arch=arch,
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options=dict(options.__dict__),
        key=f"sm{arch}:{jf.fn.__module__}.{jf.fn.__name__}:{key}",
        param_names=tuple(p.name for p in jf.params),
    )
    return cfg, dict(bound)


# --------------------------------------------------------------------------------------------------
# Recording: the launches each case makes, as a GPU of each arch would see them
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Recorded:
    """One recorded launch of one case, with its compile configuration."""

    case: Case
    arch: int
    fp32_precision: str
    config: Config
    grid: tuple
    args: dict  # bound arguments by name (meta tensors, ints, floats, constexprs)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


def record_configs(arch: int, quick: bool = False, fp32_precision: str = "ieee", only=None) -> list[Recorded]:
    """Every launch of every case (``only``: a list of cases instead of :func:`cases`) as recorded on an
    sm_``arch`` GPU, each with its :class:`Config`. Launches of distinct configs share a Config object."""
    from clipcid_fast.ops import _triton

    configs: dict[str, Config] = {}
    out = []
    for case in cases(quick) if only is None else only:
        with _triton.recording((arch // 10, arch % 10), fp32_precision) as rec:
            case.run()
        if not rec:
            raise RuntimeError(f"{case.op} {case.mode} {case.sizes_text}: the launcher recorded no launch")
        for launch in rec:
            cfg, bound = specialize(launch.kernel, launch.args, launch.meta, arch)
            cfg = configs.setdefault(cfg.key, cfg)
            out.append(Recorded(case, arch, fp32_precision, cfg, tuple(launch.grid), bound))
    return out


def distinct_configs(recorded: Iterable[Recorded]) -> list[Config]:
    """The distinct compiles among recorded launches, in first-seen order."""
    seen: dict[str, Config] = {}
    for r in recorded:
        seen.setdefault(r.config.key, r.config)
    return list(seen.values())


# --------------------------------------------------------------------------------------------------
# Compiling (in clean worker processes) and reading ptxas / PTX
# --------------------------------------------------------------------------------------------------

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict:
    """Registers, spill stores / loads, stack frame and static shared memory from ``ptxas -v`` output (one entry
    function). Raises ValueError when the log has no register line (not a ``-v`` log)."""
    if not _PTXAS_RE["registers"].search(log):
        raise ValueError(f"no 'Used N registers' line in the ptxas log: {log[:300]!r}")
    return {k: int(m.group(1)) if (m := rx.search(log)) else 0 for k, rx in _PTXAS_RE.items()}


def mma_kind(ptx: str) -> str:
    """ "wgmma" (Hopper warpgroup MMA), "mma" (mma.sync, sm_80 tensor cores) or "none": what the dots run on."""
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> float:
    """Theoretical occupancy: resident warps per SM / 64 (see the module docstring for the limits)."""
    a = ARCHS[arch]
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    blocks = min(a.max_blocks, (a.regs_per_sm // regs_per_warp) // num_warps, a.max_warps // num_warps)
    if shared:
        blocks = min(blocks, a.smem_per_sm // (shared + SMEM_RESERVED_PER_BLOCK))
    return blocks * num_warps / a.max_warps


def _ptxas_rerun(ptx: str, arch: int) -> str:
    """``ptxas -v`` with the flags Triton's make_cubin passes (used when the cubin came from a cache)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [
            get_ptxas(arch).path,
            "-lineinfo",
            "-v",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
        ]
        res = subprocess.run([*cmd, str(src), "-o", str(src) + ".o"], capture_output=True, text=True, check=True)
        return res.stdout + res.stderr


def compile_config(cfg: Config) -> dict:
    """Compile one configuration in this process (which must not run Triton's interpreter) and read it back:
    registers, spills, stack, shared bytes, mma kind, compile seconds, or ``error``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(cfg.module), cfg.kernel)
    src = ASTSource(fn=kernel, signature=cfg.signature, constexprs=cfg.constexprs, attrs=cfg.attrs)
    log = io.StringIO()
    prev = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the log of its own `ptxas -v` run
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", cfg.arch, 32), options=cfg.options)
    except Exception as exc:  # a configuration that does not compile is a result, not a crash of the report
        first = (str(exc).strip().splitlines() or [""])[0]
        return {"error": f"compile failed: {type(exc).__name__}: {first[:300]}"}
    finally:
        knobs.nvidia.dump_ptxas_log = prev
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    ptx = compiled.asm["ptx"]
    text = log.getvalue()
    if "Used" not in text:
        text = _ptxas_rerun(ptx, cfg.arch)
    out = parse_ptxas(text)
    out.update(
        shared_bytes=int(compiled.metadata.shared) + out.pop("static_smem"),
        mma_kind=mma_kind(ptx),
        compile_s=seconds,
        compile_cpu_s=cpu,
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
    )
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (ptxas): a compile's cost whatever the machine's load."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _worker_init(cache_dir: str) -> None:
    # before the first import of triton in this process: compile, do not interpret
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)


def _compile_in_worker(cfg: Config) -> dict:
    return compile_config(cfg)


def compile_configs(configs: list[Config], jobs: int | None = None, cache_dir: str | None = None) -> dict:
    """``{config.key: compile_config(config)}`` over a pool of ``jobs`` fresh processes (default: the CPU count).
    ``cache_dir``: Triton's cache (default: a new empty one, removed after, so every compile is timed; a warm one
    makes the times cache loads). The pool spawns: a script calling this needs the ``if __name__ == "__main__"``
    guard."""
    jobs = max(1, jobs or os.cpu_count() or 1)
    tmp = None if cache_dir else tempfile.mkdtemp(prefix="triton_aot_cache_")
    ctx = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(jobs, max(1, len(configs))),
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(cache_dir or tmp,),
        ) as pool:
            results = list(pool.map(_compile_in_worker, configs))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {c.key: r for c, r in zip(configs, results)}


def compile_stats(compiled: Mapping[str, dict], wall_s: float | None = None) -> dict:
    """What a set of distinct compiles costs: ``compiles`` (how many), ``failed``, ``compile_s`` (the sum of each
    compile's wall seconds in its worker: inflated on a loaded machine), ``compile_cpu_s`` (the sum of their CPU
    seconds, ptxas included: the figure to predict another machine's compile time from, divided by its cores),
    ``wall_s`` (the pool's wall time, when given)."""
    ok = [r for r in compiled.values() if "error" not in r]
    return {
        "compiles": len(compiled),
        "failed": len(compiled) - len(ok),
        "compile_s": sum(r["compile_s"] for r in ok),
        "compile_cpu_s": sum(r["compile_cpu_s"] for r in ok),
        "wall_s": wall_s,
    }


def compile_budget(archs=(90,), quick: bool = False, only=None, jobs: int | None = None) -> dict:
    """Record ``only`` (a list of :class:`Case`; default :func:`cases`) on each arch, compile the distinct
    configurations and return :func:`compile_stats` plus ``archs``: how many compiles a set of launches costs,
    and their CPU seconds (what a GPU machine's Triton would spend on them, divided by its cores)."""
    recorded = [r for arch in archs for r in record_configs(arch, quick, only=only)]
    t0 = time.perf_counter()
    compiled = compile_configs(distinct_configs(recorded), jobs)
    return {**compile_stats(compiled, time.perf_counter() - t0), "archs": tuple(archs)}


# --------------------------------------------------------------------------------------------------
# FLOP models (dot FLOPs; see the module docstring for the definitions)
# --------------------------------------------------------------------------------------------------


class ModelError(RuntimeError):
    """A FLOP model does not know this kernel, or the launch does not look like the kernel it models."""


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _expect_grid(name: str, grid: tuple, want: tuple) -> None:
    if tuple(grid) != tuple(want):
        raise ModelError(f"{name}: grid {tuple(grid)} is not the modelled {tuple(want)}; update the FLOP model")


def _logits(br, bc, bk, k) -> int:
    """One [br, bc] tile of logits summed over k in bk slices."""
    return 2 * br * bc * bk * _cdiv(k, bk)


def _class_tiles(a) -> tuple[int, int]:
    """(class splits, BLOCK_N tiles one row block streams over all splits) of the K1 split launches."""
    n, n_per, bn = a["N"], a["N_PER"], a["BLOCK_N"]
    splits = _cdiv(n, n_per)
    return splits, sum(_cdiv(min(n_per, n - s * n_per), bn) for s in range(splits))


def _grad_tile(rows, cols, a) -> int:
    """One [rows, cols] gradient tile times its N_ACC accumulator slices of BLOCK_DO columns."""
    return 2 * rows * cols * a["BLOCK_DO"] * a["N_ACC"]


def _d_chunks(a) -> int:
    return _cdiv(a["D"], a["BLOCK_DO"] * a["N_ACC"])


def _flops_ms_fwd(g, a, name="_ms_fwd_kernel"):
    splits, tiles = _class_tiles(a)
    _expect_grid(name, g, (_cdiv(a["B"], a["BLOCK_B"]), splits))
    return g[0] * tiles * _logits(a["BLOCK_B"], a["BLOCK_N"], a["BLOCK_K"], a["D"])


def _flops_ms_bwd_dx(g, a, name="_ms_bwd_dx_kernel"):
    splits, tiles = _class_tiles(a)
    _expect_grid(name, g, (_cdiv(a["B"], a["BLOCK_B"]), splits, _d_chunks(a)))
    bb, bn = a["BLOCK_B"], a["BLOCK_N"]
    return g[0] * g[2] * tiles * (_logits(bb, bn, a["BLOCK_K"], a["D"]) + _grad_tile(bb, bn, a))


def _flops_ms_bwd_dw(g, a, name="_ms_bwd_dw_kernel"):
    _expect_grid(name, g, (_cdiv(a["N"], a["BLOCK_N"]), _d_chunks(a)))
    bb, bn = a["BLOCK_B"], a["BLOCK_N"]
    return g[0] * g[1] * _cdiv(a["B"], bb) * (_logits(bb, bn, a["BLOCK_K"], a["D"]) + _grad_tile(bb, bn, a))


def _rel_tile(a) -> int:
    """The logit tiles one K2 step makes: Zs, and Zt when soft."""
    flops = _logits(a["BLOCK_R"], a["BLOCK_C"], a["BLOCK_K"], a["D"])
    if a["SOFT"]:
        flops += _logits(a["BLOCK_R"], a["BLOCK_C"], a["BLOCK_KT"], a["DT"])
    return flops


def _rel_steps(name, g0, a, cols_always: bool) -> int:
    """Tile steps of a K2 launch: NB_R row programs stream C columns, the rest (column programs) stream R rows."""
    br, bc, nb_r = a["BLOCK_R"], a["BLOCK_C"], a["NB_R"]
    n_col = g0 - nb_r
    if nb_r not in (0, _cdiv(a["R"], br)) or n_col not in (
        (_cdiv(a["C"], br),) if cols_always else (0, _cdiv(a["C"], br))
    ):
        raise ModelError(f"{name}: {g0} programs with NB_R = {nb_r} are not the modelled row / column blocks")
    return nb_r * _cdiv(a["C"], bc) + n_col * _cdiv(a["R"], bc)


def _flops_rel_fwd(g, a):
    if len(g) != 1:
        raise ModelError(f"_rel_fwd_kernel: grid {tuple(g)} is not the modelled 1-d grid")
    return _rel_steps("_rel_fwd_kernel", g[0], a, False) * _rel_tile(a)


def _flops_rel_bwd(g, a):
    if len(g) != 2 or g[1] != _d_chunks(a):
        raise ModelError(f"_rel_bwd_kernel: grid {tuple(g)} is not the modelled (row + column blocks, D chunks)")
    per_step = _rel_tile(a) + _grad_tile(a["BLOCK_R"], a["BLOCK_C"], a)
    return g[1] * _rel_steps("_rel_bwd_kernel", g[0], a, True) * per_step


def _flops_max_sim(g, a):
    bm, bn = a["BLOCK_M"], a["BLOCK_N"]
    _expect_grid("_max_sim_kernel", g, (_cdiv(a["N"], bn),))
    per_block = _logits(bm, bn, a["BLOCK_D"], a["D"])
    if not a["MASKED"]:
        return g[0] * _cdiv(a["M_rows"], bm) * per_block
    # program p visits the row blocks before its last column: min(M_rows, (p + 1)·BLOCK_N − 1) rows
    return sum(_cdiv(min(a["M_rows"], (p + 1) * bn - 1), bm) for p in range(g[0])) * per_block


def _flops_none(g, a):
    return 0  # no tl.dot


FLOP_MODELS: dict[str, Callable[[tuple, dict], int]] = {
    "_ms_fwd_kernel": _flops_ms_fwd,
    "_ms_bwd_dx_kernel": _flops_ms_bwd_dx,
    "_ms_bwd_dw_kernel": _flops_ms_bwd_dw,
    # MLCD's kernels loop exactly as K1's (the positives are a mask on the same tiles)
    "_mlcd_fwd_kernel": lambda g, a: _flops_ms_fwd(g, a, "_mlcd_fwd_kernel"),
    "_mlcd_bwd_dx_kernel": lambda g, a: _flops_ms_bwd_dx(g, a, "_mlcd_bwd_dx_kernel"),
    "_mlcd_bwd_dw_kernel": lambda g, a: _flops_ms_bwd_dw(g, a, "_mlcd_bwd_dw_kernel"),
    "_rel_fwd_kernel": _flops_rel_fwd,
    "_rel_bwd_kernel": _flops_rel_bwd,
    "_max_sim_kernel": _flops_max_sim,
    "_row_lse_kernel": _flops_none,
}


def kernel_flops(kernel: str, grid: tuple, args: Mapping) -> int:
    """Dot FLOPs one launch of ``kernel`` executes (``args``: bound arguments by name, constexprs included)."""
    model = FLOP_MODELS.get(kernel)
    if model is None:
        raise ModelError(f"no FLOP model for kernel {kernel!r}: add one to FLOP_MODELS")
    try:
        return int(model(tuple(grid), args))
    except KeyError as exc:
        raise ModelError(f"{kernel}: the FLOP model needs argument {exc} that the launch no longer has") from exc


def necessary_flops(case: Case) -> int:
    """Dot FLOPs an eager implementation of the case's op call must execute (see the module docstring)."""
    s = case.sizes
    if case.op in ("margin_softmax", "mlcd"):
        return 2 * s["B"] * s["N"] * s["D"] * (1 if case.mode == "fwd" else 3)
    if case.op in ("relational_rows", "relational_distill"):
        R = C = s["B"]
        matrices = 2 * R * C * (s["D"] + s.get("DT", 0))  # student (and teacher) similarity matrices, once
        return matrices if case.mode == "fwd" else matrices + 2 * (2 * R * C * s["D"])  # + dq, dk GEMMs
    if case.op == "masked_max_sim":
        return s["c"] * (s["c"] - 1) * s["D"]
    if case.op == "nearest_centroid":
        return 2 * s["n"] * s["k"] * s["D"]
    if case.op == "row_logsumexp":
        return 0
    raise ModelError(f"no necessary-FLOP model for op {case.op!r}")


# --------------------------------------------------------------------------------------------------
# The report: rows, violations, CSV, table
# --------------------------------------------------------------------------------------------------


def _launch_flops(rec: Recorded) -> tuple[int | None, str]:
    try:
        return kernel_flops(rec.config.kernel, rec.grid, rec.args), ""
    except ModelError as exc:
        return None, str(exc)


def build_rows(recorded: list[Recorded], compiled: Mapping[str, dict]) -> list[dict]:
    """One row per recorded launch: its config's compile results, its programs and the FLOPs of its op call."""
    by_case = collections.defaultdict(list)
    for r in recorded:
        by_case[(id(r.case), r.arch, r.fp32_precision)].append(r)
    rows = []
    for group in by_case.values():
        flops = [_launch_flops(r) for r in group]
        op_flops = None if any(f is None for f, _ in flops) else sum(f for f, _ in flops)
        needed = necessary_flops(group[0].case)
        for r, (f, model_err) in zip(group, flops):
            rows.append(_row(r, compiled.get(r.config.key, {"error": "not compiled"}), f, op_flops, needed, model_err))
    _add_step_ratios(rows)
    return rows


def _add_step_ratios(rows: list[dict]) -> None:
    """``step_flop_ratio``: (forward + backward kernel FLOPs) / (forward + backward necessary FLOPs) of one op at
    one size, dtype and arch, a training step's ratio (issue 18's "3.7×" for K2); empty without both modes."""
    calls = collections.defaultdict(dict)  # op key -> {mode: (op_kernel_flops, necessary_flops)}

    def key(r):
        return r["op"], r["sizes"], r["dtype"], r["arch"], r["fp32_precision"]

    for r in rows:
        calls[key(r)][r["mode"]] = (r["op_kernel_flops"], r["necessary_flops"])
    for r in rows:
        modes = calls[key(r)]
        done = set(modes) == {"fwd", "bwd"} and all(k is not None and n for k, n in modes.values())
        r["step_flop_ratio"] = sum(k for k, _ in modes.values()) / sum(n for _, n in modes.values()) if done else None


def _row(r: Recorded, c: Mapping, flops, op_flops, needed, model_err) -> dict:
    cfg, arch = r.config, ARCHS[r.arch]
    ok = "error" not in c
    errors = "; ".join(e for e in (c.get("error", ""), model_err) if e)
    return {
        "kernel": cfg.kernel,
        "family": r.case.family,
        "op": r.case.op,
        "mode": r.case.mode,
        "arch": f"sm_{r.arch}",
        "dtype": r.case.dtype,
        "fp32_precision": r.fp32_precision,
        "sizes": r.case.sizes_text,
        "signature": cfg.signature_text(),
        "constexprs": cfg.constexpr_text(),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "registers": c.get("registers"),
        "spill_stores": c.get("spill_stores"),
        "spill_loads": c.get("spill_loads"),
        "stack_bytes": c.get("stack_bytes"),
        "shared_bytes": c.get("shared_bytes"),
        "occupancy": occupancy(r.arch, c["registers"], c["shared_bytes"], cfg.num_warps) if ok else None,
        "tensor_cores": ("yes" if c["mma_kind"] != "none" else "no") if ok else None,
        "mma_kind": c.get("mma_kind"),
        "programs": r.programs,
        "programs_per_sm": r.programs / arch.sms,
        "kernel_flops": flops,
        "op_kernel_flops": op_flops,
        "necessary_flops": needed,
        "flop_ratio": op_flops / needed if op_flops is not None and needed else None,
        "compile_s": c.get("compile_s"),
        "compile_cpu_s": c.get("compile_cpu_s"),
        "key": cfg.short_key,
        "error": errors,
    }


# the benchmark sizes the program-count rule applies to (issue 18: two programs per SM of an H100)
_PROGRAM_RULES = (
    ("K1", "margin_softmax", "fwd", {"B": 1024, "N": 1_000_000}),
    ("K1", "mlcd", "fwd", {"B": 1024, "N": 1_000_000}),
    ("K2", None, None, {"B": 16384}),
)


def _needs_tensor_cores(row: Mapping) -> bool:
    """16-bit feature tensors handed to a kernel that has dots (a FLOP model of 0: no ``tl.dot``, e.g. the row
    log-sum-exp; an unknown model counts as having dots). Mixed fp32 / bf16 inputs follow the fp32 precision."""
    return row["dtype"] in ("bf16", "fp16") and row["kernel_flops"] != 0


def violations(rows: Iterable[Mapping]) -> list[str]:
    """Every breach of issue 18's rules, one line each: a config that fails to compile, a 16-bit config without
    mma / wgmma, spill bytes, shared memory over the arch's per-block limit, a launch that executes dot FLOPs with
    fewer than 264 programs at the K1 (B = 1024, N = 1M forward) and K2 (B = 16,384) benchmark sizes, a K2 op
    call over 2.5× its necessary FLOPs, and a launch without a FLOP model."""
    out: list[str] = []
    seen: set = set()
    for r in rows:
        where = f"{r['arch']} {r['kernel']} [{r['dtype']}; {r['constexprs']}; warps={r['num_warps']}]"
        msgs = []
        if r["error"]:
            msgs.append(f"error: {r['error']}")
        if r["registers"] is not None:
            if _needs_tensor_cores(r) and r["mma_kind"] == "none":
                msgs.append("16-bit inputs but no mma/wgmma in the PTX (CUDA-core dots)")
            if r["spill_stores"] or r["spill_loads"]:
                msgs.append(
                    f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads ({r['registers']} registers)"
                )
            limit = ARCHS[int(r["arch"][3:])].smem_per_block
            if r["shared_bytes"] > limit:
                msgs.append(f"shared memory {r['shared_bytes']} B > {limit} B per block")
        out += [f"{where}: {m}" for m in msgs]  # compile facts: one line per config (deduplicated below)
        case = f"{r['arch']} {r['op']} {r['mode']} {r['dtype']} {r['sizes']}"
        if _program_rule_applies(r) and r["kernel_flops"] and r["programs"] < MIN_PROGRAMS:
            out.append(f"{case}: {r['kernel']} launches {r['programs']} programs < {MIN_PROGRAMS}")
        for what, ratio in (("", r["flop_ratio"]), (" (fwd + bwd)", r.get("step_flop_ratio"))):
            if r["family"] == "K2" and ratio is not None and ratio > MAX_K2_FLOP_RATIO:
                out.append(f"{case}: kernel / necessary FLOPs{what} {ratio:.2f} > {MAX_K2_FLOP_RATIO}")
    return [v for v in out if not (v in seen or seen.add(v))]


VIOLATION_KINDS = {
    "compile / model errors": "error:",
    "16-bit without tensor cores": "no mma/wgmma",
    "spilling": "spills",
    "shared memory overflow": "shared memory",
    f"< {MIN_PROGRAMS} programs": "programs <",
    f"K2 FLOP ratio > {MAX_K2_FLOP_RATIO}": "necessary FLOPs",
}


def violation_counts(found: list[str]) -> dict:
    """How many violations of each kind (:data:`VIOLATION_KINDS`)."""
    return {kind: sum(1 for v in found if marker in v) for kind, marker in VIOLATION_KINDS.items()}


def _program_rule_applies(r: Mapping) -> bool:
    sizes = dict(kv.split("=", 1) for kv in r["sizes"].split())
    for family, op, mode, want in _PROGRAM_RULES:
        if r["family"] != family or (op and r["op"] != op) or (mode and r["mode"] != mode):
            continue
        if all(sizes.get(k) == str(v) for k, v in want.items()):
            return True
    return False


def report(
    archs: Iterable[int] = (80, 90),
    quick: bool = False,
    jobs: int | None = None,
    fp32_precisions: Iterable[str] = ("ieee",),
    cache_dir: str | None = None,
    only=None,
) -> tuple[list[dict], dict]:
    """Record, compile and read every configuration: ``(rows, compile_stats)``."""
    recorded = []
    for arch in archs:
        for prec in fp32_precisions:
            recorded += record_configs(arch, quick, prec, only=only)
    configs = distinct_configs(recorded)
    t0 = time.perf_counter()
    compiled = compile_configs(configs, jobs, cache_dir)
    stats = compile_stats(compiled, time.perf_counter() - t0)
    return build_rows(recorded, compiled), stats


def append_csv(path: str | os.PathLike, rows: Iterable[Mapping]) -> int:
    """Append rows (schema :data:`COLUMNS`; versions, git sha and timestamp filled in) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = {
        "torch": torch.__version__,
        "triton": _harness.triton_version(),
        "git_sha": _harness.git_sha(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return _harness.append_table(path, COLUMNS, [[_fmt(({**r, **fill}).get(c)) for c in COLUMNS] for r in rows])


def _fmt(v) -> str:
    if isinstance(v, float):
        return _harness._fmt(v)
    return "" if v is None else str(v)


def config_table(rows: list[Mapping]) -> str:
    """One line per distinct config and arch (the launches' programs per SM as min–max)."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["arch"], r["key"])].append(r)
    head = f"{'arch':6} {'kernel':18} {'dtype':9} {'warps':>5} {'stg':>3} {'regs':>4} {'spill':>6} {'smem':>6} "
    head += f"{'occ':>4} {'mma':5} {'prog/SM':>11} {'ratio':>9} {'comp_s':>6}  constexprs"
    lines = [head]
    for (_arch, _key), rs in sorted(groups.items(), key=lambda kv: (kv[1][0]["family"], kv[0][0], kv[1][0]["kernel"])):
        r = rs[0]
        ps = [x["programs_per_sm"] for x in rs]
        ratios = [x["flop_ratio"] for x in rs if x["flop_ratio"] is not None]
        spill = (r["spill_stores"] or 0) + (r["spill_loads"] or 0) if r["registers"] is not None else None
        lines.append(
            f"{r['arch']:6} {r['kernel'][:18]:18} {r['dtype']:9} {r['num_warps']:>5} {r['num_stages']:>3} "
            f"{_cell(r['registers']):>4} {_cell(spill):>6} {_cell(r['shared_bytes']):>6} "
            f"{_cell(r['occupancy'], '.2f'):>4} {_cell(r['mma_kind']):5} {min(ps):>5.1f}-{max(ps):<5.1f} "
            f"{_range(ratios):>9} {_cell(r['compile_s'], '.1f'):>6}  {r['constexprs']}"
            + (f"  ERROR {r['error']}" if r["error"] else "")
        )
    return "\n".join(lines)


def family_table(rows: list[Mapping]) -> str:
    """Per kernel family and arch: configs, max registers, max spill bytes, tensor cores, programs / SM, ratio."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["family"], r["arch"])].append(r)
    lines = [
        f"{'family':6} {'arch':6} {'configs':>7} {'max regs':>8} {'spilling':>8} {'max spill B':>11} "
        f"{'tensor cores':>12} {'prog/SM':>12} {'flop ratio':>11} {'fwd+bwd':>9} {'compile_s':>9}"
    ]
    for (fam, arch), rs in sorted(groups.items()):
        cfgs = {r["key"]: r for r in rs if r["registers"] is not None}.values()
        spills = [(r["spill_stores"] or 0) + (r["spill_loads"] or 0) for r in cfgs]
        tc = sum(1 for r in cfgs if r["mma_kind"] != "none")
        ps = [r["programs_per_sm"] for r in rs if r["kernel_flops"]] or [r["programs_per_sm"] for r in rs]
        ratios = [r["flop_ratio"] for r in rs if r["flop_ratio"] is not None]
        steps = [r["step_flop_ratio"] for r in rs if r["step_flop_ratio"] is not None]
        lines.append(
            f"{fam:6} {arch:6} {len({r['key'] for r in rs}):>7} {max((r['registers'] for r in cfgs), default=0):>8} "
            f"{sum(1 for s in spills if s):>8} {max(spills, default=0):>11} {f'{tc}/{len(cfgs)}':>12} "
            f"{min(ps):>5.1f}-{max(ps):<6.1f} {_range(ratios):>11} {_range(steps):>9} "
            f"{sum(r['compile_s'] for r in cfgs):>9.1f}"
        )
    return "\n".join(lines)


def _cell(v, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def _range(vals: list[float]) -> str:
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return f"{lo:.2f}" if abs(hi - lo) < 5e-3 else f"{lo:.2f}-{hi:.2f}"


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="the smallest benchmark size of each kernel family only")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compile processes (default: CPUs)")
    p.add_argument("--check", action="store_true", help="exit 1 listing every violation of issue 18's rules")
    p.add_argument(
        "--fp32-precision", default="ieee", help="fp32 dot precisions to record, comma-separated: ieee, tf32, tf32x3"
    )
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="results CSV (default: %(default)s)")
    p.add_argument("--no-csv", action="store_true", help="print only")
    p.add_argument("--per-config", action="store_true", help="also print one line per distinct configuration")
    p.add_argument(
        "--cache-dir", default=None, help="Triton cache to reuse (default: a fresh one, so compile times are real)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET is set here; the compile workers switch it off", flush=True)
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise SystemExit(f"--arch: unknown {unknown}; known {sorted(ARCHS)}")
    t0 = time.perf_counter()
    rows, stats = report(archs, args.quick, args.jobs, args.fp32_precision.split(","), args.cache_dir)
    if args.per_config:
        print(config_table(rows))
        print()
    print(family_table(rows))
    print(
        f"\n{stats['compiles']} distinct compiles ({stats['failed']} failed): {stats['compile_cpu_s']:.0f} CPU-s "
        f"({stats['compile_s']:.0f} s of per-compile wall time), {stats['wall_s']:.0f} s wall on {args.jobs} jobs; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    if not args.no_csv:
        n = append_csv(args.csv, rows)
        print(f"{n} rows appended to {args.csv}")
    found = violations(rows)
    if found:
        counts = ", ".join(f"{kind}: {n}" for kind, n in violation_counts(found).items() if n)
        print(f"\n{len(found)} violations ({counts}):")
        print("\n".join(f"  {v}" for v in found))
    return 1 if args.check and found else 0


if __name__ == "__main__":
    raise SystemExit(main())
