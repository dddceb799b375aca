"""All communication lives here; ops and kernels are single-device and pure.

Gathers use functional collectives (``torch.distributed._functional_collectives``), which trace
under ``torch.compile`` and run on gloo (CPU) and NCCL alike.
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
    if with_grad:
        return funcol.all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=group)
    gathered = funcol.wait_tensor(funcol.all_gather_tensor(x.detach().contiguous(), gather_dim=0, group=group))
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
