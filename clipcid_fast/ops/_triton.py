"""Triton import shared by the op files. Without Triton, ``triton`` is None, ``tl`` a stub and ``jit``
returns the undecorated function, so the modules still import. ``jit(fn)`` and ``jit(**options)(fn)``
(e.g. ``do_not_specialize``) both work, with or without Triton.

Kernel files must not use ``from __future__ import annotations``: Triton reads ``tl.constexpr``
annotations as objects, and the interpreter rejects them as strings."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # pragma: no cover - triton ships with the CUDA torch wheel we pin
    import types

    triton = None
    tl = types.SimpleNamespace(constexpr=int)  # lets `BLOCK: tl.constexpr` annotations evaluate

    def jit(fn=None, **_options):
        return fn if fn is not None else (lambda f: f)


def launch_on(t):
    """The device guard of a Triton launch: Triton launches on the *current* CUDA device's stream, so a tensor on
    another GPU (rank r under torchrun before ``set_device``, or a second GPU in one process) would be read from
    the wrong device's stream; ``torch.library`` custom ops add no guard. No-op for CPU tensors (the interpreter)."""
    import contextlib

    import torch

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
