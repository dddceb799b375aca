"""Triton tile helpers shared by the K1 (margin softmax) and K2 (relational rows) kernels, and the block sizes
they launch with.

Block-size rules (why they are what they are; see also benchmarks/README.md "GPU check"):

* The logit tiles' ``tl.dot`` operands are at most 64 rows × ``K_SLICE`` fp32 (8 KB each), so the
  software-pipelined K loop (3 stages: 48 KB) stays far below the shared memory of an A100 (164 KB) or H100
  (228 KB) block. Features are never loaded whole along D: at D = 768 a whole-row tile (1024 padded columns ×
  64 rows × 4 bytes = 256 KB) fits neither GPU, and would spill every register.
* The gradient dots take a [64, 64] weight tile and a [64, ``D_SLICE``] slice of features (80 KB, outside
  the pipelined loop).
* Gradient accumulators ([rows, D]) are split along D into ``D_SLICE`` columns: a second grid axis, each
  program recomputing the logits of its row block (the K2 / K1 backward is recompute-bound by design: it never
  stores the B×B or B×N matrix). 64 × 256 fp32 over 8 warps is 64 registers a thread.
* Every dimension handed to ``tl.dot`` is ≥ 16 (Triton's minimum) and a power of two.

Offsets are int64 wherever a row index is multiplied by a stride (callers pass int64 row / column vectors).
No ``from __future__ import annotations`` here: Triton reads the ``tl.constexpr`` annotations.
"""

from ._triton import jit, tl

ROWS_MAX = 64  # rows of A / columns of B per program tile
K_SLICE = 32  # slice of the reduction dimension per tl.dot
D_SLICE = 256  # columns of a gradient accumulator per program


def block(n: int, cap: int) -> int:
    """The power of two ≥ n (at least 16, at most ``cap``): a tile edge for ``n`` elements."""
    p2 = 1 << max(int(n) - 1, 0).bit_length()
    return min(cap, max(16, p2))


def warps_for(rows: int, cols: int) -> int:
    """num_warps for an fp32 accumulator of rows × cols: ≤ 64 accumulator registers a thread."""
    return 8 if rows * cols >= 64 * 128 else 4


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
    scale,
    K,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_B: tl.constexpr = False,
):
    """``(scale · A[rows]) · B[cols]ᵀ`` as an fp32 [BLOCK_R, BLOCK_C] tile, summed over K in BLOCK_K slices
    (``SCALE_B``: ``A[rows] · (scale · B[cols])ᵀ``, the same products when A and B swap roles: a transposed
    launch then makes bitwise the logits of the direct one, so row and column statistics agree).

    A and B are row-major with row strides ``s_a`` / ``s_b``; ``rows`` / ``cols`` are int64 index vectors.
    bf16 / fp16 are loaded then widened (the interpreter mis-handles bf16 arithmetic, and fp32 dots with
    input_precision="ieee" keep the logits exact to fp32: TF32 would move s·cos by ~1e-2 at s = 32)."""
    acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(a_ptr + rows[:, None] * s_a + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * s_b + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if SCALE_B:
            b = b * scale
        else:
            a = a * scale
        acc += tl.dot(a, tl.trans(b), input_precision="ieee")
    return acc


@jit
def load_slice(ptr, idx, imask, stride, dofs, dmask):
    """Rows ``idx`` (int64) × columns ``dofs`` of a row-major matrix as an fp32 block (0 outside the masks)."""
    v = tl.load(ptr + idx[:, None] * stride + dofs[None, :], mask=imask[:, None] & dmask[None, :], other=0.0)
    return v.to(tl.float32)
