"""MLCD Triton kernels: the negatives' log-sum-exp and its gradients, on the GPU or under TRITON_INTERPRET=1.

The margin softmax's kernels (``margin_triton.py``) with one change: instead of replacing one target column by
s·ψ, each row's K positive columns are masked to −inf (a loop over the K labels of the row block, O(K) compares
per tile), so the statistic is ``logsumexp_{j ∉ P_i} s·cos θ_ij`` and ``dcos_ij = s·g_i·P_ij`` off the positives,
0 on them. Same grids and tiles: forward over (row block, class split) combined by log-sum-exp; dx over (row
block, class split, D chunk) holding whole gradient rows in register slices; dW over (class block, D chunk)
owning its classes' rows; both finished through the normalisations in the kernels (``_finish_slices``) and
written once in the inputs' dtypes. A row whose every centre is a positive has lse −inf and gets no gradient.
"""

import torch

from ._triton import jit, launch, launch_on, tl, triton
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
    tile_dtype,
)
from .margin_triton import _finish_slices, _path, _splits

_SIZES = ("B", "N", "D", "K", "N_PER")


@jit
def _mlcd_mask(z, lab_ptr, rows, rmask, cols, K):
    """z with each row's positive columns (labels [B, K], −1 padding) set to −inf."""
    for k in range(0, K):
        lab = tl.load(lab_ptr + rows * K + k, mask=rmask, other=-1)
        z = tl.where(cols[None, :] == lab[:, None], float("-inf"), z)
    return z


@jit
def _mlcd_dcos(z, lse, g, scale):
    """d loss / d cos on a masked logit tile: s·g·exp(z − lse) (0 at the positives; 0 on rows with lse = −inf)."""
    live = lse != float("-inf")
    p = tl.exp(z - tl.where(live, lse, 0.0)[:, None])
    return tl.where(live[:, None], scale * g[:, None] * p, 0.0)


@jit(do_not_specialize=_SIZES)
def _mlcd_fwd_kernel(
    x_ptr, w_ptr, ix_ptr, iw_ptr, lab_ptr, lse_ptr, B, N, D, K, s_x, s_w, scale, N_PER,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    ix = tl.load(ix_ptr + rows, mask=rmask, other=0.0) * scale
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_B], tl.float32)
    n_lo = sp * N_PER
    n_hi = tl.minimum(n_lo + N_PER, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n_hi
        iw = tl.load(iw_ptr + cols, mask=cmask, other=0.0)
        dots = dot_rows(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, D, BLOCK_B, BLOCK_N, BLOCK_K, UPCAST, PREC)
        z = _mlcd_mask(dots * ix[:, None] * iw[None, :], lab_ptr, rows, rmask, cols, K)
        z = tl.where(cmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile of only −inf: no inf − inf
        acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), 1)
        m = m_new
    tl.store(lse_ptr + sp * B + rows, m + tl.log(acc), mask=rmask)


@jit
def _mlcd_tile(x_ptr, w_ptr, lab_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, lse, g, scale, D, K,
               BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
               PREC: tl.constexpr):  # fmt: skip
    """(dcos, cos) of one [rows, cols] tile, 0 outside the masks."""
    dots = dot_rows(x_ptr, w_ptr, rows, rmask, cols, cmask, s_x, s_w, D, BLOCK_B, BLOCK_N, BLOCK_K, UPCAST, PREC)
    c = dots * ix[:, None] * iw[None, :]
    z = _mlcd_mask(dots * (ix * scale)[:, None] * iw[None, :], lab_ptr, rows, rmask, cols, K)
    d = tl.where(rmask[:, None] & cmask[None, :], _mlcd_dcos(z, lse, g, scale), 0.0)
    return d, c


@jit(do_not_specialize=_SIZES)
def _mlcd_bwd_dx_kernel(
    x_ptr, w_ptr, ix_ptr, iw_ptr, lab_ptr, lse_ptr, g_ptr, gx_ptr, proj_ptr, B, N, D, K, s_x, s_w, scale, N_PER,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    N_ACC: tl.constexpr, FINISH: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    pd = tl.program_id(2).to(tl.int64)
    d_base = pd * (N_ACC * BLOCK_DO)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    rmask = rows < B
    ix = tl.load(ix_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    a0, a1, a2, a3, a4, a5, a6, a7 = acc_init(BLOCK_B, BLOCK_DO, N_ACC)
    proj = tl.zeros([BLOCK_B], tl.float32)
    n_lo = sp * N_PER
    n_hi = tl.minimum(n_lo + N_PER, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n_hi
        iw = tl.load(iw_ptr + cols, mask=cmask, other=0.0)
        d, c = _mlcd_tile(x_ptr, w_ptr, lab_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, lse, g, scale, D, K,
                          BLOCK_B, BLOCK_N, BLOCK_K, UPCAST, PREC)  # fmt: skip
        proj += tl.sum(d * c, 1)
        gt = operand(d * iw[None, :], x_ptr, w_ptr, UPCAST)
        a0, a1, a2, a3, a4, a5, a6, a7 = grad_dots(a0, a1, a2, a3, a4, a5, a6, a7, gt, w_ptr, x_ptr, cols, cmask,
                                                   s_w, d_base, D, BLOCK_DO, N_ACC, False, PREC)  # fmt: skip
    _finish_slices(gx_ptr + sp * B * D, x_ptr, a0, a1, a2, a3, a4, a5, a6, a7, ix, proj, rows, rmask, s_x, d_base, D,
                   BLOCK_DO, N_ACC, FINISH)  # fmt: skip
    if pd == 0:
        tl.store(proj_ptr + sp * B + rows, proj, mask=rmask)


@jit(do_not_specialize=_SIZES)
def _mlcd_bwd_dw_kernel(
    x_ptr, w_ptr, ix_ptr, iw_ptr, lab_ptr, lse_ptr, g_ptr, gw_ptr, B, N, D, K, s_x, s_w, scale,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    N_ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
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
        ix = tl.load(ix_ptr + rows, mask=rmask, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        d, c = _mlcd_tile(x_ptr, w_ptr, lab_ptr, rows, rmask, cols, cmask, s_x, s_w, ix, iw, lse, g, scale, D, K,
                          BLOCK_B, BLOCK_N, BLOCK_K, UPCAST, PREC)  # fmt: skip
        proj += tl.sum(d * c, 0)
        gt = operand(d * ix[:, None], x_ptr, w_ptr, UPCAST)
        a0, a1, a2, a3, a4, a5, a6, a7 = grad_dots(a0, a1, a2, a3, a4, a5, a6, a7, gt, x_ptr, w_ptr, rows, rmask,
                                                   s_x, d_base, D, BLOCK_DO, N_ACC, True, PREC)  # fmt: skip
    _finish_slices(gw_ptr, w_ptr, a0, a1, a2, a3, a4, a5, a6, a7, iw, proj, cols, cmask, s_w, d_base, D, BLOCK_DO,
                   N_ACC, True)  # fmt: skip


def _inv_norms(a: torch.Tensor) -> torch.Tensor:
    return 1.0 / torch.linalg.vector_norm(a, dim=1, dtype=torch.float32)


def neg_lse(x, w, labels, scale):
    """Per-row ``logsumexp_{j ∉ P_i} s·cos θ_ij`` over the shard; float32 [B]."""
    x, w, labels = x.contiguous(), w.contiguous(), labels.contiguous()
    B, D = x.shape
    N, K = w.shape[0], labels.shape[1]
    dt = tile_dtype(x, w)
    bb, bn = row_block(B, dt), ROWS_MAX
    nb = triton.cdiv(B, bb)
    splits, n_per = _splits(x, nb, N, bn)
    part = torch.empty(splits, B, dtype=torch.float32, device=x.device)
    with launch_on(x):
        launch(
            _mlcd_fwd_kernel, (nb, splits), x, w, _inv_norms(x), _inv_norms(w), labels, part, B, N, D, K,
            x.stride(0), w.stride(0), scale, n_per, BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=k_slice(dt, D),
            num_warps=FWD_WARPS, num_stages=stages(dt), maxnreg=fwd_maxnreg(dt), **_path(x, w),
        )  # fmt: skip
    return part[0] if splits == 1 else torch.logsumexp(part, 0)


def neg_lse_grads(grad, x, w, labels, lse, scale, need_x, need_w):
    """(grad_x [B, D] in x's dtype, grad_w [N, D] in W's dtype) of ``Σ_i grad_i · neg_lse_i``; empty where not
    needed."""
    x, w, labels = x.contiguous(), w.contiguous(), labels.contiguous()
    B, D = x.shape
    N, K = w.shape[0], labels.shape[1]
    dt = tile_dtype(x, w)
    do, n_acc, chunks, rows_max = grad_plan(D, dt)
    bk = k_slice(dt, D)
    row_args = (_inv_norms(x), _inv_norms(w), labels, lse.float().contiguous(), grad.float().contiguous())
    gx, gw = x.new_empty(0), w.new_empty(0)
    if need_x:
        bb, bn = block(B, rows_max), GRAD_STREAM
        nb = triton.cdiv(B, bb)
        splits, n_per = _splits(x, nb * chunks, N, bn)
        finish = splits == 1
        out = (
            torch.empty(B, D, dtype=x.dtype, device=x.device)
            if finish
            else x.new_empty(splits, B, D, dtype=torch.float32)
        )
        proj = torch.empty(splits, B, dtype=torch.float32, device=x.device)
        with launch_on(x):
            launch(
                _mlcd_bwd_dx_kernel, (nb, splits, chunks), x, w, *row_args, out, proj, B, N, D, K, x.stride(0),
                w.stride(0), scale, n_per, BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=do, N_ACC=n_acc,
                FINISH=finish, num_warps=GRAD_WARPS, num_stages=stages(dt), **_path(x, w),
            )  # fmt: skip
        if finish:
            gx = out
        else:  # several class splits: add the fp32 partial sums, then finish through x's normalisation
            ix = row_args[0]
            gx = ((out.sum(0) - x.float() * (ix * proj.sum(0))[:, None]) * ix[:, None]).to(x.dtype)
    if need_w:
        gw = torch.empty(N, D, dtype=w.dtype, device=w.device)
        bn = block(N, rows_max)
        with launch_on(x):
            launch(
                _mlcd_bwd_dw_kernel, (triton.cdiv(N, bn), chunks), x, w, *row_args, gw, B, N, D, K, x.stride(0),
                w.stride(0), scale, BLOCK_B=block(B, GRAD_STREAM), BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=do,
                N_ACC=n_acc, num_warps=GRAD_WARPS, num_stages=stages(dt), **_path(x, w),
            )  # fmt: skip
    return gx, gw
