"""Workload factories for the eager-reference baselines (and tiny test factories).

Every factory has the signature ``factory(size, D=512, dtype="float32", mode="full", seed=0,
device="cpu", ...) -> Workload``: it builds random, L2-normalised inputs once (``requires_grad`` on the
student-side tensors, and on the class centres of the cluster loss) and returns a callable object.

Modes (what one call of the returned object does):

* ``"fwd"``  — the forward pass **with autograd enabled** (the graph is recorded, as in training), no
  backward. The loss (and its graph) is returned and dropped by the caller.
* ``"bwd"``  — ``backward()`` only. The forward runs in ``setup()``, which :func:`benchmarks._harness.time_fn`
  and :func:`benchmarks._harness.peak_memory_mb` call before each call, outside the timed / measured
  region. So bwd rows are measured directly, not computed as full − fwd; a bwd peak is the extra
  memory over the inputs *and* the saved graph.
* ``"full"`` — forward + backward in one call.

``setup()`` also clears the gradients (``.grad = None``), so no call pays for gradient accumulation.

The losses are the eager reference implementations imported from :mod:`clipcid_fast.reference`
(never re-implemented here). FLOP counts per workload and mode are in :func:`flops` (the README
explains the conventions).
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

MODES = ("fwd", "bwd", "full")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def _reference():
    """``clipcid_fast.reference``. If the package ``__init__`` cannot be imported (it pulls in optional
    backends), load ``reference.py`` by path instead: it only needs torch."""
    try:
        from clipcid_fast import reference

        return reference
    except Exception as e:  # pragma: no cover - only when the package itself is broken
        path = Path(__file__).resolve().parents[1] / "clipcid_fast" / "reference.py"
        warnings.warn(f"import clipcid_fast failed ({e!r}); loading {path} directly", RuntimeWarning, stacklevel=2)
        spec = importlib.util.spec_from_file_location("_clipcid_fast_reference", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPES)}") from None


class Workload:
    """A benchmark callable: ``setup()`` (untimed) then ``__call__()`` (timed). See the module doc."""

    def __init__(
        self,
        op: str,
        mode: str,
        forward: Callable[[], object],
        params: Sequence[torch.Tensor] = (),
        flops: float = float("nan"),
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "fwd" and not params:
            raise ValueError(f"{op}: mode {mode!r} needs tensors that require grad")
        self.op, self.mode, self.flops = op, mode, flops
        self._forward = forward
        self._params = list(params)
        self._loss = None

    def setup(self) -> None:
        for p in self._params:
            p.grad = None
        self._loss = None
        if self.mode == "bwd":
            with torch.enable_grad():
                self._loss = self._forward()

    def __call__(self):
        if self.mode == "fwd":
            with torch.enable_grad():
                return self._forward()
        if self.mode == "full":
            with torch.enable_grad():
                self._forward().backward()
            return None
        loss, self._loss = self._loss, None
        if loss is None:
            raise RuntimeError("mode 'bwd': call setup() before each call")
        loss.backward()
        return None


def _unit_rows(n: int, D: int, gen: torch.Generator, dtype: torch.dtype, device, grad: bool = False):
    """``n`` random unit rows (drawn in fp32 on CPU for reproducibility, then cast and moved)."""
    x = torch.randn(n, D, generator=gen)
    x = torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)
    return x.requires_grad_(grad)


# --------------------------------------------------------------------------------------------------
# FLOP conventions (model FLOPs: the same count for every provider of an op)
# --------------------------------------------------------------------------------------------------


def flops(op: str, mode: str, size: int, D: int = 512, B: int = 1024) -> float:
    """FLOPs credited to one call (see README "FLOP conventions").

    * distill_clip (B = size): one B×B logit GEMM is ``2·B²·D``. Forward = 4 of them (student I·Tᵀ and
      T·Iᵀ, teacher I·Tᵀ and T·Iᵀ, as open_clip's ``DistillClipLoss``); backward = 4 (dI and dT for each
      of the two student matrices; the teacher is frozen); full = 8.
    * cluster_discrimination (N = size, B rows): forward ``2·B·N·D``, backward ``4·B·N·D`` (dX and dW),
      full ``6·B·N·D``.
    * semdedup_max_sim (c = size): forward ``2·c²·D`` (the dense c×c Gram matrix); no backward.
    """
    if op in ("distill_clip", "distill"):
        g = 2.0 * size * size * D
        return {"fwd": 4 * g, "bwd": 4 * g, "full": 8 * g}[mode]
    if op in ("cluster_discrimination", "cluster"):
        g = 2.0 * B * size * D
        return {"fwd": g, "bwd": 2 * g, "full": 3 * g}[mode]
    if op in ("semdedup_max_sim", "dedup"):
        if mode != "fwd":
            raise ValueError("semdedup_max_sim has only a forward")
        return 2.0 * size * size * D
    raise ValueError(f"unknown op {op!r}")


# --------------------------------------------------------------------------------------------------
# Eager-reference workloads
# --------------------------------------------------------------------------------------------------


def distill_clip(
    size: int,
    D: int = 512,
    dtype: str = "float32",
    mode: str = "full",
    seed: int = 0,
    device: str = "cpu",
    student_scale: float = 1 / 0.07,
    teacher_scale: float = 100.0,
) -> Workload:
    """``reference.distill_clip_loss`` with B = ``size``; the timed loss is contrastive + distill.

    Student image/text features and the student logit scale require grad; the teacher's do not
    (frozen teacher). Scales: student 1/0.07 (open_clip's init, already exp'ed), teacher 100.
    """
    ref = _reference()
    dt = to_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    s_img = _unit_rows(size, D, g, dt, device, grad=True)
    s_txt = _unit_rows(size, D, g, dt, device, grad=True)
    t_img = _unit_rows(size, D, g, dt, device)
    t_txt = _unit_rows(size, D, g, dt, device)
    s_scale = torch.tensor(student_scale, dtype=dt, device=device, requires_grad=True)
    t_scale = torch.tensor(teacher_scale, dtype=dt, device=device)

    def forward():
        contrastive, distill = ref.distill_clip_loss(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
        return contrastive + distill

    return Workload("distill_clip", mode, forward, (s_img, s_txt, s_scale), flops("distill_clip", mode, size, D))


def cluster_inputs(size: int, D: int, dtype: str, seed: int, device: str, B: int):
    """``(emb [B, D], centres [size, D], labels [B])`` of the cluster workloads: unit rows that require grad,
    labels uniform in [0, size), drawn in this order from one seeded generator (every provider of
    ``bench_cluster.py`` gets the same values)."""
    dt = to_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    emb = _unit_rows(B, D, g, dt, device, grad=True)
    centres = _unit_rows(size, D, g, dt, device, grad=True)
    labels = torch.randint(0, size, (B,), generator=g).to(device)
    return emb, centres, labels


def cluster_reference_forward(emb, centres, labels, s: float, m2: float):
    """The eager loss of the cluster workloads: ``reference.cluster_discrimination_loss`` (ArcFace m2), mean."""
    ref = _reference()

    def forward():
        return ref.cluster_discrimination_loss(emb, centres, labels, scale=s, m1=1.0, m2=m2, m3=0.0).mean()

    return forward


def cluster(
    size: int,
    D: int = 512,
    dtype: str = "float32",
    mode: str = "full",
    seed: int = 0,
    device: str = "cpu",
    B: int = 1024,
    s: float = 32.0,
    m2: float = 0.3,
) -> Workload:
    """``reference.cluster_discrimination_loss`` (ArcFace: m1 = 1, m2 = 0.3, m3 = 0, s = 32), B = 1024
    embeddings against N = ``size`` class centres; the timed loss is the mean over rows.

    Embeddings and centres require grad; labels are uniform in [0, N).
    """
    emb, centres, labels = cluster_inputs(size, D, dtype, seed, device, B)
    forward = cluster_reference_forward(emb, centres, labels, s, m2)
    return Workload(
        "cluster_discrimination", mode, forward, (emb, centres), flops("cluster_discrimination", mode, size, D, B)
    )


def dedup(
    size: int, D: int = 512, dtype: str = "float32", mode: str = "fwd", seed: int = 0, device: str = "cpu"
) -> Workload:
    """``reference.masked_max_similarity`` on one cluster of c = ``size`` rows (forward only)."""
    if mode != "fwd":
        raise ValueError("dedup has only mode 'fwd'")
    ref = _reference()
    x = _unit_rows(size, D, torch.Generator().manual_seed(seed), to_dtype(dtype), device)

    def forward():
        with torch.no_grad():
            return ref.masked_max_similarity(x)

    return Workload("semdedup_max_sim", mode, forward, (), flops("semdedup_max_sim", mode, size, D))


# --------------------------------------------------------------------------------------------------
# Test factories for the harness itself
# --------------------------------------------------------------------------------------------------


def _alloc_test(mb: float = 200, mode: str = "full", device: str = "cpu", **_) -> Callable[[], None]:
    """A callable that allocates (and touches) ``mb`` MB (10**6 bytes) of float32, then frees it."""
    n = int(mb * 1e6) // 4

    def run():
        if n == 0:
            return None
        x = torch.ones(n, dtype=torch.float32, device=device)  # ones: every page is written
        s = float(x[:: max(1, n // 1000)].sum())
        del x
        return s

    return run
