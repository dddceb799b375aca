"""Process group (gloo) for torchrun: rank / world, and a stage run on one or all ranks with agreed failure."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch


class _Comm:
    """Rank / world and the few collectives the pipeline needs (gloo, CPU tensors)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.group, self.owned = dist, None, False
        if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("gloo")
            self.owned = True
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != "gloo":
                self.group = dist.new_group(backend="gloo")
        else:
            self.rank, self.world = 0, 1

    def barrier(self) -> None:
        if self.world > 1:
            self.dist.barrier(group=self.group)

    def agree(self, error: BaseException | None) -> None:
        """Collective: raise on every rank if any rank failed (so no rank waits forever)."""
        if self.world > 1:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64)
            self.dist.all_reduce(flag, group=self.group)
            if error is None and int(flag) > 0:
                raise RuntimeError("another rank failed; see its error")
        if error is not None:
            raise error

    def broadcast(self, arr: np.ndarray | None, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        if self.world == 1:
            return arr
        t = torch.from_numpy(np.ascontiguousarray(arr)) if self.rank == 0 else torch.empty(shape, dtype=torch.float32)
        self.dist.broadcast(t, src=0, group=self.group)
        return t.numpy().astype(dtype, copy=False)

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def run_stage(comm: _Comm, fn: Callable, *, root_only: bool):
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
