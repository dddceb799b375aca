"""MLCD, the multi-label cluster loss: the reference against the paper's formula written out, every backend against
the reference under the error budget, the shard decomposition, the module and the bad inputs.

Gold = ``reference.mlcd_loss`` in float64 on the same (dtype-rounded) inputs; "torch" = the same reference run in
the input dtype. The C++ cases run only when the extension was built with ``csrc/cpu/mlcd.cpp``.
"""

import math

import pytest
import torch
from _budget import ULP32, ULP_BF16, assert_within_budget
from conftest import TARGETS_CPU, on_cuda, require
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcid_fast import _backend, reference
from clipcid_fast.losses import ClusterDiscriminationLoss
from clipcid_fast.ops import mlcd

HAS_CPU = mlcd.has_cpu_kernel()
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="this build of clipcid_fast._C has no MLCD kernels")
TARGETS = [pytest.param(p.values[0], marks=needs_cpu, id=p.id) for p in TARGETS_CPU] + on_cuda("triton")
IMPL_TARGETS = [pytest.param(("reference", "cpu"), id="reference"), *TARGETS]
ARCFACE, COSFACE, NONE = (1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.0, 0.0, 0.0)


def _inputs(B, N, D, K, dtype, pad="some", planted=False, seed=0):
    """x, W rounded to ``dtype`` (float64 copies), labels [B, K] of distinct centres (−1 padding), grad_out ≠ 1."""
    g = torch.Generator().manual_seed(seed * 1009 + B * 31 + N * 7 + D * 3 + K)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 3
    w = torch.randn(N, D, generator=g, dtype=torch.float64) * 0.5
    k = min(K, N)
    lab = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B)])
    lab = torch.cat([lab, torch.full((B, K - k), -1)], 1)
    if pad == "some":
        lab[::3, K // 2 :] = -1  # fewer positives on some rows, padding in the middle of a row on others
        lab[1::4, 0] = -1
        lab[B // 2, :] = -1  # a row with no positive at all
    if planted:  # rows near their first positive: large positive logits, the margin's clamp band
        first = lab[:, 0].clamp(min=0)
        x = w[first] * 4 + 1e-3 * torch.randn(B, D, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, generator=g, dtype=torch.float64) * 2 + 0.5
    return x.to(dtype).double(), w.to(dtype).double(), lab, grad_out


def _run(fn, x, w, grad_out):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w)
    gx, gw = torch.autograd.grad(loss, (x, w), grad_out.to(device=loss.device, dtype=loss.dtype))
    return loss.detach().cpu(), gx.cpu(), gw.cpu()


# --------------------------------------------------------------------------------------------------
# the reference is the paper's Eq. 5 (scaled, with the margin on the positives)
# --------------------------------------------------------------------------------------------------


def _eq5(x, w, lab, s, m):
    """Eq. 5 written out row by row with Python sets: log(1 + Σ_pos e^{−sψ}) + log(1 + Σ_neg e^{s cos})."""
    out = []
    for i in range(x.shape[0]):
        pos = {int(v) for v in lab[i] if v >= 0}
        if not pos:
            out.append(0.0)
            continue
        c = [float(torch.dot(x[i], w[j]) / (x[i].norm() * w[j].norm())) for j in range(w.shape[0])]
        psi = lambda v: float(reference.combined_margin(torch.tensor([v], dtype=torch.float64), *m)[0])  # noqa: E731
        p = sum(math.exp(-s * psi(c[j])) for j in pos)
        n = sum(math.exp(s * c[j]) for j in range(w.shape[0]) if j not in pos)
        out.append(math.log1p(p) + math.log1p(n))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("m", [ARCFACE, COSFACE, NONE], ids=["arcface", "cosface", "none"])
def test_reference_is_eq5(m):
    x, w, lab, _ = _inputs(9, 13, 5, 4, torch.float64)
    got = reference.mlcd_loss(x, w, lab, 4.0, *m)
    torch.testing.assert_close(got, _eq5(x, w, lab, 4.0, m), rtol=1e-12, atol=1e-12)


def test_reference_rows_without_positives_and_all_positive_rows_have_finite_gradients():
    """A row with no label: loss 0, no gradient; a row whose every centre is a positive: the negative part is 0."""
    x, w, _, go = _inputs(4, 3, 5, 3, torch.float64)
    lab = torch.tensor([[0, 1, 2], [-1, -1, -1], [2, -1, 0], [1, -1, -1]])
    loss, gx, gw = _run(lambda a, b: reference.mlcd_loss(a, b, lab, 8.0), x, w, go)
    assert loss[1] == 0 and gx[1].abs().max() == 0
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(loss, _eq5(x, w, lab, 8.0, ARCFACE), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# every backend against the reference
# --------------------------------------------------------------------------------------------------


def _check(B, N, D, K, dtype, m, impl, device="cpu", pad="some", planted=False, scale=32.0):
    x, w, lab, go = _inputs(B, N, D, K, dtype, pad, planted)

    def ref(a, b):
        return reference.mlcd_loss(a, b, lab.to(a.device), scale, *m)

    gold = _run(ref, x, w, go)
    same = _run(ref, x.to(dtype), w.to(dtype), go)
    got = _run(lambda a, b: mlcd.mlcd_loss(a, b, lab.to(device), scale, m, impl=impl),
               x.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype), go)  # fmt: skip
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    ulp = ULP32 if dtype == torch.float32 else ULP_BF16
    # two softplus terms of O(s) log-sum-exps: a few fp32 ulps of s is the noise floor
    assert_within_budget(got[0], same[0], gold[0], c=2.0, slack=8 * ULP32 * scale, rtol=4 * ULP32, name="loss")
    # gradients: as test_margin_softmax (|dcos| ≤ 2 s |g| per row, projected off the normalised rows)
    floors = (
        scale * go.abs().max().item() / x.norm(dim=1).min().item(),
        scale * go.abs().sum().item() / w.norm(dim=1).min().item(),
    )
    for k, t, gd, floor, name in zip(got[1:], same[1:], gold[1:], floors, ("grad_x", "grad_w")):
        slack = 64 * ULP32 * scale * gd.abs().max().item() + 8 * ULP32 * floor
        assert_within_budget(k, t, gd, c=2.0, slack=slack, rtol=2 * ulp, name=name)


CASES = [(1, 1, 3, 1), (33, 507, 77, 8), (7, 5, 16, 5), (130, 600, 40, 3), (64, 1025, 33, 2)]


@pytest.mark.parametrize("target", IMPL_TARGETS)
@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(target, shape):
    impl, device = require(target)
    _check(*shape, torch.float32, ARCFACE, impl, device)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("m", [ARCFACE, COSFACE], ids=["arcface", "cosface"])
def test_matches_reference_bf16_and_planted(target, m):
    impl, device = require(target)
    _check(33, 300, 64, 4, torch.bfloat16, m, impl, device)
    _check(40, 200, 24, 3, torch.float32, m, impl, device, planted=True)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(17, 90, 20, 3), (5, 40, 130, 2)], ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(triton_device, shape):
    _check(*shape, torch.float32, ARCFACE, "triton", triton_device)


@pytest.mark.triton
def test_triton_all_positive_and_unlabelled_rows(triton_device):
    x, w, _, go = _inputs(4, 3, 16, 3, torch.float32, pad="none")
    lab = torch.tensor([[0, 1, 2], [-1, -1, -1], [2, -1, 0], [1, -1, -1]])
    gold = _run(lambda a, b: reference.mlcd_loss(a, b, lab, 8.0), x, w, go)
    got = _run(lambda a, b: mlcd.mlcd_loss(a, b, lab.to(a.device), 8.0, impl="triton"),
               x.float().to(triton_device), w.float().to(triton_device), go)  # fmt: skip
    for k, gd in zip(got, gold):
        torch.testing.assert_close(k.double(), gd, rtol=1e-4, atol=1e-5)


@needs_cpu
@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 40), N=st.integers(1, 700), D=st.integers(1, 40), K=st.integers(1, 6), seed=st.integers(0, 99))
def test_cpu_matches_reference_on_random_shapes(B, N, D, K, seed):
    """Ragged shapes around the C++ kernel's tiles (512 classes, 128 rows), K possibly above N."""
    x, w, lab, go = _inputs(B, N, D, K, torch.float32, seed=seed)
    gold = _run(lambda a, b: reference.mlcd_loss(a, b, lab, 32.0), x, w, go)
    same = _run(lambda a, b: reference.mlcd_loss(a, b, lab, 32.0), x.float(), w.float(), go)
    got = _run(lambda a, b: mlcd.mlcd_loss(a, b, lab, 32.0, impl="cpu"), x.float(), w.float(), go)
    assert_within_budget(got[0], same[0], gold[0], c=2.0, slack=8 * ULP32 * 32, rtol=4 * ULP32, name="loss")
    for k, t, gd, name in zip(got[1:], same[1:], gold[1:], ("grad_x", "grad_w")):
        floor = 32 * go.abs().sum().item() / min(x.norm(dim=1).min().item(), w.norm(dim=1).min().item())
        slack = 64 * ULP32 * 32 * gd.abs().max().item() + 8 * ULP32 * floor
        assert_within_budget(k, t, gd, c=2.0, slack=slack, rtol=2 * ULP32, name=name)


# --------------------------------------------------------------------------------------------------
# structure: shards, label order, padding, reductions, the module
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_shards_combine_by_logsumexp(impl):
    """The loss over all centres = softplus(lse over shards of neg) + softplus(lse over shards of pos), each
    shard seeing only its own labels (the others −1): what the class-sharded module computes under torchrun."""
    x, w, lab, _ = _inputs(20, 50, 12, 4, torch.float32)
    x, w = x.float(), w.float()
    full = mlcd.mlcd_loss(x, w, lab, impl=impl)
    negs, poss = [], []
    for lo, hi in ((0, 17), (17, 50)):
        local = torch.where((lab >= lo) & (lab < hi), lab - lo, -1)
        n, p = mlcd.mlcd_stats(x, w[lo:hi], local, impl=impl)
        negs.append(n)
        poss.append(p)
    neg, pos = torch.logsumexp(torch.stack(negs), 0), torch.logsumexp(torch.stack(poss), 0)
    combined = torch.where((lab >= 0).any(1), mlcd.softplus0(neg) + mlcd.softplus0(pos), 0.0)
    torch.testing.assert_close(combined, full, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_label_order_and_padding_do_not_matter(impl):
    x, w, lab, _ = _inputs(16, 40, 8, 5, torch.float32)
    x, w = x.float(), w.float()
    base = mlcd.mlcd_loss(x, w, lab, impl=impl)
    shuffled = lab[:, torch.randperm(5)]
    wider = torch.cat([torch.full((16, 2), -1), lab], 1)
    torch.testing.assert_close(mlcd.mlcd_loss(x, w, shuffled, impl=impl), base, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(mlcd.mlcd_loss(x, w, wider, impl=impl), base, rtol=1e-6, atol=1e-5)


def test_reductions_and_module_mean_over_labelled_rows():
    x, w, lab, _ = _inputs(12, 30, 8, 3, torch.float32)
    x, w = x.float(), w.float()
    rows = reference.mlcd_loss(x.double(), w.double(), lab).float()
    on = (lab >= 0).any(1)
    torch.testing.assert_close(mlcd.mlcd_loss(x, w, lab, reduction="sum"), rows.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mlcd.mlcd_loss(x, w, lab, reduction="mean"), rows.sum() / on.sum(), rtol=1e-5, atol=1e-4)
    mod = ClusterDiscriminationLoss(30, 8, multi_label=True, weight=0.5)
    with torch.no_grad():
        mod.centres.copy_(w)
    torch.testing.assert_close(mod(x, lab), 0.5 * rows.sum() / on.sum(), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"labels must be a 2-D int64 tensor"):
        mod(x, lab[:, 0])


def test_k1_is_not_the_single_label_loss():
    """Documented Choice: the positive and negative parts are separate, so K = 1 differs from the margin softmax
    (log(1 + e^{−sψ}) + log(1 + Σ_{j≠y} e^{s cos}) vs log(1 + Σ_{j≠y} e^{s cos − sψ})), computed here from the
    single-label op's own statistics."""
    x, w, lab, _ = _inputs(10, 20, 6, 1, torch.float64, pad="none")
    y = lab[:, 0]
    lse, tgt = reference.margin_softmax_shard_stats(x, w, y, 32.0)  # lse over every class (target with margin)
    single = lse - tgt
    neg = torch.log(torch.exp(lse) - torch.exp(tgt))  # Σ_{j≠y} e^{s cos}: fine in float64 at these sizes
    expected = torch.log1p(torch.exp(-tgt)) + torch.log1p(torch.exp(neg))
    torch.testing.assert_close(reference.mlcd_loss(x, w, lab), expected, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(expected, single)


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_one_sided_gradients(impl):
    """Frozen centres (no dW work) or constant embeddings: the wanted gradient alone, equal to the reference's."""
    x, w, lab, go = _inputs(21, 600, 16, 3, torch.float32)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    gx_ref, gw_ref = torch.autograd.grad(reference.mlcd_loss(xr, wr, lab), (xr, wr), go)
    xf, wf = x.float(), w.float()
    (gx,) = torch.autograd.grad(mlcd.mlcd_loss(xf.requires_grad_(), wf, lab, impl=impl), xf, go.float())
    (gw,) = torch.autograd.grad(mlcd.mlcd_loss(x.float(), wf.requires_grad_(), lab, impl=impl), wf, go.float())
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-4, atol=1e-4 * gx_ref.abs().max().item())
    torch.testing.assert_close(gw.double(), gw_ref, rtol=1e-4, atol=1e-4 * gw_ref.abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck(backend):
    if backend == "cpu" and not HAS_CPU:
        pytest.skip("C++ kernel not in this build")
    if backend == "triton" and not _backend.triton_usable_on(torch.device("cpu")):
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU tensors")
    x = torch.randn(6, 20, requires_grad=True)
    w = torch.randn(40, 20, requires_grad=True)
    lab = torch.tensor([[0, 5], [-1, -1], [39, -1], [5, 12], [1, 2], [3, 0]])
    torch.library.opcheck(mlcd.mlcd_neg_lse_op, (x, w, lab, 32.0, backend))
    lse = mlcd.mlcd_neg_lse_op(x.detach(), w.detach(), lab, 32.0, backend)
    for need in ((True, True), (True, False), (False, True)):
        args = (torch.randn(6), x.detach(), w.detach(), lab, lse, 32.0, *need, backend)
        torch.library.opcheck(mlcd.mlcd_neg_lse_bwd_op, args)


def test_compiles_fullgraph():
    f = torch.compile(lambda x, w, lab: mlcd.mlcd_loss(x, w, lab, reduction="mean"), fullgraph=True, backend="eager")
    x, w, lab, _ = _inputs(8, 100, 40, 3, torch.float32)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    f(x, w, lab).backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    on = (lab >= 0).any(1)
    (reference.mlcd_loss(xr, wr, lab).sum() / on.sum()).backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# bad inputs: one line naming the argument
# --------------------------------------------------------------------------------------------------


def _bad(match, **over):
    args = {"embeddings": torch.randn(4, 8), "centres": torch.randn(10, 8), "labels": torch.tensor([[0, 1]] * 4)}
    args.update(over)
    with pytest.raises(ValueError, match=match) as e:
        mlcd.mlcd_loss(**args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"labels": torch.tensor([0, 1, 2, 3])}, r"labels must be a 2-d \[B, K\] signed integer tensor"),
        ({"labels": torch.tensor([[0.0, 1.0]] * 4)}, r"labels must be a 2-d"),
        ({"labels": torch.tensor([[0, 1]] * 3)}, r"labels must be \[B = 4, K >= 1\]"),
        ({"labels": torch.tensor([[0, 10]] * 4)}, r"labels\[0, 1\] = 10 is outside \[-1, N\) with N = 10"),
        ({"labels": torch.tensor([[0, -2]] * 4)}, r"labels\[0, 1\] = -2 is outside"),
        ({"labels": torch.tensor([[3, 3]] * 4)}, r"labels row 0 lists centre 3 twice"),
        ({"centres": torch.randn(10, 7)}, r"centres must have D = 8 columns"),
        ({"centres": torch.randn(0, 8)}, r"centres must have at least one row"),
        ({"embeddings": torch.randn(0, 8), "labels": torch.zeros(0, 2, dtype=torch.long)}, r"embeddings must have"),
        ({"scale": -1.0}, r"scale must be > 0"),
        ({"margin": (1.0, 4.0, 0.0)}, r"m2 must be in \[0, pi\)"),
        ({"reduction": "avg"}, r"reduction must be one of"),
        ({"embeddings": torch.full((4, 8), float("nan"))}, r"embeddings has a non-finite value"),
    ],
)
def test_bad_inputs(over, match):
    _bad(match, **over)


@settings(max_examples=30, deadline=None)
@given(K=st.integers(1, 4), bad=st.integers(-50, 50).filter(lambda v: v < -1 or v >= 10), col=st.integers(0, 3))
def test_any_out_of_range_label_is_named(K, bad, col):
    col = min(col, K - 1)
    lab = torch.tensor([list(range(K))] * 3)
    lab[2, col] = bad
    _bad(rf"labels\[2, {col}\] = {bad} is outside", embeddings=torch.randn(3, 8), labels=lab)
