"""The pipeline's process group: rank / world under ``torchrun``, agreed failure, the few host-side collectives of
the semantic-balance stages and of the trainer (gradient mean of replicated parameters, sharded state gathered for
a checkpoint)."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import shard_range


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

    def max(self, value: float) -> float:
        """The largest of every rank's ``value``: one all-reduce of one number on the host (gloo) group."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def host_sum(self, value: float) -> float:
        """The sum of every rank's ``value``: one all-reduce of one number on the host (gloo) group."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return float(t)

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
