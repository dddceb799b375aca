"""Triton tile helpers shared by the margin-softmax and relational kernels, and the tile rules they launch with.

The dot path (``_triton.Target``): on a GPU, 16-bit operands go straight into ``tl.dot`` with an fp32
accumulator (tensor cores: a bf16×bf16 or fp16×fp16 product is exact in fp32, so this makes the same products
as widening first, up to summation order), and fp32 operands use the ``PREC`` the launcher passes
(``torch.get_float32_matmul_precision()``: "ieee" by default, "tf32" / "tf32x3" on tensor cores). Scales
(s, logit scales) multiply the fp32 accumulator, never a 16-bit operand. The gradient GEMMs (softmax
differences × rows) run on TF32 tensor cores for 16-bit inputs (``operand``, ``grad_dot``). Under the
interpreter (``UPCAST``) 16-bit tiles are widened before the dot, because the interpreter's bf16 ``tl.dot``
multiplies raw bits, and the TF32 rounding of gradient tiles is emulated, so the interpreter checks the GPU's
math, not a more exact one.

Tile rules (checked for every configuration the launchers pick by ``benchmarks/triton_aot.py``: 0 spill bytes,
shared memory inside an A100 / H100 block):

* logit tiles are made over the reduction dimension in ``k_slice(dtype)`` slices (64 columns of 16-bit, 16 of
  fp32), software-pipelined by Triton for 16-bit operands (``stages``);
* gradient accumulators ([rows, D], fp32) stay in registers as up to ``N_ACC`` static slices of 128 columns
  (``grad_plan``), so one program owns whole rows of the gradient up to D = 1024 and makes each logit tile once;
  wider D is split over a second grid axis (each chunk remaking the logits). Registers, not the accumulators,
  are the limit: every loaded tile carries a 64-bit pointer per element, so wider slices or streamed tiles spill;
* every dimension handed to ``tl.dot`` is ≥ 16 (Triton's minimum) and a power of two.

Offsets are int64 wherever a row index is multiplied by a stride (callers pass int64 row / column vectors).
No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.
"""

import torch

from ._triton import jit, tl

ROWS_MAX = 64  # rows of A / columns of B per logit tile
N_ACC = 8  # accumulator slices one program may hold (``grad_plan``)
GRAD_WARPS = 8
GRAD_STREAM = 16  # the streamed side of a backward tile (the other side's rows): 32 or 64 spill
FWD_WARPS = 8  # a [64, 64] fp32 logit tile with its online softmax (two, with a teacher): 4 warps spill


def block(n: int, cap: int) -> int:
    """The power of two ≥ n (at least 16, at most ``cap``): a tile edge for ``n`` elements."""
    p2 = 1 << max(int(n) - 1, 0).bit_length()
    return min(cap, max(16, p2))


def k_slice(dtype: torch.dtype, K: int) -> int:
    """Reduction slice of a logit tile, at most K's tile: 64 columns of 16-bit (128 bytes: a cache line), 16 of
    fp32 (fp32 operands are converted in registers for CUDA-core dots; 32-column slices spill)."""
    return block(K, 16 if dtype == torch.float32 else 64)


def stages(dtype: torch.dtype) -> int:
    """Software-pipeline depth: fp32 operands take twice the registers of 16-bit ones; pipelined, they spill."""
    return 1 if dtype == torch.float32 else 3


def fwd_maxnreg(dtype: torch.dtype) -> int | None:
    """Register bound of an fp32 logit-only program: left alone, ptxas caps some at 80 registers a thread (for
    occupancy) and spills 4-8 B; 128 keeps 2 blocks of 8 warps per SM and spills nothing. None (ptxas's own
    choice) for 16-bit operands, which use up to ~180."""
    return 128 if dtype == torch.float32 else None


def grad_plan(D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_DO, N_ACC, chunks, rows) of a program that holds gradient rows: accumulator slices of 128 columns
    (wider ones spill), up to ``N_ACC`` of them, so whole rows up to D = 1024 and each logit tile made once;
    beyond that, chunks along D over a second grid axis. Rows: 32 for 16-bit inputs up to 512 columns, else 16
    (≤ 64 accumulator registers a thread at 8 warps; fp32 operand tiles take twice the registers)."""
    do = block(D, 128)
    n = min(N_ACC, -(-D // do))
    rows = 32 if dtype != torch.float32 and n * do <= 512 else 16
    return do, n, -(-D // (do * n)), rows


def tile_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype a kernel's dot tiles hold: the inputs' when they agree, else fp32 (mixed inputs are widened)."""
    return a.dtype if a.dtype == b.dtype else torch.float32


def row_block(n: int, dtype: torch.dtype) -> int:
    """Rows of a logit-only program (forward statistics, max similarity): 64, or 32 for fp32 operands, whose
    tiles take twice the registers (64-row fp32 tiles spill)."""
    return block(n, ROWS_MAX if dtype != torch.float32 else ROWS_MAX // 2)


@jit
def dot_rows(
    a_ptr,
    b_ptr,
    rows,
    rmask,
    cols,
    cmask,
    s_a,
    s_b,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """``A[rows] · B[cols]ᵀ`` as an fp32 [BLOCK_R, BLOCK_C] tile, summed over K in BLOCK_K slices; A and B are
    row-major with row strides ``s_a`` / ``s_b``; ``rows`` / ``cols`` are int64 index vectors. The caller
    scales the result (the fp32 accumulator, so a 16-bit operand is never rounded twice)."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + rows[:, None] * s_a + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * s_b + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        if UPCAST or a_ptr.dtype.element_ty != b_ptr.dtype.element_ty:  # (mixed dtypes: fp32 CUDA-core / TF32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@jit
def operand(v, a_ptr, b_ptr, UPCAST: tl.constexpr):
    """An fp32 gradient tile (softmax differences, whose rows cancel) as the first operand of ``grad_dot``.

    With 16-bit inputs the gradient GEMM runs on TF32 tensor cores: the 16-bit rows widen to TF32 exactly (8 or
    10 mantissa bits), and this tile keeps 11 bits where rounding it to bf16 would keep 8 (a bf16 G made
    errors of 6 % in gradients whose terms cancel). The GPU rounds to TF32 (cvt.rna); the interpreter computes
    TF32 dots in plain fp32, so here it rounds the same way (ties away) and checks the GPU's math."""
    r = v
    if UPCAST and a_ptr.dtype.element_ty == b_ptr.dtype.element_ty and a_ptr.dtype.element_ty != tl.float32:
        bits = v.to(tl.uint32, bitcast=True)
        r = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return r


@jit
def grad_dot(acc, g, b_ptr, o_ptr, idx, imask, stride, d0, D, BLOCK_DO: tl.constexpr, TRANS: tl.constexpr,
             PREC: tl.constexpr):  # fmt: skip
    """``acc + g · B[idx, d0 : d0 + BLOCK_DO]`` (``TRANS``: ``gᵀ · B``, the class-side gradient); g an fp32 tile
    from ``operand``. When B and the other input (``o_ptr``) are the same 16-bit dtype, on TF32 tensor cores
    (see ``operand``); otherwise (fp32, or mixed dtypes) fp32 at ``PREC``."""
    dofs = d0 + tl.arange(0, BLOCK_DO).to(tl.int64)
    b = tl.load(b_ptr + idx[:, None] * stride + dofs[None, :], mask=imask[:, None] & (dofs < D)[None, :], other=0.0)
    b = b.to(tl.float32)
    if TRANS:
        g = tl.trans(g)
    if b_ptr.dtype.element_ty == o_ptr.dtype.element_ty and b_ptr.dtype.element_ty != tl.float32:
        acc = tl.dot(g, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(g, b, acc, input_precision=PREC)
    return acc


@jit
def acc_init(ROWS: tl.constexpr, BLOCK_DO: tl.constexpr, N_ACC: tl.constexpr):
    """Eight accumulator slices: [ROWS, BLOCK_DO] fp32 zeros for the first N_ACC, [1, 1] placeholders after
    (the static ``if``s of ``grad_dots`` never touch them, so they cost no registers)."""
    a0 = tl.zeros([ROWS, BLOCK_DO], tl.float32)
    a1 = tl.zeros([1, 1], tl.float32)
    a2 = tl.zeros([1, 1], tl.float32)
    a3 = tl.zeros([1, 1], tl.float32)
    a4 = tl.zeros([1, 1], tl.float32)
    a5 = tl.zeros([1, 1], tl.float32)
    a6 = tl.zeros([1, 1], tl.float32)
    a7 = tl.zeros([1, 1], tl.float32)
    if N_ACC > 1:
        a1 = tl.zeros([ROWS, BLOCK_DO], tl.float32)
    if N_ACC > 2:
        a2 = tl.zeros([ROWS, BLOCK_DO], tl.float32)
    if N_ACC > 3:
        a3 = tl.zeros([ROWS, BLOCK_DO], tl.float32)
    if N_ACC > 4:
        a4 = tl.zeros([ROWS, BLOCK_DO], tl.float32)
    if N_ACC > 5:
        a5 = tl.zeros([ROWS, BLOCK_DO], tl.float32)
    if N_ACC > 6:
        a6 = tl.zeros([ROWS, BLOCK_DO], tl.float32)
    if N_ACC > 7:
        a7 = tl.zeros([ROWS, BLOCK_DO], tl.float32)
    return a0, a1, a2, a3, a4, a5, a6, a7


@jit
def grad_dots(a0, a1, a2, a3, a4, a5, a6, a7, g, b_ptr, o_ptr, idx, imask, stride, d0, D, BLOCK_DO: tl.constexpr,
              N_ACC: tl.constexpr, TRANS: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """``grad_dot`` into each of the first N_ACC slices (columns d0 + i·BLOCK_DO): one G tile, whole rows."""
    a0 = grad_dot(a0, g, b_ptr, o_ptr, idx, imask, stride, d0, D, BLOCK_DO, TRANS, PREC)
    if N_ACC > 1:
        a1 = grad_dot(a1, g, b_ptr, o_ptr, idx, imask, stride, d0 + BLOCK_DO, D, BLOCK_DO, TRANS, PREC)
    if N_ACC > 2:
        a2 = grad_dot(a2, g, b_ptr, o_ptr, idx, imask, stride, d0 + 2 * BLOCK_DO, D, BLOCK_DO, TRANS, PREC)
    if N_ACC > 3:
        a3 = grad_dot(a3, g, b_ptr, o_ptr, idx, imask, stride, d0 + 3 * BLOCK_DO, D, BLOCK_DO, TRANS, PREC)
    if N_ACC > 4:
        a4 = grad_dot(a4, g, b_ptr, o_ptr, idx, imask, stride, d0 + 4 * BLOCK_DO, D, BLOCK_DO, TRANS, PREC)
    if N_ACC > 5:
        a5 = grad_dot(a5, g, b_ptr, o_ptr, idx, imask, stride, d0 + 5 * BLOCK_DO, D, BLOCK_DO, TRANS, PREC)
    if N_ACC > 6:
        a6 = grad_dot(a6, g, b_ptr, o_ptr, idx, imask, stride, d0 + 6 * BLOCK_DO, D, BLOCK_DO, TRANS, PREC)
    if N_ACC > 7:
        a7 = grad_dot(a7, g, b_ptr, o_ptr, idx, imask, stride, d0 + 7 * BLOCK_DO, D, BLOCK_DO, TRANS, PREC)
    return a0, a1, a2, a3, a4, a5, a6, a7


@jit
def store_rows(out_ptr, acc, rows, rmask, d0, D, BLOCK_DO: tl.constexpr):
    """Store an fp32 [rows, BLOCK_DO] block at columns d0.. of a row-major [*, D] output, in its dtype."""
    dofs = d0 + tl.arange(0, BLOCK_DO).to(tl.int64)
    omask = rmask[:, None] & (dofs < D)[None, :]
    tl.store(out_ptr + rows[:, None] * D + dofs[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)
