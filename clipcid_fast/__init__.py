"""clipcid_fast: fused kernels for CLIP distillation losses (CLIP-CID, CLIP-RD, CLIP-KD).

Imports anywhere: without a GPU, Triton or the C++ extension it runs the PyTorch reference.
``clipcid_fast.backend_summary()`` says which backend runs where.
"""

from __future__ import annotations

from . import reference
from ._backend import summary as backend_summary
from .functional import row_logsumexp

__version__ = "0.1.0"

__all__ = ["__version__", "backend_summary", "reference", "row_logsumexp"]
