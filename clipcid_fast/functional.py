"""Public functional entry points: validation at the boundary, then one op call.

Every function takes ``impl="auto" | "triton" | "cpu" | "cuda" | "reference"`` (see ``_backend.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validate
from ._backend import resolve
from .ops.margin_softmax import cluster_discrimination_loss, margin_softmax_stats
from .ops.masked_max_sim import masked_max_similarity, nearest_centroid, semdedup_keep
from .ops.mlcd import mlcd_loss, mlcd_stats
from .ops.relational_rows import crd_loss, distill_clip_loss, relational_distill, relational_kd_rows
from .ops.row_logsumexp import row_logsumexp_op

# The fused ops validate their own arguments in their op files; they are re-exported here so one
# module lists every public functional entry point.
__all__ = [
    "cluster_discrimination_loss",
    "crd_loss",
    "distill_clip_loss",
    "margin_softmax_stats",
    "masked_max_similarity",
    "mlcd_loss",
    "mlcd_stats",
    "nearest_centroid",
    "relational_distill",
    "relational_kd_rows",
    "row_logsumexp",
    "semdedup_keep",
]


def row_logsumexp(x: Tensor, impl: str = "auto") -> Tensor:
    """``out[i] = log Σ_j exp(x[i, j])`` for ``x [R, C]``; float32 result (float64 for float64 input).

    Backends: C++ CPU (float32, bfloat16), Triton (float32, bfloat16, float16), CUDA C++ (forward),
    reference (any float dtype). float64 and float16 on CPU always take the reference.
    """
    _validate.tensor("x", x, ndim=2)
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one column, got shape {tuple(x.shape)}")
    backend = resolve(impl, x.device, has_cuda_kernel=True)
    if x.dtype == torch.float64 or (backend == "cpu" and x.dtype == torch.float16):
        backend = "reference"
    if backend == "cuda" and torch.is_grad_enabled() and x.requires_grad:
        backend = "triton"  # the CUDA kernel is forward-only; Triton has the same forward
    return row_logsumexp_op(x, backend)
