"""The infrastructure op: every backend against the reference under the error budget."""

import pytest
import torch
from _budget import ULP32, ULP_BF16, assert_within_budget
from conftest import backends_for, on_cuda, require
from hypothesis import given, settings
from hypothesis import strategies as st

import clipcid_fast
from clipcid_fast import _backend, reference

SHAPES = [(1, 1), (7, 3), (33, 517), (257, 1000), (3, 4099)]


def _run(x, impl, grad_out):
    x = x.detach().clone().requires_grad_()
    y = clipcid_fast.row_logsumexp(x, impl=impl)
    (gx,) = torch.autograd.grad(y, x, grad_out)
    return y, gx


def _check(shape, dtype, device, impl, planted, grad=True):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64) * 20
    if planted:  # a huge logit per row: the exp overflows without max-shifting
        x64[:, shape[1] // 2] = 3000.0
    grad_out = torch.randn(shape[0], generator=g, dtype=torch.float64) * 3 + 0.5
    x = x64.to(dtype)
    gold = _run(x.double(), "reference", grad_out)
    same = _run(x, "reference", grad_out.float())
    if grad:
        got = _run(x.to(device), impl, grad_out.float().to(device))
        assert got[1].dtype == dtype
    else:  # forward only (the CUDA C++ kernel has no backward: with a gradient wanted, Triton runs)
        with torch.no_grad():
            got = (clipcid_fast.row_logsumexp(x.to(device), impl=impl),)
    assert got[0].dtype == torch.float32 and got[0].device.type == torch.device(device).type
    ulp = ULP32 if dtype == torch.float32 else ULP_BF16
    assert_within_budget(got[0], same[0], gold[0], c=2.0, slack=1e-6, rtol=4 * ulp, name="lse")
    if not grad:
        return
    # grad = g·exp(x − lse): an lse off by one ulp of |lse| moves it by that much, relatively
    cond = 4 * ulp * (1 + gold[0].abs().max().item())
    assert_within_budget(got[1], same[1], gold[1], c=2.0, slack=1e-6, rtol=cond, name="grad_x")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("planted", [False, True])
def test_cpu_backend_matches_reference(shape, dtype, planted):
    if not _backend.has_c():
        pytest.skip("C++ extension not built")
    _check(shape, dtype, torch.device("cpu"), "cpu", planted)


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (33, 517), (5, 2100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_matches_reference(triton_device, shape, dtype):
    _check(shape, dtype, triton_device, "triton", planted=True)


@pytest.mark.parametrize("target", on_cuda("triton"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("planted", [False, True])
def test_cuda_backends_match_reference(target, shape, dtype, planted):
    impl, device = require(target)
    _check(shape, dtype, device, impl, planted)


@pytest.mark.parametrize("target", on_cuda("cuda", "triton"))
@pytest.mark.parametrize("shape", [*SHAPES, (300, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_matches_reference(target, shape, dtype):
    impl, device = require(target)
    _check(shape, dtype, device, impl, planted=True, grad=False)


def test_auto_picks_a_backend_with_the_reference_result():
    x = torch.randn(20, 300)
    torch.testing.assert_close(clipcid_fast.row_logsumexp(x), reference.row_logsumexp(x), atol=2e-6, rtol=0)


@settings(max_examples=20, deadline=None)
@given(bad=st.sampled_from(["1d", "empty_cols", "int", "list", "impl"]))
def test_bad_inputs_raise_value_error(bad):
    x = torch.randn(4, 5)
    args = {
        "1d": (torch.randn(5),),
        "empty_cols": (torch.randn(4, 0),),
        "int": (torch.ones(4, 5, dtype=torch.int64),),
        "list": ([[1.0]],),
        "impl": (x,),
    }[bad]
    kwargs = {"impl": "fast"} if bad == "impl" else {}
    with pytest.raises(ValueError, match=r"x|impl"):
        clipcid_fast.row_logsumexp(*args, **kwargs)


def test_does_not_mutate_input():
    x = torch.randn(9, 70)
    before = x.clone()
    for impl in ["reference", *backends_for(x.device)]:
        clipcid_fast.row_logsumexp(x, impl=impl)
    assert torch.equal(x, before)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    if backend == "cpu" and not _backend.has_c():
        pytest.skip("C++ extension not built")
    from clipcid_fast.ops.row_logsumexp import row_logsumexp_op

    x = torch.randn(6, 33, requires_grad=True)
    torch.library.opcheck(row_logsumexp_op, (x, backend))


def test_compiles_fullgraph():
    f = torch.compile(lambda x: clipcid_fast.row_logsumexp(x, impl="auto").sum(), fullgraph=True, backend="eager")
    x = torch.randn(8, 40, requires_grad=True)
    y = f(x)
    y.backward()
    torch.testing.assert_close(x.grad, torch.softmax(x.detach(), 1), atol=1e-6, rtol=0)
