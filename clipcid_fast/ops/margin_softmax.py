"""K1: cluster-discrimination margin softmax over up to millions of class centres, never storing B×N.

Computes :func:`clipcid_fast.reference.margin_softmax_shard_stats`: embeddings ``x [B, D]`` and centres
``W [N, D]`` (both L2-normalised inside, gradients through the normalisation), labels ``[B]`` int64 in
``[0, N)`` or ``−1`` (target not on this shard); logits ``z_ij = s·cos θ_ij`` with the target column
replaced by ``s·ψ(cos θ_iy)`` (``ψ`` = :func:`~clipcid_fast.reference.combined_margin`). The op returns
the per-row ``lse`` over this shard and the ``target`` logit (0 where the label is −1). Its backward takes
a gradient for each, so a class-sharded loss ``logsumexp_ranks(lse) − Σ_ranks target`` backpropagates
through every shard; the single-device loss is ``lse − target``.

Faces:

* C++ CPU (``csrc/cpu/margin_softmax.cpp``): one engine, ``margin_softmax_fused_grad``: given the per-row
  gradient weights it returns lse, the target logit and the exact gradients. Its single pass takes row chunks
  of ≤ 128 rows × all N logits, each thread owning a block of L2-sized class tiles (single-threaded GEMMs, its
  own rows of grad_w), an online log-sum-exp per row (6·B·N·D FLOPs); grad_w accumulates over the row chunks,
  in place in the returned fp32 grad_w, or, for bf16 centres, in an fp32 [N, D] buffer. Where that buffer would
  pass 256 MB (bf16 centres with N·D > 64M, e.g. N > 128k at D = 512) the engine turns its loops around
  instead: class tiles outer over all B rows, the lse first, then each tile's gradient complete in an fp32
  tile buffer and written once in bf16 (8·B·N·D FLOPs instead of 6: the logits twice; O(B·D + N) extra
  memory). A "mean" / "sum" loss that needs gradients knows the weights at forward time and takes the
  engine in its forward, with a backward that only scales the gradients (in place, in C++: no host sync).
  Otherwise (``reduction="none"``, the class-sharded loss) the forward is the engine without gradients (one
  tile slot per thread, W read once) and the backward the engine with the incoming weights (8·B·N·D in all;
  the tiles-outer form takes the forward's lse and skips its own). fp32 / bf16 storage, fp32 math; a NaN
  input gives a NaN lse (and loss).
* Triton (``margin_triton.py``; GPU, or CPU tensors under ``TRITON_INTERPRET=1``): a forward kernel over
  (row block, class split), the splits combined by log-sum-exp, and backward kernels over (row block, class
  split) for dx and class blocks for dW, so no two programs write one row; 16-bit inputs on tensor cores.
  Offsets are int64 (N = 10M rows of W overflow int32). The target cosine, ψ and dψ/dc are O(B) and are
  computed here with the reference's own ``combined_margin``.
* the reference (float64 and float16 on CPU, and the fallback).

Extra memory beyond the inputs and the returned gradients, never O(B·N): C++ R·N (≤ 384 MB while N ≤ 3M,
32·N floats beyond) + B·D + N floats for the single pass with gradients (+ 4·N·D bytes, ≤ 256 MB, for bf16
centres), O(B·D + N) floats for the tiles-outer form, ≤ 64 MB of tile slots without gradients; at B = 1024, N = 1M,
D = 512: 385 MB for fp32 centres, 16 MB for bf16 (2433 MB with the fp32 [N, D] accumulator;
``benchmarks/bench_cluster_module.py``). Triton O(B·D + N) floats forward and backward: its backward kernels
finish the gradients through the normalisations themselves and write them once in the inputs' dtypes; with
several class splits (few rows: the splits fill the GPU), dx first keeps fp32 partial sums of S·B·D floats,
where S·B ≈ 128 rows per SM (about 35 MB at D = 512 on an H100, whatever B is).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .. import _validate, reference
from .._backend import resolve
from . import margin_triton

REDUCTIONS = ("none", "mean", "sum")

# --------------------------------------------------------------------------------------------------
# Triton backend (kernels in margin_triton.py): O(B) target terms here, the B×N work in the kernels
# --------------------------------------------------------------------------------------------------


def _inv_norms(a: Tensor) -> Tensor:
    return 1.0 / torch.linalg.vector_norm(a, dim=1, dtype=torch.float32)


def _dpsi_dc(c: Tensor, m1: float, m2: float) -> Tensor:
    """dψ/dc of reference.combined_margin (tiles.h margin_psi's derivative): 1 on the plain and
    fallback paths, m1·sin(m1θ + m2)/sin θ on the arccos path, 0 outside the clamp band."""
    if m1 == 1.0 and m2 == 0.0:
        return torch.ones_like(c)
    eps = reference.ACOS_EPS
    cc = c.clamp(-1.0 + eps, 1.0 - eps)
    t = m1 * torch.acos(cc) + m2
    inside = (c >= -1.0 + eps) & (c <= 1.0 - eps)
    d = torch.where(inside, m1 * torch.sin(t) / torch.sqrt((1.0 - cc * cc).clamp(min=0.0)), 0.0)
    return torch.where(t > math.pi, 1.0, d)


def _target_terms(x, w, labels, ix, iw, scale, m1, m2, m3):
    """Target cosine → (s·ψ, dψ/dc) per row, O(B·D); ψ is the reference's combined_margin."""
    on = labels >= 0
    safe = labels.clamp(min=0)
    c = ((x.float() * ix[:, None]) * (w[safe].float() * iw[safe][:, None])).sum(1)
    tgt = torch.where(on, scale * reference.combined_margin(c, m1, m2, m3), 0.0)
    return tgt, torch.where(on, _dpsi_dc(c, m1, m2), 0.0)


def _triton_fwd(x, w, labels, scale, m1, m2, m3):
    x, w, labels = x.contiguous(), w.contiguous(), labels.contiguous()
    ix, iw = _inv_norms(x), _inv_norms(w)
    tgt, _ = _target_terms(x, w, labels, ix, iw, scale, m1, m2, m3)
    return margin_triton.triton_lse(x, w, labels, ix, iw, tgt, scale), tgt


def _triton_bwd(g_lse, g_tgt, x, w, labels, lse, scale, m1, m2, m3, need_x, need_w):
    x, w, labels = x.contiguous(), w.contiguous(), labels.contiguous()
    ix, iw = _inv_norms(x), _inv_norms(w)
    tgt, dpsi = _target_terms(x, w, labels, ix, iw, scale, m1, m2, m3)
    gl, gt = g_lse.float().contiguous(), g_tgt.float().contiguous()
    row_args = (ix, iw, labels, tgt, lse.float().contiguous(), gl, gt, dpsi)
    # the kernels finish the gradients through the normalisations and write them in x's / W's dtype
    return margin_triton.triton_grads(x, w, row_args, scale, need_x, need_w)


def _through_norm(g_hat: Tensor, a: Tensor, inv: Tensor) -> Tensor:
    """Gradient through a_hat = a / ‖a‖: (g − a_hat ⟨g, a_hat⟩) / ‖a‖."""
    a_hat = a.to(inv.dtype) * inv[:, None]
    return (g_hat - a_hat * (g_hat * a_hat).sum(1, keepdim=True)) * inv[:, None]


# --------------------------------------------------------------------------------------------------
# Reference backend (float64 / float16 inputs, and the fallback)
# --------------------------------------------------------------------------------------------------


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _ref_fwd(x, w, labels, scale, m1, m2, m3):
    cd = _out_dtype(x)
    lse, tgt = reference.margin_softmax_shard_stats(x.to(cd), w.to(cd), labels, scale, m1, m2, m3)
    return lse, tgt


def _ref_bwd(g_lse, g_tgt, x, w, labels, lse, scale, m1, m2, m3, need_x, need_w):
    # Dense B×N (it is the reference): dcos = s·g_lse·P, the target column s·ψ'·(g_lse·P + g_tgt).
    cd = _out_dtype(x)
    xc, wc = x.to(cd), w.to(cd)
    nx, nw = xc.norm(dim=1, keepdim=True), wc.norm(dim=1, keepdim=True)
    xh, wh = xc / nx, wc / nw  # divide as the forward (reference) does: P_y must match it bit for bit
    ix, iw = 1.0 / nx[:, 0], 1.0 / nw[:, 0]
    cos = xh @ wh.T
    on = labels >= 0
    safe = labels.clamp(min=0)
    rows = torch.arange(x.shape[0], device=x.device)
    c_y = cos[rows, safe]
    tgt = scale * reference.combined_margin(c_y, m1, m2, m3)
    onehot = torch.nn.functional.one_hot(safe, cos.shape[1]).to(torch.bool) & on[:, None]
    g_lse, g_tgt, lse = g_lse.to(cd), g_tgt.to(cd), lse.to(cd)
    p = torch.exp(torch.where(onehot, tgt[:, None], scale * cos) - lse[:, None])
    d_y = scale * _dpsi_dc(c_y, m1, m2) * (g_lse * p[rows, safe] + g_tgt)
    dcos = torch.where(onehot, d_y[:, None], scale * g_lse[:, None] * p)
    gx = _through_norm(dcos @ wh, xc, ix).to(x.dtype) if need_x else x.new_empty(0)
    gw = _through_norm(dcos.T @ xh, wc, iw).to(w.dtype) if need_w else w.new_empty(0)
    return gx, gw


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("clipcid_fast::margin_softmax_stats", mutates_args=())
def margin_softmax_stats_op(
    x: Tensor, w: Tensor, labels: Tensor, scale: float, m1: float, m2: float, m3: float, backend: str
) -> tuple[Tensor, Tensor]:
    if backend == "cpu":
        return torch.ops.clipcid_fast_C.margin_softmax_fwd(x.contiguous(), w.contiguous(), labels, scale, m1, m2, m3)
    if backend == "triton":
        return _triton_fwd(x, w, labels, scale, m1, m2, m3)
    return _ref_fwd(x, w, labels, scale, m1, m2, m3)


@margin_softmax_stats_op.register_fake
def _(x, w, labels, scale, m1, m2, m3, backend):
    dt = _out_dtype(x)
    return x.new_empty((x.shape[0],), dtype=dt), x.new_empty((x.shape[0],), dtype=dt)


@torch.library.custom_op("clipcid_fast::margin_softmax_stats_bwd", mutates_args=())
def margin_softmax_stats_bwd_op(
    grad_lse: Tensor,
    grad_target: Tensor,
    x: Tensor,
    w: Tensor,
    labels: Tensor,
    lse: Tensor,
    scale: float,
    m1: float,
    m2: float,
    m3: float,
    need_x: bool,
    need_w: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "cpu":
        return torch.ops.clipcid_fast_C.margin_softmax_bwd(
            grad_lse.contiguous(),
            grad_target.contiguous(),
            x.contiguous(),
            w.contiguous(),
            labels,
            lse.contiguous(),
            scale,
            m1,
            m2,
            m3,
            need_x,
            need_w,
        )
    if backend == "triton":
        return _triton_bwd(grad_lse, grad_target, x, w, labels, lse, scale, m1, m2, m3, need_x, need_w)
    return _ref_bwd(grad_lse, grad_target, x, w, labels, lse, scale, m1, m2, m3, need_x, need_w)


@margin_softmax_stats_bwd_op.register_fake
def _(grad_lse, grad_target, x, w, labels, lse, scale, m1, m2, m3, need_x, need_w, backend):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), (torch.empty_like(w) if need_w else w.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w, labels, scale, m1, m2, m3, backend = inputs
    ctx.save_for_backward(x, w, labels, output[0])
    ctx.args = (scale, m1, m2, m3)
    ctx.backend = backend


def _backward(ctx, g_lse, g_tgt):
    x, w, labels, lse = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_w):
        return None, None, None, None, None, None, None, None
    gx, gw = margin_softmax_stats_bwd_op(g_lse, g_tgt, x, w, labels, lse, *ctx.args, need_x, need_w, ctx.backend)
    return (gx if need_x else None), (gw if need_w else None), None, None, None, None, None, None


margin_softmax_stats_op.register_autograd(_backward, setup_context=_setup_context)


def has_cpu_kernel() -> bool:
    """True when the C++ kernels are registered (the built extension, or a dev build loaded by hand)."""
    return hasattr(torch.ops.clipcid_fast_C, "margin_softmax_fwd")


if has_cpu_kernel():  # fakes for the raw C++ ops (torch.compile, opcheck)
    try:

        @torch.library.register_fake("clipcid_fast_C::margin_softmax_fwd")
        def _(x, w, labels, scale, m1, m2, m3, tile=0):
            return x.new_empty((x.shape[0],), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)

        @torch.library.register_fake("clipcid_fast_C::margin_softmax_bwd")
        def _(grad_lse, grad_target, x, w, labels, lse, scale, m1, m2, m3, need_x, need_w, tile=0):
            return (torch.empty_like(x) if need_x else x.new_empty(0)), (
                torch.empty_like(w) if need_w else w.new_empty(0)
            )

    except RuntimeError:  # the extension was built without this op
        pass


# --------------------------------------------------------------------------------------------------
# Single-pass reduced loss (C++ CPU): gradients computed in the forward, scaled in the backward
# --------------------------------------------------------------------------------------------------


def has_fused_grad_kernel() -> bool:
    """True when the single-pass C++ op ``margin_softmax_fused_grad`` is registered."""
    return hasattr(torch.ops.clipcid_fast_C, "margin_softmax_fused_grad")


@torch.library.custom_op("clipcid_fast::margin_softmax_fused_loss", mutates_args=())
def margin_softmax_fused_loss_op(
    x: Tensor,
    w: Tensor,
    labels: Tensor,
    scale: float,
    m1: float,
    m2: float,
    m3: float,
    mean: bool,
    need_x: bool,
    need_w: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, d loss/dx, d loss/dw)`` of the "mean" / "sum" reduced loss in one pass over W.

    The reduction fixes the per-row gradient weights at forward time (c_i = 1/B_valid or 1 on rows with a
    target, 0 elsewhere), so the C++ op computes the gradients with the logits it has just made; the
    backward only scales them by the scalar grad_output (in place). Gradients that are not needed are
    returned empty and cost nothing."""
    on = labels >= 0
    c = 1.0 / on.sum().clamp(min=1).to(torch.float32) if mean else torch.ones((), dtype=torch.float32)
    g_lse = torch.where(on, c, 0.0)
    lse, tgt, gx, gw = torch.ops.clipcid_fast_C.margin_softmax_fused_grad(
        x.contiguous(), w.contiguous(), labels, g_lse, -g_lse, scale, m1, m2, m3, need_x, need_w
    )
    loss = torch.where(on, lse - tgt, 0.0).sum()
    if mean:
        loss = loss / on.sum().clamp(min=1)
    return loss, gx, gw


@margin_softmax_fused_loss_op.register_fake
def _(x, w, labels, scale, m1, m2, m3, mean, need_x, need_w):
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    gw = torch.empty_like(w) if need_w else w.new_empty(0)
    return x.new_empty((), dtype=torch.float32), gx, gw


def _fused_setup_context(ctx, inputs, output):
    _, gx, gw = output
    ctx.mark_non_differentiable(gx, gw)
    ctx.set_materialize_grads(False)  # else autograd passes zero tensors of gx / gw's size (N×D) to backward
    ctx.save_for_backward(gx, gw)


def has_scale_kernel() -> bool:
    """True when the C++ op ``margin_softmax_scale_`` (the single pass's in-place backward) is registered."""
    return hasattr(torch.ops.clipcid_fast_C, "margin_softmax_scale_")


def _fused_backward(ctx, g_loss, _gx, _gw):
    # The stored gradients are scaled in place and handed over (no second N×D buffer); a second backward
    # through the same graph (retain_graph=True) after a scaled one therefore fails autograd's in-place check
    # instead of returning wrong numbers (after an unscaled one the stored gradients are still right).
    # No host sync: the C++ op reads the CPU scalar grad_output itself, skips the N×D pass when it is 1 and
    # bumps the versions when it scales (a Python `bool(g_loss == 1)` here was a value read every step).
    gx, gw = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if g_loss is None:
        return (None,) * 10
    gx_out = gx if need_x and gx.numel() else None
    gw_out = gw if need_w and gw.numel() else None
    live = [t for t in (gx_out, gw_out) if t is not None]
    if live:
        if has_scale_kernel() and not torch.compiler.is_compiling():
            empty = g_loss.new_empty(0)
            torch.ops.clipcid_fast_C.margin_softmax_scale_(
                gx_out if gx_out is not None else empty, gw_out if gw_out is not None else empty, g_loss
            )
        else:
            for t in live:
                t.mul_(g_loss.to(t.dtype))
    return (gx_out, gw_out, None, None, None, None, None, None, None, None)


margin_softmax_fused_loss_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


if has_fused_grad_kernel():
    try:

        @torch.library.register_fake("clipcid_fast_C::margin_softmax_fused_grad")
        def _(x, w, labels, grad_lse, grad_target, scale, m1, m2, m3, need_x, need_w, rows=0, tile=0, passes=0):
            B = x.shape[0]
            return (
                x.new_empty((B,), dtype=torch.float32),
                x.new_empty((B,), dtype=torch.float32),
                torch.empty_like(x) if need_x else x.new_empty(0),
                torch.empty_like(w) if need_w else w.new_empty(0),
            )

    except RuntimeError:
        pass


# --------------------------------------------------------------------------------------------------
# Public entry points: validation at the boundary, then one op call
# --------------------------------------------------------------------------------------------------


def _real(name: str, v, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    return v


def _margins(margin, m1, m2, m3) -> tuple[float, float, float]:
    if not isinstance(margin, (tuple, list)) or len(margin) != 3:
        raise ValueError(f"margin must be a tuple (m1, m2, m3), got {margin!r}")
    vals = [m if m is not None else d for m, d in zip((m1, m2, m3), margin)]
    out = (
        _real("m1", vals[0], positive=True),
        _real("m2", vals[1]),
        _real("m3", vals[2]),
    )
    if not 0.0 <= out[1] < math.pi:
        raise ValueError(f"m2 must be in [0, pi), got {out[1]!r}")
    return out


VALUE_CHECK_ROWS = 16384
"""Rows per slice of the value checks (:func:`check_rows`): their temporaries stay O(slice × D), never N × D."""


def check_labels(labels: Tensor, num_classes: int, name: str = "labels") -> None:
    """Value check (reads the labels, one host sync): every entry in ``[-1, num_classes)``, else ValueError naming
    the first bad index. For data entering a training loop (at load), or behind a debug flag: never per step."""
    bad = (labels < -1) | (labels >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(labels[i])} is outside [-1, N) with N = {num_classes}")


def check_rows(name: str, a: Tensor, rows: int = VALUE_CHECK_ROWS) -> None:
    """Value check: every entry of ``a [n, D]`` finite and every row of nonzero norm (L2-normalisable), else
    ValueError naming the first bad index. Reads ``a`` once in slices of ``rows`` rows (temporaries of a slice,
    not of ``a``: at N = 1M × 512 the whole-matrix form allocated ~1.5 GB) and syncs the host once (twice when it
    fails, to locate the entry)."""
    n = a.shape[0]
    acc = torch.promote_types(a.dtype, torch.float32)
    flags = torch.zeros(max(1, -(-n // rows)), 2, dtype=torch.bool, device=a.device)
    for k, r0 in enumerate(range(0, n, rows)):
        part = a[r0 : r0 + rows]
        flags[k, 0] = ~torch.isfinite(part).all()
        flags[k, 1] = (torch.linalg.vector_norm(part, dim=1, dtype=acc) == 0).any()
    if not bool(flags.any()):
        return
    for k, r0 in enumerate(range(0, n, rows)):  # only on failure: find the first bad entry
        part = a[r0 : r0 + rows]
        if bool(flags[k, 0]):
            i, j = (~torch.isfinite(part)).nonzero()[0].tolist()
            raise ValueError(f"{name} has a non-finite value (NaN or inf) at index {[r0 + i, j]}")
        if bool(flags[k, 1]):
            zero = torch.linalg.vector_norm(part, dim=1, dtype=acc) == 0
            raise ValueError(f"{name} row {r0 + int(zero.nonzero()[0, 0])} has zero norm (cannot be normalised)")


def _check(embeddings, centres, labels, scale, margin, m1, m2, m3, check_values):
    _validate.tensor("embeddings", embeddings, ndim=2)
    _validate.tensor("centres", centres, ndim=2)
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"labels must be a 1-d integer tensor, got shape {tuple(labels.shape)}, dtype {labels.dtype}")
    _validate.same_device(embeddings=embeddings, centres=centres, labels=labels)
    B, D = embeddings.shape
    if B == 0:
        raise ValueError(f"embeddings must have at least one row (empty batch), got shape {tuple(embeddings.shape)}")
    if D == 0:
        raise ValueError(f"embeddings must have at least one feature, got shape {tuple(embeddings.shape)}")
    if centres.shape[0] == 0:
        raise ValueError(f"centres must have at least one row, got shape {tuple(centres.shape)}")
    if centres.shape[1] != D:
        raise ValueError(f"centres must have D = {D} columns like embeddings, got shape {tuple(centres.shape)}")
    if labels.shape[0] != B:
        raise ValueError(f"labels must have B = {B} entries, got shape {tuple(labels.shape)}")
    s = _real("scale", scale, positive=True)
    ms = _margins(margin, m1, m2, m3)
    if check_values and not torch.compiler.is_compiling():
        check_labels(labels, centres.shape[0])
        check_rows("embeddings", embeddings)
        check_rows("centres", centres)
    return s, ms


def _backend_for(impl: str, x: Tensor, w: Tensor) -> str:
    backend = resolve(impl, x.device)
    if backend == "cpu" and not has_cpu_kernel():
        if impl == "cpu":
            raise ValueError("impl='cpu': the C++ extension was built without margin_softmax; rebuild it")
        backend = "reference"
    cpu_dtypes = (torch.float32, torch.bfloat16)
    if x.dtype == torch.float64 or w.dtype == torch.float64:
        backend = "reference"
    if backend == "cpu" and (x.dtype not in cpu_dtypes or w.dtype not in cpu_dtypes):
        backend = "reference"
    return backend


def margin_softmax_stats(
    embeddings: Tensor,
    centres: Tensor,
    labels: Tensor,
    scale: float = 32.0,
    margin: tuple[float, float, float] = (1.0, 0.5, 0.0),
    impl: str = "auto",
    *,
    m1: float | None = None,
    m2: float | None = None,
    m3: float | None = None,
    check_values: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-row ``(lse [B], target [B])`` of the margin softmax over this shard of centres.

    Same math as :func:`clipcid_fast.reference.margin_softmax_shard_stats` (labels ``−1``: the row has
    no target here, ``target = 0``, the row still adds to ``lse``). Differentiable in both outputs, so
    a class-sharded loss is ``logsumexp_ranks(lse) − Σ_ranks target``. float32 results (float64 for
    float64 inputs). See :func:`cluster_discrimination_loss` for the arguments.
    """
    s, (a, b, c) = _check(embeddings, centres, labels, scale, margin, m1, m2, m3, check_values)
    backend = _backend_for(impl, embeddings, centres)
    return margin_softmax_stats_op(embeddings, centres, labels.long(), s, a, b, c, backend)


def cluster_discrimination_loss(
    embeddings: Tensor,
    centres: Tensor,
    labels: Tensor,
    scale: float = 32.0,
    margin: tuple[float, float, float] = (1.0, 0.5, 0.0),
    reduction: str = "none",
    impl: str = "auto",
    *,
    m1: float | None = None,
    m2: float | None = None,
    m3: float | None = None,
    check_values: bool = True,
) -> Tensor:
    """CLIP-CID cluster discrimination: margin softmax cross-entropy against N class centres.

    ``ℓ_i = logsumexp_j z_ij − z_{i y_i}`` with ``z_ij = s·cos θ_ij`` (j ≠ y_i) and
    ``z_{i y_i} = s·ψ(cos θ_{i y_i})``, ``ψ = cos(m1·θ + m2) − m3`` (past π: README "Modelling choices" 1).
    Embeddings and centres are L2-normalised inside; gradients flow to both (through the
    normalisation) and are exact: no class sampling, no gradient filtering.

    Shapes: ``embeddings [B, D]``, ``centres [N, D]`` (float32 / bfloat16 on the fused backends; float64
    and float16 take the reference on CPU), ``labels [B]`` integers in ``[0, N)`` or ``−1`` (no target:
    loss 0, no gradient). ``margin = (m1, m2, m3)``: ArcFace ``(1, m, 0)``, CosFace ``(1, 0, m)``,
    SphereFace ``(m, 0, 0)``, none ``(1, 0, 0)``; keyword ``m1`` / ``m2`` / ``m3`` override entries.
    ``reduction``: ``"none"`` → ``[B]``; ``"sum"``; ``"mean"`` over rows with a target (0 if none).
    ``impl``: ``"auto" | "cpu" | "triton" | "reference"`` (``"cuda"`` has no kernel for this op).

    On the C++ CPU backend, ``reduction="mean"`` / ``"sum"`` with a gradient wanted (grad mode on and
    embeddings or centres requiring grad) takes a single pass: the gradients are computed in the forward
    for the reduction's row weights and the backward only scales them by the scalar grad_output
    (6·B·N·D FLOPs instead of 8·B·N·D; extra memory R·N + B·D floats, R ≤ 128 rows per chunk with the
    R·N buffer ≤ 384 MB up to N = 3M, e.g. R = 94 at N = 1M; bf16 centres also take an fp32 [N, D]
    accumulator while it is ≤ 256 MB; above it the class tiles go outer, the lse first: 8·B·N·D FLOPs with
    O(B·D + N) extra memory). Centres that do not require grad get no dW work. Such a loss can be
    backpropagated once (a second backward with ``retain_graph`` raises).
    ``"none"``, no-grad calls and the other backends use the two-pass path (forward LSE, recomputing
    backward).

    Validation: shapes, dtypes, an empty batch or no centres, ``scale ≤ 0`` or non-finite, bad margins
    raise ``ValueError`` always. ``check_values=True`` (default) also reads the values — labels outside
    ``[−1, N)``, NaN / inf in embeddings or centres, zero-norm rows (:func:`check_labels`,
    :func:`check_rows`: W in slices, no N×D temporaries) — which syncs with the device and reads W once;
    pass ``False`` in a hot loop, as ``ClusterDiscriminationLoss`` does (the C++ kernel still refuses
    out-of-range labels with a RuntimeError; NaN inputs then give NaN losses). Under ``torch.compile`` value
    checks are skipped.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    s, (a, b, c) = _check(embeddings, centres, labels, scale, margin, m1, m2, m3, check_values)
    backend = _backend_for(impl, embeddings, centres)
    need_x = torch.is_grad_enabled() and embeddings.requires_grad
    need_w = torch.is_grad_enabled() and centres.requires_grad
    if reduction != "none" and (need_x or need_w) and backend == "cpu" and has_fused_grad_kernel():
        # Single pass: the reduction fixes the per-row gradient weights, so the gradients are made in the
        # forward (6·B·N·D FLOPs instead of 8·B·N·D for a forward plus a recomputing backward).
        loss, _, _ = margin_softmax_fused_loss_op(
            embeddings, centres, labels.long(), s, a, b, c, reduction == "mean", need_x, need_w
        )
        return loss
    lse, tgt = margin_softmax_stats_op(embeddings, centres, labels.long(), s, a, b, c, backend)
    on = labels >= 0
    loss = torch.where(on, lse - tgt, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / on.sum().clamp(min=1)
