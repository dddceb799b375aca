"""All communication lives here; ops and kernels are single-device and pure.

* the losses' collectives: :func:`gather_rows`, :func:`sharded_margin_softmax_rows` (functional
  collectives, ``torch.distributed._functional_collectives``, which trace under ``torch.compile`` and run
  on gloo (CPU) and NCCL alike), :func:`scale_grad`;
* the pipeline's process group (:class:`Comm`): rank / world under ``torchrun``, agreed failure, the few
  host-side collectives of the semantic-balance stages and of the trainer (gradient mean of replicated
  parameters, sharded state gathered for a checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
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
        s = funcol.wait_tensor(funcol.all_reduce(torch.exp(lse_local.detach() - m), "sum", group))
        out = m + torch.log(s)
        ctx.save_for_backward(lse_local.detach(), out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        lse_local, out = ctx.saved_tensors
        return grad * torch.exp(lse_local - out), None


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


# ---------------------------------------------------------------------------------------------------------------
# the pipeline's process group


def local_rank() -> int:
    """This process's index on its host (torchrun's ``LOCAL_RANK``; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


class Comm:
    """Rank / world of this process and the host-side collectives the pipeline needs.

    Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the default process group (``backend``: gloo on CPU,
    nccl on CUDA) unless one is already initialised; the semantic-balance stages' CPU collectives always go
    through a gloo group (a second group when the default one is nccl). ``world == 1``: every collective is
    the identity and nothing is initialised."""

    def __init__(self, backend: str = "gloo", device: torch.device | None = None) -> None:
        self.group, self.owned = None, False
        self.device = device if device is not None else torch.device("cpu")
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if backend == "nccl" and self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
            self.owned = True
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
        else:
            self.rank, self.world = 0, 1

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (so no rank waits forever)."""
        if self.world > 1:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
            dist.all_reduce(flag, group=self.group)
            if error is None and int(flag) > 0:
                raise RuntimeError("another rank failed; see its error")
        if error is not None:
            raise error

    def broadcast(self, arr: np.ndarray | None, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        if self.world == 1:
            return arr
        t = torch.from_numpy(np.ascontiguousarray(arr)) if self.rank == 0 else torch.empty(shape, dtype=torch.float32)
        dist.broadcast(t, src=0, group=self.group)
        return t.numpy().astype(dtype, copy=False)

    # -- device collectives of the trainer (default group: nccl on CUDA, gloo on CPU)

    def mean_(self, tensors: list[Tensor]) -> None:
        """In place: each tensor becomes its mean over ranks (one flat all-reduce)."""

        def mean(flat: Tensor) -> None:
            dist.all_reduce(flat)
            flat /= self.world

        self._through_flat(tensors, mean)

    def broadcast_(self, tensors: list[Tensor]) -> None:
        """In place: each tensor becomes rank 0's (one flat broadcast)."""
        self._through_flat(tensors, lambda flat: dist.broadcast(flat, src=0))

    def _through_flat(self, tensors: list[Tensor], collective) -> None:
        # one collective over the tensors' concatenation (default group), copied back in place
        if self.world == 1 or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        collective(flat)
        torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(flat.split([t.numel() for t in tensors]), tensors)])

    def sum(self, t: Tensor) -> Tensor:
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def gather_shards(self, shard: Tensor, total: int) -> Tensor | None:
        """Rank 0 gets the concatenation, on the host, of every rank's row block (``shard_range`` blocks of
        ``total`` rows, which differ by at most one row); other ranks get None.

        One block at a time (point to point, straight to the host): rank 0's device holds one other rank's block
        at a time, not world of them (a checkpoint of 1M fp32 centres and their two AdamW moments would otherwise
        need ~6 GB more on GPU 0)."""
        if self.world == 1:
            return shard
        if self.rank != 0:
            dist.send(shard.detach().contiguous(), dst=0)
            return None
        parts = [shard.detach().cpu()]
        for r in range(1, self.world):
            a, b = shard_range(total, r, self.world)
            block = shard.new_empty((b - a, *shard.shape[1:]))
            dist.recv(block, src=r)
            parts.append(block.cpu())
        return torch.cat(parts)

    def close(self) -> None:
        if self.owned:
            dist.destroy_process_group()
            self.owned = False


def run_stage(comm: Comm, fn: Callable, *, root_only: bool):
    """Run ``fn`` (on rank 0 only if ``root_only``), then agree on success across ranks."""
    result, err = None, None
    if not root_only or comm.rank == 0:
        try:
            result = fn()
        except Exception as e:
            err = e
    comm.agree(err)
    comm.barrier()
    return result
