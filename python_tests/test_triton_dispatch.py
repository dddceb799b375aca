"""Which path the Triton launchers pick, checked without a GPU: inside ``_triton.recording(capability)`` the real
launchers run on ``meta`` tensors and record what they would launch on an A100 / H100.

16-bit inputs must reach ``tl.dot`` as they are (tensor cores: ``UPCAST`` False), fp32 inputs follow
``torch.get_float32_matmul_precision()`` as ``torch.mm`` does, and the grids must give every SM of an H100 at
least two programs at the sizes this library is for. Under the interpreter (CPU tensors) the launchers must
widen 16-bit tiles (its bf16 dots are wrong)."""

import pytest
import torch

from clipcid_fast.ops import _triton, margin_softmax, masked_max_sim, relational_triton

pytestmark = pytest.mark.skipif(_triton.triton is None, reason="needs triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
H100, A100 = (9, 0), (8, 0)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _k1(B, N, D, dtype):
    x, w = _meta(B, D, dtype=dtype), _meta(N, D, dtype=dtype)
    labels = torch.empty(B, dtype=torch.int64, device="meta")
    lse, _ = margin_softmax._triton_fwd(x, w, labels, 32.0, 1.0, 0.5, 0.0)
    margin_softmax._triton_bwd(_meta(B), _meta(B), x, w, labels, lse, 32.0, 1.0, 0.5, 0.0, True, True)


def _k2(B, D, DT, dtype, soft, hard=False):
    q, k = _meta(B, D, dtype=dtype), _meta(B, D, dtype=dtype)
    qt, kt = (_meta(B, DT, dtype=dtype), _meta(B, DT, dtype=dtype)) if soft else (None, None)
    s, st = _meta(()), (_meta(()) if soft else None)
    kind = "kl" if soft else "ce"
    out = relational_triton.triton_fwd(q, k, s, qt, kt, st, kind, 0, True, True, hard=hard)
    h = (_meta(B), _meta(B)) if hard else None
    relational_triton.triton_bwd(_meta(B), _meta(B), q, k, s, qt, kt, st, out[2], out[3], 0, True, True, hard=h)


def _k3(c, k, D, dtype):
    masked_max_sim._triton_max_sim(_meta(c, D, dtype=dtype), _meta(c, D, dtype=dtype), True, 128)
    masked_max_sim._triton_max_sim(_meta(k, D, dtype=dtype), _meta(c, D, dtype=dtype), False, 128)


FAMILIES = {
    "margin_softmax": lambda dt: _k1(1024, 1_000_000, 512, dt),
    "relational": lambda dt: _k2(16384, 512, 768, dt, soft=True),
    "relational_hard": lambda dt: _k2(16384, 768, 768, dt, soft=False),
    "relational_distill": lambda dt: _k2(16384, 512, 512, dt, soft=True, hard=True),
    "masked_max_sim": lambda dt: _k3(32768, 1024, 512, dt),
}


def _record(family, dtype, cap=H100, precision=None):
    with _triton.recording(cap, precision) as launches:
        FAMILIES[family](dtype)
    assert launches, f"{family} recorded no launch"
    return launches


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_path_feeds_tensor_cores_and_fp32_stays_exact(family, dtype):
    for launch in _record(family, dtype):
        assert launch.meta["UPCAST"] is False, (family, launch.kernel.fn.__name__)
        # the default float32 matmul precision is "highest": fp32 dots stay IEEE fp32 (16-bit ones ignore it)
        assert launch.meta["PREC"] == "ieee", (family, launch.kernel.fn.__name__)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_follows_torch_matmul_precision(family):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert {ln.meta["PREC"] for ln in _record(family, torch.float32)} == {"tf32"}
    finally:
        torch.set_float32_matmul_precision(before)
    assert {ln.meta["PREC"] for ln in _record(family, torch.float32, precision="tf32x3")} == {"tf32x3"}


def test_recording_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="fp32_precision"):
        with _triton.recording(H100, "tf16"):
            pass


def test_interpreter_widens_16_bit_tiles():
    if not _triton.interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (the CPU test session)")
    tg = _triton.target(torch.empty(1, dtype=torch.bfloat16))
    assert tg.upcast and tg.capability is None


def _programs(launch):
    n = 1
    for g in launch.grid:
        n *= g
    return n


@pytest.mark.parametrize("cap", [A100, H100], ids=["sm80", "sm90"])
def test_grids_give_every_sm_at_least_two_programs(cap):
    sms = _triton.SMS_BY_CAPABILITY[cap]
    for family in ("margin_softmax", "relational", "relational_hard"):
        for launch in _record(family, torch.bfloat16, cap):
            assert _programs(launch) >= 2 * sms, (family, launch.kernel.fn.__name__, launch.grid)


def test_margin_softmax_forward_splits_classes_only_when_rows_are_few():
    with _triton.recording(H100) as small_b:
        _k1(1024, 1_000_000, 512, torch.bfloat16)
    with _triton.recording(H100) as big_b:
        _k1(65536, 100_000, 512, torch.bfloat16)
    fwd = lambda ls: next(ln for ln in ls if ln.kernel.fn.__name__ == "_ms_fwd_kernel")  # noqa: E731
    assert fwd(small_b).grid[1] > 1
    assert fwd(big_b).grid[1] == 1


def test_float16_rows_reach_the_triton_dedup_kernel_as_float16():
    """The embed cache is fp16: the Triton backend takes it as stored (tensor cores), the C++ one widens it."""
    x = torch.empty(8, 4, dtype=torch.float16)
    assert masked_max_sim._backend_for("triton", x) == ("triton", torch.float16)
    assert masked_max_sim._backend_for("reference", x)[1] == torch.float32
