"""Margin-softmax Triton kernels (statistics, forward and backward), on the GPU or under TRITON_INTERPRET=1.

Forward: programs over (row block, class split): each makes the online log-sum-exp of its rows over its share
of the classes, and the per-split results are combined (log-sum-exp over splits, as flash-decoding does), so
B = 1024 rows still fill a GPU. Backward: dx over (row block, class split), each program holding its rows'
whole gradient ([rows, D] in up to ``N_ACC`` register slices: each cosine tile made once), and dW over class
blocks, each program owning its classes' rows of dW, accumulated over every row of x. Cosines are made tile by
tile over D in slices (``_triton_tiles.dot_rows``: 16-bit operands on tensor cores on a GPU, fp32 at the
``PREC`` the launcher passes); the normalisation enters as per-row inverse norms (ix for x, iw for W)
computed once outside, O(B + N), applied to the fp32 accumulator. The gradients are finished through the
normalisations (the coefficient <g_hat, a_hat> of the projection is Σ dcos·cos, from the cosine tiles) and
written once in the inputs' dtype; with several class splits, dx's partial sums (linear in the split) are
added outside first. The target cosine, ψ and dψ/dc are O(B) and computed outside the kernels with the
reference's own ``combined_margin`` (``margin_softmax._target_terms``). Offsets are int64 (N = 10M rows of W
overflow int32). Block sizes: ``_triton_tiles``.

FLOPs (one unit = B·N·D multiply-adds): forward 1, dx 2 (cosines again, then dcos·W), dW 2: 5 units where
eager autograd needs 3.
"""

import torch

from ._triton import jit, launch, launch_on, target, tl, triton
from ._triton_tiles import (
    FWD_WARPS,
    GRAD_STREAM,
    GRAD_WARPS,
    ROWS_MAX,
    acc_init,
    block,
    dot_rows,
    fwd_maxnreg,
    grad_dots,
    grad_plan,
    k_slice,
    operand,
    row_block,
    stages,
    store_rows,
    tile_dtype,
)

# Sizes are not specialised on (see relational_triton.py); strides are.
_SIZES = ("B", "N", "D", "N_PER")
PROGRAMS_PER_SM = 4  # class splits are chosen so that the forward / dx grids reach this many programs per SM


@jit
def _ms_logits_cos(
    x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, scale, D,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """(z, cos) tiles from one set of dot products: z = s·cos (ix·s first, the forward's logits bit for bit),
    cos for the normalisation's projection coefficient Σ dcos·cos."""
    dots = dot_rows(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, D, BLOCK_B, BLOCK_N, BLOCK_K, UPCAST, PREC)
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
    x_ptr, w_ptr, ix_ptr, iw_ptr, lab_ptr, tgt_ptr, lse_ptr, B, N, D, s_x, s_w, scale, N_PER,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # lse[split, rows] over classes [split·N_PER, (split + 1)·N_PER) (−inf for a split with no class)
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    ix = tl.load(ix_ptr + rows, mask=rmask, other=0.0) * scale
    lab = tl.load(lab_ptr + rows, mask=rmask, other=-1)
    tg = tl.load(tgt_ptr + rows, mask=rmask, other=0.0)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_B], tl.float32)
    n_lo = sp * N_PER
    n_hi = tl.minimum(n_lo + N_PER, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n_hi
        iw = tl.load(iw_ptr + cols, mask=cmask, other=0.0)
        dots = dot_rows(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, D, BLOCK_B, BLOCK_N, BLOCK_K, UPCAST, PREC)
        z = dots * ix[:, None] * iw[None, :]
        z = tl.where(cols[None, :] == lab[:, None], tg[:, None], z)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of only −inf: no inf − inf
        acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + sp * B + rows, m + tl.log(acc), mask=rmask)


@jit
def _through_norm_slice(
    gx_ptr, x_ptr, acc, ix, proj, rows, rmask, s_x, d0, D, BLOCK_DO: tl.constexpr, FINISH: tl.constexpr
):
    """One D slice of dx: finished through the normalisation, gx = (dX_hat − x·ix·proj)·ix, in x's dtype; or
    (not FINISH: several class splits) the raw partial dX_hat in fp32, added up outside."""
    if FINISH:
        dofs = d0 + tl.arange(0, BLOCK_DO).to(tl.int64)
        xs = tl.load(x_ptr + rows[:, None] * s_x + dofs[None, :], mask=rmask[:, None] & (dofs < D)[None, :],
                     other=0.0).to(tl.float32)  # fmt: skip
        acc = (acc - xs * (ix * proj)[:, None]) * ix[:, None]
    store_rows(gx_ptr, acc, rows, rmask, d0, D, BLOCK_DO)


@jit
def _finish_slices(out_ptr, a_ptr, a0, a1, a2, a3, a4, a5, a6, a7, inv, proj, rows, rmask, s_a, d0, D,
                   BLOCK_DO: tl.constexpr, N_ACC: tl.constexpr, FINISH: tl.constexpr):  # fmt: skip
    """``_through_norm_slice`` of each of the first N_ACC slices (columns d0 + i·BLOCK_DO)."""
    _through_norm_slice(out_ptr, a_ptr, a0, inv, proj, rows, rmask, s_a, d0, D, BLOCK_DO, FINISH)
    if N_ACC > 1:
        _through_norm_slice(out_ptr, a_ptr, a1, inv, proj, rows, rmask, s_a, d0 + 1 * BLOCK_DO, D, BLOCK_DO, FINISH)
    if N_ACC > 2:
        _through_norm_slice(out_ptr, a_ptr, a2, inv, proj, rows, rmask, s_a, d0 + 2 * BLOCK_DO, D, BLOCK_DO, FINISH)
    if N_ACC > 3:
        _through_norm_slice(out_ptr, a_ptr, a3, inv, proj, rows, rmask, s_a, d0 + 3 * BLOCK_DO, D, BLOCK_DO, FINISH)
    if N_ACC > 4:
        _through_norm_slice(out_ptr, a_ptr, a4, inv, proj, rows, rmask, s_a, d0 + 4 * BLOCK_DO, D, BLOCK_DO, FINISH)
    if N_ACC > 5:
        _through_norm_slice(out_ptr, a_ptr, a5, inv, proj, rows, rmask, s_a, d0 + 5 * BLOCK_DO, D, BLOCK_DO, FINISH)
    if N_ACC > 6:
        _through_norm_slice(out_ptr, a_ptr, a6, inv, proj, rows, rmask, s_a, d0 + 6 * BLOCK_DO, D, BLOCK_DO, FINISH)
    if N_ACC > 7:
        _through_norm_slice(out_ptr, a_ptr, a7, inv, proj, rows, rmask, s_a, d0 + 7 * BLOCK_DO, D, BLOCK_DO, FINISH)


@jit(do_not_specialize=_SIZES)
def _ms_bwd_dx_kernel(
    x_ptr, w_ptr, ix_ptr, iw_ptr, lab_ptr, tgt_ptr, lse_ptr, gl_ptr, gt_ptr, dpsi_ptr, gx_ptr, proj_ptr,
    B, N, D, s_x, s_w, scale, N_PER,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    N_ACC: tl.constexpr, FINISH: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # dX_hat[i, d] = Σ_j dcos_ij · W_hat[j, d] over this split's classes, for the program's chunk of D, and
    # proj_i = Σ_j dcos_ij cos_ij (= <dX_hat_i, x_hat_i>, from the cosine tiles, so no D chunk needs another).
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    pd = tl.program_id(2).to(tl.int64)
    d_base = pd * (N_ACC * BLOCK_DO)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    ix, lab, tg, lse, gl, gt, dpsi = _ms_row_terms(
        ix_ptr, lab_ptr, tgt_ptr, lse_ptr, gl_ptr, gt_ptr, dpsi_ptr, rows, rmask
    )
    a0, a1, a2, a3, a4, a5, a6, a7 = acc_init(BLOCK_B, BLOCK_DO, N_ACC)
    proj = tl.zeros([BLOCK_B], tl.float32)
    n_lo = sp * N_PER
    n_hi = tl.minimum(n_lo + N_PER, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n_hi
        iw = tl.load(iw_ptr + cols, mask=cmask, other=0.0)
        z, c = _ms_logits_cos(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, scale, D, BLOCK_B, BLOCK_N,
                              BLOCK_K, UPCAST, PREC)  # fmt: skip
        d = _ms_dcos(z, cols, lab, tg, lse, gl, gt, dpsi, scale)
        d = tl.where(rmask[:, None] & cmask[None, :], d, 0.0)
        proj += tl.sum(d * c, 1)
        g = operand(d * iw[None, :], x_ptr, w_ptr, UPCAST)
        a0, a1, a2, a3, a4, a5, a6, a7 = grad_dots(a0, a1, a2, a3, a4, a5, a6, a7, g, w_ptr, x_ptr, cols, cmask,
                                                   s_w, d_base, D, BLOCK_DO, N_ACC, False, PREC)  # fmt: skip
    _finish_slices(gx_ptr + sp * B * D, x_ptr, a0, a1, a2, a3, a4, a5, a6, a7, ix, proj, rows, rmask, s_x, d_base, D,
                   BLOCK_DO, N_ACC, FINISH)  # fmt: skip
    if pd == 0:
        tl.store(proj_ptr + sp * B + rows, proj, mask=rmask)


@jit(do_not_specialize=_SIZES)
def _ms_bwd_dw_kernel(
    x_ptr, w_ptr, ix_ptr, iw_ptr, lab_ptr, tgt_ptr, lse_ptr, gl_ptr, gt_ptr, dpsi_ptr, gw_ptr,
    B, N, D, s_x, s_w, scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    N_ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # dW_hat[j, d] = Σ_i dcos_ij · X_hat[i, d]   (one program per block of classes: it owns those rows of dW,
    # accumulated in fp32 over every row of x), then through the normalisation in the program,
    # gw_j = (dW_hat_j − w_hat_j <dW_hat_j, w_hat_j>) / ‖w_j‖ with <dW_hat_j, w_hat_j> = Σ_i dcos_ij cos_ij, and
    # written once in W's dtype: no fp32 [N, D] accumulator (2 GB at N = 1M, D = 512).
    pid = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1).to(tl.int64)
    d_base = pd * (N_ACC * BLOCK_DO)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < N
    iw = tl.load(iw_ptr + cols, mask=cmask, other=0.0)
    a0, a1, a2, a3, a4, a5, a6, a7 = acc_init(BLOCK_N, BLOCK_DO, N_ACC)
    proj = tl.zeros([BLOCK_N], tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        rmask = rows < B
        ix, lab, tg, lse, gl, gt, dpsi = _ms_row_terms(
            ix_ptr, lab_ptr, tgt_ptr, lse_ptr, gl_ptr, gt_ptr, dpsi_ptr, rows, rmask
        )
        z, c = _ms_logits_cos(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, scale, D, BLOCK_B, BLOCK_N,
                              BLOCK_K, UPCAST, PREC)  # fmt: skip
        d = _ms_dcos(z, cols, lab, tg, lse, gl, gt, dpsi, scale)
        d = tl.where(rmask[:, None] & cmask[None, :], d, 0.0)
        proj += tl.sum(d * c, 0)
        g = operand(d * ix[:, None], x_ptr, w_ptr, UPCAST)
        a0, a1, a2, a3, a4, a5, a6, a7 = grad_dots(a0, a1, a2, a3, a4, a5, a6, a7, g, x_ptr, w_ptr, rows, rmask,
                                                   s_x, d_base, D, BLOCK_DO, N_ACC, True, PREC)  # fmt: skip
    _finish_slices(gw_ptr, w_ptr, a0, a1, a2, a3, a4, a5, a6, a7, iw, proj, cols, cmask, s_w, d_base, D, BLOCK_DO,
                   N_ACC, True)  # fmt: skip


def _path(x, w) -> dict:
    """The dot path: UPCAST under the interpreter, PREC for fp32 (and mixed-dtype) operands."""
    tg = target(x)
    return {"UPCAST": tg.upcast, "PREC": "ieee" if tg.upcast else tg.fp32_precision}


def _splits(x, row_blocks: int, N: int, block_n: int) -> tuple[int, int]:
    """(splits, classes per split): enough class splits that row_blocks × splits reaches PROGRAMS_PER_SM per SM."""
    want = -(-PROGRAMS_PER_SM * target(x).sms // max(row_blocks, 1))
    splits = max(1, min(want, triton.cdiv(N, block_n)))
    n_per = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    return triton.cdiv(N, n_per), n_per


def triton_lse(x, w, labels, ix, iw, tgt, scale):
    """Per-row log-sum-exp over the shard (target column s·ψ = ``tgt``); float32 [B]."""
    B, D = x.shape
    N = w.shape[0]
    if B == 0 or N == 0:
        return torch.full((B,), float("-inf"), dtype=torch.float32, device=x.device)
    dt = tile_dtype(x, w)
    bb, bn = row_block(B, dt), ROWS_MAX
    nb = triton.cdiv(B, bb)
    splits, n_per = _splits(x, nb, N, bn)
    part = torch.empty(splits, B, dtype=torch.float32, device=x.device)
    with launch_on(x):
        launch(
            _ms_fwd_kernel, (nb, splits), x, w, ix, iw, labels, tgt, part, B, N, D, x.stride(0), w.stride(0),
            scale, n_per, BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=k_slice(dt, D),
            num_warps=FWD_WARPS, num_stages=stages(dt), maxnreg=fwd_maxnreg(dt), **_path(x, w),
        )  # fmt: skip
    return part[0] if splits == 1 else torch.logsumexp(part, 0)


def triton_grads(x, w, row_args, scale, need_x, need_w):
    """(grad_x [B, D] in x's dtype, grad_w [N, D] in W's dtype), through the normalisations; empty where not
    needed.

    ``row_args`` = (ix, iw, labels, tgt, lse, g_lse, g_target, dψ/dc), each contiguous."""
    B, D = x.shape
    N = w.shape[0]
    dt = tile_dtype(x, w)
    do, n_acc, chunks, rows_max = grad_plan(D, dt)
    bk = k_slice(dt, D)
    gx = x.new_empty(0)
    gw = w.new_empty(0)
    if need_x:
        gx = _grad_x(x, w, row_args, scale, B, N, D, do, n_acc, chunks, bk, rows_max, dt)
    if need_w:
        gw = (torch.empty if B > 0 else torch.zeros)(N, D, dtype=w.dtype, device=w.device)
        if B > 0 and N > 0:
            bn = block(N, rows_max)
            with launch_on(x):
                launch(
                    _ms_bwd_dw_kernel, (triton.cdiv(N, bn), chunks), x, w, *row_args, gw, B, N, D,
                    x.stride(0), w.stride(0), scale, BLOCK_B=block(B, GRAD_STREAM), BLOCK_N=bn, BLOCK_K=bk,
                    BLOCK_DO=do, N_ACC=n_acc, num_warps=GRAD_WARPS, num_stages=stages(dt), **_path(x, w),
                )  # fmt: skip
    return gx, gw


def _grad_x(x, w, row_args, scale, B, N, D, do, n_acc, chunks, bk, rows_max, dt):
    """grad_x: one launch over (row blocks, class splits, D chunks); with several splits the fp32 partial sums
    of dX_hat and of the projection coefficient are added here and finished through x's normalisation."""
    if B == 0 or N == 0:
        return torch.zeros(B, D, dtype=x.dtype, device=x.device)
    bb, bn = block(B, rows_max), GRAD_STREAM
    nb = triton.cdiv(B, bb)
    splits, n_per = _splits(x, nb * chunks, N, bn)
    finish = splits == 1
    gx = torch.empty(B, D, dtype=x.dtype, device=x.device) if finish else x.new_empty(splits, B, D, dtype=torch.float32)
    proj = torch.empty(splits, B, dtype=torch.float32, device=x.device)
    with launch_on(x):
        launch(
            _ms_bwd_dx_kernel, (nb, splits, chunks), x, w, *row_args, gx, proj, B, N, D, x.stride(0), w.stride(0),
            scale, n_per, BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=do, N_ACC=n_acc, FINISH=finish,
            num_warps=GRAD_WARPS, num_stages=stages(dt), **_path(x, w),
        )  # fmt: skip
    if finish:
        return gx
    ix = row_args[0]
    g_hat = gx.sum(0)
    return ((g_hat - x.float() * (ix * proj.sum(0))[:, None]) * ix[:, None]).to(x.dtype)
