"""Triton import shared by the op files, and the one place every Triton kernel is launched from.

Without Triton, ``triton`` is None, ``tl`` a stub and ``jit`` returns the undecorated function, so the modules
still import. ``jit(fn)`` and ``jit(**options)(fn)`` (e.g. ``do_not_specialize``) both work, with or without
Triton.

``launch(kernel, grid, *args, **meta)`` runs a kernel, or, inside ``recording(...)``, records what would run
(kernel, grid, arguments, constexprs, warps, stages) without running it: the static GPU report
(``benchmarks/triton_aot.py``) drives the real launchers with ``meta`` tensors at GPU sizes and compiles exactly
the configurations they pick, so the report cannot drift from what runs.

``target()`` is what the launchers choose tiles and the dot path for: the interpreter (upcast 16-bit tiles to
fp32 before ``tl.dot``: its bf16 dots are wrong) or a CUDA GPU of some compute capability (16-bit operands
straight into ``tl.dot`` on tensor cores), and the fp32 dot precision (``torch.get_float32_matmul_precision()``
as ``torch.mm`` follows it, unless a recording overrides it).

Kernel files must not use ``from __future__ import annotations``: Triton reads ``tl.constexpr``
annotations as objects, and the interpreter rejects them as strings."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

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
    import torch

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class Target:
    """What a launch is compiled for. ``capability`` is (major, minor) of the GPU, None under the interpreter;
    ``fp32_precision`` is the ``tl.dot`` input precision of fp32 operands ("ieee", "tf32" or "tf32x3")."""

    capability: tuple | None
    fp32_precision: str
    sms: int = 1  # streaming multiprocessors: what grids are sized for (1 under the interpreter: small grids)

    @property
    def upcast(self) -> bool:
        """True: widen 16-bit tiles to fp32 before ``tl.dot`` (only the interpreter needs it)."""
        return self.capability is None


@dataclasses.dataclass
class Launch:
    """One recorded launch: what ``kernel[grid](*args, **meta)`` would have run."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict


_RECORDING: list | None = None
_RECORD_TARGET: Target | None = None

# torch.get_float32_matmul_precision() -> tl.dot's input_precision for fp32 operands ("medium" is bf16 in
# torch.mm; the closest tensor-core mode tl.dot has for fp32 operands is TF32, so it maps there too)
_PRECISION = {"highest": "ieee", "high": "tf32", "medium": "tf32"}


def fp32_dot_precision() -> str:
    """``tl.dot``'s input precision for fp32 operands, as ``torch.mm`` follows the same setting."""
    import torch

    return _PRECISION.get(torch.get_float32_matmul_precision(), "ieee")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def target(t) -> Target:
    """The target a launch on tensor ``t`` compiles for (see the module docstring)."""
    if _RECORD_TARGET is not None:
        if _RECORD_TARGET.fp32_precision is None:
            return dataclasses.replace(_RECORD_TARGET, fp32_precision=fp32_dot_precision())
        return _RECORD_TARGET
    prec = fp32_dot_precision()
    if interpreting() or not t.is_cuda:
        return Target(None, prec)
    import torch

    props = _device_props(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return Target((props.major, props.minor), prec, props.multi_processor_count)


@functools.cache
def _device_props(index: int):
    import torch

    return torch.cuda.get_device_properties(index)


# SMs of the GPUs the static report compiles for (A100, H100 SXM); others fall back to the H100's count
SMS_BY_CAPABILITY = {(8, 0): 108, (9, 0): 132}


@contextlib.contextmanager
def recording(capability: tuple, fp32_precision: str | None = None):
    """Record launches instead of running them, as if on a GPU of ``capability``; yields the list of
    :class:`Launch`. Use with ``meta`` tensors: nothing is allocated or computed. ``fp32_precision`` None
    follows ``torch.get_float32_matmul_precision()`` as a real launch does."""
    global _RECORDING, _RECORD_TARGET
    if fp32_precision not in (None, "ieee", "tf32", "tf32x3"):
        raise ValueError(f"fp32_precision must be 'ieee', 'tf32' or 'tf32x3', got {fp32_precision!r}")
    prev = _RECORDING, _RECORD_TARGET
    cap = tuple(capability)
    _RECORDING, _RECORD_TARGET = [], Target(cap, fp32_precision, SMS_BY_CAPABILITY.get(cap, 132))
    try:
        yield _RECORDING
    finally:
        _RECORDING, _RECORD_TARGET = prev


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)``, or a recorded :class:`Launch` inside :func:`recording`."""
    if _RECORDING is not None:
        _RECORDING.append(Launch(kernel, tuple(grid), args, dict(meta)))
        return
    kernel[grid](*args, **meta)
