"""K1 Triton kernels (margin softmax statistics, forward and backward), on the GPU or under TRITON_INTERPRET=1.

A forward kernel over row blocks (online log-sum-exp over class tiles), and backward kernels over row blocks
(dx) and class blocks (dW), so no two programs write one row. Cosines are made tile by tile over D in slices
(``_triton_tiles.dot_rows``); the normalisation enters as per-row inverse norms (ix for x, iw for W)
computed once outside, O(B + N). The backward splits its [rows, D] accumulators along D over a second grid
axis, each D slice recomputing its tile's cosines, and finishes its rows through the normalisation itself (the
coefficient <g_hat, a_hat> of the projection is Σ dcos·cos, from the cosine tiles), writing grad_x and grad_w
once in the inputs' dtype: no fp32 [B, D] or [N, D] buffer. The target cosine, ψ and dψ/dc are O(B) and computed
outside the kernels with the reference's own ``combined_margin`` (``margin_softmax._target_terms``).
Offsets are int64 (N = 10M rows of W overflow int32). Block sizes: ``_triton_tiles``.
"""

import torch

from ._triton import jit, launch_on, tl, triton
from ._triton_tiles import D_SLICE, K_SLICE, ROWS_MAX, block, dot_rows, load_slice, warps_for

# Sizes are not specialised on (see relational_triton.py); strides are.
_SIZES = ("B", "N", "D")
BLOCK_B = 32  # rows of x per tile (B is small next to N: a 32-row tile keeps the dW grid's work per program low)


@jit
def _ms_cos(
    x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, D,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """cos tile [rows, cols] of the unnormalised rows, given their inverse norms (ix may carry the scale s)."""
    dots = dot_rows(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, 1.0, D, BLOCK_B, BLOCK_N, BLOCK_K, False)
    return dots * ix[:, None] * iw[None, :]


@jit
def _ms_logits_cos(
    x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, scale, D,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(z, cos) tiles of the backward from one set of dot products: z = the forward's logits bit for bit (ix·s
    first, as ``_ms_fwd_kernel`` scales it), cos for the normalisation's projection coefficient Σ dcos·cos."""
    dots = dot_rows(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, 1.0, D, BLOCK_B, BLOCK_N, BLOCK_K, False)
    return dots * (ix * scale)[:, None] * iw[None, :], dots * ix[:, None] * iw[None, :]


@jit
def _ms_row_terms(ix_ptr, lab_ptr, tgt_ptr, lse_ptr, gl_ptr, gt_ptr, dpsi_ptr, rows, rmask):
    """Per-row backward terms: inverse norm, label, s·ψ, lse, g_lse, g_target, dψ/dc."""
    ix = tl.load(ix_ptr + rows, mask=rmask, other=0.0)
    lab = tl.load(lab_ptr + rows, mask=rmask, other=-1)
    tg = tl.load(tgt_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=rmask, other=0.0)
    gt = tl.load(gt_ptr + rows, mask=rmask, other=0.0)
    dpsi = tl.load(dpsi_ptr + rows, mask=rmask, other=0.0)
    return ix, lab, tg, lse, gl, gt, dpsi


@jit
def _ms_dcos(z, cols, lab, tg, lse, gl, gt, dpsi, scale):
    """d loss / d cos for a [BLOCK_B, BLOCK_N] tile of raw logits z = s·cos (target column: s·ψ)."""
    is_t = cols[None, :] == lab[:, None]
    z = tl.where(is_t, tg[:, None], z)
    p = tl.exp(z - lse[:, None])
    return tl.where(is_t, scale * dpsi[:, None] * (gl[:, None] * p + gt[:, None]), scale * gl[:, None] * p)


@jit(do_not_specialize=_SIZES)
def _ms_fwd_kernel(
    x_ptr,
    w_ptr,
    ix_ptr,
    iw_ptr,
    lab_ptr,
    tgt_ptr,
    lse_ptr,
    B,
    N,
    D,
    s_x,
    s_w,
    scale,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    ix = tl.load(ix_ptr + rows, mask=rmask, other=0.0) * scale
    lab = tl.load(lab_ptr + rows, mask=rmask, other=-1)
    tg = tl.load(tgt_ptr + rows, mask=rmask, other=0.0)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_B], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        iw = tl.load(iw_ptr + cols, mask=cmask, other=0.0)
        z = _ms_cos(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, D, BLOCK_B, BLOCK_N, BLOCK_K)
        z = tl.where(cols[None, :] == lab[:, None], tg[:, None], z)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + rows, m + tl.log(acc), mask=rmask)


@jit(do_not_specialize=_SIZES)
def _ms_bwd_dx_kernel(
    x_ptr,
    w_ptr,
    ix_ptr,
    iw_ptr,
    lab_ptr,
    tgt_ptr,
    lse_ptr,
    gl_ptr,
    gt_ptr,
    dpsi_ptr,
    gx_ptr,
    B,
    N,
    D,
    s_x,
    s_w,
    scale,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # dX_hat[i, dslice] = Σ_j dcos_ij · W_hat[j, dslice]   (one program per block of rows and D slice), then
    # through the normalisation in the program: gx_i = (dX_hat_i − x_hat_i <dX_hat_i, x_hat_i>) / ‖x_i‖ with
    # <dX_hat_i, x_hat_i> = Σ_j dcos_ij cos_ij (from the cosine tiles, so no D slice needs the others), written
    # once in x's dtype (no fp32 [B, D] buffer).
    pid = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    dofs = pd * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    dmask = dofs < D
    ix, lab, tg, lse, gl, gt, dpsi = _ms_row_terms(
        ix_ptr, lab_ptr, tgt_ptr, lse_ptr, gl_ptr, gt_ptr, dpsi_ptr, rows, rmask
    )
    acc = tl.zeros([BLOCK_B, BLOCK_DO], tl.float32)
    proj = tl.zeros([BLOCK_B], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        iw = tl.load(iw_ptr + cols, mask=cmask, other=0.0)
        z, c = _ms_logits_cos(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, scale, D, BLOCK_B, BLOCK_N,
                              BLOCK_K)  # fmt: skip
        d = _ms_dcos(z, cols, lab, tg, lse, gl, gt, dpsi, scale)
        d = tl.where(cmask[None, :], d, 0.0)
        proj += tl.sum(d * c, 1)
        acc += tl.dot(d * iw[None, :], load_slice(w_ptr, cols, cmask, s_w, dofs, dmask), input_precision="ieee")
    xs = load_slice(x_ptr, rows, rmask, s_x, dofs, dmask)
    g = (acc - xs * (ix * proj)[:, None]) * ix[:, None]
    omask = rmask[:, None] & dmask[None, :]
    tl.store(gx_ptr + rows[:, None] * D + dofs[None, :], g.to(gx_ptr.dtype.element_ty), mask=omask)


@jit(do_not_specialize=_SIZES)
def _ms_bwd_dw_kernel(
    x_ptr,
    w_ptr,
    ix_ptr,
    iw_ptr,
    lab_ptr,
    tgt_ptr,
    lse_ptr,
    gl_ptr,
    gt_ptr,
    dpsi_ptr,
    gw_ptr,
    B,
    N,
    D,
    s_x,
    s_w,
    scale,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # dW_hat[j, dslice] = Σ_i dcos_ij · X_hat[i, dslice]   (one program per block of classes and D slice: it owns
    # those rows of dW, accumulated in fp32 over every row of x), then through the normalisation in the program,
    # gw_j = (dW_hat_j − w_hat_j <dW_hat_j, w_hat_j>) / ‖w_j‖ with <dW_hat_j, w_hat_j> = Σ_i dcos_ij cos_ij, and
    # written once in W's dtype: no fp32 [N, D] accumulator (2 GB at N = 1M, D = 512).
    pid = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1).to(tl.int64)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < N
    dofs = pd * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    dmask = dofs < D
    iw = tl.load(iw_ptr + cols, mask=cmask, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], tl.float32)
    proj = tl.zeros([BLOCK_N], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        rmask = rows < B
        ix, lab, tg, lse, gl, gt, dpsi = _ms_row_terms(
            ix_ptr, lab_ptr, tgt_ptr, lse_ptr, gl_ptr, gt_ptr, dpsi_ptr, rows, rmask
        )
        z, c = _ms_logits_cos(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, scale, D, BLOCK_B, BLOCK_N,
                              BLOCK_K)  # fmt: skip
        d = _ms_dcos(z, cols, lab, tg, lse, gl, gt, dpsi, scale)
        d = tl.where(rmask[:, None], d, 0.0)
        proj += tl.sum(d * c, 0)
        xb = load_slice(x_ptr, rows, rmask, s_x, dofs, dmask)
        acc += tl.dot(tl.trans(d * ix[:, None]), xb, input_precision="ieee")
    ws = load_slice(w_ptr, cols, cmask, s_w, dofs, dmask)
    g = (acc - ws * (iw * proj)[:, None]) * iw[:, None]
    omask = cmask[:, None] & dmask[None, :]
    tl.store(gw_ptr + cols[:, None] * D + dofs[None, :], g.to(gw_ptr.dtype.element_ty), mask=omask)


def _blocks(D: int) -> dict:
    return {"BLOCK_B": BLOCK_B, "BLOCK_N": ROWS_MAX, "BLOCK_K": block(D, K_SLICE)}


def triton_lse(x, w, labels, ix, iw, tgt, scale):
    """Per-row log-sum-exp over the shard (target column s·ψ = ``tgt``); float32 [B]."""
    B, D = x.shape
    N = w.shape[0]
    lse = torch.empty(B, dtype=torch.float32, device=x.device)
    if B > 0:
        bl = _blocks(D)
        grid = (triton.cdiv(B, bl["BLOCK_B"]),)
        with launch_on(x):
            _ms_fwd_kernel[grid](x, w, ix, iw, labels, tgt, lse, B, N, D, x.stride(0), w.stride(0), scale, **bl)
    return lse


def triton_grads(x, w, row_args, scale, need_x, need_w):
    """(grad_x [B, D] in x's dtype, grad_w [N, D] in W's dtype), through the normalisations, each written once
    by the program that owns its rows; empty where not needed.

    ``row_args`` = (ix, iw, labels, tgt, lse, g_lse, g_target, dψ/dc), each contiguous."""
    B, D = x.shape
    N = w.shape[0]
    bl = _blocks(D)
    bl["BLOCK_DO"] = block(D, D_SLICE)
    n_slices = triton.cdiv(D, bl["BLOCK_DO"])
    gx = x.new_empty(0)
    gw = w.new_empty(0)
    if need_x:
        gx = (torch.empty if B > 0 else torch.zeros)(B, D, dtype=x.dtype, device=x.device)
        if B > 0:
            with launch_on(x):
                _ms_bwd_dx_kernel[(triton.cdiv(B, bl["BLOCK_B"]), n_slices)](
                    x, w, *row_args, gx, B, N, D, x.stride(0), w.stride(0), scale,
                    num_warps=warps_for(bl["BLOCK_B"], bl["BLOCK_DO"]), **bl,
                )  # fmt: skip
    if need_w:
        gw = (torch.empty if B > 0 else torch.zeros)(N, D, dtype=w.dtype, device=w.device)
        if B > 0:
            with launch_on(x):
                _ms_bwd_dw_kernel[(triton.cdiv(N, bl["BLOCK_N"]), n_slices)](
                    x, w, *row_args, gw, B, N, D, x.stride(0), w.stride(0), scale,
                    num_warps=warps_for(bl["BLOCK_N"], bl["BLOCK_DO"]), **bl,
                )  # fmt: skip
    return gx, gw
