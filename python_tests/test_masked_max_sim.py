"""K3: the per-cluster SemDeDup op (masked max cosine) and nearest centroid, every backend against the reference.

Gold = the reference in float64 on the same stored values. M is checked under the error budget (against
the fp32 reference); idx and keep are compared exactly wherever the gold decision is well separated:
idx where the best earlier row beats the runner-up by more than ``SEP`` (elsewhere idx must be a valid
near-argmax), keep where ``|M_gold − (1 − eps)| > SEP`` (two fp32 summation orders may legitimately disagree
on a near-tie). On planted near-duplicate data every keep decision is clear (asserted), so keep must match
everywhere; on exact-duplicate data (bit-identical copies) idx must point at an identical row. (Copies tie at
cos = 1 only in exact arithmetic: which copy wins is decided by the last bit of each fp dot, in the
reference as in the kernels, so "ties → smallest i" holds for exactly equal computed values.)
"""

import math

import pytest
import torch
from _budget import ULP32, assert_within_budget
from conftest import TARGETS_CPU, on_cuda, require
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcid_fast import _backend, reference
from clipcid_fast.ops import masked_max_sim as mms

SEP = 1e-5  # ≫ the fp32 error of a cosine (≈ 1e-7 at D = 512), ≪ any planted gap
EPS_LIST = [1e-3, 2e-3, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.3, 1.7, 1.99]
CS = [1, 2, 33, 1000, 2049]
DS = [3, 77, 512]

needs_cpu = pytest.mark.skipif(
    not mms.has_cpu_kernel(), reason="C++ op clipcid_fast_C.masked_max_sim_fwd not in this build"
)
# Every kernel case on the C++ CPU op and, on a GPU, on Triton and the CUDA C++ kernel.
TARGETS = [pytest.param(p.values[0], marks=needs_cpu, id=p.id) for p in TARGETS_CPU] + on_cuda("triton", "cuda")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_rows(c: int, D: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(c, D, generator=_gen(seed)) * 3 + 0.5  # not normalised: the op normalises


def planted_rows(c: int, D: int, seed: int = 0, exact: bool = False, dtype=torch.float32) -> torch.Tensor:
    """Random originals plus near (or exact) copies of earlier rows: every keep decision is clear.

    About a third of the rows are originals (random directions); every other row copies an earlier row:
    scaled by a factor in [0.5, 2.5] plus relative noise 1e-3 (cos ≥ 1 − 1e-5, far above 1 − 1e-3), or, with
    ``exact``, the bit-identical row (cos = 1: idx must point at a copy). Rows are
    rounded to ``dtype`` as they are made, so the clearances hold for the stored values.
    """
    g = _gen(seed)
    rows = []
    unit = torch.empty(c, D, dtype=torch.float64)
    thr = 1 - torch.tensor(EPS_LIST, dtype=torch.float64)
    for j in range(c):
        if j == 0 or torch.rand((), generator=g) < 0.35:
            for _ in range(100):  # an original whose max cos to earlier rows is clear of every threshold
                r = (torch.randn(D, generator=g) * 2).to(dtype)
                u = r.double() / r.double().norm()
                if j == 0 or bool(((unit[:j] @ u).max() - thr).abs().min() > 20 * SEP):
                    break
            rows.append(r)
            unit[j] = u
            continue
        i = int(torch.randint(0, j, (), generator=g))
        if exact:
            rows.append(rows[i].clone())
        else:
            scale = float(torch.rand((), generator=g)) * 2 + 0.5
            noise = torch.randn(D, generator=g) * rows[i].float().norm() / math.sqrt(D)
            rows.append((rows[i].float() * scale + 1e-3 * noise).to(dtype))
        unit[j] = rows[j].double() / rows[j].double().norm()
    return torch.stack(rows)


def _gold(x: torch.Tensor):
    """float64 reference (M, idx) and the gap between the best and second-best earlier row."""
    x64 = x.double()
    m, idx = reference.masked_max_similarity(x64)
    xn = x64 / x64.norm(dim=1, keepdim=True)
    sim = (xn @ xn.T).masked_fill(~torch.ones(x.shape[0], x.shape[0], dtype=torch.bool).triu(1), -math.inf)
    if x.shape[0] >= 3:
        top2 = sim.topk(2, dim=0).values
        gap = top2[0] - top2[1]
    else:
        gap = torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    gap = torch.where(torch.isfinite(gap), gap, math.inf)
    return m, idx, gap, sim


def _check_masked(x, impl, *, tile=0, clear_keep=False, device="cpu"):
    m, idx = mms.masked_max_similarity(x.to(device), impl, tile=tile)
    assert m.device.type == torch.device(device).type
    m, idx = m.cpu(), idx.cpu()
    assert m.dtype == torch.float32 and idx.dtype == torch.int64 and m.shape == idx.shape == (x.shape[0],)
    m_gold, idx_gold, gap, sim = _gold(x)
    m_f32, _ = reference.masked_max_similarity(x.float())
    assert m[0] == -math.inf and idx[0] == -1
    assert_within_budget(m, m_f32, m_gold, c=2.0, slack=1e-6, rtol=4 * ULP32, name="M")
    sep = gap > SEP
    assert torch.equal(idx[sep], idx_gold[sep]), "idx differs from the reference where the argmax is clear"
    j = torch.arange(1, x.shape[0])
    if j.numel():  # elsewhere a valid (near-)argmax among earlier rows
        assert bool((idx[1:] < j).all() & (idx[1:] >= 0).all())
        assert bool((sim[idx[1:], j] >= m_gold[1:] - SEP).all())
    keep = mms.semdedup_keep(x.to(device), EPS_LIST, impl, tile=tile).cpu()
    keep_gold = reference.semdedup_keep(x.double(), EPS_LIST)
    thr = 1 - torch.tensor(EPS_LIST, dtype=torch.float64)[:, None]
    clear = (m_gold[None, :] - thr).abs() > SEP
    if clear_keep:
        assert bool(clear.all()), "test data too close to a threshold"
    assert keep.dtype == torch.bool and keep.shape == (len(EPS_LIST), x.shape[0])
    assert torch.equal(keep[clear], keep_gold[clear])
    return m, idx, keep


# --------------------------------------------------------------------------------------------------
# C++ CPU op
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random(target, c, D, dtype):
    impl, device = require(target)
    _check_masked(random_rows(c, D, seed=c * 1000 + D).to(dtype), impl, device=device)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("c", [2, 33, 1000, 2049])
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planted_duplicates(target, c, D, exact, dtype):
    impl, device = require(target)
    x = planted_rows(c, D, seed=c + D, exact=exact, dtype=dtype)
    _, idx, keep = _check_masked(x, impl, clear_keep=True, device=device)
    assert torch.equal(keep, reference.semdedup_keep(x.double(), EPS_LIST))
    if exact:
        _check_exact_copies(x, idx)


def _check_exact_copies(x, idx):
    """Where row j has a bit-identical earlier row, idx_j must point at one (cos = 1: any rounding of 1 picks
    one of the copies; which one is decided by the last bit of each fp dot, in the reference as here)."""
    same = (x[:, None, :] == x[None, :, :]).all(-1).triu(1)  # [i, j]: i < j, identical rows
    has_copy = same.any(0)
    j = has_copy.nonzero()[:, 0]
    assert bool(same[idx[j], j].all())


TILES = {"cpu": (16, 33, 100, 256, 1024), "triton": (16, 33, 64, 128, 1024)}  # Triton: powers of two ≤ 128


@pytest.mark.parametrize("target", [t for t in TARGETS if "cuda-cuda" not in t.id])  # CUDA C++: fixed tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_size_independence(target, dtype):
    impl, device = require(target)
    x = planted_rows(1000, 77, seed=7, dtype=dtype)
    _, _, gap, _ = _gold(x)
    sep = gap > SEP
    tiles = TILES[impl]
    xd = x.to(device)
    outs = [tuple(t.cpu() for t in mms.masked_max_similarity(xd, impl, tile=t)) for t in tiles]
    keeps = [mms.semdedup_keep(xd, EPS_LIST, impl, tile=t).cpu() for t in tiles]
    for (m, idx), keep in zip(outs[1:], keeps[1:]):
        assert torch.equal(idx[sep], outs[0][1][sep])
        assert torch.equal(keep, keeps[0])  # planted: every keep decision is clear of the thresholds
        torch.testing.assert_close(m, outs[0][0], atol=8 * ULP32, rtol=0)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("n,K,D", [(1, 1, 3), (33, 5, 77), (1000, 257, 512), (2049, 64, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tile", [0, 32])
def test_nearest_centroid(target, n, K, D, dtype, tile):
    impl, device = require(target)
    _check_nearest(n, K, D, dtype, impl, tile, device=device)


def _check_nearest(n, K, D, dtype, impl, tile, device="cpu"):
    x = random_rows(n, D, seed=n).to(dtype)
    cen = random_rows(K, D, seed=K + 1).to(dtype)
    sim, idx = mms.nearest_centroid(x.to(device), cen.to(device), impl, tile=tile)
    assert sim.device.type == torch.device(device).type
    sim, idx = sim.cpu(), idx.cpu()
    assert sim.dtype == torch.float32 and idx.dtype == torch.int64 and sim.shape == (n,)
    s_gold, i_gold = reference.nearest_centroid(x.double(), cen.double())
    s_f32, _ = reference.nearest_centroid(x.float(), cen.float())
    assert_within_budget(sim, s_f32, s_gold, c=2.0, slack=1e-6, rtol=4 * ULP32, name="sim")
    xn = x.double() / x.double().norm(dim=1, keepdim=True)
    cn = cen.double() / cen.double().norm(dim=1, keepdim=True)
    full = xn @ cn.T
    top2 = full.topk(min(2, K), dim=1).values
    sep = (top2[:, 0] - top2[:, -1] > SEP) if K > 1 else torch.ones(n, dtype=torch.bool)
    assert torch.equal(idx[sep], i_gold[sep])
    assert bool((full[torch.arange(n), idx] >= s_gold - SEP).all())


@pytest.mark.parametrize("target", TARGETS)
def test_matches_dense_semdedup_brute_force(target):
    """The keep mask against a SemDeDup-style dense computation (X·Xᵀ, triu, column max) in float64."""
    impl, device = require(target)
    x = planted_rows(1000, 512, seed=3)
    xn = x.double() / x.double().norm(dim=1, keepdim=True)
    sim = torch.triu(xn @ xn.T, diagonal=1)  # SemDeDup zeroes the lower triangle and diagonal
    m_dense = sim.max(dim=0).values
    for eps in EPS_LIST:
        dense_keep = ~(m_dense > 1 - eps)
        clear = (m_dense - (1 - eps)).abs() > SEP
        keep = mms.semdedup_keep(x.to(device), eps, impl)[0].cpu()
        if eps < 1:  # SemDeDup's zero fill equals −inf as long as 1 − eps > 0
            assert torch.equal(keep[clear], dense_keep[clear])


# --------------------------------------------------------------------------------------------------
# Triton (interpreter on CPU tensors: small shapes, 32–64 tiles) and the reference backend
# --------------------------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("c,D", [(1, 3), (2, 77), (33, 77), (100, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tile", [32, 64])
def test_triton_matches_reference(triton_device, c, D, dtype, tile):
    _check_masked(random_rows(c, D, seed=c).to(dtype), "triton", tile=tile, device=triton_device)
    x = planted_rows(c, D, seed=c, exact=True, dtype=dtype)
    _, idx, _ = _check_masked(x, "triton", tile=tile, clear_keep=True, device=triton_device)
    _check_exact_copies(x, idx)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_nearest_centroid(triton_device, dtype):
    _check_nearest(70, 40, 77, dtype, "triton", 32, device=triton_device)


def test_reference_backend_and_float64():
    x = planted_rows(50, 16, seed=1)
    m, idx = mms.masked_max_similarity(x.double(), "auto")
    assert m.dtype == torch.float64
    m_ref, idx_ref = reference.masked_max_similarity(x.double())
    assert torch.equal(m, m_ref) and torch.equal(idx, idx_ref)
    _check_masked(x, "reference")


def test_float16_is_widened():
    x = planted_rows(40, 16, seed=2, dtype=torch.float16)
    m, idx = mms.masked_max_similarity(x)
    assert m.dtype == torch.float32
    _, idx_gold, gap, _ = _gold(x)
    sep = gap > SEP
    assert torch.equal(idx[sep], idx_gold[sep])
    assert torch.equal(mms.semdedup_keep(x, EPS_LIST), reference.semdedup_keep(x.double(), EPS_LIST))


def test_auto_matches_reference_and_does_not_mutate():
    x = random_rows(300, 64, seed=5)
    before = x.clone()
    _check_masked(x, "auto")
    _check_nearest(300, 20, 64, torch.float32, "auto", 0)
    assert torch.equal(x, before)


# --------------------------------------------------------------------------------------------------
# torch.library: opcheck, forward-only, torch.compile
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck(backend):
    if backend == "cpu" and not mms.has_cpu_kernel():
        pytest.skip("C++ op not in this build")
    if backend == "triton" and not _backend.triton_usable_on(torch.device("cpu")):
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU tensors")
    tile = 32 if backend == "triton" else 16
    x = random_rows(40, 20, seed=9)
    cen = random_rows(7, 20, seed=10)
    torch.library.opcheck(mms.masked_max_similarity_op, (x, backend, tile))
    torch.library.opcheck(mms.nearest_centroid_op, (x, cen, backend, tile))
    if backend == "cpu":
        torch.library.opcheck(torch.ops.clipcid_fast_C.masked_max_sim_fwd.default, (x, 16))
        torch.library.opcheck(torch.ops.clipcid_fast_C.nearest_centroid_fwd.default, (x, cen, 16))


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_forward_only_backward_raises(impl):
    if impl == "cpu" and not mms.has_cpu_kernel():
        pytest.skip("C++ op not in this build")
    x = random_rows(10, 8).requires_grad_()
    m, _ = mms.masked_max_similarity(x, impl)
    with pytest.raises(RuntimeError, match="forward-only"):
        m[1:].sum().backward()
    if impl == "cpu":  # the raw C++ op says so too
        m_raw, _ = torch.ops.clipcid_fast_C.masked_max_sim_fwd(x, 0)
        with pytest.raises(RuntimeError, match="not implemented"):
            m_raw[1:].sum().backward()


def test_compiles_fullgraph():
    f = torch.compile(lambda x: mms.semdedup_keep(x, [0.1, 0.5], check_values=False), fullgraph=True, backend="eager")
    x = planted_rows(60, 16, seed=4)
    assert torch.equal(f(x), reference.semdedup_keep(x.double(), [0.1, 0.5]))


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(c=st.integers(2, 40), row=st.integers(0, 39), kind=st.sampled_from(["nan", "inf", "zero"]))
def test_bad_rows_name_the_row(c, row, kind):
    row = row % c
    x = random_rows(c, 5)
    x[row] = {"nan": math.nan, "inf": math.inf, "zero": 0.0}[kind]
    if kind == "nan":
        x[row, 1:] = 1.0  # one NaN entry is enough
    msg = rf"row {row} has " + ("zero norm" if kind == "zero" else "a non-finite")
    with pytest.raises(ValueError, match=msg):
        mms.masked_max_similarity(x)
    with pytest.raises(ValueError, match=msg):
        mms.semdedup_keep(x, 0.1)
    with pytest.raises(ValueError, match=msg):
        mms.nearest_centroid(random_rows(3, 5), x)


@settings(max_examples=40, deadline=None)
@given(
    eps=st.one_of(
        st.floats(max_value=0.0, allow_nan=False),
        st.floats(min_value=2.0),
        st.just(math.nan),
        st.just(-math.inf),
    )
)
def test_eps_outside_open_interval(eps):
    with pytest.raises(ValueError, match=r"eps must be in \(0, 2\)"):
        mms.semdedup_keep(random_rows(5, 4), [0.1, eps])


@settings(max_examples=30, deadline=None)
@given(bad=st.sampled_from(["1d", "3d", "no_rows", "no_cols", "int", "list", "impl", "tile", "eps_empty", "cen_D"]))
def test_bad_arguments_raise_value_error(bad):
    x = random_rows(6, 4)
    with pytest.raises(ValueError):
        if bad == "1d":
            mms.masked_max_similarity(torch.randn(5))
        elif bad == "3d":
            mms.masked_max_similarity(torch.randn(2, 3, 4))
        elif bad == "no_rows":
            mms.semdedup_keep(torch.randn(0, 4), 0.1)
        elif bad == "no_cols":
            mms.masked_max_similarity(torch.randn(4, 0))
        elif bad == "int":
            mms.masked_max_similarity(torch.ones(4, 5, dtype=torch.int64))
        elif bad == "list":
            mms.masked_max_similarity([[1.0, 2.0]])
        elif bad == "impl":
            mms.masked_max_similarity(x, impl="fast")
        elif bad == "tile":
            mms.masked_max_similarity(x, tile=-1)
        elif bad == "eps_empty":
            mms.semdedup_keep(x, [])
        else:
            mms.nearest_centroid(x, torch.randn(3, 5))


def test_scalar_and_tensor_eps():
    x = planted_rows(30, 16, seed=6)
    k1 = mms.semdedup_keep(x, 0.1)
    k2 = mms.semdedup_keep(x, torch.tensor([0.1, 0.2]))
    assert k1.shape == (1, 30) and k2.shape == (2, 30)
    assert torch.equal(k1[0], k2[0]) and bool(k1[:, 0].all())
