"""The hot path (issue 12): a training step through the loss modules reads no values and never syncs the host.

Checked on CPU tensors, so it runs on every machine: :class:`NoHostSync` is a ``TorchDispatchMode`` that raises
on every op that would make a GPU wait for the host or the host wait for a GPU — a value read
(``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``; ``aten.is_nonzero``: ``bool(t)``;
``aten.equal``), an output whose shape depends on values (``nonzero``, ``masked_select``, ``unique``, boolean-mask
indexing, ...) — and, outside the dispatcher, ``Tensor.tolist`` / ``Tensor.numpy`` and a host→device copy of host
data (``torch.tensor(...)`` / ``Tensor.new_tensor`` inside a forward). Ops of this package registered with
``torch.library.custom_op`` are followed into their Python implementations (a mode sees only the outer op
otherwise); C++ kernels and Triton launches are device work (``scripts/gpu_check.sh`` checks those on a GPU with
``torch.cuda.set_sync_debug_mode("error")``, ``test_gpu_launch_hygiene.py``).

Every module runs forward + backward under the mode with ragged shapes, and with logit scales as tensors (one
requiring grad) and as Python floats. The last tests show the mode catches what it must: the debug flag
``check_values=True`` (the module's default before issue 12) raises inside it.
"""

import collections
import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _host_sync import why_it_syncs
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from clipcid_fast import _backend
from clipcid_fast.losses import (
    ClipKDLoss,
    ClipRDLoss,
    ClusterDiscriminationLoss,
    FusedDistillClipLoss,
    InstanceDiscriminationLoss,
)
from clipcid_fast.ops import margin_softmax as ms


class HostSyncError(AssertionError):
    """An op on the hot path that would sync the host with the device (or read a value on the host)."""


class NoHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` on any op that syncs (``_host_sync.why_it_syncs``); records the ops."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = why_it_syncs(func, args, kwargs)
        if why is not None:
            raise HostSyncError(f"{func}: {why}")
        self.ops[str(func)] += 1
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None and func.namespace == "clipcid_fast":
            # A Python custom op: the mode is off while its handler runs, so run the implementation under it
            # (below autograd, as the dispatcher would) to see the ops inside too.
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


# Calls outside the dispatcher: values to the host, or host data to the device (torch.tensor(x, device=...) is a
# synchronising copy on a GPU: a fill, torch.full, is not). (owner, name) -> why.
_PATCHED = {
    (torch.Tensor, "tolist"): "Tensor.tolist() copies values to the host",
    (torch.Tensor, "numpy"): "Tensor.numpy() copies values to the host",
    (torch.Tensor, "new_tensor"): "Tensor.new_tensor(host data) is a host->device copy on a GPU",
    (torch, "tensor"): "torch.tensor(host data) is a host->device copy on a GPU (use torch.full for a scalar)",
}


def _forbidden(why):
    def raiser(*a, **k):
        raise HostSyncError(why)

    return raiser


@contextlib.contextmanager
def no_host_sync():
    """Forward + backward inside this context must not sync (see the module docstring); yields the mode."""
    saved = {key: getattr(*key) for key in _PATCHED}
    patched_launch = None
    if _backend.triton_module() is not None and _backend.triton_interpreting():
        # Under TRITON_INTERPRET=1 a kernel launch runs on the host in Python (copies, numpy): that is the
        # device's work, not the hot path's host code, so it runs unwatched.
        from triton.runtime import interpreter

        patched_launch = interpreter.GridExecutor.__call__

        def launch(self, *a, **k):
            with _disable_current_modes(), _unpatched(saved):
                return patched_launch(self, *a, **k)

        interpreter.GridExecutor.__call__ = launch
    mode = NoHostSync()
    try:
        for (owner, name), why in _PATCHED.items():
            setattr(owner, name, _forbidden(why))
        with mode:
            yield mode
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
        if patched_launch is not None:
            interpreter.GridExecutor.__call__ = patched_launch


@contextlib.contextmanager
def _unpatched(saved):
    current = {key: getattr(*key) for key in saved}
    try:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)
        yield
    finally:
        for (owner, name), fn in current.items():
            setattr(owner, name, fn)


# --------------------------------------------------------------------------------------------------
# Targets: the backends a training step takes (C++ on CPU; Triton, the GPU's, through the interpreter)
# --------------------------------------------------------------------------------------------------


def _impls():
    out = []
    if _backend.has_c():
        out.append(pytest.param("cpu", id="cpu"))
    triton_ok = _backend.triton_module() is not None and _backend.triton_interpreting()
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(not triton_ok, reason="no interpreter")))
    return out


IMPLS = _impls()
# The relational reference backend too (the fallback without the extension); the margin softmax reference is not
# held to it: reference.margin_softmax_shard_stats uses F.one_hot, whose CPU kernel reads min/max on the host
# (its CUDA kernel does not).
RELATIONAL_IMPLS = [*IMPLS, pytest.param("reference", id="reference")]


def _features(b, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s_i, s_t = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    t_i = F.normalize(torch.randn(b, d, generator=g), dim=1)
    t_t = F.normalize(t_i + 0.5 * torch.randn(b, d, generator=g), dim=1)
    s_i, s_t, t_i, t_t = (a.to(dtype) for a in (s_i, s_t, t_i, t_t))
    return s_i.requires_grad_(), s_t.requires_grad_(), t_i, t_t


def _scales(kind):
    if kind == "tensor":
        return torch.tensor(14.3, requires_grad=True), torch.tensor(50.0)
    return 14.3, 50.0


RELATIONAL_MODULES = {
    "distill": lambda impl: FusedDistillClipLoss(impl=impl),
    "kd": lambda impl: ClipKDLoss(cross_kd_weight=0.5, impl=impl),
    "kd_no_crd": lambda impl: ClipKDLoss(crd_weight=0.0, impl=impl),
    "rd": lambda impl: ClipRDLoss(impl=impl),
    "instance": lambda impl: InstanceDiscriminationLoss(impl=impl),
    "instance_two_towers": lambda impl: InstanceDiscriminationLoss(use_student_text=True, impl=impl),
}


@pytest.mark.parametrize("scales", ["tensor", "float"])
@pytest.mark.parametrize("name", list(RELATIONAL_MODULES))
@pytest.mark.parametrize("impl", RELATIONAL_IMPLS)
def test_relational_modules_do_not_sync(impl, name, scales):
    b, d = (9, 20) if impl == "triton" else (37, 77)  # ragged against every tile size
    s_i, s_t, t_i, t_t = _features(b, d, seed=b + d)
    ls, tls = _scales(scales)
    mod = RELATIONAL_MODULES[name](impl)
    with no_host_sync() as mode:
        out = mod(s_i, s_t, ls, t_i, t_t, tls, output_dict=True)
        sum(out.values()).backward()
    assert sum(mode.ops.values()) > 0 and s_i.grad is not None
    assert all(torch.isfinite(v.detach()).all() for v in out.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_cluster_module_does_not_sync(impl, dtype):
    """The default module (check_values=False) over several class tiles (a ragged last one), labels −1 included,
    weight ≠ 1 (the single pass's backward scales its gradients), learnable and frozen centres."""
    B, N, D = (9, 70, 33) if impl == "triton" else (37, 1100, 512)
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(B, D, generator=g).requires_grad_()
    labels = torch.randint(0, N, (B,), generator=g)
    labels[::5] = -1
    for learnable in (True, False):
        mod = ClusterDiscriminationLoss(
            N, D, margin=(1.0, 0.3, 0.0), weight=0.7, impl=impl, learnable_centres=learnable
        )
        mod = mod.to(dtype)
        emb.grad = None
        with no_host_sync() as mode:
            loss = mod(emb, labels)
            (2.0 * loss).backward()
        assert any("clipcid_fast" in op for op in mode.ops), mode.ops
        assert emb.grad is not None and (mod.centres.grad is not None) == learnable
        assert torch.isfinite(loss.detach())


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_label_cluster_module_does_not_sync(impl):
    """MLCD (``multi_label=True``): labels [B, K] with padding and an unlabelled row, over several class tiles."""
    B, N, D = (9, 70, 33) if impl == "triton" else (37, 1100, 64)
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(B, D, generator=g).requires_grad_()
    labels = torch.stack([torch.randperm(N, generator=g)[:4] for _ in range(B)])
    labels[::3, 2:] = -1
    labels[1] = -1
    mod = ClusterDiscriminationLoss(N, D, weight=0.7, impl=impl, multi_label=True)
    with no_host_sync() as mode:
        loss = mod(emb, labels)
        (2.0 * loss).backward()
    assert any("clipcid_fast" in op for op in mode.ops), mode.ops
    assert torch.isfinite(loss.detach()) and torch.isfinite(mod.centres.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_cluster_stats_do_not_sync(impl):
    """The class-sharded form's op (what a world_size > 1 module calls), with separate gradients for both outputs."""
    B, N, D = (9, 70, 33) if impl == "triton" else (37, 1100, 64)
    x = torch.randn(B, D).requires_grad_()
    w = torch.randn(N, D).requires_grad_()
    lab = torch.randint(-1, N, (B,))
    with no_host_sync():
        lse, tgt = ms.margin_softmax_stats(x, w, lab, 32.0, (1.0, 0.5, 0.0), impl, check_values=False)
        (lse.sum() - 0.5 * tgt.sum()).backward()
        loss = ms.cluster_discrimination_loss(x, w, lab, reduction="none", impl=impl, check_values=False)
        loss.sum().backward()
    assert torch.isfinite(w.grad).all()


def test_module_default_is_the_hot_path():
    mod = ClusterDiscriminationLoss(50, 8)
    assert mod.check_values is False
    x, lab = torch.randn(6, 8, requires_grad=True), torch.tensor([0, 49, -1, 3, 3, 7])
    with no_host_sync():
        mod(x, lab).backward()


# --------------------------------------------------------------------------------------------------
# The mode catches what it must (so the tests above can fail)
# --------------------------------------------------------------------------------------------------


def test_debug_flag_check_values_is_caught():
    """check_values=True (the default before issue 12) reads labels and centres every step: a host sync."""
    mod = ClusterDiscriminationLoss(50, 8, check_values=True)
    x = torch.randn(6, 8, requires_grad=True)
    lab = torch.tensor([0, 49, -1, 3, 3, 7])
    with pytest.raises(HostSyncError, match=r"item|_local_scalar_dense|is_nonzero"), no_host_sync():
        mod(x, lab)
    with pytest.raises(HostSyncError), no_host_sync():
        ms.cluster_discrimination_loss(x, mod.centres, lab)  # the functional's default checks values


@pytest.mark.parametrize(
    "what",
    ["item", "float", "bool", "tolist", "numpy", "nonzero", "mask_index", "mask_assign", "tensor_literal", "unique"],
)
def test_the_mode_catches_syncs(what):
    t = torch.randn(5)
    fns = {
        "item": lambda: t.sum().item(),
        "float": lambda: float(t.sum()),
        "bool": lambda: bool(t.sum() > 0),
        "tolist": lambda: t.tolist(),
        "numpy": lambda: t.numpy(),
        "nonzero": lambda: (t > 0).nonzero(),
        "mask_index": lambda: t[t > 0],
        "mask_assign": lambda: t.clone().__setitem__(t > 0, 0.0),
        "tensor_literal": lambda: torch.tensor(3.0) * t,
        "unique": lambda: torch.unique(t),
    }
    with pytest.raises(HostSyncError), no_host_sync():
        fns[what]()
    fns[what]()  # and outside the mode it runs


@torch.library.custom_op("clipcid_fast::_test_syncs_inside", mutates_args=())
def _syncs_inside(x: torch.Tensor) -> torch.Tensor:
    return x * float(x.sum())


def test_the_mode_looks_inside_python_custom_ops():
    x = torch.randn(3)
    with pytest.raises(HostSyncError, match=r"item|_local_scalar_dense"), no_host_sync():
        _syncs_inside(x)


# --------------------------------------------------------------------------------------------------
# Values checked once where data enters
# --------------------------------------------------------------------------------------------------


def test_check_labels_and_centres():
    mod = ClusterDiscriminationLoss(10, 4)
    mod.check_labels(torch.tensor([0, 9, -1, 3]))
    mod.check_labels(torch.arange(-1, 10, dtype=torch.int32))
    mod.check_centres()
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside \[-1, N\) with N = 10"):
        mod.check_labels(torch.tensor([0, 10, 3]))
    with pytest.raises(ValueError, match=r"labels\[2\] = -2"):
        mod.check_labels(torch.tensor([0, 1, -2]))
    with pytest.raises(ValueError, match="1-D integer"):
        mod.check_labels(torch.tensor([0.0, 1.0]))
    with torch.no_grad():
        mod.centres[7, 2] = math.nan
    with pytest.raises(ValueError, match=r"centres has a non-finite value \(NaN or inf\) at index \[7, 2\]"):
        mod.check_centres()
    with torch.no_grad():
        mod.centres[7] = 0.0
    with pytest.raises(ValueError, match="centres row 7 has zero norm"):
        mod.check_centres()


def test_check_rows_finds_the_first_bad_entry_in_any_slice():
    a = torch.randn(100, 3, dtype=torch.bfloat16)
    ms.check_rows("a", a, rows=7)
    a[64, 1] = math.inf
    a[90] = 0
    with pytest.raises(ValueError, match=r"a has a non-finite value \(NaN or inf\) at index \[64, 1\]"):
        ms.check_rows("a", a, rows=7)
    a[64, 1] = 1.0
    with pytest.raises(ValueError, match="a row 90 has zero norm"):
        ms.check_rows("a", a, rows=7)


def test_from_centroids_checks_the_file_once(tmp_path):
    good = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    np.save(tmp_path / "good.npy", good)
    mod = ClusterDiscriminationLoss.from_centroids(str(tmp_path / "good.npy"), margin=(1.0, 0.3, 0.0), scale=16.0,
                                                   weight=0.5, rank=1, world_size=2, impl="auto")  # fmt: skip
    assert (mod.start, mod.stop) == (6, 12) and torch.equal(mod.centres.detach(), torch.from_numpy(good[6:]))
    bad = good.copy()
    bad[8] = 0.0
    np.save(tmp_path / "bad.npy", bad)
    ClusterDiscriminationLoss.from_centroids(str(tmp_path / "bad.npy"), rank=0, world_size=2)  # rows 0-5: clean
    with pytest.raises(ValueError, match=r"bad\.npy: centres row 2 has zero norm"):
        ClusterDiscriminationLoss.from_centroids(str(tmp_path / "bad.npy"), rank=1, world_size=2)


def test_debug_flag_still_checks_values_every_step():
    mod = ClusterDiscriminationLoss(10, 4, check_values=True)
    with pytest.raises(ValueError, match="labels"):
        mod(torch.randn(3, 4), torch.tensor([0, 10, 1]))
    with torch.no_grad():
        mod.centres[3] = math.nan
    with pytest.raises(ValueError, match="centres"):
        mod(torch.randn(3, 4), torch.tensor([0, 9, 1]))
    fast = ClusterDiscriminationLoss(10, 4)
    with torch.no_grad():
        fast.centres[3] = math.nan
    assert torch.isnan(fast(torch.randn(3, 4), torch.tensor([0, 9, 1])))  # the NaN shows in the loss value
