"""K2 Triton kernels (forward and backward of ``relational_rows``), on the GPU or under TRITON_INTERPRET=1.

One launch handles one direction: programs own blocks of rows of A and stream the rows of B in tiles. The
column direction is the same kernel with A = k, B = q (and the teacher's likewise), i.e. rows of Zᵀ.
Logits ``Zs = (β·q) kᵀ``, ``Zt = (α·q_t) k_tᵀ`` are made tile by tile over D in slices
(``_triton_tiles.dot_rows``), so no tile depends on D; the transposed launches (``T``: A = k, B = q) put the
scale on B, so every launch makes the same products in the same order and the row statistics of one
direction match the logits the other direction's backward recomputes (B = 1: exactly zero gradients). The
backward splits its [rows, D] accumulator along D over a second grid axis (each D slice recomputes its row
block's logits). Block sizes: ``_triton_tiles``.
"""

import torch
from torch import Tensor

from ._triton import jit, launch_on, tl, triton
from ._triton_tiles import D_SLICE, K_SLICE, ROWS_MAX, block, dot_rows, load_slice, warps_for

# Sizes are not specialised on (value 1, divisibility by 16): one compiled kernel serves every batch size, so
# a test run or a benchmark sweep compiles a handful of variants, not one per shape. Strides still are
# (aligned vector loads).
_SIZES = ("R", "C", "D", "DT", "off")


@jit(do_not_specialize=_SIZES)
def _rel_fwd_kernel(
    a_ptr,
    b_ptr,
    at_ptr,
    bt_ptr,
    beta_ptr,
    alpha_ptr,
    loss_ptr,
    lse_s_ptr,
    lse_t_ptr,
    R,
    C,
    D,
    DT,
    off,
    s_a,
    s_b,
    s_at,
    s_bt,
    SOFT: tl.constexpr,
    KL: tl.constexpr,
    T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KT: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: rows × stride may pass 2^31
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < R
    beta = tl.load(beta_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    m_s = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_s = tl.zeros([BLOCK_R], tl.float32)
    m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_t = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R], tl.float32)
    diag = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < C
        # (scale · q) kᵀ, the reference's order, in both directions (T: the scale goes on B = q)
        zs_raw = dot_rows(a_ptr, b_ptr, rows, rmask, cols, cmask, s_a, s_b, beta, D, BLOCK_R, BLOCK_C, BLOCK_K, T)
        zs = tl.where(cmask[None, :], zs_raw, float("-inf"))
        m_new = tl.maximum(m_s, tl.max(zs, 1))
        s_s = s_s * tl.exp(m_s - m_new) + tl.sum(tl.exp(zs - m_new[:, None]), 1)
        m_s = m_new
        if SOFT:
            zt_raw = dot_rows(
                at_ptr, bt_ptr, rows, rmask, cols, cmask, s_at, s_bt, alpha, DT, BLOCK_R, BLOCK_C, BLOCK_KT, T
            )
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
        else:
            hit = (cols[None, :] == rows[:, None] + off) & cmask[None, :]
            diag += tl.sum(tl.where(hit, zs, 0.0), 1)
    lse_s = m_s + tl.log(s_s)
    if SOFT:
        lse_t = m_t + tl.log(s_t)
        mean = acc / s_t
        if KL:
            loss = mean - lse_t + lse_s
        else:
            loss = lse_s - mean
        tl.store(lse_t_ptr + rows, lse_t, mask=rmask)
    else:
        loss = lse_s - diag
    tl.store(loss_ptr + rows, loss, mask=rmask)
    tl.store(lse_s_ptr + rows, lse_s, mask=rmask)


@jit(do_not_specialize=_SIZES)
def _rel_bwd_kernel(
    a_ptr,
    b_ptr,
    at_ptr,
    bt_ptr,
    beta_ptr,
    alpha_ptr,
    ga_ptr,
    lsa_ptr,
    lta_ptr,
    gb_ptr,
    lsb_ptr,
    ltb_ptr,
    out_ptr,
    dscale_ptr,
    R,
    C,
    D,
    DT,
    off,
    s_a,
    s_b,
    s_at,
    s_bt,
    SOFT: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_B: tl.constexpr,
    T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KT: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    # out[rows, dslice] = β Σ_j G[i, j] b_j[dslice] with G = g_a (ps_rows − pt_rows) + g_b (ps_cols − pt_cols);
    # dscale[dslice_id, rows] = Σ_{d in dslice} a_raw · (G b) (its sum over slices and rows is dβ).
    pid = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = rows < R
    dd = pd * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    dmask = dd < D
    beta = tl.load(beta_ptr).to(tl.float32)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    g_a = tl.zeros([BLOCK_R], tl.float32)
    ls_a = tl.zeros([BLOCK_R], tl.float32)
    lt_a = tl.zeros([BLOCK_R], tl.float32)
    if HAS_A:
        g_a = tl.load(ga_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        ls_a = tl.load(lsa_ptr + rows, mask=rmask, other=0.0)
        if SOFT:
            lt_a = tl.load(lta_ptr + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BLOCK_R, BLOCK_DO], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cols < C
        zs = dot_rows(a_ptr, b_ptr, rows, rmask, cols, cmask, s_a, s_b, beta, D, BLOCK_R, BLOCK_C, BLOCK_K, T)
        zt = zs
        if SOFT:
            zt = dot_rows(
                at_ptr, bt_ptr, rows, rmask, cols, cmask, s_at, s_bt, alpha, DT, BLOCK_R, BLOCK_C, BLOCK_KT, T
            )
        g_b = tl.zeros([BLOCK_C], tl.float32)
        ls_b = tl.zeros([BLOCK_C], tl.float32)
        lt_b = tl.zeros([BLOCK_C], tl.float32)
        if HAS_B:
            g_b = tl.load(gb_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            ls_b = tl.load(lsb_ptr + cols, mask=cmask, other=0.0)
            if SOFT:
                lt_b = tl.load(ltb_ptr + cols, mask=cmask, other=0.0)
        g = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
        if HAS_A:
            d = tl.exp(zs - ls_a[:, None])
            if SOFT:
                d -= tl.exp(zt - lt_a[:, None])
            g += g_a[:, None] * d
        if HAS_B:
            d = tl.exp(zs - ls_b[None, :])
            if SOFT:
                d -= tl.exp(zt - lt_b[None, :])
            g += g_b[None, :] * d
        if not SOFT:
            hit = cols[None, :] == rows[:, None] + off
            g -= tl.where(hit, g_a[:, None] + g_b[None, :], 0.0)
        g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
        b = load_slice(b_ptr, cols, cmask, s_b, dd, dmask)
        acc += tl.dot(g, b, input_precision="ieee")
    omask = rmask[:, None] & dmask[None, :]
    tl.store(out_ptr + rows[:, None] * D + dd[None, :], acc * beta, mask=omask)
    a_raw = load_slice(a_ptr, rows, rmask, s_a, dd, dmask)
    tl.store(dscale_ptr + pd * R + rows, tl.sum(a_raw * acc, 1), mask=rmask)


def _blocks(R: int, C: int, D: int, DT: int) -> dict:
    return dict(
        BLOCK_R=block(R, ROWS_MAX),
        BLOCK_C=block(C, ROWS_MAX),
        BLOCK_K=block(D, K_SLICE),
        BLOCK_KT=block(DT, K_SLICE),
    )


def _scale_tensor(s: Tensor, like: Tensor) -> Tensor:
    return s.reshape(1).to(device=like.device, dtype=torch.float32)


def _fwd_dir(a, b, at, bt, beta, alpha, kind, off, soft, transposed):
    R, D = a.shape
    C = b.shape[0]
    DT = at.shape[1]
    loss = torch.empty(R, dtype=torch.float32, device=a.device)
    stats = torch.zeros(2, R, dtype=torch.float32, device=a.device)
    blk = _blocks(R, C, D, DT)
    grid = (triton.cdiv(R, blk["BLOCK_R"]),)
    with launch_on(a):
        _rel_fwd_kernel[grid](
            a, b, at, bt, beta, alpha, loss, stats[0], stats[1], R, C, D, DT, off,
            a.stride(0), b.stride(0), at.stride(0), bt.stride(0),
            SOFT=soft, KL=kind == "kl", T=transposed, **blk,
        )  # fmt: skip
    return loss, stats


def triton_fwd(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, off, rows, cols):
    """``(loss_rows, loss_cols, stats_rows, stats_cols)`` of relational_rows (see relational_rows_op)."""
    soft = q_t is not None
    q_s, k_s = q_s.contiguous(), k_s.contiguous()
    beta = _scale_tensor(scale_s, q_s)
    if soft:
        q_t, k_t, alpha = q_t.contiguous(), k_t.contiguous(), _scale_tensor(scale_t, q_s)
    else:  # dummies: the SOFT=False kernel never reads them
        q_t, k_t, alpha = q_s, k_s, beta
    empty = lambda: (q_s.new_empty(0, dtype=torch.float32), q_s.new_zeros(2, 0, dtype=torch.float32))
    lr, sr = _fwd_dir(q_s, k_s, q_t, k_t, beta, alpha, kind, off, soft, False) if rows else empty()
    lc, sc = _fwd_dir(k_s, q_s, k_t, q_t, beta, alpha, kind, -off, soft, True) if cols else empty()
    return lr, lc, sr, sc


def _bwd_dir(a, b, at, bt, beta, alpha, ga, sa, gb, sb, off, soft, has_a, has_b, transposed):
    R, D = a.shape
    C = b.shape[0]
    DT = at.shape[1]
    blk = _blocks(R, C, D, DT)
    blk["BLOCK_DO"] = block(D, D_SLICE)
    n_slices = triton.cdiv(D, blk["BLOCK_DO"])
    out = torch.empty(R, D, dtype=torch.float32, device=a.device)
    dscale = torch.empty(n_slices, R, dtype=torch.float32, device=a.device)
    dummy = torch.zeros(1, dtype=torch.float32, device=a.device)
    if not has_a:
        ga, sa = dummy, torch.zeros(2, 1, dtype=torch.float32, device=a.device)
    if not has_b:
        gb, sb = dummy, torch.zeros(2, 1, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(R, blk["BLOCK_R"]), n_slices)
    with launch_on(a):
        _rel_bwd_kernel[grid](
            a, b, at, bt, beta, alpha, ga.contiguous(), sa[0].contiguous(), sa[1].contiguous(),
            gb.contiguous(), sb[0].contiguous(), sb[1].contiguous(), out, dscale, R, C, D, DT, off,
            a.stride(0), b.stride(0), at.stride(0), bt.stride(0), SOFT=soft, HAS_A=has_a, HAS_B=has_b, T=transposed,
            num_warps=warps_for(blk["BLOCK_R"], blk["BLOCK_DO"]), **blk,
        )  # fmt: skip
    return out, dscale


def triton_bwd(g_r, g_c, q_s, k_s, scale_s, q_t, k_t, scale_t, s_r, s_c, off, rows, cols):
    """``(d q_s, d k_s, d scale_s)`` of relational_rows (see relational_rows_bwd_op)."""
    soft = q_t is not None
    q_s, k_s = q_s.contiguous(), k_s.contiguous()
    beta = _scale_tensor(scale_s, q_s)
    if soft:
        q_t, k_t, alpha = q_t.contiguous(), k_t.contiguous(), _scale_tensor(scale_t, q_s)
    else:
        q_t, k_t, alpha = q_s, k_s, beta
    g_r, g_c = g_r.float(), g_c.float()
    dq, part = _bwd_dir(q_s, k_s, q_t, k_t, beta, alpha, g_r, s_r, g_c, s_c, off, soft, rows, cols, False)
    dk, _ = _bwd_dir(k_s, q_s, k_t, q_t, beta, alpha, g_c, s_c, g_r, s_r, -off, soft, cols, rows, True)
    dscale = part.sum().reshape(scale_s.shape).to(scale_s.dtype)
    return dq.to(q_s.dtype), dk.to(k_s.dtype), dscale
