"""Launch hygiene on a real GPU (every test here is ``gpu``: skipped without one, run by scripts/gpu_check.sh).

* No host synchronisation inside the fused forward and backward passes: each op runs under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call (``.item()``,
  ``nonzero``, a blocking device↔host copy). Inputs and scales are device tensors made beforehand, and value
  checks are off (``check_values=False``: those read values by design, at the public boundary).
* int64 offsets: row × stride past 2^31 elements for every pointer that can get there in practice (K1's
  centres, K2's keys, K3's points, the log-sum-exp rows), checked on the rows at the far end.
"""

import contextlib

import pytest
import torch

import clipcid_fast
from clipcid_fast import _backend, reference
from clipcid_fast.losses import ClusterDiscriminationLoss, FusedDistillClipLoss
from clipcid_fast.ops import margin_softmax as ms
from clipcid_fast.ops import masked_max_sim as mms
from clipcid_fast.ops import relational_rows as rr

pytestmark = pytest.mark.gpu
BIG = 2**31 // 512 + 4096  # rows of 512 features: past 2^31 elements


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)
    torch.cuda.synchronize()


def _unit(n, d, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype)
    return x.requires_grad_(grad)


def _needs(gb: float, impl: str = "triton"):
    if impl == "cuda" and not _backend.cuda_kernels_built():
        pytest.skip("clipcid_fast._C was built without the CUDA kernels")
    if impl == "triton" and _backend.triton_module() is None:
        pytest.skip("triton is not installed")
    free, _ = torch.cuda.mem_get_info()
    if free < gb * 1e9:
        pytest.skip(f"needs {gb:.0f} GB of free GPU memory, {free / 1e9:.0f} GB free")


# --------------------------------------------------------------------------------------------------
# No host syncs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_k2_forward_and_backward_do_not_sync(dtype, kind):
    _needs(1)
    q, k = _unit(300, 128, dtype, True, 1), _unit(300, 128, dtype, True, 2)
    qt, kt = _unit(300, 96, dtype, seed=3), _unit(300, 96, dtype, seed=4)
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    t = torch.tensor(50.0, device="cuda")
    with no_host_sync():
        parts = rr.relational_distill(q, k, s, qt, kt, t, kind=kind, impl="triton")
        rows, cols = rr.relational_kd_rows(q, k, s, qt, kt, t, kind=kind, direction="both", impl="triton")
        total = sum(p.sum() for p in parts) + rows.sum() + cols.sum()
        total.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_k2_loss_module_does_not_sync():
    _needs(1)
    q, k = _unit(256, 64, grad=True, seed=1), _unit(256, 64, grad=True, seed=2)
    qt, kt = _unit(256, 64, seed=3), _unit(256, 64, seed=4)
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    t = torch.tensor(50.0, device="cuda")
    loss = FusedDistillClipLoss()
    with no_host_sync():
        sum(loss(q, k, s, qt, kt, t, output_dict=True).values()).backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_k1_forward_and_backward_do_not_sync(dtype, reduction):
    _needs(1)
    x, w = _unit(200, 128, dtype, True, 1), _unit(5000, 128, dtype, True, 2)
    lab = torch.randint(-1, 5000, (200,), device="cuda")
    with no_host_sync():
        loss = ms.cluster_discrimination_loss(x, w, lab, reduction=reduction, impl="triton", check_values=False)
        loss.sum().backward()
        lse, tgt = ms.margin_softmax_stats(x, w, lab, impl="triton", check_values=False)
        (lse.sum() - tgt.sum()).backward()
    assert torch.isfinite(w.grad).all()


def test_k1_loss_module_does_not_sync():
    _needs(1)
    mod = ClusterDiscriminationLoss(5000, 128, check_values=False).cuda()
    x = _unit(200, 128, grad=True, seed=1)
    lab = torch.randint(0, 5000, (200,), device="cuda")
    with no_host_sync():
        mod(x, lab).backward()


@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_k3_ops_do_not_sync(impl, dtype):
    _needs(1, impl)
    x, c = _unit(3000, 128, dtype, seed=1), _unit(64, 128, dtype, seed=2)
    with no_host_sync():
        m, idx = mms.masked_max_similarity(x, impl, check_values=False)
        sim, lab = mms.nearest_centroid(x, c, impl, check_values=False)
    assert m.shape == idx.shape == sim.shape == lab.shape == (3000,)


def test_row_logsumexp_does_not_sync():
    _needs(1)
    x = torch.randn(500, 3000, device="cuda", requires_grad=True)
    with no_host_sync():
        clipcid_fast.row_logsumexp(x, impl="triton").sum().backward()
        if _backend.cuda_kernels_built():
            with torch.no_grad():
                clipcid_fast.row_logsumexp(x, impl="cuda")


# --------------------------------------------------------------------------------------------------
# int64 offsets: row × stride past 2^31 elements
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_row_logsumexp_past_2_31_elements(impl):
    _needs(12, impl)
    x = torch.randn(BIG, 512, device="cuda")
    with torch.no_grad():
        got = clipcid_fast.row_logsumexp(x, impl=impl)[-2048:]
    torch.testing.assert_close(got, torch.logsumexp(x[-2048:], 1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_nearest_centroid_past_2_31_elements(impl):
    _needs(12, impl)
    x = torch.randn(BIG, 512, device="cuda")
    cen = torch.randn(16, 512, device="cuda")
    sim, idx = mms.nearest_centroid(x, cen, impl, check_values=False)
    s_ref, i_ref = reference.nearest_centroid(x[-2048:].double(), cen.double())
    torch.testing.assert_close(sim[-2048:].double(), s_ref, atol=1e-5, rtol=0)
    assert (idx[-2048:] == i_ref).float().mean() > 0.99  # near-ties may differ in the last bit


def test_k1_centres_past_2_31_elements():
    """N·D > 2^31 (bf16 centres): lse against the reference, and dW of the last classes against the
    gradient formula evaluated with that lse (the full reference dW would need another N×D in float64)."""
    _needs(40)
    B, N, D = 8, BIG, 512
    x = _unit(B, D, seed=1).requires_grad_()
    w = _unit(N, D, torch.bfloat16, seed=2).requires_grad_()
    lab = torch.tensor([0, N - 1, N - 2, 5, N - 3, -1, N // 2, N - 64], device="cuda")
    lse, tgt = ms.margin_softmax_stats(x, w, lab, 32.0, (1.0, 0.5, 0.0), impl="triton", check_values=False)
    with torch.no_grad():
        lse_ref, tgt_ref = reference.margin_softmax_shard_stats(x.float(), w.float(), lab, 32.0, 1.0, 0.5, 0.0)
    torch.testing.assert_close(lse, lse_ref, atol=2e-4, rtol=0)
    torch.testing.assert_close(tgt, tgt_ref, atol=2e-4, rtol=0)
    g_lse = torch.linspace(0.5, 1.5, B, device="cuda")
    (gw,) = torch.autograd.grad(lse, w, g_lse)
    tail = w[-64:].detach().double().requires_grad_()
    xh = x.detach().double() / x.detach().double().norm(dim=1, keepdim=True)
    cos = xh @ (tail / tail.norm(dim=1, keepdim=True)).T
    z = torch.where(lab[:, None] - (N - 64) == torch.arange(64, device="cuda"), tgt.double()[:, None], 32.0 * cos)
    (want,) = torch.autograd.grad((g_lse.double()[:, None] * torch.exp(z - lse.double()[:, None])).sum(), tail)
    mask = ~(lab[:, None] - (N - 64) == torch.arange(64, device="cuda")).any(0)  # non-target classes: exact form
    torch.testing.assert_close(gw[-64:][mask].double(), want[mask], atol=2e-2, rtol=2e-2)  # bf16 result


def test_k2_keys_past_2_31_elements():
    """C·D > 2^31 keys (a rectangular KL row loss, both directions): the row losses against the reference, and
    the key gradients of the last rows."""
    _needs(40)
    R, C, D = 16, BIG, 512
    q = _unit(R, D, seed=1).requires_grad_()
    k = _unit(C, D, torch.bfloat16, seed=2).requires_grad_()
    qt, kt = _unit(R, 8, seed=3), _unit(C, 8, seed=4)
    rows = rr.relational_kd_rows(q, k, 10.0, qt, kt, 20.0, kind="kl", direction="rows", impl="triton")
    (gk,) = torch.autograd.grad(rows.sum(), k)
    kf = k.detach().float()
    with torch.no_grad():
        want = reference.relational_rows_loss(q.detach(), kf, 10.0, qt, kt, 20.0, kind="kl")
    torch.testing.assert_close(rows, want, atol=1e-3, rtol=1e-4)
    zs = 10.0 * q.detach() @ kf.T
    ps = torch.softmax(zs, 1)
    pt = torch.softmax(20.0 * qt @ kt.T, 1)
    want_gk = 10.0 * ((ps - pt)[:, -64:].T @ q.detach())  # d/dk_j of Σ_i KL(pt_i ‖ ps_i)
    torch.testing.assert_close(gk[-64:].float(), want_gk, atol=2e-3, rtol=2e-2)  # bf16 result
