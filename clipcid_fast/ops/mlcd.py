"""MLCD multi-label cluster loss over up to millions of class centres, never storing B×N.

Computes :func:`clipcid_fast.reference.mlcd_loss` (An et al., ECCV 2024, Eq. 5; maths and choices in
``docs/mlcd.md``): per row, with P_i its K labels (``−1`` = padding),
``ℓ_i = softplus(logsumexp_{p∈P_i} −s·ψ(cos θ_ip)) + softplus(logsumexp_{j∉P_i} s·cos θ_ij)``.

Split of the work:

* the negatives' log-sum-exp (B×N) is the fused op ``clipcid_fast::mlcd_neg_lse`` here: the C++ CPU kernel
  (``csrc/cpu/mlcd.cpp``: class tiles outer, online log-sum-exp, the positives masked to −inf tile by tile;
  backward recomputes the logits from the saved lse), the Triton kernels (``mlcd_triton.py``), or the dense
  reference; forward and backward to embeddings and centres;
* the positives' term is B×K×D: gathered rows and plain PyTorch autograd (the reference's own ``combined_margin``).

Both statistics combine across class shards by log-sum-exp, so the class-sharded loss is
``softplus(lse_ranks(neg)) + softplus(lse_ranks(pos))``; ``ClusterDiscriminationLoss(multi_label=True)``
(``losses.py``) does that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate, reference
from .._backend import resolve
from . import margin_softmax as ms

REDUCTIONS = ("none", "mean", "sum")


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _neg_logits(x: Tensor, w: Tensor, labels: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Dense (reference backend only): normalised x, W and the masked logits s·cos (positives −inf)."""
    cd = _out_dtype(x)
    xh = x.to(cd) / x.to(cd).norm(dim=1, keepdim=True)
    wh = w.to(cd) / w.to(cd).norm(dim=1, keepdim=True)
    pos = reference._positive_mask(labels, w.shape[0])
    return xh, wh, torch.where(pos, float("-inf"), scale * (xh @ wh.T))


def _ref_fwd(x, w, labels, scale):
    return torch.logsumexp(_neg_logits(x, w, labels, scale)[2], dim=1)


def _ref_bwd(g, x, w, labels, lse, scale, need_x, need_w):
    cd = _out_dtype(x)
    xh, wh, z = _neg_logits(x, w, labels, scale)
    g, lse = g.to(cd), lse.to(cd)
    dead = torch.isneginf(lse) | (g == 0)  # every centre a positive (lse = −inf), or no weight: no gradient
    p = torch.exp(z - torch.where(dead, 0.0, lse)[:, None])
    dcos = torch.where(dead[:, None], 0.0, scale * g[:, None] * p)
    gx = ms._through_norm(dcos @ wh, x.to(cd), 1.0 / x.to(cd).norm(dim=1)).to(x.dtype) if need_x else x.new_empty(0)
    gw = ms._through_norm(dcos.T @ xh, w.to(cd), 1.0 / w.to(cd).norm(dim=1)).to(w.dtype) if need_w else w.new_empty(0)
    return gx, gw


def _triton():
    from . import mlcd_triton  # imports triton; only when the Triton backend is asked for

    return mlcd_triton


@torch.library.custom_op("clipcid_fast::mlcd_neg_lse", mutates_args=())
def mlcd_neg_lse_op(x: Tensor, w: Tensor, labels: Tensor, scale: float, backend: str) -> Tensor:
    if backend == "cpu":
        return torch.ops.clipcid_fast_C.mlcd_neg_lse_fwd(x.contiguous(), w.contiguous(), labels.contiguous(), scale)
    if backend == "triton":
        return _triton().neg_lse(x, w, labels, scale)
    return _ref_fwd(x, w, labels, scale)


@mlcd_neg_lse_op.register_fake
def _(x, w, labels, scale, backend):
    return x.new_empty((x.shape[0],), dtype=_out_dtype(x))


@torch.library.custom_op("clipcid_fast::mlcd_neg_lse_bwd", mutates_args=())
def mlcd_neg_lse_bwd_op(
    grad: Tensor,
    x: Tensor,
    w: Tensor,
    labels: Tensor,
    lse: Tensor,
    scale: float,
    need_x: bool,
    need_w: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "cpu":
        return torch.ops.clipcid_fast_C.mlcd_neg_lse_bwd(
            grad.float().contiguous(),
            x.contiguous(),
            w.contiguous(),
            labels.contiguous(),
            lse.float().contiguous(),
            scale,
            need_x,
            need_w,
        )
    if backend == "triton":
        return _triton().neg_lse_grads(grad, x, w, labels, lse, scale, need_x, need_w)
    return _ref_bwd(grad, x, w, labels, lse, scale, need_x, need_w)


@mlcd_neg_lse_bwd_op.register_fake
def _(grad, x, w, labels, lse, scale, need_x, need_w, backend):
    return (torch.empty_like(x) if need_x else x.new_empty(0)), (torch.empty_like(w) if need_w else w.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w, labels, scale, backend = inputs
    ctx.save_for_backward(x, w, labels, output)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, g):
    x, w, labels, lse = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_w):
        return None, None, None, None, None
    gx, gw = mlcd_neg_lse_bwd_op(g, x, w, labels, lse, ctx.scale, need_x, need_w, ctx.backend)
    return (gx if need_x else None), (gw if need_w else None), None, None, None


mlcd_neg_lse_op.register_autograd(_backward, setup_context=_setup_context)


def has_cpu_kernel() -> bool:
    """True when the C++ MLCD kernels are registered (an extension built with csrc/cpu/mlcd.cpp)."""
    return hasattr(torch.ops.clipcid_fast_C, "mlcd_neg_lse_fwd")


if has_cpu_kernel():  # fakes for the raw C++ ops (torch.compile, opcheck)
    try:

        @torch.library.register_fake("clipcid_fast_C::mlcd_neg_lse_fwd")
        def _(x, w, labels, scale):
            return x.new_empty((x.shape[0],), dtype=torch.float32)

        @torch.library.register_fake("clipcid_fast_C::mlcd_neg_lse_bwd")
        def _(grad, x, w, labels, lse, scale, need_x, need_w):
            return (torch.empty_like(x) if need_x else x.new_empty(0)), (
                torch.empty_like(w) if need_w else w.new_empty(0)
            )

    except RuntimeError:
        pass


# --------------------------------------------------------------------------------------------------
# The positives (B×K×D, plain autograd) and the public entry points
# --------------------------------------------------------------------------------------------------


def positive_lse(x: Tensor, w: Tensor, labels: Tensor, scale: float, m1: float, m2: float, m3: float) -> Tensor:
    """``logsumexp_{p ∈ P_i} −s·ψ(cos θ_ip)`` per row (−inf where a row has no label here): the K gathered
    centres of each row, normalised, through the reference's ``combined_margin``; differentiable."""
    cd = _out_dtype(x)
    on = labels >= 0
    B, K = labels.shape
    xc = x.to(cd)
    wk = w[labels.clamp(min=0).reshape(-1)].to(cd).reshape(B, K, -1)
    c = ((xc / xc.norm(dim=1, keepdim=True))[:, None, :] * (wk / wk.norm(dim=2, keepdim=True))).sum(2)
    logit = torch.where(on, -scale * reference.combined_margin(c, m1, m2, m3), float("-inf"))
    return reference._logsumexp_rows(logit)  # −inf, zero gradient, on rows with no label here


def softplus0(a: Tensor) -> Tensor:
    """log(1 + e^a), exact (no threshold), 0 with a zero gradient at a = −inf."""
    return torch.logaddexp(a, torch.zeros_like(a))


def check_label_rows(labels: Tensor, num_classes: int, name: str = "labels") -> None:
    """Value check (one host sync): every entry in ``[-1, num_classes)`` and no label twice in a row; else
    ValueError naming the first bad entry."""
    bad = (labels < -1) | (labels >= num_classes)
    if bool(bad.any()):
        i, k = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}[{i}, {k}] = {int(labels[i, k])} is outside [-1, N) with N = {num_classes}")
    srt = labels.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if bool(dup.any()):
        i, k = dup.nonzero()[0].tolist()
        raise ValueError(f"{name} row {i} lists centre {int(srt[i, k + 1])} twice (each positive must appear once)")


def _check(embeddings, centres, labels, scale, margin, m1, m2, m3, check_values):
    _validate.tensor("embeddings", embeddings, ndim=2)
    _validate.tensor("centres", centres, ndim=2)
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 2 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
        raise ValueError(
            f"labels must be a 2-d [B, K] signed integer tensor, got shape {tuple(labels.shape)}, dtype {labels.dtype}"
        )
    _validate.same_device(embeddings=embeddings, centres=centres, labels=labels)
    B, D = embeddings.shape
    if B == 0 or D == 0:
        raise ValueError(f"embeddings must have at least one row and one feature, got shape {tuple(embeddings.shape)}")
    if centres.shape[0] == 0:
        raise ValueError(f"centres must have at least one row, got shape {tuple(centres.shape)}")
    if centres.shape[1] != D:
        raise ValueError(f"centres must have D = {D} columns like embeddings, got shape {tuple(centres.shape)}")
    if labels.shape[0] != B or labels.shape[1] == 0:
        raise ValueError(f"labels must be [B = {B}, K >= 1], got shape {tuple(labels.shape)}")
    s = ms._real("scale", scale, positive=True)
    margins = ms._margins(margin, m1, m2, m3)
    if check_values and not torch.compiler.is_compiling():
        check_label_rows(labels, centres.shape[0])
        ms.check_rows("embeddings", embeddings)
        ms.check_rows("centres", centres)
    return s, margins


def _backend_for(impl: str, x: Tensor, w: Tensor) -> str:
    backend = resolve(impl, x.device)
    if backend == "cpu" and not has_cpu_kernel():
        if impl == "cpu":
            raise ValueError("impl='cpu': the C++ extension was built without the MLCD kernels; rebuild it")
        backend = "reference"
    cpu_dtypes = (torch.float32, torch.bfloat16)
    if x.dtype == torch.float64 or w.dtype == torch.float64:
        backend = "reference"
    if backend == "cpu" and (x.dtype not in cpu_dtypes or w.dtype not in cpu_dtypes):
        backend = "reference"
    return backend


def mlcd_stats(
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
    """Per-row ``(neg_lse [B], pos_lse [B])`` over this shard of centres (:func:`reference.mlcd_shard_stats`):
    labels not on this shard are −1. Both differentiable; the class-sharded loss is
    ``softplus(lse_ranks(neg)) + softplus(lse_ranks(pos))``. Arguments as :func:`mlcd_loss`."""
    s, (a, b, c) = _check(embeddings, centres, labels, scale, margin, m1, m2, m3, check_values)
    backend = _backend_for(impl, embeddings, centres)
    lab = labels.long()
    return mlcd_neg_lse_op(embeddings, centres, lab, s, backend), positive_lse(embeddings, centres, lab, s, a, b, c)


def mlcd_loss(
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
    """MLCD multi-label cluster discrimination (An et al., ECCV 2024, Eq. 5) against N class centres.

    ``ℓ_i = log(1 + Σ_{p∈P_i} e^{−s·ψ(cos θ_ip)}) + log(1 + Σ_{j∉P_i} e^{s·cos θ_ij})``: each row's K labelled
    centres are positives (with the margin ψ of :func:`cluster_discrimination_loss`), every other centre a negative
    (no sampling). Embeddings and centres are L2-normalised inside; exact gradients to both.

    Shapes: ``embeddings [B, D]``, ``centres [N, D]`` (float32 / bfloat16 on the fused backends; float64 and
    float16 take the reference on CPU), ``labels [B, K]`` integers in ``[0, N)`` or ``−1`` (padding; a row with no
    label: loss 0, no gradient). ``margin``, ``scale``, ``impl`` as :func:`cluster_discrimination_loss`;
    ``reduction``: ``"none"`` → ``[B]``, ``"sum"``, ``"mean"`` over rows with a label.

    Validation: shapes, dtypes, empty inputs, bad scale / margins raise ``ValueError``; ``check_values=True`` also
    reads the values (labels in range and not repeated within a row, finite inputs, no zero-norm rows: one host
    sync; pass ``False`` in a hot loop, as ``ClusterDiscriminationLoss(multi_label=True)`` does).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    neg, pos = mlcd_stats(
        embeddings, centres, labels, scale, margin, impl, m1=m1, m2=m2, m3=m3, check_values=check_values
    )
    on = (labels >= 0).any(dim=1)
    loss = torch.where(on, softplus0(neg) + softplus0(pos), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / on.sum().clamp(min=1)
