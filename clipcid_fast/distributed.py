"""The losses' communication; ops and kernels are single-device and pure.

:func:`gather_rows`, :func:`sharded_margin_softmax_rows` (functional collectives,
``torch.distributed._functional_collectives``, which trace under ``torch.compile`` and run on gloo (CPU) and
NCCL alike), :func:`scale_grad`, and the class-shard arithmetic :func:`shard_range`. The pipeline's process
group (ranks, run-on-rank-0, barriers) is ``pipeline/comm.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _funcol():
    from torch.distributed import _functional_collectives as funcol

    return funcol


def gather_rows(
    x: Tensor, *, rank: int, world_size: int, with_grad: bool, local_slot_grad: bool = True, group=None
) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 (equal row counts on all ranks).

    open_clip's semantics: ``with_grad=True`` gathers with autograd, so gradients of other ranks'
    rows flow back (summed) to their owners; otherwise the gathered copies are constants, except this
    rank's own slot when ``local_slot_grad`` (open_clip's global loss), which is the caller's tensor
    and keeps its gradient. open_clip's ``local_loss`` without ``gather_with_grad`` passes False.
    """
    if world_size == 1:
        return x
    funcol = _funcol()
    group = group if group is not None else dist.group.WORLD
    # torch >= 2.14 names them *_single (the *_tensor names warn); older releases have only *_tensor
    gather_grad = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    if with_grad:
        return gather_grad(x.contiguous(), gather_dim=0, group=group)
    gathered = funcol.wait_tensor(gather(x.detach().contiguous(), gather_dim=0, group=group))
    parts = list(gathered.chunk(world_size, dim=0))
    if local_slot_grad:
        parts[rank] = x
    return torch.cat(parts, dim=0)


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous block ``[start, stop)`` of class centres rank ``rank`` owns.

    The first ``num_classes % world_size`` ranks own one class more, so uneven N spreads by at most one.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if num_classes < world_size:
        raise ValueError(f"num_classes ({num_classes}) must be >= world_size ({world_size})")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _GlobalLogSumExp(torch.autograd.Function):
    """log Σ_ranks exp(lse_r) per row, from an all-reduce of the max and of the rescaled sums: O(B)
    values cross the wire, never B×N. Backward needs no communication: d/d lse_r = exp(lse_r − lse)."""

    @staticmethod
    def forward(ctx, lse_local: Tensor, group) -> Tensor:
        funcol = _funcol()
        m = funcol.wait_tensor(funcol.all_reduce(lse_local.detach(), "max", group))
        m = torch.where(torch.isneginf(m), 0.0, m)  # a row that is −inf on every rank stays −inf, not NaN
        s = funcol.wait_tensor(funcol.all_reduce(torch.exp(lse_local.detach() - m), "sum", group))
        out = m + torch.log(s)
        ctx.save_for_backward(lse_local.detach(), out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        lse_local, out = ctx.saved_tensors
        return torch.where(torch.isneginf(lse_local), 0.0, grad * torch.exp(lse_local - out)), None


def global_logsumexp(lse_local: Tensor, world_size: int, group=None) -> Tensor:
    """``log Σ_ranks exp(lse_r)`` per row (identity for one rank); −inf rows stay −inf with no gradient."""
    if world_size == 1:
        return lse_local
    return _GlobalLogSumExp.apply(lse_local, group if group is not None else dist.group.WORLD)


class _SumOverRanks(torch.autograd.Function):
    """Σ_ranks x_r; each rank's x_r enters the (replicated) sum once, so its gradient is the identity."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        funcol = _funcol()
        return funcol.wait_tensor(funcol.all_reduce(x.detach(), "sum", group))

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def sharded_margin_softmax_rows(lse_local: Tensor, target_local: Tensor, *, world_size: int, group=None) -> Tensor:
    """Per-row cross-entropy of a class-sharded margin softmax: ``logsumexp_ranks(lse_r) − Σ_ranks target_r``.

    ``lse_local``/``target_local`` are this rank's ``margin_softmax_stats`` over its own centres (target 0
    where the label lives on another rank). Every rank gets the same rows; gradients reach only this
    rank's statistics (and through them its centres and its share of the embeddings' gradient).
    """
    if world_size == 1:
        return lse_local - target_local
    group = group if group is not None else dist.group.WORLD
    return _GlobalLogSumExp.apply(lse_local, group) - _SumOverRanks.apply(target_local, group)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` unchanged forward; its gradient times ``factor`` backward (identity when ``factor == 1``).

    A data-parallel trainer averages parameter gradients over ranks, which is exact for losses every rank
    computes in full (open_clip's gather with grad sums the ``world`` replicas' feature gradients, ``world ×``
    each rank's share, and the mean divides it back). A class-sharded loss gives each rank only its shard's
    part, which the gather sums to the share once: scaling its input's gradient by ``world`` puts it on
    the same footing before the mean."""
    return x if factor == 1 else _ScaleGrad.apply(x, float(factor))
