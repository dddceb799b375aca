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

* logit tiles are made over the reduction dimension in ``k_slice(dtype)`` slices (128 bytes of a row per
  slice: 64 columns of 16-bit, 32 of fp32), software-pipelined by Triton;
* gradient accumulators ([rows, D], fp32) stay in registers as up to ``N_ACC`` static slices of ``D_SLICE``
  columns, so one program owns whole rows of the gradient up to D = 512 and makes each logit tile once; wider
  D is split over a second grid axis (each chunk remaking the logits). Registers, not the accumulators, are
  the limit: every loaded tile carries a 64-bit pointer per element, so wider slices or streamed tiles spill;
* every dimension handed to ``tl.dot`` is ≥ 16 (Triton's minimum) and a power of two.

Offsets are int64 wherever a row index is multiplied by a stride (callers pass int64 row / column vectors).
No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.
"""

import torch

from ._triton import jit, tl

ROWS_MAX = 64  # rows of A / columns of B per logit tile
D_SLICE = 128  # columns of one gradient accumulator slice (256 spills: the 64-bit pointers of its operand tile)
N_ACC = 4  # accumulator slices one program holds: whole rows up to D = N_ACC · D_SLICE
GRAD_ROWS = 32  # rows of a program that holds gradient accumulators (registers: see the module docstring)
GRAD_WARPS = 8


def block(n: int, cap: int) -> int:
    """The power of two ≥ n (at least 16, at most ``cap``): a tile edge for ``n`` elements."""
    p2 = 1 << max(int(n) - 1, 0).bit_length()
    return min(cap, max(16, p2))


def k_slice(dtype: torch.dtype, K: int) -> int:
    """Reduction slice of a logit tile: 128 bytes of a row (a full cache line / TMA-friendly), at most K's tile."""
    return block(K, 32 if dtype == torch.float32 else 64)


def stages(dtype: torch.dtype) -> int:
    """Software-pipeline depth: fp32 operands are twice the registers of 16-bit ones, and 3 stages spill."""
    return 2 if dtype == torch.float32 else 3


def grad_slices(D: int) -> tuple[int, int, int]:
    """(BLOCK_DO, N_ACC, chunks): accumulator slice width, slices per program, programs along D."""
    do = block(D, D_SLICE)
    n = min(N_ACC, -(-D // do))
    return do, n, -(-D // (do * n))


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
def grad_dot(
    acc, g, b_ptr, idx, imask, stride, d0, D, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr
):
    """``acc + g · B[idx, d0 : d0 + BLOCK_DO]``: g an fp32 [R, len(idx)] tile from ``operand``; 16-bit B rows on
    TF32 tensor cores (see ``operand``), fp32 ones at ``PREC``."""
    dofs = d0 + tl.arange(0, BLOCK_DO).to(tl.int64)
    b = tl.load(b_ptr + idx[:, None] * stride + dofs[None, :], mask=imask[:, None] & (dofs < D)[None, :], other=0.0)
    if b_ptr.dtype.element_ty != tl.float32:
        acc = tl.dot(g, b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(g, b, acc, input_precision=PREC)
    return acc


@jit
def grad_dot_t(
    acc, g, b_ptr, idx, imask, stride, d0, D, BLOCK_DO: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr
):
    """``acc + gᵀ · B[idx, d0 : d0 + BLOCK_DO]`` (the transposed form, for the class-side gradient)."""
    dofs = d0 + tl.arange(0, BLOCK_DO).to(tl.int64)
    b = tl.load(b_ptr + idx[:, None] * stride + dofs[None, :], mask=imask[:, None] & (dofs < D)[None, :], other=0.0)
    if b_ptr.dtype.element_ty != tl.float32:
        acc = tl.dot(tl.trans(g), b.to(tl.float32), acc, input_precision="tf32")
    else:
        acc = tl.dot(tl.trans(g), b, acc, input_precision=PREC)
    return acc


@jit
def store_rows(out_ptr, acc, rows, rmask, d0, D, BLOCK_DO: tl.constexpr):
    """Store an fp32 [rows, BLOCK_DO] block at columns d0.. of a row-major [*, D] output, in its dtype."""
    dofs = d0 + tl.arange(0, BLOCK_DO).to(tl.int64)
    omask = rmask[:, None] & (dofs < D)[None, :]
    tl.store(out_ptr + rows[:, None] * D + dofs[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)
