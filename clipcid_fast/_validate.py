"""Input checks at the public boundary: a clear ValueError naming the argument and the value.

Kernels assume clean inputs; nothing here runs inside a forward or backward, and nothing reads a
tensor's values unless the caller asked for value checks (``check_finite``), since that syncs.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tensor(name: str, x: object, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    return x


def same_device(**tensors: Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    return next(iter(devices.values()))


def finite(name: str, x: Tensor) -> None:
    """Value check (host sync): only for callers that asked for it."""
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{name} has a non-finite value (NaN or inf) at index {bad}")
