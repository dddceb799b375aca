"""K2: fused relational / contrastive KD over similarity matrices, never storing the R×C matrices.

Student logits ``Zs = (β·q_s) k_sᵀ`` and teacher logits ``Zt = (α·q_t) k_tᵀ`` ([R, C]); per row (softmax
over columns) and per column (softmax over rows) of the same matrices, the loss of
:func:`clipcid_fast.reference.relational_rows_loss`: hard diagonal cross-entropy (no teacher), soft
cross-entropy (``kind="ce"``, open_clip ``DistillClipLoss``) or ``KL(p_t ‖ p_s)`` (``kind="kl"``, CLIP-KD).
The row direction is ``relational_rows_loss(q_s, k_s, β, q_t, k_t, α)``, the column direction
``relational_rows_loss(k_s, q_s, β, k_t, q_t, α)``; one call computes either or both from the same tiles.

Faces: the C++ CPU kernel (``csrc/cpu/relational_rows.cpp``: one pass of fp32 GEMM tiles with online
softmax states forward, recomputation from the saved log-sum-exps backward), Triton kernels
(``relational_triton.py``: forward and backward, both directions in one launch, each direction's programs
making their own tiles; 16-bit inputs on tensor cores; the distill op is one soft pass carrying the hard
terms), and the reference. Only O(R + C) statistics are saved for backward.

Gradients flow to ``q_s``, ``k_s`` and ``scale_s`` only. **The teacher (q_t, k_t, scale_t) gets no
gradient**: the KD losses detach it and open_clip's teacher never requires grad; the public function
detaches it explicitly so this is never silent.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .. import _validate, reference
from .._backend import c_extension, resolve
from .relational_triton import triton_bwd as _triton_bwd
from .relational_triton import triton_fwd as _triton_fwd

KINDS = ("kl", "ce")
DIRECTIONS = ("rows", "cols", "both")

# --------------------------------------------------------------------------------------------------
# Reference backend of the op: the dense spec (relational_rows_loss) plus the statistics.
# --------------------------------------------------------------------------------------------------


def _compute_dtype(*xs) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _ref_fwd(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, off, rows, cols):
    dt = _compute_dtype(q_s, k_s, q_t, k_t)
    qs, ks, bs = q_s.to(dt), k_s.to(dt), scale_s.to(dt)
    soft = q_t is not None
    zs = reference._logits(qs, ks, bs)
    if soft:
        qt, kt, at = q_t.to(dt), k_t.to(dt), scale_t.to(dt)
        zt = reference._logits(qt, kt, at)
    outs = []
    for dim, on in ((1, rows), (0, cols)):
        if not on:
            outs.append((qs.new_empty(0), qs.new_zeros(2, 0)))
            continue
        if dim == 1:
            args = (qs, ks, bs, *((qt, kt, at) if soft else (None, None, None)))
        else:
            args = (ks, qs, bs, *((kt, qt, at) if soft else (None, None, None)))
        loss = reference.relational_rows_loss(*args, kind=kind, target_offset=off if dim == 1 else 0)
        lse_s = torch.logsumexp(zs, dim)
        lse_t = torch.logsumexp(zt, dim) if soft else torch.zeros_like(lse_s)
        outs.append((loss, torch.stack([lse_s, lse_t])))
    return outs[0][0], outs[1][0], outs[0][1], outs[1][1]


def _ref_bwd(g_r, g_c, q_s, k_s, scale_s, q_t, k_t, scale_t, s_r, s_c, off, rows, cols):
    dt = _compute_dtype(q_s, k_s, q_t, k_t)
    qs, ks, bs = q_s.to(dt), k_s.to(dt), scale_s.to(dt)
    soft = q_t is not None
    zs = reference._logits(qs, ks, bs)
    zt = reference._logits(q_t.to(dt), k_t.to(dt), scale_t.to(dt)) if soft else None
    g = torch.zeros_like(zs)
    R = zs.shape[0]
    onehot = torch.zeros_like(zs)
    if not soft:
        idx = torch.arange(R, device=zs.device)
        onehot[idx, idx + off] = 1.0
    if rows:
        p_t = torch.exp(zt - s_r[1].to(dt)[:, None]) if soft else onehot
        g = g + g_r.to(dt)[:, None] * (torch.exp(zs - s_r[0].to(dt)[:, None]) - p_t)
    if cols:
        p_t = torch.exp(zt - s_c[1].to(dt)[None, :]) if soft else onehot
        g = g + g_c.to(dt)[None, :] * (torch.exp(zs - s_c[0].to(dt)[None, :]) - p_t)
    gk_rows = g @ ks
    dscale = (qs * gk_rows).sum().reshape(scale_s.shape).to(scale_s.dtype)
    return (bs * gk_rows).to(q_s.dtype), (bs * (g.T @ qs)).to(k_s.dtype), dscale


# --------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("clipcid_fast::relational_rows", mutates_args=())
def relational_rows_op(
    q_s: Tensor,
    k_s: Tensor,
    scale_s: Tensor,
    q_t: Tensor | None,
    k_t: Tensor | None,
    scale_t: Tensor | None,
    kind: str,
    target_offset: int,
    rows: bool,
    cols: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss_rows [R or 0], loss_cols [C or 0], stats_rows [2, R or 0], stats_cols [2, C or 0])``;
    stats are the student and teacher log-sum-exps (teacher row 0 for hard targets)."""
    args = (q_s, k_s, scale_s, q_t, k_t, scale_t)
    if backend == "cpu":
        return torch.ops.clipcid_fast_C.relational_rows_fwd(*args, kind, target_offset, rows, cols)
    if backend == "triton":
        return _triton_fwd(*args, kind, target_offset, rows, cols)
    return _ref_fwd(*args, kind, target_offset, rows, cols)


@relational_rows_op.register_fake
def _(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, target_offset, rows, cols, backend):
    dt = _compute_dtype(q_s, k_s, q_t, k_t) if backend == "reference" else torch.float32
    R = q_s.shape[0] if rows else 0
    C = k_s.shape[0] if cols else 0
    return (
        q_s.new_empty((R,), dtype=dt),
        q_s.new_empty((C,), dtype=dt),
        q_s.new_empty((2, R), dtype=dt),
        q_s.new_empty((2, C), dtype=dt),
    )


@torch.library.custom_op("clipcid_fast::relational_rows_bwd", mutates_args=())
def relational_rows_bwd_op(
    grad_rows: Tensor,
    grad_cols: Tensor,
    q_s: Tensor,
    k_s: Tensor,
    scale_s: Tensor,
    q_t: Tensor | None,
    k_t: Tensor | None,
    scale_t: Tensor | None,
    stats_rows: Tensor,
    stats_cols: Tensor,
    target_offset: int,
    rows: bool,
    cols: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d q_s, d k_s, d scale_s)`` of ``Σ grad_rows·loss_rows + Σ grad_cols·loss_cols``."""
    args = (grad_rows, grad_cols, q_s, k_s, scale_s, q_t, k_t, scale_t, stats_rows, stats_cols)
    if backend == "cpu":
        return torch.ops.clipcid_fast_C.relational_rows_bwd(*args, target_offset, rows, cols)
    if backend == "triton":
        return _triton_bwd(*args, target_offset, rows, cols)
    return _ref_bwd(*args, target_offset, rows, cols)


@relational_rows_bwd_op.register_fake
def _(grad_rows, grad_cols, q_s, k_s, scale_s, q_t, k_t, scale_t, stats_rows, stats_cols, target_offset, rows, cols, b):
    return torch.empty_like(q_s), torch.empty_like(k_s), torch.empty_like(scale_s)


def _setup_context(ctx, inputs, output):
    q_s, k_s, scale_s, q_t, k_t, scale_t, _kind, target_offset, rows, cols, backend = inputs
    ctx.save_for_backward(q_s, k_s, scale_s, q_t, k_t, scale_t, output[2], output[3])
    ctx.meta = (target_offset, rows, cols, backend)


def _backward(ctx, g_lr, g_lc, _g_sr, _g_sc):
    q_s, k_s, scale_s, q_t, k_t, scale_t, s_r, s_c = ctx.saved_tensors
    off, rows, cols, backend = ctx.meta
    g_lr = torch.zeros_like(s_r[0]) if g_lr is None else g_lr.contiguous()
    g_lc = torch.zeros_like(s_c[0]) if g_lc is None else g_lc.contiguous()
    # detached: the backward is not itself differentiable (no double backward)
    det = lambda x: None if x is None else x.detach()
    dq, dk, ds = relational_rows_bwd_op(
        g_lr.detach(), g_lc.detach(), det(q_s), det(k_s), det(scale_s), det(q_t), det(k_t), det(scale_t),
        det(s_r), det(s_c), off, rows, cols, backend,
    )  # fmt: skip
    # the teacher (q_t, k_t, scale_t) gets no gradient: see the module docstring
    return dq, dk, ds, None, None, None, None, None, None, None, None


relational_rows_op.register_autograd(_backward, setup_context=_setup_context)

# --------------------------------------------------------------------------------------------------
# The distill op: hard diagonal loss AND soft loss (ce / kl) against the teacher, rows and columns, from the
# same student tiles (open_clip DistillClipLoss = hard CE + soft CE; CLIP-KD task CE + CRD = hard CE + KL).
# CPU: one kernel pass, 2 B×B×D GEMMs forward (student + teacher tile) and 4 backward (both recomputed, then
# dq and dk): 6 in all, against 10 for two relational_rows calls and 8 for open_clip.
# --------------------------------------------------------------------------------------------------


def _split_fwd(fwd, q_s, k_s, scale_s, q_t, k_t, scale_t, kind):
    """A distill forward from two relational_rows forwards (hard, then soft): the reference's (the Triton
    backend fuses both into one soft pass)."""
    hr, hc, _, _ = fwd(q_s, k_s, scale_s, None, None, None, "ce", 0, True, True)
    sr, sc, st_r, st_c = fwd(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, 0, True, True)
    return hr, hc, sr, sc, st_r, st_c


def _split_bwd(bwd, g_hr, g_hc, g_sr, g_sc, q_s, k_s, scale_s, q_t, k_t, scale_t, st_r, st_c):
    """The matching backward: the hard part needs only the student log-sum-exps (stats row 0)."""
    hq, hk, hs = bwd(g_hr, g_hc, q_s, k_s, scale_s, None, None, None, st_r, st_c, 0, True, True)
    sq, sk, ss = bwd(g_sr, g_sc, q_s, k_s, scale_s, q_t, k_t, scale_t, st_r, st_c, 0, True, True)
    return hq + sq, hk + sk, hs + ss


@torch.library.custom_op("clipcid_fast::relational_distill", mutates_args=())
def relational_distill_op(
    q_s: Tensor,
    k_s: Tensor,
    scale_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    scale_t: Tensor,
    kind: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(hard_rows [R], hard_cols [C], soft_rows [R], soft_cols [C], stats_rows [2, R], stats_cols [2, C])``;
    stats are the student and teacher log-sum-exps of every row / column (R == C)."""
    args = (q_s, k_s, scale_s, q_t, k_t, scale_t, kind)
    if backend == "cpu":
        return torch.ops.clipcid_fast_C.relational_distill_fwd(*args)
    if backend == "triton":  # one soft pass carries the hard terms (the student statistics are shared)
        sr, sc, st_r, st_c, hr, hc = _triton_fwd(*args, 0, True, True, hard=True)
        return hr, hc, sr, sc, st_r, st_c
    return _split_fwd(_ref_fwd, *args)


@relational_distill_op.register_fake
def _(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, backend):
    dt = _compute_dtype(q_s, k_s, q_t, k_t) if backend == "reference" else torch.float32
    R, C = q_s.shape[0], k_s.shape[0]
    return (
        q_s.new_empty((R,), dtype=dt),
        q_s.new_empty((C,), dtype=dt),
        q_s.new_empty((R,), dtype=dt),
        q_s.new_empty((C,), dtype=dt),
        q_s.new_empty((2, R), dtype=dt),
        q_s.new_empty((2, C), dtype=dt),
    )


@torch.library.custom_op("clipcid_fast::relational_distill_bwd", mutates_args=())
def relational_distill_bwd_op(
    g_hard_rows: Tensor,
    g_hard_cols: Tensor,
    g_soft_rows: Tensor,
    g_soft_cols: Tensor,
    q_s: Tensor,
    k_s: Tensor,
    scale_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    scale_t: Tensor,
    stats_rows: Tensor,
    stats_cols: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(d q_s, d k_s, d scale_s)`` of ``Σ g_hard·hard + Σ g_soft·soft`` (rows and columns)."""
    args = (g_hard_rows, g_hard_cols, g_soft_rows, g_soft_cols, q_s, k_s, scale_s, q_t, k_t, scale_t)
    if backend == "cpu":
        return torch.ops.clipcid_fast_C.relational_distill_bwd(*args, stats_rows, stats_cols)
    if backend == "triton":
        g_hr, g_hc, g_sr, g_sc, *inputs = args
        return _triton_bwd(g_sr, g_sc, *inputs, stats_rows, stats_cols, 0, True, True, hard=(g_hr, g_hc))
    return _split_bwd(_ref_bwd, *args, stats_rows, stats_cols)


@relational_distill_bwd_op.register_fake
def _(g_hr, g_hc, g_sr, g_sc, q_s, k_s, scale_s, q_t, k_t, scale_t, stats_rows, stats_cols, backend):
    return torch.empty_like(q_s), torch.empty_like(k_s), torch.empty_like(scale_s)


def _distill_setup_context(ctx, inputs, output):
    q_s, k_s, scale_s, q_t, k_t, scale_t, _kind, backend = inputs
    ctx.save_for_backward(q_s, k_s, scale_s, q_t, k_t, scale_t, output[4], output[5])
    ctx.backend = backend


def _distill_backward(ctx, g_hr, g_hc, g_sr, g_sc, _g_str, _g_stc):
    q_s, k_s, scale_s, q_t, k_t, scale_t, s_r, s_c = ctx.saved_tensors
    det = lambda x: x.detach()
    grads = [
        torch.zeros_like(like) if g is None else g.detach().contiguous()
        for g, like in ((g_hr, s_r[0]), (g_hc, s_c[0]), (g_sr, s_r[0]), (g_sc, s_c[0]))
    ]
    dq, dk, ds = relational_distill_bwd_op(
        *grads, det(q_s), det(k_s), det(scale_s), det(q_t), det(k_t), det(scale_t), det(s_r), det(s_c), ctx.backend
    )
    # the teacher (q_t, k_t, scale_t) gets no gradient: see the module docstring
    return dq, dk, ds, None, None, None, None, None


relational_distill_op.register_autograd(_distill_backward, setup_context=_distill_setup_context)


def has_cpu_kernel() -> bool:
    """Whether the loaded C++ extension includes this op (older builds do not)."""
    return c_extension() is not None and hasattr(torch.ops.clipcid_fast_C, "relational_rows_fwd")


def has_cpu_distill_kernel() -> bool:
    """Whether the loaded C++ extension includes the one-pass distill op."""
    return c_extension() is not None and hasattr(torch.ops.clipcid_fast_C, "relational_distill_fwd")


if has_cpu_kernel():  # fakes for the raw C++ ops (torch.compile, opcheck)

    @torch.library.register_fake("clipcid_fast_C::relational_rows_fwd")
    def _(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, target_offset, rows, cols, block_rows=0, block_cols=0):
        R = q_s.shape[0] if rows else 0
        C = k_s.shape[0] if cols else 0
        f = torch.float32
        return (
            q_s.new_empty((R,), dtype=f),
            q_s.new_empty((C,), dtype=f),
            q_s.new_empty((2, R), dtype=f),
            q_s.new_empty((2, C), dtype=f),
        )

    @torch.library.register_fake("clipcid_fast_C::relational_rows_bwd")
    def _(g_r, g_c, q_s, k_s, scale_s, q_t, k_t, scale_t, s_r, s_c, off, rows, cols, block_rows=0, block_cols=0):
        return torch.empty_like(q_s), torch.empty_like(k_s), torch.empty_like(scale_s)


if has_cpu_distill_kernel():

    @torch.library.register_fake("clipcid_fast_C::relational_distill_fwd")
    def _(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, block_rows=0, block_cols=0):
        R, C = q_s.shape[0], k_s.shape[0]
        f = torch.float32
        return (
            q_s.new_empty((R,), dtype=f),
            q_s.new_empty((C,), dtype=f),
            q_s.new_empty((R,), dtype=f),
            q_s.new_empty((C,), dtype=f),
            q_s.new_empty((2, R), dtype=f),
            q_s.new_empty((2, C), dtype=f),
        )

    @torch.library.register_fake("clipcid_fast_C::relational_distill_bwd")
    def _(g_hr, g_hc, g_sr, g_sc, q_s, k_s, scale_s, q_t, k_t, scale_t, s_r, s_c, block_rows=0, block_cols=0):
        return torch.empty_like(q_s), torch.empty_like(k_s), torch.empty_like(scale_s)


# --------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------


def _scale_arg(name: str, s, like: Tensor) -> Tensor:
    if isinstance(s, Tensor):
        if s.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got shape {tuple(s.shape)}")
        if not s.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {s.dtype}")
        if s.device != like.device:
            raise ValueError(f"{name} must be on {like.device}, got {s.device}")
        return s
    if isinstance(s, numbers.Real) and not isinstance(s, bool):
        # torch.full, not torch.tensor: a fill on the device, where torch.tensor copies host data to it (a
        # synchronising host->device copy on a GPU, every step a float scale is passed)
        return torch.full((), float(s), dtype=torch.float32, device=like.device)
    raise ValueError(f"{name} must be a float or a one-element tensor, got {type(s).__name__}")


def _check_args(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, direction, target_offset, impl, distill=False):
    """Validates the public arguments (ValueError) and picks the backend; returns
    ``(q_s, k_s, scale_s, q_t, k_t, scale_t, rows, cols, backend)`` with the scales as tensors and the teacher
    detached."""
    what = "relational_distill" if distill else "relational_rows"
    _validate.tensor("q_s", q_s, ndim=2)
    _validate.tensor("k_s", k_s, ndim=2)
    R, D = q_s.shape
    C = k_s.shape[0]
    if R == 0 or C == 0 or D == 0:
        raise ValueError(f"q_s and k_s must be non-empty, got shapes {tuple(q_s.shape)} and {tuple(k_s.shape)}")
    if k_s.shape[1] != D:
        raise ValueError(f"q_s and k_s must have the same feature dim, got {tuple(q_s.shape)} and {tuple(k_s.shape)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not isinstance(target_offset, int) or isinstance(target_offset, bool):
        raise ValueError(f"target_offset must be an int, got {target_offset!r}")
    rows, cols = direction in ("rows", "both"), direction in ("cols", "both")
    given = [x is not None for x in (q_t, k_t, scale_t)]
    if any(given) and not all(given):
        raise ValueError(f"q_t, k_t and scale_t must be given together, got q_t, k_t, scale_t given = {given}")
    soft = all(given)
    device = _validate.same_device(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t)
    scale_s = _scale_arg("scale_s", scale_s, q_s)
    if soft:
        _validate.tensor("q_t", q_t, ndim=2)
        _validate.tensor("k_t", k_t, ndim=2)
        if q_t.shape[0] != R or k_t.shape[0] != C or q_t.shape[1] != k_t.shape[1] or q_t.shape[1] == 0:
            raise ValueError(
                f"q_t / k_t must have shapes [{R}, D_t] / [{C}, D_t], got {tuple(q_t.shape)} / {tuple(k_t.shape)}"
            )
        if target_offset != 0:
            raise ValueError(
                f"target_offset applies to hard targets only; with a teacher it must be 0, got {target_offset}"
            )
        scale_t = _scale_arg("scale_t", scale_t, q_s)
        q_t, k_t, scale_t = q_t.detach(), k_t.detach(), scale_t.detach()
    else:
        if kind != "ce":
            raise ValueError(f"a hard diagonal target (no teacher) needs kind='ce', got kind={kind!r}")
        if rows and not 0 <= target_offset <= C - R:
            raise ValueError(f"target_offset must be in [0, C − R] = [0, {C - R}] for {R} rows, got {target_offset}")
        if cols and (R != C or target_offset != 0):
            raise ValueError(
                f"the column direction with hard targets needs R == C and target_offset == 0, got R={R}, C={C}, "
                f"target_offset={target_offset}"
            )
    backend = resolve(impl, device)
    dtypes = {x.dtype for x in (q_s, k_s, q_t, k_t) if x is not None}
    if backend == "cpu" and not (has_cpu_distill_kernel() if distill else has_cpu_kernel()):
        if impl == "cpu":
            raise ValueError(f"impl='cpu': the loaded C++ extension was built without {what}")
        backend = "reference"
    if torch.float64 in dtypes or (backend == "cpu" and torch.float16 in dtypes):
        backend = "reference"
    return q_s, k_s, scale_s, q_t, k_t, scale_t, rows, cols, backend


def relational_kd_rows(
    q_s: Tensor,
    k_s: Tensor,
    scale_s: Tensor | float,
    q_t: Tensor | None = None,
    k_t: Tensor | None = None,
    scale_t: Tensor | float | None = None,
    *,
    kind: str = "kl",
    direction: str = "rows",
    target_offset: int = 0,
    impl: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-row (and/or per-column) similarity-softmax KD loss, fused: the R×C logits are never stored.

    Shapes: ``q_s [R, D]``, ``k_s [C, D]``, ``q_t [R, D_t]``, ``k_t [C, D_t]``; scales are floats or
    one-element tensors (``scale_s`` may require grad). With ``Zs = (scale_s·q_s) k_sᵀ``,
    ``Zt = (scale_t·q_t) k_tᵀ``:

    * ``direction="rows"``: ``[R]`` = ``reference.relational_rows_loss(q_s, k_s, scale_s, q_t, k_t, scale_t,
      kind, target_offset)`` (softmax over each row);
    * ``direction="cols"``: ``[C]`` = the same over columns, ``relational_rows_loss(k_s, q_s, scale_s, k_t,
      q_t, scale_t, kind)``;
    * ``direction="both"``: the tuple ``(rows [R], cols [C])`` from one pass over the same tiles.

    Without a teacher (``q_t = k_t = scale_t = None``) the target is the diagonal (``kind="ce"``,
    InfoNCE): row i targets column ``i + target_offset`` (``0 ≤ target_offset ≤ C − R``); the column
    direction needs ``R == C`` and ``target_offset == 0``. With a teacher, ``kind="ce"`` is soft
    cross-entropy (open_clip ``DistillClipLoss``) and ``kind="kl"`` is ``KL(p_t ‖ p_s)`` (CLIP-KD).

    Gradients reach ``q_s``, ``k_s`` and ``scale_s``; **the teacher is detached** (no gradient to
    ``q_t``, ``k_t``, ``scale_t``). Losses are float32 (float64 for float64 inputs, which always take
    the reference). Backends: ``"cpu"`` (C++; float32 / bfloat16, bfloat16 as storage; float16 takes
    the reference), ``"triton"`` (float32 / bfloat16 / float16), ``"reference"``; ``"auto"`` picks by device.
    """
    q_s, k_s, scale_s, q_t, k_t, scale_t, rows, cols, backend = _check_args(
        q_s, k_s, scale_s, q_t, k_t, scale_t, kind, direction, target_offset, impl
    )
    lr, lc, _, _ = relational_rows_op(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, target_offset, rows, cols, backend)
    if direction == "both":
        return lr, lc
    return lr if rows else lc


def relational_distill(
    q_s: Tensor,
    k_s: Tensor,
    scale_s: Tensor | float,
    q_t: Tensor,
    k_t: Tensor,
    scale_t: Tensor | float,
    *,
    kind: str = "ce",
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hard diagonal CE and soft loss against the teacher, rows and columns, from ONE pass over the same tiles.

    Shapes: ``q_s, k_s [B, D]``, ``q_t, k_t [B, D_t]`` (square: row i targets column i). Returns
    ``(hard_rows, hard_cols, soft_rows, soft_cols)``, each ``[B]``: ``hard_*`` = ``relational_kd_rows(q_s, k_s,
    scale_s, kind="ce", direction="both")``, ``soft_*`` = ``relational_kd_rows(q_s, k_s, scale_s, q_t, k_t,
    scale_t, kind=kind, direction="both")`` (``kind="ce"``: open_clip's soft cross-entropy; ``"kl"``: CLIP-KD's
    KL). On the C++ backend this costs 2 B×B×D GEMMs forward and 4 backward, against 3 + 6 for the two calls.
    The teacher is detached; gradients reach ``q_s``, ``k_s`` and ``scale_s``.
    """
    if q_t is None or k_t is None or scale_t is None:
        raise ValueError("relational_distill needs a teacher: q_t, k_t and scale_t must be given")
    if isinstance(q_s, Tensor) and isinstance(k_s, Tensor) and q_s.dim() == 2 and k_s.dim() == 2:
        if q_s.shape[0] != k_s.shape[0]:
            raise ValueError(
                f"relational_distill needs as many rows in q_s as in k_s, got {q_s.shape[0]} and {k_s.shape[0]}"
            )
    q_s, k_s, scale_s, q_t, k_t, scale_t, _, _, backend = _check_args(
        q_s, k_s, scale_s, q_t, k_t, scale_t, kind, "both", 0, impl, distill=True
    )
    hr, hc, sr, sc, _, _ = relational_distill_op(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, backend)
    return hr, hc, sr, sc


def distill_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    dist_image_features: Tensor,
    dist_text_features: Tensor,
    dist_logit_scale: Tensor | float,
    impl: str = "auto",
) -> tuple[Tensor, Tensor]:
    """open_clip ``DistillClipLoss`` (= ``reference.distill_clip_loss``) from one fused call
    (:func:`relational_distill`, 6 B×B×D GEMMs forward + backward on CPU): returns
    ``(contrastive_loss, distill_loss)``. The teacher gets no gradient."""
    hr, hc, sr, sc = relational_distill(
        image_features,
        text_features,
        logit_scale,
        dist_image_features,
        dist_text_features,
        dist_logit_scale,
        kind="ce",
        impl=impl,
    )
    return (hr.mean() + hc.mean()) / 2, (sr.mean() + sc.mean()) / 2


def crd_loss(
    s_image: Tensor, s_text: Tensor, s_scale, t_image: Tensor, t_text: Tensor, t_scale, impl: str = "auto"
) -> Tensor:
    """CLIP-KD CRD (= ``reference.crd_loss``): KL both directions from one fused call (2 GEMMs forward,
    4 backward). The teacher gets no gradient."""
    lr, lc = relational_kd_rows(
        s_image, s_text, s_scale, t_image, t_text, t_scale, kind="kl", direction="both", impl=impl
    )
    return (lr.mean() + lc.mean()) / 2
