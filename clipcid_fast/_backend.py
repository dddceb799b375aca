"""Which backends this process has, and how ``impl=`` picks one.

Order for ``impl="auto"``: CUDA tensors → Triton (or the CUDA C++ kernel where an op prefers it);
CPU tensors → the C++ extension ``clipcid_fast._C``; anything missing degrades to the PyTorch
reference with the same result. ``impl="triton"`` on CPU tensors runs under Triton's interpreter,
which must be switched on (``TRITON_INTERPRET=1``) before Triton is first imported.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings

import torch

log = logging.getLogger("clipcid_fast")

IMPLS = ("auto", "triton", "cpu", "cuda", "reference")


def _load_c():
    if os.environ.get("CLIPCID_DISABLE_C") == "1":
        return None, "disabled by CLIPCID_DISABLE_C=1"
    try:
        return importlib.import_module("clipcid_fast._C"), ""
    except ImportError as exc:  # not built (CLIPCID_NO_EXT=1) or built against another torch
        return None, str(exc)


def _load_triton():
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


# Loaded once at import (module globals, not functools caches, so torch.compile traces through).
_C, C_ERROR = _load_c()
_TRITON = _load_triton()
if _C is None:
    warnings.warn(
        f"clipcid_fast: the C++ extension is not available ({C_ERROR}); CPU ops use the PyTorch "
        "reference backend (same results, more time and memory).",
        stacklevel=2,
    )


def c_extension():
    """The loaded ``clipcid_fast._C`` module, or None (the reason is in ``C_ERROR``)."""
    return _C


def has_c() -> bool:
    return _C is not None


def triton_module():
    """The imported ``triton`` package, or None."""
    return _TRITON


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable_on(device: torch.device) -> bool:
    if triton_module() is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())


def cuda_kernels_built() -> bool:
    ext = c_extension()
    return bool(ext is not None and ext.build_info()["cuda_built"])


def resolve(impl: str, device: torch.device, *, has_cuda_kernel: bool = False) -> str:
    """Map a user's ``impl`` to the backend that will run: 'triton', 'cpu', 'cuda' or 'reference'."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda":
            if triton_module() is not None:
                return "triton"
            return "cuda" if has_cuda_kernel and cuda_kernels_built() else "reference"
        return "cpu" if device.type == "cpu" and has_c() else "reference"
    if impl == "triton" and not triton_usable_on(device):
        raise ValueError(
            f"impl='triton' cannot run on device {device}: "
            + (
                "triton is not installed"
                if triton_module() is None
                else "on CPU tensors Triton needs TRITON_INTERPRET=1 set before triton is imported"
            )
        )
    if impl == "cpu":
        if device.type != "cpu":
            raise ValueError(f"impl='cpu' needs CPU tensors, got device {device}")
        if not has_c():
            raise ValueError("impl='cpu' needs the C++ extension clipcid_fast._C, which is not built")
    if impl == "cuda":
        if device.type != "cuda":
            raise ValueError(f"impl='cuda' needs CUDA tensors, got device {device}")
        if not (has_cuda_kernel and cuda_kernels_built()):
            raise ValueError("impl='cuda': this op has no CUDA C++ kernel in this build")
    return impl


def summary() -> str:
    """One human-readable paragraph saying which backend runs where in this process."""
    ext = c_extension()
    lines = []
    if ext is None:
        lines.append("CPU tensors: PyTorch reference backend (C++ extension clipcid_fast._C not available)")
    else:
        info = ext.build_info()
        lines.append(f"CPU tensors: C++ backend clipcid_fast._C ({torch.get_num_threads()} threads, OpenMP)")
        lines.append(f"CUDA C++ kernels: {info['cuda']}")
    tri = triton_module()
    if tri is None:
        lines.append("Triton: not installed (CUDA tensors use the reference backend)")
    else:
        if triton_interpreting():
            mode = "interpreter on CPU tensors (TRITON_INTERPRET=1)"
        elif torch.cuda.is_available():
            mode = "compiled kernels for CUDA tensors"
        else:
            mode = "installed, unused without a GPU (TRITON_INTERPRET=1 runs it on CPU tensors)"
        lines.append(f"Triton {tri.__version__}: {mode}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"GPU: {gpu}; torch {torch.__version__}")
    return "\n".join(lines)
