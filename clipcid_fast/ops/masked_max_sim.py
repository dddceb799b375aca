"""K3: the per-cluster SemDeDup op and spherical nearest-centroid assignment, never forming c×c.

* :func:`masked_max_similarity` — for one cluster's ordered rows ``x [c, D]``:
  ``M_j = max_{i<j} cos(x_i, x_j)`` and its argmax (ties → smallest i; ``M_0 = −inf``, ``idx_0 = −1``),
  as :func:`clipcid_fast.reference.masked_max_similarity`.
* :func:`semdedup_keep` — SemDeDup's keep rule for many eps from that one pass: ``keep = ~(M > 1 − eps)``.
* :func:`nearest_centroid` — the unmasked form: ``max_k cos(x_i, C_k)`` and its argmax (ties → smallest k),
  the k-means assignment step.

Faces (one kernel shape for both ops: per column block, loop over row blocks, fold a tile of cosines into a
running column max / argmax):

* C++ CPU (``csrc/cpu/masked_max_sim.cpp``): fp32 GEMM per tile (MKL) and a vectorised max epilogue; the
  dedup op visits only the lower triangle. Threads own column blocks. fp32 / bf16 storage, fp32 math.
* CUDA C++ (``csrc/cuda/masked_max_sim.cu``): shared-memory tiles, fp32 accumulation. Compiled, not run here.
* Triton (GPU; CPU tensors under ``TRITON_INTERPRET=1``): program per column block, loop over earlier row
  blocks, ``tl.dot`` in fp32 after widening, int64 offsets.
* the reference (float64, and the fallback; it forms the c×c matrix).

Rows are L2-normalised inside (norms once, in fp32 or better). Extra memory of the fused backends:
O(c + threads·tile·(tile + D)) floats. The ops are forward only (dedup is not differentiated): a backward
through them raises.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import _validate, reference
from .._backend import resolve
from ._triton import jit, launch, launch_on, target, tl, triton
from ._triton_tiles import dot_rows, k_slice, row_block, stages

TRITON_TILE_MAX = 64  # 128 × 128 tiles spill (their 64-bit pointer tensors): see _triton_tiles.py

# --------------------------------------------------------------------------------------------------
# Triton kernel: program per column block of Y; loop over the row blocks of A (for the masked op only the
# rows before the block's last column), D in slices. Cosines = (a·y)·inv_a·inv_y with the inverse norms
# computed once outside (O(c)). 16-bit rows go to tensor cores as they are (the embed cache is fp16: nothing is
# lost); fp32 rows follow torch.get_float32_matmul_precision() (default "highest" = IEEE fp32; plain TF32 would
# blur near-duplicates at eps = 1e-3, "tf32x3" keeps fp32 accuracy on tensor cores).
# --------------------------------------------------------------------------------------------------


@jit(do_not_specialize=("M_rows", "N", "D"))  # one compiled kernel for every cluster size (strides still are)
def _max_sim_kernel(
    a_ptr,
    y_ptr,
    ia_ptr,
    iy_ptr,
    m_ptr,
    idx_ptr,
    M_rows,
    N,
    D,
    stride_a,
    stride_y,
    MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: rows × stride passes 2^31 at 10M × 512
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    if MASKED:
        r_end = tl.minimum(M_rows, pid * BLOCK_N + BLOCK_N - 1)
    else:
        r_end = M_rows + pid * 0
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK_N], -1, tl.int64)
    for r0 in range(0, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < r_end
        acc = dot_rows(a_ptr, y_ptr, rows, row_ok, cols, col_ok, stride_a, stride_y, D, BLOCK_M, BLOCK_N, BLOCK_D,
                       UPCAST, PREC)  # fmt: skip
        ia = tl.load(ia_ptr + rows, mask=row_ok, other=0.0)
        s = acc * ia[:, None]
        ok = row_ok[:, None] & col_ok[None, :]
        if MASKED:
            ok = ok & (rows[:, None] < cols[None, :])
        s = tl.where(ok, s, float("-inf"))
        bmax = tl.max(s, 0)
        # smallest row reaching the block max (ties → smallest i), then a strict > across blocks
        cand = tl.where(ok & (s == bmax[None, :]), rows[:, None], M_rows)
        bidx = tl.min(cand, 0)
        upd = bmax > best
        best = tl.where(upd, bmax, best)
        best_i = tl.where(upd, bidx, best_i)
    iy = tl.load(iy_ptr + cols, mask=col_ok, other=1.0)
    tl.store(m_ptr + cols, best * iy, mask=col_ok)
    tl.store(idx_ptr + cols, best_i, mask=col_ok)


def _inv_norms(a: Tensor) -> Tensor:
    return torch.linalg.vector_norm(a, dim=1, dtype=torch.float32).reciprocal()


def _triton_max_sim(a: Tensor, y: Tensor, masked: bool, tile: int) -> tuple[Tensor, Tensor]:
    a, y = a.contiguous(), y.contiguous()
    n, D = y.shape
    m = torch.empty(n, dtype=torch.float32, device=y.device)
    idx = torch.empty(n, dtype=torch.int64, device=y.device)
    if n == 0:
        return m, idx
    ia = _inv_norms(a)
    iy = ia if masked else _inv_norms(y)
    # Triton blocks are powers of two; ≤ 128 keeps the fp32 [block, block] accumulator (8 warps) in registers,
    # and a D slice of 128 bytes a row keeps the pipelined K loop's operand buffers (3 stages of two
    # [128, slice] tiles: 96 KB) inside an A100's 164 KB of shared memory (see _triton_tiles.py).
    block = min(TRITON_TILE_MAX, triton.next_power_of_2(tile)) if tile > 0 else 64
    block = min(block, row_block(block, y.dtype))  # fp32: 32-row tiles (64 spill)
    block_d = k_slice(y.dtype, D)
    tg = target(y)
    with launch_on(y):
        launch(
            _max_sim_kernel, (triton.cdiv(n, block),),
            a, y, ia, iy, m, idx, a.shape[0], n, D, a.stride(0), y.stride(0),
            MASKED=masked, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, num_warps=8, num_stages=stages(y.dtype),
            UPCAST=tg.upcast, PREC="ieee" if tg.upcast else tg.fp32_precision,
        )  # fmt: skip
    return m, idx


# --------------------------------------------------------------------------------------------------
# torch.library ops (forward only)
# --------------------------------------------------------------------------------------------------


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ref_dtype(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


@torch.library.custom_op("clipcid_fast::masked_max_similarity", mutates_args=())
def masked_max_similarity_op(x: Tensor, backend: str, tile: int) -> tuple[Tensor, Tensor]:
    """Forward only. ``(M [c] float32 (float64 for float64 x), idx [c] int64)``."""
    if backend == "triton":
        return _triton_max_sim(x, x, True, tile)
    if backend in ("cpu", "cuda"):
        return torch.ops.clipcid_fast_C.masked_max_sim_fwd(x.contiguous(), tile)
    m, idx = reference.masked_max_similarity(_ref_dtype(x))
    return m.contiguous(), idx.contiguous()


@masked_max_similarity_op.register_fake
def _(x: Tensor, backend: str, tile: int) -> tuple[Tensor, Tensor]:
    c = x.shape[0]
    return x.new_empty((c,), dtype=_out_dtype(x)), x.new_empty((c,), dtype=torch.int64)


@torch.library.custom_op("clipcid_fast::nearest_centroid", mutates_args=())
def nearest_centroid_op(x: Tensor, centroids: Tensor, backend: str, tile: int) -> tuple[Tensor, Tensor]:
    """Forward only. ``(sim [n] float32 (float64 for float64 x), idx [n] int64)``."""
    if backend == "triton":
        return _triton_max_sim(centroids, x, False, tile)
    if backend in ("cpu", "cuda"):
        return torch.ops.clipcid_fast_C.nearest_centroid_fwd(x.contiguous(), centroids.contiguous(), tile)
    sim, idx = reference.nearest_centroid(_ref_dtype(x), _ref_dtype(centroids))
    return sim.contiguous(), idx.contiguous()


@nearest_centroid_op.register_fake
def _(x: Tensor, centroids: Tensor, backend: str, tile: int) -> tuple[Tensor, Tensor]:
    n = x.shape[0]
    return x.new_empty((n,), dtype=_out_dtype(x)), x.new_empty((n,), dtype=torch.int64)


def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"clipcid_fast::{name} is forward-only (semantic dedup is not differentiated)")

    return backward


masked_max_similarity_op.register_autograd(_not_differentiable("masked_max_similarity"))
nearest_centroid_op.register_autograd(_not_differentiable("nearest_centroid"))


def has_cpu_kernel() -> bool:
    """True when the C++ kernels are registered (the built extension, or a dev build loaded by hand)."""
    return hasattr(torch.ops.clipcid_fast_C, "masked_max_sim_fwd")


def _register_c_fakes() -> None:
    """Fakes for the raw C++ ops (torch.compile, opcheck); call again after loading a dev build by hand."""
    if not has_cpu_kernel():
        return
    try:

        @torch.library.register_fake("clipcid_fast_C::masked_max_sim_fwd")
        def _(x, tile=0):
            c = x.shape[0]
            return x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.int64)

        @torch.library.register_fake("clipcid_fast_C::nearest_centroid_fwd")
        def _(x, centroids, tile=0):
            n = x.shape[0]
            return x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.int64)

    except RuntimeError:  # already registered
        pass


_register_c_fakes()

# --------------------------------------------------------------------------------------------------
# Public entry points: validation at the boundary, then one op call
# --------------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # the C++ / CUDA kernels' storage dtypes
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp16 (the embed cache) onto tensor cores as is


def _check_rows(name: str, x: object, check_values: bool) -> Tensor:
    _validate.tensor(name, x, ndim=2)
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row (empty input), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one feature (D ≥ 1), got shape {tuple(x.shape)}")
    if check_values and not torch.compiler.is_compiling():
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} row {i} has a non-finite value (NaN or inf)")
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        zero = torch.linalg.vector_norm(x, dim=1, dtype=acc) == 0
        if bool(zero.any()):
            raise ValueError(f"{name} row {int(zero.nonzero()[0, 0])} has zero norm (cannot be normalised)")
    return x


def _check_tile(tile: object) -> int:
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 0:
        raise ValueError(f"tile must be an integer ≥ 0 (0 = the backend's default), got {tile!r}")
    if tile and tile < 16:
        raise ValueError(f"tile must be 0 or ≥ 16 (tl.dot needs 16-wide tiles), got {tile!r}")
    return int(tile)


def _backend_for(impl: str, *tensors: Tensor) -> tuple[str, torch.dtype]:
    """The backend to run and the dtype to hand it (fp16 goes to the C++ / CUDA kernels as fp32 and to Triton as
    it is; float64 → reference)."""
    device = tensors[0].device
    backend = resolve(impl, device, has_cuda_kernel=True)
    if backend in ("cpu", "cuda") and not has_cpu_kernel():
        if impl in ("cpu", "cuda"):
            raise ValueError(f"impl={impl!r}: the C++ extension was built without masked_max_sim; rebuild it")
        backend = "reference"
    dtypes = {t.dtype for t in tensors}
    if torch.float64 in dtypes:
        return "reference", torch.float64
    kernel_dtypes = _TRITON_DTYPES if backend == "triton" else _KERNEL_DTYPES
    if len(dtypes) == 1 and next(iter(dtypes)) in kernel_dtypes:
        return backend, next(iter(dtypes))
    return backend, torch.float32


def masked_max_similarity(
    x: Tensor, impl: str = "auto", *, tile: int = 0, check_values: bool = True
) -> tuple[Tensor, Tensor]:
    """``M_j = max_{i<j} cos(x_i, x_j)`` and its argmax over the ordered rows of one cluster.

    ``x [c, D]`` (rows normalised inside). Returns ``(M [c] float32, idx [c] int64)`` (float64 ``M`` for
    float64 ``x``); ``M_0 = −inf``, ``idx_0 = −1``; ties go to the smallest ``i``. Memory: O(c·D) at most,
    never c×c on the fused backends.

    ``impl``: ``"auto" | "cpu" | "cuda" | "triton" | "reference"``. dtypes: float32 and bfloat16 go to the
    kernels as stored (fp32 accumulation); float16 goes to Triton as stored and is widened to float32 for the
    C++ / CUDA kernels; float64 runs the reference.
    ``tile``: block size (0 = the backend's default; results do not depend on it beyond fp32 rounding; Triton
    rounds it up to a power of two, at most 128; the CUDA C++ kernel has fixed 64 × 64 tiles).
    Validation: not a 2-d float tensor, no rows or no features → ``ValueError``; with ``check_values``
    (default; one host sync) also NaN / inf rows and zero rows, naming the row. Forward only.
    """
    _check_rows("x", x, check_values)
    tile = _check_tile(tile)
    backend, dtype = _backend_for(impl, x)
    return masked_max_similarity_op(x.to(dtype), backend, tile)


def _eps_tensor(eps) -> Tensor:
    if isinstance(eps, Tensor):
        vals = eps.detach().reshape(-1).double().cpu().tolist()
    elif isinstance(eps, numbers.Real) and not isinstance(eps, bool):
        vals = [float(eps)]
    else:
        try:
            vals = list(eps)
        except TypeError:
            raise ValueError(f"eps must be a number, a sequence of numbers or a tensor, got {eps!r}") from None
    if not vals:
        raise ValueError("eps must hold at least one threshold, got an empty sequence")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"eps values must be real numbers, got {v!r}")
        if not (0.0 < float(v) < 2.0) or math.isnan(float(v)):
            raise ValueError(f"eps must be in (0, 2) (keep rule: drop j when max cos > 1 − eps), got {v!r}")
    return torch.tensor([float(v) for v in vals], dtype=torch.float64)


def semdedup_keep(x: Tensor, eps, impl: str = "auto", *, tile: int = 0, check_values: bool = True) -> Tensor:
    """SemDeDup keep rule for one ordered cluster and several thresholds from one pass.

    Drop row ``j`` when ``max_{i<j} cos(x_i, x_j) > 1 − eps`` (earlier rows count whether kept or not, as in
    SemDeDup); the comparison is made in the dtype of ``M`` (float32; float64 for float64 ``x``), as the
    reference does. ``eps``: a number, a sequence or a tensor of values in ``(0, 2)`` (``ValueError``
    naming the value otherwise). Returns ``keep [len(eps), c]`` bool (``[1, c]`` for a scalar); row 0 is
    always kept. Other arguments as :func:`masked_max_similarity`.
    """
    eps_t = _eps_tensor(eps)
    m, _ = masked_max_similarity(x, impl, tile=tile, check_values=check_values)
    thr = 1 - eps_t.to(device=m.device, dtype=m.dtype)
    return ~(m[None, :] > thr[:, None])


def nearest_centroid(
    x: Tensor, centroids: Tensor, impl: str = "auto", *, tile: int = 0, check_values: bool = True
) -> tuple[Tensor, Tensor]:
    """Spherical assignment: ``(max_k cos(x_i, C_k) [n], argmax_k [n] int64)``, ties → smallest ``k``.

    ``x [n, D]``, ``centroids [K, D]`` (both normalised inside), on one device. Mixed dtypes are computed in
    float32; float64 anywhere runs the reference. Never forms n×K on the fused backends (tiles of
    ``tile`` points × ``tile`` centroids). Validation as :func:`masked_max_similarity`, for both inputs.
    """
    _check_rows("x", x, check_values)
    _check_rows("centroids", centroids, check_values)
    _validate.same_device(x=x, centroids=centroids)
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids must have D = {x.shape[1]} columns like x, got shape {tuple(centroids.shape)}")
    tile = _check_tile(tile)
    backend, dtype = _backend_for(impl, x, centroids)
    return nearest_centroid_op(x.to(dtype), centroids.to(dtype), backend, tile)
