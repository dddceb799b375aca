"""K1, the cluster-discrimination margin softmax: every backend against the reference under the error budget.

Gold = the reference (``reference.cluster_discrimination_loss`` / ``margin_softmax_shard_stats``) in float64
on the same (dtype-rounded) inputs; "torch" = the same reference run in the input dtype. The C++ tests run
only when the kernels are registered (``torch.ops.clipcid_fast_C.margin_softmax_fwd``), so this file passes
before and after the extension is rebuilt with them.
"""

import math

import pytest
import torch
from _budget import ULP32, ULP_BF16, assert_within_budget
from conftest import TARGETS_CPU, on_cuda, require
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcid_fast import _backend, reference
from clipcid_fast.ops import margin_softmax as ms

HAS_CPU = ms.has_cpu_kernel()
needs_cpu = pytest.mark.skipif(
    not HAS_CPU, reason="C++ kernel clipcid_fast_C::margin_softmax_fwd is not in this build of clipcid_fast._C"
)

# Every kernel case on the C++ CPU op and, on a GPU, on Triton (K1 has no CUDA C++ kernel).
TARGETS = [pytest.param(p.values[0], marks=needs_cpu, id=p.id) for p in TARGETS_CPU] + on_cuda("triton")
# The cases that also run on the reference backend (CPU), the C++ op and Triton on a GPU.
IMPL_TARGETS = [pytest.param(("reference", "cpu"), id="reference"), *TARGETS]

MARGINS = {
    "arcface": (1.0, 0.5, 0.0),
    "cosface": (1.0, 0.0, 0.35),
    "combined": (1.0, 0.3, 0.2),
    "sphereface": (2.0, 0.0, 0.0),
    "none": (1.0, 0.0, 0.0),
}
SHAPES = [(1, 1, 3), (1, 507, 512), (33, 507, 77), (33, 1, 3), (1000, 507, 512), (1000, 1, 77)]


def _inputs(B, N, D, dtype, labels="random", planted=None, seed=0):
    """Inputs rounded to ``dtype`` (returned as float64 copies of the rounded values)."""
    g = torch.Generator().manual_seed(seed * 1009 + B * 31 + N * 7 + D)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 3
    w = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.5
    lab = torch.randint(0, N, (B,), generator=g)
    if labels == "mixed":
        lab[::3] = -1
    elif labels == "none":
        lab[:] = -1
    elif labels == "duplicate":
        lab[:] = N // 2
    if planted == "antipodal":  # θ_y ≈ π: past the fallback point for every margin here
        x = -w[lab.clamp(min=0)] * 2 + 1e-3 * torch.randn(B, D, generator=g, dtype=torch.float64)
    elif planted == "aligned":  # θ_y ≈ 0: large target logits, the clamp band of the arccos
        x = w[lab.clamp(min=0)] * 4 + 1e-4 * torch.randn(B, D, generator=g, dtype=torch.float64)
    elif planted == "mixed":
        half = B // 2
        x[:half] = -w[lab.clamp(min=0)[:half]] + 1e-3 * torch.randn(half, D, generator=g, dtype=torch.float64)
        x[half:] = w[lab.clamp(min=0)[half:]] + 1e-3 * torch.randn(B - half, D, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, generator=g, dtype=torch.float64) * 2 + 0.5  # ≠ 1, some negative
    return x.to(dtype).double(), w.to(dtype).double(), lab, grad_out


def _ref_run(x, w, lab, grad_out, m, scale=32.0):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = reference.cluster_discrimination_loss(x, w, lab, scale, *m)
    gx, gw = torch.autograd.grad(loss, (x, w), grad_out.to(loss.dtype))
    return loss.detach(), gx, gw


def _op_run(x, w, lab, grad_out, m, impl, scale=32.0, device="cpu"):
    """The op on ``device``; the loss and gradients come back on the CPU."""
    x = x.detach().to(device).requires_grad_()
    w = w.detach().to(device).requires_grad_()
    loss = ms.cluster_discrimination_loss(x, w, lab.to(device), scale, margin=m, impl=impl)
    gx, gw = torch.autograd.grad(loss, (x, w), grad_out.to(device=device, dtype=loss.dtype))
    assert loss.device.type == gx.device.type == torch.device(device).type
    return loss.detach().cpu(), gx.cpu(), gw.cpu()


def _check(B, N, D, dtype, m, impl, labels="random", planted=None, scale=32.0, device="cpu"):
    x, w, lab, go = _inputs(B, N, D, dtype, labels, planted)
    gold = _ref_run(x, w, lab, go, m, scale)
    same = _ref_run(x.to(dtype), w.to(dtype), lab, go, m, scale)
    got = _op_run(x.to(dtype), w.to(dtype), lab, go, m, impl, scale, device)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    ulp = ULP32 if dtype == torch.float32 else ULP_BF16
    # The loss is a difference of O(s) numbers: a couple of ulps of s in fp32 is the noise floor.
    assert_within_budget(got[0], same[0], gold[0], c=2.0, slack=8 * ULP32 * scale, rtol=4 * ULP32, name="loss")
    # Gradients: d x_hat = Σ_j dcos_ij ŵ_j with |dcos_i·| ≤ 2 s |g_i|, then projected off x_hat and divided
    # by ‖x‖. The projection cancels (to 0 exactly for D = 1 or aligned targets), so the noise floor is a
    # few fp32 ulps of the unprojected size: s·max|g|/min‖x‖ for x, s·Σ|g|/min‖w‖ for W (a sum over rows);
    # plus a few ulps of the largest gradient and the rounding of the result to the storage dtype.
    floors = (
        scale * go.abs().max().item() / x.norm(dim=1).min().item(),
        scale * go.abs().sum().item() / w.norm(dim=1).min().item(),
    )
    for k, t, gd, floor, name in zip(got[1:], same[1:], gold[1:], floors, ("grad_x", "grad_w")):
        big = gd.abs().max().item()
        slack = 64 * ULP32 * scale * big + 8 * ULP32 * floor
        assert_within_budget(k, t, gd, c=2.0, slack=slack, rtol=2 * ulp, name=name)


def _impls():
    out = ["reference"]
    if HAS_CPU:
        out.append("cpu")
    return out


# --------------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------------


# Every shape × dtype × margin, except that the bf16 reference at B = 1000, D = 512 (a bf16 matmul: slow on
# CPUs without bf16 instructions) runs for ArcFace only.
CPU_CASES = [
    pytest.param(shape, dtype, margin, id=f"{margin}-{dn}-{'x'.join(map(str, shape))}")
    for shape in SHAPES
    for dtype, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for margin in MARGINS
    if not (dtype == torch.bfloat16 and shape[0] == 1000 and shape[2] == 512 and margin != "arcface")
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape,dtype,margin", CPU_CASES)
def test_matches_reference(target, shape, dtype, margin):
    impl, device = require(target)
    _check(*shape, dtype, MARGINS[margin], impl, labels="mixed", device=device)


@pytest.mark.parametrize("target", IMPL_TARGETS)
@pytest.mark.parametrize("margin", list(MARGINS), ids=list(MARGINS))
@pytest.mark.parametrize("planted", ["antipodal", "aligned", "mixed"])
def test_past_pi_fallback_and_aligned_targets(target, margin, planted):
    impl, device = require(target)
    _check(33, 507, 77, torch.float32, MARGINS[margin], impl, planted=planted, device=device)


@pytest.mark.parametrize("target", IMPL_TARGETS)
@pytest.mark.parametrize("labels", ["none", "duplicate", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_label_patterns(target, labels, dtype):
    impl, device = require(target)
    _check(33, 507, 77, dtype, MARGINS["arcface"], impl, labels=labels, device=device)


@needs_cpu
@pytest.mark.parametrize("tile", [1, 7, 64, 0])
def test_cpu_tile_sizes_agree(tile):
    x, w, lab, _ = _inputs(33, 507, 77, torch.float32, "mixed")
    x, w = x.float(), w.float()
    l0, t0 = torch.ops.clipcid_fast_C.margin_softmax_fwd(x, w, lab, 32.0, 1.0, 0.5, 0.0, 0)
    l1, t1 = torch.ops.clipcid_fast_C.margin_softmax_fwd(x, w, lab, 32.0, 1.0, 0.5, 0.0, tile)
    torch.testing.assert_close(l1, l0, atol=4e-5, rtol=0)
    torch.testing.assert_close(t1, t0, atol=1e-5, rtol=0)  # GEMM shapes differ: cos may move an ulp
    g = torch.randn(33), torch.randn(33)
    a = torch.ops.clipcid_fast_C.margin_softmax_bwd(*g, x, w, lab, l0, 32.0, 1.0, 0.5, 0.0, True, True, 0)
    b = torch.ops.clipcid_fast_C.margin_softmax_bwd(*g, x, w, lab, l0, 32.0, 1.0, 0.5, 0.0, True, True, tile)
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("target", IMPL_TARGETS)
def test_shard_stats_with_separate_grads(target):
    """The sharded form: lse and target each with their own gradient, as distributed code feeds them."""
    impl, device = require(target)
    x, w, lab, _ = _inputs(33, 507, 77, torch.float32, "mixed")
    g = torch.Generator().manual_seed(3)
    g_lse = torch.randn(33, generator=g, dtype=torch.float64)
    g_tgt = torch.randn(33, generator=g, dtype=torch.float64)

    def run(fn, dt, dev="cpu"):
        xx = x.to(device=dev, dtype=dt).requires_grad_()
        ww = w.to(device=dev, dtype=dt).requires_grad_()
        lse, tgt = fn(xx, ww, lab.to(dev))
        grads = (g_lse.to(device=dev, dtype=lse.dtype), g_tgt.to(device=dev, dtype=tgt.dtype))
        gx, gw = torch.autograd.grad((lse, tgt), (xx, ww), grads)
        return lse.detach().cpu(), tgt.detach().cpu(), gx.cpu(), gw.cpu()

    def ref(a, b, labels):
        return reference.margin_softmax_shard_stats(a, b, labels, 32.0, 1.0, 0.5, 0.0)

    gold = run(ref, torch.float64)
    same = run(ref, torch.float32)
    op = lambda a, b, labels: ms.margin_softmax_stats(a, b, labels, 32.0, (1.0, 0.5, 0.0), impl)  # noqa: E731
    got = run(op, torch.float32, device)
    for k, t, gd, n in zip(got, same, gold, ("lse", "target", "grad_x", "grad_w")):
        big = gd.abs().max().item()
        assert_within_budget(k, t, gd, c=2.0, slack=64 * ULP32 * 32 * max(big, 1e-30), rtol=4 * ULP32, name=n)


@pytest.mark.parametrize("target", IMPL_TARGETS)
def test_frozen_centres_and_reductions(target):
    impl, device = require(target)
    x, w, lab, _ = _inputs(33, 507, 77, torch.float32, "mixed")
    x, w = x.float().requires_grad_(), w.float()
    xd = x.detach().to(device).requires_grad_()
    for red in ("mean", "sum"):
        loss = ms.cluster_discrimination_loss(xd, w.to(device), lab.to(device), reduction=red, impl=impl)
        per_row = reference.cluster_discrimination_loss(x.detach(), w, lab)
        want = per_row.sum() / ((lab >= 0).sum() if red == "mean" else 1)
        torch.testing.assert_close(loss.detach().cpu(), want, atol=1e-4, rtol=1e-5)
        (gx,) = (g.cpu() for g in torch.autograd.grad(loss, xd))
        xr = x.detach().clone().requires_grad_()
        r = reference.cluster_discrimination_loss(xr, w, lab)
        r = r.sum() / ((lab >= 0).sum() if red == "mean" else 1)
        (gr,) = torch.autograd.grad(r, xr)
        torch.testing.assert_close(gx, gr, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Single pass (C++ CPU, reduction "mean" / "sum" with gradients): gradients made in the forward
# --------------------------------------------------------------------------------------------------

needs_fused = pytest.mark.skipif(
    not ms.has_fused_grad_kernel(), reason="C++ kernel clipcid_fast_C::margin_softmax_fused_grad is not in this build"
)


def _reduced_run(fn, x, w, lab, m, reduction, grad_out, need_w=True, scale=32.0):
    """Loss and gradients of a reduced loss; ``fn`` is the reference or the op. grad_out is a scalar."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(need_w)
    loss = fn(x, w, reduction)
    assert loss.dim() == 0
    grads = torch.autograd.grad(loss, (x, w) if need_w else (x,), torch.tensor(grad_out, dtype=loss.dtype))
    return (loss.detach(), *grads)


def _check_fused(B, N, D, dtype, m, reduction, grad_out, labels="mixed", planted=None, need_w=True, scale=32.0):
    x, w, lab, _ = _inputs(B, N, D, dtype, labels, planted)

    def ref(a, b, red):
        per_row = reference.cluster_discrimination_loss(a, b, lab, scale, *m)
        return per_row.sum() / ((lab >= 0).sum().clamp(min=1) if red == "mean" else 1)

    def op(a, b, red):
        loss = ms.cluster_discrimination_loss(a, b, lab, scale, margin=m, reduction=red, impl="cpu")
        assert "FusedLoss" in type(loss.grad_fn).__name__ or "fused_loss" in str(loss.grad_fn), loss.grad_fn
        return loss

    gold = _reduced_run(ref, x, w, lab, m, reduction, grad_out, need_w, scale)
    same = _reduced_run(ref, x.to(dtype), w.to(dtype), lab, m, reduction, grad_out, need_w, scale)
    got = _reduced_run(op, x.to(dtype), w.to(dtype), lab, m, reduction, grad_out, need_w, scale)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and (not need_w or got[2].dtype == dtype)
    ulp = ULP32 if dtype == torch.float32 else ULP_BF16
    n_on = max(int((lab >= 0).sum()), 1)
    weight = abs(grad_out) / (n_on if reduction == "mean" else 1)  # |d loss / d loss_i| on rows with a target
    # The reduced loss sums B_valid row losses of O(s): a few fp32 ulps of s per row (scaled by the weight).
    loss_slack = 8 * ULP32 * scale * n_on * (1.0 / n_on if reduction == "mean" else 1.0)
    assert_within_budget(got[0], same[0], gold[0], c=2.0, slack=loss_slack, rtol=4 * ULP32, name="loss")
    # As in _check: the floors are s·max|g_i|/min‖x‖ for x and s·Σ|g_i|/min‖w‖ for W, g_i the row weights.
    floors = (scale * weight / x.norm(dim=1).min().item(), scale * weight * n_on / w.norm(dim=1).min().item())
    for k, t, gd, floor, name in zip(got[1:], same[1:], gold[1:], floors, ("grad_x", "grad_w")):
        big = gd.abs().max().item()
        slack = 64 * ULP32 * scale * big + 8 * ULP32 * floor
        assert_within_budget(k, t, gd, c=2.0, slack=slack, rtol=2 * ulp, name=name)


FUSED_CASES = [
    pytest.param(shape, dtype, margin, red, go, id=f"{margin}-{dn}-{'x'.join(map(str, shape))}-{red}-g{go}")
    # (70, 1100, 512): several class tiles of the default size, split over the threads, a ragged last tile
    for shape in [(1, 1, 3), (33, 507, 77), (200, 1000, 64), (70, 1100, 512)]
    for dtype, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for margin in ("arcface", "sphereface", "combined", "none")
    for red, go in (("mean", -1.7), ("sum", 0.25), ("mean", 1.0))
    if not (margin in ("sphereface", "none") and red == "sum")
]


@needs_fused
@pytest.mark.parametrize("shape,dtype,margin,reduction,grad_out", FUSED_CASES)
def test_fused_single_pass_matches_reference(shape, dtype, margin, reduction, grad_out):
    _check_fused(*shape, dtype, MARGINS[margin], reduction, grad_out)


@needs_fused
@pytest.mark.parametrize("labels", ["none", "duplicate", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_label_patterns(labels, dtype):
    _check_fused(33, 507, 77, dtype, MARGINS["arcface"], "mean", 3.0, labels=labels)


@needs_fused
@pytest.mark.parametrize("planted", ["antipodal", "aligned", "mixed"])
@pytest.mark.parametrize("margin", ["arcface", "sphereface", "combined"])
def test_fused_past_pi_fallback_and_aligned_targets(planted, margin):
    _check_fused(33, 507, 77, torch.float32, MARGINS[margin], "sum", -0.5, labels="random", planted=planted)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_frozen_centres(dtype):
    """Centres without requires_grad: only grad_x, and the op does no dW work (empty grad_w)."""
    _check_fused(33, 507, 77, dtype, MARGINS["arcface"], "mean", -2.0, need_w=False)
    x, w, lab, _ = _inputs(33, 507, 77, dtype, "mixed")
    _, gx, gw = ms.margin_softmax_fused_loss_op(x.to(dtype), w.to(dtype), lab, 32.0, 1.0, 0.5, 0.0, True, True, False)
    assert gx.shape == x.shape and gw.numel() == 0


@needs_fused
@pytest.mark.parametrize("rows,tile", [(1, 1), (7, 13), (64, 100), (0, 0), (1000, 4096)])
def test_fused_chunk_sizes_agree_with_two_pass(rows, tile):
    """The raw single-pass op at any row chunk and class tile equals the two-pass ops (the same engine at its
    default chunking): results do not depend on the blocking."""
    x, w, lab, _ = _inputs(33, 507, 77, torch.float32, "mixed")
    x, w = x.float(), w.float()
    g = torch.Generator().manual_seed(4)
    gl, gt = torch.randn(33, generator=g), torch.randn(33, generator=g)
    C = torch.ops.clipcid_fast_C
    for m in (MARGINS["arcface"], MARGINS["sphereface"]):
        lse, tgt = C.margin_softmax_fwd(x, w, lab, 32.0, *m, 0)
        gx, gw = C.margin_softmax_bwd(gl, gt, x, w, lab, lse, 32.0, *m, True, True, 0)
        l1, t1, gx1, gw1 = C.margin_softmax_fused_grad(x, w, lab, gl, gt, 32.0, *m, True, True, rows, tile)
        torch.testing.assert_close(l1, lse, atol=4e-5, rtol=0)
        torch.testing.assert_close(t1, tgt, atol=1e-5, rtol=0)
        torch.testing.assert_close(gx1, gx, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gw1, gw, atol=1e-5, rtol=1e-4)
        l2, t2, gx2, gw2 = C.margin_softmax_fused_grad(x, w, lab, gl, gt, 32.0, *m, False, False, rows, tile)
        assert torch.equal(l2, l1) and torch.equal(t2, t1) and gx2.numel() == 0 and gw2.numel() == 0


@needs_fused
def test_fused_is_deterministic_and_thread_count_only_reorders_sums():
    """Threads own blocks of class tiles and merge per-row partial LSEs in a fixed order: two runs at one
    thread count are bitwise equal, and 1 vs 3 threads differ only by fp32 summation order."""
    x, w, lab, _ = _inputs(70, 1100, 512, torch.float32, "mixed")
    x, w = x.float(), w.float()
    g = torch.Generator().manual_seed(5)
    gl, gt = torch.rand(70, generator=g), -torch.rand(70, generator=g)
    C = torch.ops.clipcid_fast_C
    before = torch.get_num_threads()
    out = {}
    try:
        for n in (1, 3, 3):
            torch.set_num_threads(n)
            out.setdefault(n, []).append(
                C.margin_softmax_fused_grad(x, w, lab, gl, gt, 32.0, 1.0, 0.5, 0.0, True, True)
            )
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out[3]):
        assert torch.equal(a, b)
    for a, b in zip(out[1][0], out[3][0]):
        torch.testing.assert_close(a, b, atol=1e-6 * (1 + b.abs().max().item()), rtol=1e-5)


@needs_fused
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_loss_under_inference_mode_with_class_tiles_over_threads(mode):
    """Evaluation of a loss over a learnable W (several class tiles, split over the threads): the worker
    threads do not inherit the caller's inference mode, so their in-place GEMMs must not go through
    autograd / ADInplaceOrView (this raised "Inplace update to inference tensor" before)."""
    x, w, lab, _ = _inputs(33, 700, 512, torch.float32, "mixed")
    w = torch.nn.Parameter(w.float())
    gold = reference.cluster_discrimination_loss(x, w.detach().double(), lab, 32.0, 1.0, 0.5, 0.0)
    with getattr(torch, mode)():
        for red in ("mean", "none"):
            got = ms.cluster_discrimination_loss(x.float(), w, lab, 32.0, (1.0, 0.5, 0.0), reduction=red, impl="cpu")
            want = gold.sum() / (lab >= 0).sum() if red == "mean" else gold
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@needs_fused
def test_fused_path_is_taken_only_when_gradients_are_wanted():
    x, w, lab, _ = _inputs(33, 507, 77, torch.float32, "mixed")
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    fused = ms.cluster_discrimination_loss(x, w, lab, reduction="mean", impl="cpu")
    assert "FusedLoss" in type(fused.grad_fn).__name__ or "fused_loss" in str(fused.grad_fn)
    per_row = ms.cluster_discrimination_loss(x, w, lab, reduction="none", impl="cpu")
    assert "FusedLoss" not in type(per_row.grad_fn.next_functions[0][0]).__name__
    with torch.no_grad():
        plain = ms.cluster_discrimination_loss(x, w, lab, reduction="mean", impl="cpu")
    torch.testing.assert_close(fused.detach(), plain, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fused.detach(), per_row.detach().sum() / (lab >= 0).sum(), atol=1e-4, rtol=1e-6)


@needs_fused
def test_fused_backward_twice_raises_and_grads_accumulate_once():
    """The stored gradients are scaled in place: a second backward through the graph must fail loudly."""
    x, w, lab, _ = _inputs(9, 40, 12, torch.float32, "mixed")
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    loss = ms.cluster_discrimination_loss(x, w, lab, reduction="sum", impl="cpu")
    (2.0 * loss).backward(retain_graph=True)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (2.0 * reference.cluster_discrimination_loss(xr, wr, lab).sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError):
        loss.backward()


needs_two_pass = pytest.mark.skipif(
    not (ms.has_fused_grad_kernel() and ms.has_scale_kernel()),
    reason="this build of clipcid_fast._C has no two-pass engine (margin_softmax_fused_grad passes=)",
)


@needs_two_pass
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_backward_scales_in_cpp_and_guards_a_second_backward(dtype):
    """The C++ op scales the stored gradients in place (nothing to do at grad_output 1): after an unscaled backward a
    second one is still right (1 + 3 = 4 times the gradient), after a scaled one it raises (the stored tensors were
    changed in place; the versions are bumped as Python's mul_ did)."""
    x, w, lab, _ = _inputs(9, 40, 12, dtype, "mixed")
    x, w = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    loss = ms.cluster_discrimination_loss(x, w, lab, reduction="mean", impl="cpu")
    loss.backward(retain_graph=True)
    g1 = w.grad.float().clone()
    (3.0 * loss).backward(retain_graph=True)
    torch.testing.assert_close(w.grad.float(), 4 * g1, atol=1e-6, rtol=4 * ULP_BF16)
    with pytest.raises(RuntimeError):
        loss.backward()
    v = torch.ones(3)
    torch.ops.clipcid_fast_C.margin_softmax_scale_(v, torch.empty(0), torch.tensor(1.0))
    assert v._version == 0
    torch.ops.clipcid_fast_C.margin_softmax_scale_(v, torch.empty(0), torch.tensor(-2.5, dtype=torch.float64))
    assert v._version == 1 and torch.equal(v, torch.full((3,), -2.5))


TWO_PASS_CASES = [
    pytest.param(shape, dtype, margin, id=f"{margin}-{dn}-{'x'.join(map(str, shape))}")
    # (70, 1100, 512): several class tiles of the default size over the threads, a ragged last tile; (700, 300, 64):
    # several row blocks of the default size ([RB, T] ≤ 1 MB: RB = 128 at T = 2048); (1, 1, 3): one of everything
    for shape in [(1, 1, 3), (33, 507, 77), (70, 1100, 512), (700, 300, 64)]
    for dtype, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"))
    for margin in ("arcface", "sphereface", "none")
]


@needs_two_pass
@pytest.mark.parametrize("shape,dtype,margin", TWO_PASS_CASES)
def test_two_pass_engine_matches_reference(shape, dtype, margin):
    """The class-tile-outer engine (what bf16 centres take at large N: no fp32 [N, D] accumulator; forced here
    with passes=2) under the same budget as the single pass, with per-row weights ≠ the reductions'."""
    B, N, D = shape
    x, w, lab, _ = _inputs(B, N, D, dtype, "mixed")
    m = MARGINS[margin]
    g = torch.Generator().manual_seed(7)
    gl = torch.randn(B, generator=g, dtype=torch.float64)
    gt = torch.randn(B, generator=g, dtype=torch.float64)

    def ref(a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        lse, tgt = reference.margin_softmax_shard_stats(a, b, lab, 32.0, *m)
        ga, gb = torch.autograd.grad((lse * gl.to(lse.dtype)).sum() + (tgt * gt.to(tgt.dtype)).sum(), (a, b))
        return lse.detach(), tgt.detach(), ga, gb

    gold = ref(x, w)
    same = ref(x.to(dtype), w.to(dtype))
    C = torch.ops.clipcid_fast_C
    got = C.margin_softmax_fused_grad(
        x.to(dtype), w.to(dtype), lab, gl.float(), gt.float(), 32.0, *m, True, True, 0, 0, 2
    )
    assert got[2].dtype == dtype and got[3].dtype == dtype
    ulp = ULP32 if dtype == torch.float32 else ULP_BF16
    for k, t, gd, name in zip(got[:2], same[:2], gold[:2], ("lse", "target")):
        assert_within_budget(k, t, gd, c=2.0, slack=8 * ULP32 * 32.0, rtol=4 * ULP32, name=name)
    floors = (
        32.0 * gl.abs().max().item() / x.norm(dim=1).min().item(),
        32.0 * gl.abs().sum().item() / w.norm(dim=1).min().item(),
    )
    for k, t, gd, floor, name in zip(got[2:], same[2:], gold[2:], floors, ("grad_x", "grad_w")):
        slack = 64 * ULP32 * 32.0 * gd.abs().max().item() + 8 * ULP32 * floor
        assert_within_budget(k, t, gd, c=2.0, slack=slack, rtol=2 * ulp, name=name)
    # and against the single pass (fp32: the same sums in another order)
    one = C.margin_softmax_fused_grad(
        x.to(dtype), w.to(dtype), lab, gl.float(), gt.float(), 32.0, *m, True, True, 0, 0, 1
    )
    torch.testing.assert_close(got[0], one[0], atol=4e-5, rtol=0)
    torch.testing.assert_close(got[1], one[1], atol=1e-5, rtol=0)
    if dtype == torch.float32:
        for a, b in zip(got[2:], one[2:]):
            torch.testing.assert_close(a, b, atol=1e-5 * (1 + b.abs().max().item()), rtol=1e-4)


@needs_two_pass
@pytest.mark.parametrize("tile", [1, 7, 64, 0])
@pytest.mark.parametrize("need", [(True, True), (False, True)], ids=["x_and_w", "w_only"])
def test_two_pass_tile_sizes_and_needs_agree(tile, need):
    x, w, lab, _ = _inputs(33, 507, 77, torch.bfloat16, "mixed")
    x, w = x.bfloat16(), w.bfloat16()
    g = torch.Generator().manual_seed(8)
    gl, gt = torch.randn(33, generator=g), torch.randn(33, generator=g)
    C = torch.ops.clipcid_fast_C
    a = C.margin_softmax_fused_grad(x, w, lab, gl, gt, 32.0, 1.0, 0.5, 0.0, True, True, 0, 0, 2)
    b = C.margin_softmax_fused_grad(x, w, lab, gl, gt, 32.0, 1.0, 0.5, 0.0, *need, 0, tile, 2)
    torch.testing.assert_close(b[0], a[0], atol=4e-5, rtol=0)
    torch.testing.assert_close(b[1], a[1], atol=1e-5, rtol=0)
    assert b[2].numel() == (x.numel() if need[0] else 0)
    if need[0]:
        torch.testing.assert_close(b[2].float(), a[2].float(), atol=1e-5, rtol=2 * ULP_BF16)
    torch.testing.assert_close(b[3].float(), a[3].float(), atol=1e-5, rtol=2 * ULP_BF16)


@needs_two_pass
def test_bf16_centres_past_the_accumulator_budget_take_two_passes():
    """N·D above 64M elements with bf16 centres: the default (passes=0) is the two-pass engine, bitwise."""
    B, N, D = 4, 140_000, 512
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, D, generator=g).bfloat16()
    w = torch.randn(N, D, generator=g).bfloat16()
    lab = torch.tensor([0, N - 1, -1, 77_777])
    gl, gt = torch.full((B,), 0.25), torch.full((B,), -0.25)
    C = torch.ops.clipcid_fast_C
    auto = C.margin_softmax_fused_grad(x, w, lab, gl, gt, 32.0, 1.0, 0.5, 0.0, True, True)
    two = C.margin_softmax_fused_grad(x, w, lab, gl, gt, 32.0, 1.0, 0.5, 0.0, True, True, 0, 0, 2)
    for a, b in zip(auto, two):
        assert torch.equal(a, b)
    del two
    one = C.margin_softmax_fused_grad(x, w, lab, gl, gt, 32.0, 1.0, 0.5, 0.0, True, True, 0, 0, 1)
    torch.testing.assert_close(auto[0], one[0], atol=4e-5, rtol=0)
    torch.testing.assert_close(auto[3].float(), one[3].float(), atol=1e-6, rtol=2 * ULP_BF16)
    del one
    # the backward of the two-op form (reduction="none", sharded) takes the forward's lse and skips its own pass
    lse, _ = C.margin_softmax_fwd(x, w, lab, 32.0, 1.0, 0.5, 0.0)
    torch.testing.assert_close(lse, auto[0], atol=4e-5, rtol=0)
    gx, gw = C.margin_softmax_bwd(gl, gt, x, w, lab, lse, 32.0, 1.0, 0.5, 0.0, True, True)
    torch.testing.assert_close(gx.float(), auto[2].float(), atol=1e-6, rtol=2 * ULP_BF16)
    torch.testing.assert_close(gw.float(), auto[3].float(), atol=1e-6, rtol=2 * ULP_BF16)


@needs_two_pass
@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("where", ["centre", "embedding"])
def test_nan_input_gives_a_nan_loss(where, dtype, passes):
    """Without value checks a NaN input must show in the loss value (the trainer watches it): a NaN centre makes
    every row's lse NaN, a NaN embedding its own row's (max_ps and fast_exp used to drop the NaN: finite loss)."""
    x, w, lab, _ = _inputs(33, 700, 77, dtype, "mixed")
    x, w = x.to(dtype), w.to(dtype)
    if where == "centre":
        w[300, 5] = math.nan
    else:
        x[4, 70] = math.nan
    C = torch.ops.clipcid_fast_C
    g = torch.full((33,), 0.1)
    lse, _, _, _ = C.margin_softmax_fused_grad(x, w, lab, g, -g, 32.0, 1.0, 0.5, 0.0, True, True, 0, 0, passes)
    lse0, _ = C.margin_softmax_fwd(x, w, lab, 32.0, 1.0, 0.5, 0.0)
    want = torch.ones(33, dtype=torch.bool) if where == "centre" else torch.arange(33) == 4
    assert torch.equal(torch.isnan(lse), want) and torch.equal(torch.isnan(lse0), want)
    for red in ("mean", "none"):
        loss = ms.cluster_discrimination_loss(x.requires_grad_(), w, lab, reduction=red, impl="cpu", check_values=False)
        assert torch.isnan(loss.detach()).any()


@pytest.mark.triton
def test_triton_backward_keeps_no_fp32_buffer_of_the_centres_size(triton_device):
    """bf16 centres: the dW kernel writes grad_w in bf16 itself; no fp32 [N, D] tensor appears in the backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    B, N, D = 9, 70, 33
    x = torch.randn(B, D, device=triton_device).requires_grad_()
    w = torch.randn(N, D, device=triton_device).bfloat16().requires_grad_()
    lab = torch.randint(-1, N, (B,), device=triton_device)
    loss = ms.cluster_discrimination_loss(x, w, lab, reduction="none", impl="triton", check_values=False)
    big = []

    class Allocs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= N * D:
                    big.append((str(func), tuple(t.shape)))
            return out

    with Allocs():
        (loss * torch.linspace(-1, 2, B, device=triton_device)).sum().backward()
    assert not big, big
    assert w.grad.dtype == torch.bfloat16


@needs_cpu
@pytest.mark.slow
def test_cpu_matches_reference_100k_classes():
    _check(1000, 100_000, 512, torch.float32, MARGINS["arcface"], "cpu", labels="mixed")


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(5, 70, 3), (33, 200, 77)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("margin", ["arcface", "sphereface", "cosface"])
def test_triton_matches_reference(triton_device, shape, dtype, margin):
    _check(*shape, dtype, MARGINS[margin], "triton", labels="mixed", device=triton_device)


@pytest.mark.triton
def test_triton_fallback_and_no_labels(triton_device):
    _check(17, 90, 20, torch.float32, MARGINS["arcface"], "triton", planted="mixed", device=triton_device)
    _check(17, 90, 20, torch.float32, MARGINS["combined"], "triton", labels="none", device=triton_device)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [300, 600])
def test_triton_wide_features_over_several_d_slices(triton_device, dtype, D):
    """D = 300: several K slices per cosine tile and several accumulator slices (the last ragged) of both
    gradients in one program; D = 600: in fp32 past 8 slices of 64, two chunks along D on a second grid axis
    (the GPU layout of D = 512 / 768 / 1024, at interpreter-sized B and N)."""
    _check(9, 70, D, dtype, MARGINS["arcface"], "triton", labels="mixed", device=triton_device)


# --------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck(backend):
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("C++ kernel not in this build")
    if backend == "triton" and not _backend.triton_usable_on(torch.device("cpu")):
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU tensors")
    x = torch.randn(6, 20, requires_grad=True)
    w = torch.randn(40, 20, requires_grad=True)
    lab = torch.tensor([0, 5, -1, 39, 5, 12])
    torch.library.opcheck(ms.margin_softmax_stats_op, (x, w, lab, 32.0, 1.0, 0.5, 0.0, backend))
    g = torch.randn(6), torch.randn(6)
    lse, _ = ms.margin_softmax_stats_op(x.detach(), w.detach(), lab, 32.0, 1.0, 0.5, 0.0, backend)
    for need in ((True, True), (True, False), (False, True)):
        args = (*g, x.detach(), w.detach(), lab, lse, 32.0, 1.0, 0.5, 0.0, *need, backend)
        torch.library.opcheck(ms.margin_softmax_stats_bwd_op, args)


def test_compiles_fullgraph():
    f = torch.compile(
        lambda x, w, lab: ms.cluster_discrimination_loss(x, w, lab, reduction="mean"), fullgraph=True, backend="eager"
    )
    x = torch.randn(8, 40, requires_grad=True)
    w = torch.randn(100, 40, requires_grad=True)
    lab = torch.randint(0, 100, (8,))
    f(x, w, lab).backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.cluster_discrimination_loss(xr, wr, lab).mean().backward()
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad, wr.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# Hypothesis: shapes, and bad inputs → ValueError
# --------------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 40),
    N=st.integers(1, 300),
    D=st.integers(1, 70),
    margin=st.sampled_from(list(MARGINS)),
    labels=st.sampled_from(["random", "mixed", "none", "duplicate"]),
)
def test_random_shapes(B, N, D, margin, labels):
    for impl in _impls():
        _check(B, N, D, torch.float32, MARGINS[margin], impl, labels=labels)
    if torch.cuda.is_available() and _backend.triton_module() is not None:  # the GPU check: Triton compiled
        _check(B, N, D, torch.float32, MARGINS[margin], "triton", labels=labels, device="cuda")


BAD = [
    "label_ge_n",
    "label_lt_m1",
    "nan_x",
    "inf_w",
    "zero_x",
    "zero_w",
    "neg_scale",
    "zero_scale",
    "nan_scale",
    "x_1d",
    "w_3d",
    "int_x",
    "float_labels",
    "labels_2d",
    "empty_batch",
    "no_centres",
    "d_mismatch",
    "labels_len",
    "reduction",
    "impl",
    "m1_zero",
    "margin_len",
]


@settings(max_examples=40, deadline=None)
@given(bad=st.sampled_from(BAD), impl=st.sampled_from(["auto", "reference"]))
def test_bad_inputs_raise_value_error(bad, impl):
    x, w = torch.randn(4, 5), torch.randn(7, 5)
    lab = torch.tensor([0, 6, -1, 3])
    kw = {"impl": impl}
    if bad == "label_ge_n":
        lab = torch.tensor([0, 7, -1, 3])
    elif bad == "label_lt_m1":
        lab = torch.tensor([0, -2, -1, 3])
    elif bad == "nan_x":
        x[1, 2] = math.nan
    elif bad == "inf_w":
        w[3, 0] = math.inf
    elif bad == "zero_x":
        x[2] = 0
    elif bad == "zero_w":
        w[5] = 0
    elif bad == "neg_scale":
        kw["scale"] = -1.0
    elif bad == "zero_scale":
        kw["scale"] = 0.0
    elif bad == "nan_scale":
        kw["scale"] = math.nan
    elif bad == "x_1d":
        x = torch.randn(5)
    elif bad == "w_3d":
        w = torch.randn(7, 5, 1)
    elif bad == "int_x":
        x = torch.ones(4, 5, dtype=torch.int64)
    elif bad == "float_labels":
        lab = lab.float()
    elif bad == "labels_2d":
        lab = lab[:, None]
    elif bad == "empty_batch":
        x, lab = torch.randn(0, 5), torch.zeros(0, dtype=torch.int64)
    elif bad == "no_centres":
        w, lab = torch.randn(0, 5), torch.full((4,), -1)
    elif bad == "d_mismatch":
        w = torch.randn(7, 6)
    elif bad == "labels_len":
        lab = torch.tensor([0, 1])
    elif bad == "reduction":
        kw["reduction"] = "avg"
    elif bad == "impl":
        kw["impl"] = "fast"
    elif bad == "m1_zero":
        kw["m1"] = 0.0
    elif bad == "margin_len":
        kw["margin"] = (0.5,)
    pattern = r"labels|embeddings|centres|scale|reduction|impl|m1|margin"  # the message names the argument
    with pytest.raises(ValueError, match=pattern):
        ms.cluster_discrimination_loss(x, w, lab, **kw)


@needs_cpu
def test_cpu_kernel_rejects_out_of_range_labels_without_value_checks():
    x, w = torch.randn(4, 5), torch.randn(7, 5)
    with pytest.raises(RuntimeError, match="labels"):
        ms.cluster_discrimination_loss(x, w, torch.tensor([0, 7, -1, 3]), impl="cpu", check_values=False)


def test_does_not_mutate_inputs():
    x, w = torch.randn(9, 30), torch.randn(50, 30, dtype=torch.bfloat16)
    lab = torch.randint(-1, 50, (9,))
    before = (x.clone(), w.clone(), lab.clone())
    for impl in _impls():
        ms.cluster_discrimination_loss(x, w, lab, impl=impl)
    assert torch.equal(x, before[0]) and torch.equal(w, before[1]) and torch.equal(lab, before[2])


def test_other_dtypes_layouts_and_impls():
    """float64 / float16 take the reference (float64 keeps float64); non-contiguous inputs are fine."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(7, 12, generator=g, dtype=torch.float64), torch.randn(30, 12, generator=g, dtype=torch.float64)
    lab = torch.tensor([0, 29, -1, 3, 3, 17, 8])
    want = reference.cluster_discrimination_loss(x, w, lab)
    got = ms.cluster_discrimination_loss(x, w, lab)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)
    half = ms.cluster_discrimination_loss(x.half(), w.half(), lab)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    xt = x.float().T.contiguous().T  # non-contiguous view
    for impl in _impls():
        torch.testing.assert_close(
            ms.cluster_discrimination_loss(xt, w.float()[::1], lab, impl=impl), want.float(), atol=1e-4, rtol=1e-5
        )
    with pytest.raises(ValueError, match="impl"):
        ms.cluster_discrimination_loss(x.float(), w.float(), lab, impl="cuda")
