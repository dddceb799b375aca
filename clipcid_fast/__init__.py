"""clipcid_fast: fused kernels for CLIP distillation losses (CLIP-CID, CLIP-RD, CLIP-KD).

Imports anywhere: without a GPU, Triton or the C++ extension it runs the PyTorch reference.
``clipcid_fast.backend_summary()`` says which backend runs where.
"""

from __future__ import annotations

from . import reference
from ._backend import summary as backend_summary
from .functional import (
    cluster_discrimination_loss,
    crd_loss,
    distill_clip_loss,
    masked_max_similarity,
    mlcd_loss,
    nearest_centroid,
    relational_distill,
    relational_kd_rows,
    row_logsumexp,
    semdedup_keep,
)
from .losses import (
    ClipKDLoss,
    ClipRDLoss,
    ClusterDiscriminationLoss,
    FusedDistillClipLoss,
    InstanceDiscriminationLoss,
)

__version__ = "0.1.0"

__all__ = [
    "ClipKDLoss",
    "ClipRDLoss",
    "ClusterDiscriminationLoss",
    "FusedDistillClipLoss",
    "InstanceDiscriminationLoss",
    "__version__",
    "backend_summary",
    "cluster_discrimination_loss",
    "crd_loss",
    "distill_clip_loss",
    "masked_max_similarity",
    "mlcd_loss",
    "nearest_centroid",
    "reference",
    "relational_distill",
    "relational_kd_rows",
    "row_logsumexp",
    "semdedup_keep",
]
