"""Relational-rows Triton kernels (forward and backward of ``relational_rows`` and ``relational_distill``), on
the GPU or under TRITON_INTERPRET=1.

One launch covers both directions: the first ``NB_R`` programs own blocks of rows of Z = (β·q) kᵀ (A = q,
B = k), the rest blocks of its columns (rows of Zᵀ: A = k, B = q); each streams the other side in tiles. Logits
``Zs = β (q kᵀ)``, ``Zt = α (q_t k_tᵀ)`` are made tile by tile over D in slices (``_triton_tiles.dot_rows``)
and scaled as fp32 accumulators, so a transposed program makes the same products as the direct one. The
backward program holds its rows' whole gradient ([rows, D] in up to ``N_ACC`` register slices), so it makes
each logit tile once; only D > N_ACC·D_SLICE splits over a second grid axis. ``HARD`` with a soft kind is
``relational_distill``: the hard (contrastive) terms ride on the soft kernel's student statistics, so the
distill loss costs one soft pass, not a hard and a soft one. Block sizes: ``_triton_tiles``.

FLOPs (one unit = one B×B×D GEMM, 2·B²·D): the forward makes Zs (and Zt) once per direction, 2 (4) units;
the backward makes them once more per direction plus the two gradient GEMMs, 4 (6). Eager autograd needs 1 (2)
+ 2, so the ratio is 2.0 for hard kinds and 2.5 for soft ones and distill.
"""

import torch
from torch import Tensor

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
)

# Sizes are not specialised on (value 1, divisibility by 16): one compiled kernel serves every batch size, so
# a test run or a benchmark sweep compiles a handful of variants, not one per shape. Strides still are
# (aligned vector loads).
_SIZES = ("R", "C", "D", "DT", "off", "NB_R")


@jit
def _direction(pid, NB_R, q_ptr, k_ptr, qt_ptr, kt_ptr, s_q, s_k, s_qt, s_kt, R, C, off):
    """(block index, A, B, A_t, B_t, strides, rows of A, rows of B, target offset, is_col) of program ``pid``."""
    is_col = pid >= NB_R
    blk, a, b, at, bt, sa, sb, sat, sbt, na, nb, o = pid, q_ptr, k_ptr, qt_ptr, kt_ptr, s_q, s_k, s_qt, s_kt, R, C, off
    if is_col:
        blk, a, b, at, bt, sa, sb, sat, sbt, na, nb, o = (
            pid - NB_R,
            k_ptr,
            q_ptr,
            kt_ptr,
            qt_ptr,
            s_k,
            s_q,
            s_kt,
            s_qt,
            C,
            R,
            -off,
        )
    return blk, a, b, at, bt, sa, sb, sat, sbt, na, nb, o, is_col


@jit(do_not_specialize=_SIZES)
def _rel_fwd_kernel(
    q_ptr, k_ptr, qt_ptr, kt_ptr, beta_ptr, alpha_ptr, out_r_ptr, out_c_ptr,
    R, C, D, DT, off, s_q, s_k, s_qt, s_kt, NB_R,
    SOFT: tl.constexpr, KL: tl.constexpr, HARD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KT: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # out[0] = lse of Zs, out[1] = lse of Zt (the stats, first: returned as a view at offset 0), out[2] = loss
    # (soft, or hard without SOFT), out[3] = hard loss (HARD)
    blk, a_ptr, b_ptr, at_ptr, bt_ptr, s_a, s_b, s_at, s_bt, n_a, n_b, o, is_col = _direction(
        tl.program_id(0), NB_R, q_ptr, k_ptr, qt_ptr, kt_ptr, s_q, s_k, s_qt, s_kt, R, C, off
    )
    out_ptr = out_r_ptr
    if is_col:
        out_ptr = out_c_ptr
    rows = blk.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # int64: rows × stride may pass 2^31
    rmask = rows < n_a
    beta = tl.load(beta_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    m_s = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_s = tl.zeros([BLOCK_R], tl.float32)
    m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_t = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R], tl.float32)
    diag = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, n_b, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < n_b
        zs_raw = beta * dot_rows(a_ptr, b_ptr, rows, rmask, cols, cmask, s_a, s_b, D, BLOCK_R, BLOCK_C, BLOCK_K,
                                 UPCAST, PREC)  # fmt: skip
        zs = tl.where(cmask[None, :], zs_raw, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(zs, 1))
        s_s = s_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(zs - m_new[:, None]), 1)
        m_s = m_new
        if SOFT:
            zt_raw = alpha * dot_rows(at_ptr, bt_ptr, rows, rmask, cols, cmask, s_at, s_bt, DT, BLOCK_R, BLOCK_C,
                                      BLOCK_KT, UPCAST, PREC)  # fmt: skip
            zt = tl.where(cmask[None, :], zt_raw, float("-inf"))
            mt_new = tl.maximum(m_t, tl.max(zt, 1))
            w = tl.exp(zt - mt_new[:, None])  # 0 on masked columns
            f = tl.exp(m_t - mt_new)
            if KL:
                v = zt_raw - zs_raw
            else:
                v = zs_raw
            s_t = s_t * f + tl.sum(w, 1)
            acc = acc * f + tl.sum(w * v, 1)
            m_t = mt_new
        if HARD or not SOFT:
            hit = (cols[None, :] == rows[:, None] + o) & cmask[None, :]
            diag += tl.sum(tl.where(hit, zs, 0.0), 1)
    lse_s = m_s + tl.log(s_s)
    if SOFT:
        lse_t = m_t + tl.log(s_t)
        mean = acc / s_t
        if KL:
            loss = mean - lse_t + lse_s
        else:
            loss = lse_s - mean
        tl.store(out_ptr + n_a + rows, lse_t, mask=rmask)
        if HARD:
            tl.store(out_ptr + 3 * n_a + rows, lse_s - diag, mask=rmask)
    else:
        loss = lse_s - diag
    tl.store(out_ptr + 2 * n_a + rows, loss, mask=rmask)
    tl.store(out_ptr + rows, lse_s, mask=rmask)


@jit
def _row_weights(g_ptr, h_ptr, st_ptr, idx, imask, n, has, SOFT: tl.constexpr, HARD: tl.constexpr):
    """(soft weight, hard weight, lse of Zs, lse of Zt) of rows ``idx`` of one side; 0 where the side is absent."""
    m = imask & has
    g = tl.load(g_ptr + idx, mask=m, other=0.0)
    ls = tl.load(st_ptr + idx, mask=m, other=0.0)
    lt = tl.zeros_like(ls)
    if SOFT:
        lt = tl.load(st_ptr + n + idx, mask=m, other=0.0)
        hw = tl.zeros_like(g)
        if HARD:
            hw = tl.load(h_ptr + idx, mask=m, other=0.0)
        return g, hw, ls, lt
    return tl.zeros_like(g), g, ls, lt


@jit(do_not_specialize=_SIZES)
def _rel_bwd_kernel(
    q_ptr, k_ptr, qt_ptr, kt_ptr, beta_ptr, alpha_ptr,
    g_r_ptr, g_c_ptr, h_r_ptr, h_c_ptr, st_r_ptr, st_c_ptr, dq_ptr, dk_ptr, dscale_ptr,
    R, C, D, DT, off, s_q, s_k, s_qt, s_kt, NB_R,
    SOFT: tl.constexpr, HARD: tl.constexpr, HAS_R: tl.constexpr, HAS_C: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KT: tl.constexpr,
    BLOCK_DO: tl.constexpr, N_ACC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    # dA[rows] = β Σ_j G[i, j] b_j with G = (w_a + h_a) ps_row + (w_b + h_b) ps_col − w_a pt_row − w_b pt_col
    # − [j = i + o] (h_a + h_b)  (w: soft upstream weights, h: hard ones; a: this direction's side, b: the other)
    # and, in the row programs, dscale[chunk, rows] = Σ_d a_raw · (G b) (its sum is dβ).
    blk, a_ptr, b_ptr, at_ptr, bt_ptr, s_a, s_b, s_at, s_bt, n_a, n_b, o, is_col = _direction(
        tl.program_id(0), NB_R, q_ptr, k_ptr, qt_ptr, kt_ptr, s_q, s_k, s_qt, s_kt, R, C, off
    )
    ga_ptr, ha_ptr, sa_ptr, gb_ptr, hb_ptr, sb_ptr, out_ptr = (
        g_r_ptr,
        h_r_ptr,
        st_r_ptr,
        g_c_ptr,
        h_c_ptr,
        st_c_ptr,
        dq_ptr,
    )
    has_a = tl.full([], HAS_R, tl.int1)
    has_b = tl.full([], HAS_C, tl.int1)
    if is_col:
        ga_ptr, ha_ptr, sa_ptr, gb_ptr, hb_ptr, sb_ptr, out_ptr = (
            g_c_ptr,
            h_c_ptr,
            st_c_ptr,
            g_r_ptr,
            h_r_ptr,
            st_r_ptr,
            dk_ptr,
        )
        has_a = tl.full([], HAS_C, tl.int1)
        has_b = tl.full([], HAS_R, tl.int1)
    d_base = tl.program_id(1).to(tl.int64) * (N_ACC * BLOCK_DO)
    rows = blk.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < n_a
    beta = tl.load(beta_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    w_a, h_a, ls_a, lt_a = _row_weights(ga_ptr, ha_ptr, sa_ptr, rows, rmask, n_a, has_a, SOFT, HARD)
    a0, a1, a2, a3, a4, a5, a6, a7 = acc_init(BLOCK_R, BLOCK_DO, N_ACC)
    for c0 in range(0, n_b, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < n_b
        zs = beta * dot_rows(a_ptr, b_ptr, rows, rmask, cols, cmask, s_a, s_b, D, BLOCK_R, BLOCK_C, BLOCK_K,
                             UPCAST, PREC)  # fmt: skip
        w_b, h_b, ls_b, lt_b = _row_weights(gb_ptr, hb_ptr, sb_ptr, cols, cmask, n_b, has_b, SOFT, HARD)
        g = tl.where(has_a, (w_a + h_a)[:, None] * tl.exp(zs - ls_a[:, None]), 0.0)
        g += tl.where(has_b, (w_b + h_b)[None, :] * tl.exp(zs - ls_b[None, :]), 0.0)
        if SOFT:
            zt = alpha * dot_rows(at_ptr, bt_ptr, rows, rmask, cols, cmask, s_at, s_bt, DT, BLOCK_R, BLOCK_C,
                                  BLOCK_KT, UPCAST, PREC)  # fmt: skip
            g -= tl.where(has_a, w_a[:, None] * tl.exp(zt - lt_a[:, None]), 0.0)
            g -= tl.where(has_b, w_b[None, :] * tl.exp(zt - lt_b[None, :]), 0.0)
        if HARD or not SOFT:
            hit = cols[None, :] == rows[:, None] + o
            g -= tl.where(hit, h_a[:, None] + h_b[None, :], 0.0)
        g = operand(tl.where(rmask[:, None] & cmask[None, :], g, 0.0), a_ptr, b_ptr, UPCAST)
        a0, a1, a2, a3, a4, a5, a6, a7 = grad_dots(a0, a1, a2, a3, a4, a5, a6, a7, g, b_ptr, a_ptr, cols, cmask,
                                                   s_b, d_base, D, BLOCK_DO, N_ACC, False, PREC)  # fmt: skip
    part = _store_slices(out_ptr, a_ptr, a0, a1, a2, a3, a4, a5, a6, a7, beta, rows, rmask, s_a, d_base, D, BLOCK_DO,
                         N_ACC)  # fmt: skip
    if not is_col:
        tl.store(dscale_ptr + tl.program_id(1).to(tl.int64) * R + rows, part, mask=rmask)


@jit
def _store_slice(out_ptr, a_ptr, acc, beta, rows, rmask, s_a, d0, D, BLOCK_DO: tl.constexpr):
    """Store β·acc into the gradient (its dtype); return Σ_d a_raw · acc over the slice (this slice's dβ part)."""
    store_rows(out_ptr, acc * beta, rows, rmask, d0, D, BLOCK_DO)
    dofs = d0 + tl.arange(0, BLOCK_DO).to(tl.int64)
    a = tl.load(a_ptr + rows[:, None] * s_a + dofs[None, :], mask=rmask[:, None] & (dofs < D)[None, :], other=0.0)
    return tl.sum(a.to(tl.float32) * acc, 1)


@jit
def _store_slices(out_ptr, a_ptr, a0, a1, a2, a3, a4, a5, a6, a7, beta, rows, rmask, s_a, d0, D,
                  BLOCK_DO: tl.constexpr, N_ACC: tl.constexpr):  # fmt: skip
    """``_store_slice`` of each of the first N_ACC slices; the sum of their dβ parts."""
    part = _store_slice(out_ptr, a_ptr, a0, beta, rows, rmask, s_a, d0, D, BLOCK_DO)
    if N_ACC > 1:
        part += _store_slice(out_ptr, a_ptr, a1, beta, rows, rmask, s_a, d0 + 1 * BLOCK_DO, D, BLOCK_DO)
    if N_ACC > 2:
        part += _store_slice(out_ptr, a_ptr, a2, beta, rows, rmask, s_a, d0 + 2 * BLOCK_DO, D, BLOCK_DO)
    if N_ACC > 3:
        part += _store_slice(out_ptr, a_ptr, a3, beta, rows, rmask, s_a, d0 + 3 * BLOCK_DO, D, BLOCK_DO)
    if N_ACC > 4:
        part += _store_slice(out_ptr, a_ptr, a4, beta, rows, rmask, s_a, d0 + 4 * BLOCK_DO, D, BLOCK_DO)
    if N_ACC > 5:
        part += _store_slice(out_ptr, a_ptr, a5, beta, rows, rmask, s_a, d0 + 5 * BLOCK_DO, D, BLOCK_DO)
    if N_ACC > 6:
        part += _store_slice(out_ptr, a_ptr, a6, beta, rows, rmask, s_a, d0 + 6 * BLOCK_DO, D, BLOCK_DO)
    if N_ACC > 7:
        part += _store_slice(out_ptr, a_ptr, a7, beta, rows, rmask, s_a, d0 + 7 * BLOCK_DO, D, BLOCK_DO)
    return part


def _scale_tensor(s: Tensor, like: Tensor) -> Tensor:
    return s.reshape(1).to(device=like.device, dtype=torch.float32)


def _inputs(q_s, k_s, scale_s, q_t, k_t, scale_t):
    soft = q_t is not None
    q_s, k_s = q_s.contiguous(), k_s.contiguous()
    beta = _scale_tensor(scale_s, q_s)
    if soft:
        return soft, q_s, k_s, beta, q_t.contiguous(), k_t.contiguous(), _scale_tensor(scale_t, q_s)
    return soft, q_s, k_s, beta, q_s, k_s, beta  # dummies: the SOFT=False kernels never read them


def _meta(q_s, q_t, D, DT, R, C):
    """Tile sizes and the dot path for the student / teacher dtypes (one set for both directions)."""
    tg = target(q_s)
    n = max(R, C)
    return dict(BLOCK_K=k_slice(q_s.dtype, D), BLOCK_KT=k_slice(q_t.dtype, DT), UPCAST=tg.upcast,
                PREC="ieee" if tg.upcast else tg.fp32_precision), n  # fmt: skip


def triton_fwd(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, off, rows, cols, hard=False):
    """``(loss_rows, loss_cols, stats_rows, stats_cols)`` of relational_rows (see relational_rows_op); with
    ``hard`` and a soft kind, also ``(hard_rows, hard_cols)`` of relational_distill, from the same pass."""
    soft, q_s, k_s, beta, q_t, k_t, alpha = _inputs(q_s, k_s, scale_s, q_t, k_t, scale_t)
    R, D = q_s.shape
    C, DT = k_s.shape[0], q_t.shape[1]
    out_r = torch.zeros(4, R if rows else 0, dtype=torch.float32, device=q_s.device)
    out_c = torch.zeros(4, C if cols else 0, dtype=torch.float32, device=q_s.device)
    meta, n = _meta(q_s, q_t, D, DT, R, C)
    br = max(16, row_block(n, q_s.dtype) // (1 if rows and cols else 2))  # one direction: twice the programs
    nb_r = triton.cdiv(R, br) if rows else 0
    grid = (nb_r + (triton.cdiv(C, br) if cols else 0),)
    if grid[0] > 0:
        with launch_on(q_s):
            launch(
                _rel_fwd_kernel, grid, q_s, k_s, q_t, k_t, beta, alpha, out_r, out_c, R, C, D, DT, off,
                q_s.stride(0), k_s.stride(0), q_t.stride(0), k_t.stride(0), nb_r,
                SOFT=soft, KL=kind == "kl", HARD=hard and soft, BLOCK_R=br, BLOCK_C=block(n, ROWS_MAX),
                num_warps=FWD_WARPS, num_stages=stages(q_s.dtype), maxnreg=fwd_maxnreg(q_s.dtype), **meta,
            )  # fmt: skip
    # custom ops may not return aliases of one another: the O(B) losses are copied out of the packed buffer
    res = (out_r[2].clone(), out_c[2].clone(), out_r[0:2], out_c[0:2])
    return (*res, out_r[3].clone(), out_c[3].clone()) if hard else res


def _bwd_warps(q_s) -> int:
    """Warps of a backward program: 16 for fp32 operands on an A100 (at 8 its CUDA-core dot operands spill 4-12 B;
    on an H100 16 warps spill more than 8), else GRAD_WARPS."""
    cap = target(q_s).capability
    return 16 if q_s.dtype == torch.float32 and cap is not None and cap[0] < 9 else GRAD_WARPS


def triton_bwd(g_r, g_c, q_s, k_s, scale_s, q_t, k_t, scale_t, s_r, s_c, off, rows, cols, hard=None):
    """``(d q_s, d k_s, d scale_s)`` of relational_rows (see relational_rows_bwd_op); ``hard = (g_hard_rows,
    g_hard_cols)`` with a soft kind adds the hard terms of relational_distill in the same pass."""
    soft, q_s, k_s, beta, q_t, k_t, alpha = _inputs(q_s, k_s, scale_s, q_t, k_t, scale_t)
    R, D = q_s.shape
    C, DT = k_s.shape[0], q_t.shape[1]
    dev = q_s.device
    dummy = torch.zeros(1, dtype=torch.float32, device=dev)
    dummy2 = torch.zeros(2, 1, dtype=torch.float32, device=dev)
    g_r = g_r.float().contiguous() if rows else dummy
    g_c = g_c.float().contiguous() if cols else dummy
    s_r = s_r.contiguous() if rows else dummy2
    s_c = s_c.contiguous() if cols else dummy2
    h_r, h_c = dummy, dummy
    if hard is not None and soft:
        h_r = hard[0].float().contiguous() if rows else dummy
        h_c = hard[1].float().contiguous() if cols else dummy
    meta, n = _meta(q_s, q_t, D, DT, R, C)
    do, n_acc, chunks, rows_max = grad_plan(D, q_s.dtype)
    br = block(n, rows_max)
    nb_r = triton.cdiv(R, br)
    dq = torch.empty_like(q_s) if R > 0 else torch.zeros_like(q_s)
    dk = torch.empty_like(k_s) if C > 0 else torch.zeros_like(k_s)
    dscale = torch.zeros(chunks, R, dtype=torch.float32, device=dev)
    grid = (nb_r + triton.cdiv(C, br), chunks)
    if grid[0] > 0 and D > 0:
        with launch_on(q_s):
            launch(
                _rel_bwd_kernel, grid, q_s, k_s, q_t, k_t, beta, alpha, g_r, g_c, h_r, h_c, s_r, s_c, dq, dk, dscale,
                R, C, D, DT, off, q_s.stride(0), k_s.stride(0), q_t.stride(0), k_t.stride(0), nb_r,
                SOFT=soft, HARD=hard is not None and soft, HAS_R=bool(rows), HAS_C=bool(cols),
                BLOCK_R=br, BLOCK_C=block(n, GRAD_STREAM), BLOCK_DO=do, N_ACC=n_acc,
                num_warps=_bwd_warps(q_s), num_stages=stages(q_s.dtype), **meta,
            )  # fmt: skip
    dscale = dscale.sum().reshape(scale_s.shape).to(scale_s.dtype)
    return dq, dk, dscale
