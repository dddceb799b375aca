"""K2 relational / contrastive KD rows: every backend against the reference under the error budget.

Gold = reference.relational_rows_loss in float64 (rows: (q, k); columns: (k, q)); the same-dtype torch
value is the reference run on the inputs' dtype. Gradients are those of Σ g_r·ℓ_rows + Σ g_c·ℓ_cols with
random g (≠ 1) with respect to q_s, k_s and the student scale; the teacher gets none.
"""

import pytest
import torch
from _budget import ULP32, ULP_BF16, assert_within_budget
from conftest import TARGETS_CPU, on_cuda, require

from clipcid_fast import _backend, reference
from clipcid_fast.ops import relational_rows as rr

MODES = [("hard", "ce"), ("soft", "ce"), ("soft", "kl")]


def _cpu_or_skip():
    if not rr.has_cpu_kernel():
        pytest.skip("the loaded C++ extension has no relational_rows_fwd (not built with csrc/cpu/relational_rows.cpp)")


# Every kernel case on the C++ CPU op and, on a GPU, on Triton (K2 has no CUDA C++ kernel).
TARGETS = TARGETS_CPU + on_cuda("triton")


def _target(target, distill=False):
    impl, device = require(target)
    if impl == "cpu":
        _cpu_distill_or_skip() if distill else _cpu_or_skip()
    return impl, device


def _on(x, device):
    return None if x is None else x.to(device)


def _feats(g, n, d, near=False):
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if near:  # near-identical rows: one direction plus a tiny perturbation
        x = x[:1] + 1e-3 * x
    return x / x.norm(dim=1, keepdim=True)


def _make(R, C, D, soft, seed, near=False, d_t=None):
    g = torch.Generator().manual_seed(seed)
    q_s, k_s = _feats(g, R, D, near), _feats(g, C, D, near)
    q_t = k_t = None
    if soft:
        d_t = d_t or D + 5
        q_t, k_t = _feats(g, R, d_t, near), _feats(g, C, d_t, near)
    g_r = torch.randn(R, generator=g, dtype=torch.float64) * 2 + 0.5
    g_c = torch.randn(C, generator=g, dtype=torch.float64) * 2 - 0.3
    return q_s, k_s, q_t, k_t, g_r, g_c


def _ref(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, direction, off, g_r, g_c):
    """Per-row / per-column reference losses and the gradients (q_s, k_s, scale_s) of the weighted sum."""
    q = q_s.detach().clone().requires_grad_()
    k = k_s.detach().clone().requires_grad_()
    s = torch.tensor(float(scale_s), dtype=torch.float32 if q.dtype != torch.float64 else q.dtype).requires_grad_()
    outs, total = [], 0
    if direction in ("rows", "both"):
        lr = reference.relational_rows_loss(q, k, s, q_t, k_t, scale_t, kind=kind, target_offset=off)
        outs.append(lr)
        total = total + (lr * g_r.to(lr.dtype)).sum()
    if direction in ("cols", "both"):
        lc = reference.relational_rows_loss(k, q, s, k_t, q_t, scale_t, kind=kind)
        outs.append(lc)
        total = total + (lc * g_c.to(lc.dtype)).sum()
    return outs, torch.autograd.grad(total, (q, k, s))


def _kernel(q_s, k_s, scale_s, q_t, k_t, scale_t, kind, direction, off, g_r, g_c, impl, device="cpu"):
    """The op on ``device``; outputs and gradients come back on the CPU."""
    q = q_s.detach().to(device).requires_grad_()
    k = k_s.detach().to(device).requires_grad_()
    s = torch.tensor(float(scale_s), device=device).requires_grad_()
    out = rr.relational_kd_rows(
        q, k, s, _on(q_t, device), _on(k_t, device), scale_t, kind=kind, direction=direction, target_offset=off,
        impl=impl,
    )  # fmt: skip
    outs = list(out) if direction == "both" else [out]
    gs = {"rows": [g_r], "cols": [g_c], "both": [g_r, g_c]}[direction]
    total = sum((o * gg.float().to(device)).sum() for o, gg in zip(outs, gs))
    grads = torch.autograd.grad(total, (q, k, s))
    assert all(o.device.type == torch.device(device).type for o in (*outs, *grads))
    return [o.cpu() for o in outs], [g.cpu() for g in grads]


def _check(
    R, C, D, dtype, mode, kind, impl, *, direction="both", scale_s=30.0, scale_t=50.0, off=0, near=False, device="cpu"
):
    soft = mode == "soft"
    q_s, k_s, q_t, k_t, g_r, g_c = _make(R, C, D, soft, seed=R * 1000 + D + len(kind), near=near)
    st = scale_t if soft else None

    def cast(x):
        return None if x is None else x.to(dtype)

    def up(x):  # gold sees the same rounded inputs
        return None if x is None else x.to(dtype).double()

    gold_out, gold_g = _ref(up(q_s), up(k_s), scale_s, up(q_t), up(k_t), st, kind, direction, off, g_r, g_c)
    args = (cast(q_s), cast(k_s), scale_s, cast(q_t), cast(k_t), st, kind, direction, off)
    same_out, same_g = _ref(*args, g_r, g_c)
    got_out, got_g = _kernel(*args, g_r, g_c, impl, device)
    ulp = ULP32 if dtype == torch.float32 else ULP_BF16
    # Logits are up to max(scale) in size: a kernel that sums in another order (tiles, a different GEMM) is
    # off by a few ulps of the logits, which the loss and the softmax weights inherit.
    zmax = 1.0 + max(scale_s, scale_t if soft else 0.0)
    for i, (o, t, g) in enumerate(zip(got_out, same_out, gold_out)):
        assert o.dtype == torch.float32
        assert_within_budget(o, t, g, c=2.0, slack=16 * ULP32 * zmax, rtol=4 * ulp, name=f"loss[{i}]")
    for name, o, t, g in zip(("grad_q_s", "grad_k_s", "grad_scale_s"), got_g, same_g, gold_g):
        gmax = g.abs().max().item()
        slack = 16 * ULP32 * zmax * (1 + gmax) * (1 + (max(R, C) if name == "grad_scale_s" else 1)) ** 0.5
        assert_within_budget(o, t, g, c=2.0, slack=slack, rtol=4 * ulp, name=name)
    assert got_g[0].dtype == dtype and got_g[1].dtype == dtype


CPU_SHAPES = [(1, 3), (7, 77), (257, 512), (1000, 77)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("B,D", CPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,kind", MODES)
def test_matches_reference(target, B, D, dtype, mode, kind):
    impl, device = _target(target)
    _check(B, B, D, dtype, mode, kind, impl, device=device)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mode,kind", MODES)
@pytest.mark.parametrize("near", [False, True])
def test_extreme_scales_and_near_identical_rows(target, mode, kind, near):
    impl, device = _target(target)
    _check(300, 300, 512, torch.float32, mode, kind, impl, scale_s=100.0, scale_t=100.0, near=near, device=device)
    _check(65, 65, 3, torch.float32, mode, kind, impl, scale_s=0.5, scale_t=100.0, near=near, device=device)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("mode,kind", MODES)
@pytest.mark.parametrize("direction", ["rows", "cols"])
def test_one_direction_and_rectangular(target, mode, kind, direction):
    impl, device = _target(target)
    kw = dict(direction=direction, device=device)
    if mode == "hard" and direction == "rows":
        _check(7, 20, 77, torch.float32, mode, kind, impl, off=5, **kw)  # shard-style offset
    elif mode == "soft":
        _check(33, 70, 77, torch.float32, mode, kind, impl, **kw)
    else:
        _check(40, 40, 77, torch.float32, mode, kind, impl, **kw)


@pytest.mark.parametrize("mode,kind", MODES)
@pytest.mark.parametrize("blocks", [(16, 9), (64, 96), (1, 1000)])
def test_cpu_tiles_of_any_size(mode, kind, blocks):
    """The raw C++ ops with small, ragged tiles give what the default tiles give (online merging)."""
    _cpu_or_skip()
    soft = mode == "soft"
    q_s, k_s, q_t, k_t, g_r, g_c = _make(123, 123, 40, soft, seed=5)

    def f(x):
        return None if x is None else x.float()

    t = (f(q_t), f(k_t), torch.tensor(40.0)) if soft else (None, None, None)
    args = (f(q_s), f(k_s), torch.tensor(25.0), *t)
    op = torch.ops.clipcid_fast_C
    base = op.relational_rows_fwd(*args, kind, 0, True, True)
    tiled = op.relational_rows_fwd(*args, kind, 0, True, True, *blocks)
    for a, b in zip(base, tiled):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-5)
    gb = op.relational_rows_bwd(g_r.float(), g_c.float(), *args, base[2], base[3], 0, True, True)
    gt = op.relational_rows_bwd(g_r.float(), g_c.float(), *args, base[2], base[3], 0, True, True, *blocks)
    for a, b in zip(gb, gt):
        torch.testing.assert_close(a, b, atol=1e-4 * (1 + a.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("B,D", [(3, 77), (40, 512)])
@pytest.mark.parametrize("mode,kind", MODES)
def test_reference_backend_matches_reference(B, D, mode, kind):
    _check(B, B, D, torch.float32, mode, kind, "reference")


@pytest.mark.triton
@pytest.mark.parametrize("B,D", [(1, 3), (7, 77), (70, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,kind", MODES)
def test_triton_matches_reference(triton_device, B, D, dtype, mode, kind):
    _check(B, B, D, dtype, mode, kind, "triton", scale_s=100.0 if B == 7 else 30.0, device=triton_device)


@pytest.mark.triton
def test_triton_rectangular_offset_and_one_direction(triton_device):
    _check(7, 20, 77, torch.float32, "hard", "ce", "triton", direction="rows", off=5, device=triton_device)
    _check(20, 33, 16, torch.float32, "soft", "kl", "triton", direction="cols", device=triton_device)


@pytest.mark.triton
@pytest.mark.parametrize("mode,kind", MODES)
@pytest.mark.parametrize("D", [300, 600])
def test_triton_wide_features_over_several_d_slices(triton_device, mode, kind, D):
    """D = 300 (D_t = 305): several K slices per logit tile and five 64-column accumulator slices in one backward
    program, the last one ragged; D = 600 (fp32): past 8 slices, two chunks along D on a second grid axis, each
    remaking its logits (the GPU layout of D = 512 / 768 / 1024, at interpreter-sized B)."""
    _check(20, 20, D, torch.float32, mode, kind, "triton", device=triton_device)


def _distill_inputs(B, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [_feats(g, B, D).float() for _ in range(4)]
    return feats, torch.tensor(20.0), torch.tensor(60.0)


COMPOSE_TARGETS = [
    *TARGETS_CPU,
    pytest.param(("triton", "cpu"), id="triton"),
    pytest.param(("reference", "cpu"), id="ref"),
    *on_cuda("triton", "auto"),
]


@pytest.mark.parametrize("target", COMPOSE_TARGETS)
def test_composes_into_open_clip_distill_clip_loss(target):
    """The one-call fused distill_clip_loss equals reference.distill_clip_loss and its student grads."""
    impl, device = _target(target) if target[0] != "reference" else target
    if impl == "triton" and not _backend.triton_usable_on(torch.device(device)):
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU tensors")
    B = 24 if impl == "triton" and str(device) == "cpu" else 300
    (si, st, ti, tt), ls, lt = _distill_inputs(B, 64)
    outs = []
    for fn, dev in ((reference.distill_clip_loss, "cpu"), (lambda *a: rr.distill_clip_loss(*a, impl=impl), device)):
        a, b, s = (x.to(dev).requires_grad_() for x in (si, st, ls))
        c, d = fn(a, b, s, ti.to(dev), tt.to(dev), lt.to(dev))
        grads = torch.autograd.grad(0.7 * c + 1.3 * d, (a, b, s))
        outs.append([t.cpu() for t in (c, d, *grads)])
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, atol=1e-5 * (1 + y.abs().max().item()), rtol=1e-5)


def _opcheck_args(soft):
    q_s, k_s, q_t, k_t, _, _ = _make(9, 9, 12, soft, seed=3)
    q, k = q_s.float().requires_grad_(), k_s.float().requires_grad_()
    s = torch.tensor(7.0, requires_grad=True)
    t = (q_t.float(), k_t.float(), torch.tensor(9.0)) if soft else (None, None, None)
    return q, k, s, t


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("mode,kind", MODES)
def test_opcheck(backend, mode, kind):
    if backend == "cpu":
        _cpu_or_skip()
    if backend == "triton" and not _backend.triton_usable_on(torch.device("cpu")):
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU tensors")
    q, k, s, t = _opcheck_args(mode == "soft")
    torch.library.opcheck(rr.relational_rows_op, (q, k, s, *t, kind, 0, True, True, backend))
    stats = rr.relational_rows_op(q, k, s, *t, kind, 0, True, True, backend)
    g = torch.randn(9)
    st_r, st_c = stats[2].detach(), stats[3].detach()
    bwd_args = (g, g * 2, q.detach(), k.detach(), s.detach(), *t, st_r, st_c, 0, True, True, backend)
    torch.library.opcheck(rr.relational_rows_bwd_op, bwd_args)


def test_opcheck_raw_cpu_ops():
    _cpu_or_skip()
    q, k, s, t = _opcheck_args(True)
    op = torch.ops.clipcid_fast_C
    args = (q.detach(), k.detach(), s.detach(), *t, "kl", 0, True, True)
    torch.library.opcheck(op.relational_rows_fwd.default, args)
    out = op.relational_rows_fwd(*args)
    g = torch.randn(9)
    torch.library.opcheck(op.relational_rows_bwd.default, (g, g, *args[:6], out[2], out[3], 0, True, True))


def test_compiles_fullgraph():
    (si, st, ti, tt), ls, lt = _distill_inputs(16, 8)
    f = torch.compile(
        lambda a, b, s: (
            sum(rr.distill_clip_loss(a, b, s, ti, tt, lt)) + rr.relational_kd_rows(a, b, 3.0, kind="ce").sum()
        ),
        fullgraph=True,
        backend="eager",
    )
    a, b, s = si.clone().requires_grad_(), st.clone().requires_grad_(), ls.clone().requires_grad_()
    f(a, b, s).backward()
    a2, b2, s2 = si.clone().requires_grad_(), st.clone().requires_grad_(), ls.clone().requires_grad_()
    ref_total = (
        sum(reference.distill_clip_loss(a2, b2, s2, ti, tt, lt))
        + reference.relational_rows_loss(a2, b2, 3.0, kind="ce").sum()
    )
    ref_total.backward()
    for x, y in ((a.grad, a2.grad), (b.grad, b2.grad), (s.grad, s2.grad)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_teacher_gets_no_gradient():
    (si, st, ti, tt), ls, lt = _distill_inputs(10, 8)
    ti, lt = ti.clone().requires_grad_(), lt.clone().requires_grad_()
    loss = rr.relational_kd_rows(si, st, ls, ti, tt, lt).sum()
    assert not loss.requires_grad  # nothing on the student side requires grad, the teacher is detached


def test_does_not_mutate_inputs():
    (si, st, ti, tt), ls, lt = _distill_inputs(33, 20)
    before = [x.clone() for x in (si, st, ti, tt)]
    for impl in ["reference", *(["cpu"] if rr.has_cpu_kernel() else [])]:
        rr.relational_kd_rows(si, st, ls, ti, tt, lt, direction="both", impl=impl)
    for x, y in zip((si, st, ti, tt), before):
        assert torch.equal(x, y)


BAD = {
    "q_s_1d": (dict(q_s=torch.randn(4)), "q_s"),
    "q_s_list": (dict(q_s=[[1.0]]), "q_s"),
    "q_s_int": (dict(q_s=torch.ones(4, 8, dtype=torch.int64)), "q_s"),
    "empty": (dict(q_s=torch.randn(0, 8)), "q_s"),
    "dim_mismatch": (dict(k_s=torch.randn(4, 7)), "feature dim"),
    "kind": (dict(kind="js"), "kind"),
    "direction": (dict(direction="diag"), "direction"),
    "teacher_partial": (dict(q_t=None), "q_t, k_t and scale_t"),
    "teacher_shape": (dict(q_t=torch.randn(5, 6)), "q_t / k_t"),
    "scale_shape": (dict(scale_s=torch.ones(2)), "scale_s"),
    "scale_type": (dict(scale_s="big"), "scale_s"),
    "hard_kl": (dict(q_t=None, k_t=None, scale_t=None, kind="kl"), "kind='ce'"),
    "hard_offset": (
        dict(q_t=None, k_t=None, scale_t=None, kind="ce", direction="rows", target_offset=3),
        "target_offset",
    ),
    "soft_offset": (dict(target_offset=1), "target_offset"),
    "impl": (dict(impl="fast"), "impl"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_inputs_raise_value_error(bad):
    kw = dict(
        q_s=torch.randn(4, 8),
        k_s=torch.randn(4, 8),
        scale_s=2.0,
        q_t=torch.randn(4, 6),
        k_t=torch.randn(4, 6),
        scale_t=3.0,
        kind="kl",
        direction="both",
    )
    change, match = BAD[bad]
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        rr.relational_kd_rows(**kw)


# --------------------------------------------------------------------------------------------------
# The one-pass distill op: hard CE + soft loss (ce / kl) of the same student tiles
# --------------------------------------------------------------------------------------------------


def _cpu_distill_or_skip():
    if not rr.has_cpu_distill_kernel():
        pytest.skip("the loaded C++ extension has no relational_distill_fwd")


def _distill_check(B, D, dtype, kind, impl, *, scale_s=30.0, scale_t=50.0, near=False, seed=0, device="cpu"):
    """relational_distill == the two relational_kd_rows calls (hard, soft) in the reference, in float64 gold."""
    q_s, k_s, q_t, k_t, g_r, g_c = _make(B, B, D, True, seed=seed + B, near=near)
    g = torch.Generator().manual_seed(seed + 7)
    h_r, h_c = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)

    def run(q, k, qt, kt, s, fn, dev="cpu"):
        q = q.detach().to(dev).requires_grad_()
        k = k.detach().to(dev).requires_grad_()
        s = torch.tensor(s, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=dev)
        s.requires_grad_()
        outs = fn(q, k, s, qt.to(dev), kt.to(dev))
        ws = (h_r, h_c, g_r, g_c)
        total = sum((o * w.to(device=dev, dtype=o.dtype)).sum() for o, w in zip(outs, ws))
        return [o.cpu() for o in outs], [g.cpu() for g in torch.autograd.grad(total, (q, k, s))]

    def ref(q, k, s, qt, kt):
        return (
            reference.relational_rows_loss(q, k, s, kind="ce"),
            reference.relational_rows_loss(k, q, s, kind="ce"),
            reference.relational_rows_loss(q, k, s, qt, kt, scale_t, kind=kind),
            reference.relational_rows_loss(k, q, s, kt, qt, scale_t, kind=kind),
        )

    def fused(q, k, s, qt, kt):
        return rr.relational_distill(q, k, s, qt, kt, scale_t, kind=kind, impl=impl)

    def up(x):
        return x.to(dtype).double()

    gold_out, gold_g = run(up(q_s), up(k_s), up(q_t), up(k_t), scale_s, ref)

    def c(x):
        return x.to(dtype)

    same_out, same_g = run(c(q_s), c(k_s), c(q_t), c(k_t), scale_s, ref)
    got_out, got_g = run(c(q_s), c(k_s), c(q_t), c(k_t), scale_s, fused, device)
    ulp = ULP32 if dtype == torch.float32 else ULP_BF16
    zmax = 1.0 + max(scale_s, scale_t)
    for i, (o, t, gd) in enumerate(zip(got_out, same_out, gold_out)):
        assert o.dtype == torch.float32
        assert_within_budget(o, t, gd, c=2.0, slack=16 * ULP32 * zmax, rtol=4 * ulp, name=f"loss[{i}]")
    for name, o, t, gd in zip(("grad_q_s", "grad_k_s", "grad_scale_s"), got_g, same_g, gold_g):
        gmax = gd.abs().max().item()
        slack = 16 * ULP32 * zmax * (1 + gmax) * (1 + (B if name == "grad_scale_s" else 1)) ** 0.5
        assert_within_budget(o, t, gd, c=2.0, slack=slack, rtol=4 * ulp, name=name)
    assert got_g[0].dtype == dtype and got_g[1].dtype == dtype


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("B,D", [(1, 3), (7, 77), (257, 512), (1000, 77)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_distill_matches_reference(target, B, D, dtype, kind):
    impl, device = _target(target, distill=True)
    _distill_check(B, D, dtype, kind, impl, device=device)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("near", [False, True])
def test_distill_extreme_scales_and_near_identical_rows(target, kind, near):
    impl, device = _target(target, distill=True)
    kw = dict(near=near, device=device)
    _distill_check(300, 512, torch.float32, kind, impl, scale_s=100.0, scale_t=100.0, **kw)
    _distill_check(65, 3, torch.float32, kind, impl, scale_s=0.5, scale_t=100.0, **kw)


@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_reference_backend_distill_matches_reference(kind):
    _distill_check(40, 77, torch.float32, kind, "reference")


@pytest.mark.triton
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_triton_distill_matches_reference(triton_device, kind):
    _distill_check(20, 16, torch.float32, kind, "triton", device=triton_device)


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("blocks", [(16, 9), (64, 96), (1, 1000), (1000, 1)])
def test_cpu_distill_tiles_of_any_size_and_threads(kind, blocks):
    """The raw distill ops with small, ragged tiles (many row chunks merged across threads) give what the
    default tiles give, and what one thread gives."""
    _cpu_distill_or_skip()
    q_s, k_s, q_t, k_t, g_r, g_c = _make(123, 123, 40, True, seed=5)
    args = (q_s.float(), k_s.float(), torch.tensor(25.0), q_t.float(), k_t.float(), torch.tensor(40.0), kind)
    op = torch.ops.clipcid_fast_C
    base = op.relational_distill_fwd(*args)
    tiled = op.relational_distill_fwd(*args, *blocks)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = op.relational_distill_fwd(*args, *blocks)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(base, tiled, single):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-5)
        torch.testing.assert_close(a, c, atol=2e-4, rtol=2e-5)
    gs = (g_r.float() * 0.3, g_c.float() * 0.7, g_r.float(), g_c.float())
    gb = op.relational_distill_bwd(*gs, *args[:6], base[4], base[5])
    gt = op.relational_distill_bwd(*gs, *args[:6], base[4], base[5], *blocks)
    for a, b in zip(gb, gt):
        torch.testing.assert_close(a, b, atol=1e-4 * (1 + a.abs().max().item()), rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("kind", ["ce", "kl"])
def test_opcheck_distill(backend, kind):
    if backend == "cpu":
        _cpu_distill_or_skip()
    if backend == "triton" and not _backend.triton_usable_on(torch.device("cpu")):
        pytest.skip("Triton needs TRITON_INTERPRET=1 on CPU tensors")
    q, k, s, t = _opcheck_args(True)
    torch.library.opcheck(rr.relational_distill_op, (q, k, s, *t, kind, backend))
    out = rr.relational_distill_op(q, k, s, *t, kind, backend)
    g = torch.randn(4, 9)
    args = (*g, q.detach(), k.detach(), s.detach(), *t, out[4].detach(), out[5].detach(), backend)
    torch.library.opcheck(rr.relational_distill_bwd_op, args)


def test_opcheck_raw_cpu_distill_ops():
    _cpu_distill_or_skip()
    q, k, s, t = _opcheck_args(True)
    op = torch.ops.clipcid_fast_C
    args = (q.detach(), k.detach(), s.detach(), *t, "ce")
    torch.library.opcheck(op.relational_distill_fwd.default, args)
    out = op.relational_distill_fwd(*args)
    g = torch.randn(4, 9)
    torch.library.opcheck(op.relational_distill_bwd.default, (*g, *args[:6], out[4], out[5]))


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_crd_loss_matches_reference(impl):
    if impl == "cpu":
        _cpu_or_skip()
    (si, st, ti, tt), ls, lt = _distill_inputs(200, 64, seed=3)
    outs = []
    for fn in (reference.crd_loss, lambda *a: rr.crd_loss(*a, impl=impl)):
        a, b, s = si.clone().requires_grad_(), st.clone().requires_grad_(), ls.clone().requires_grad_()
        loss = fn(a, b, s, ti, tt, lt)
        outs.append((loss, *torch.autograd.grad(1.7 * loss, (a, b, s))))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, atol=1e-5 * (1 + y.abs().max().item()), rtol=1e-5)


def test_distill_bad_inputs_raise_value_error():
    x, t = torch.randn(4, 8), torch.randn(4, 6)
    with pytest.raises(ValueError, match="needs a teacher"):
        rr.relational_distill(x, x, 2.0, None, None, None)
    with pytest.raises(ValueError, match="as many rows"):
        rr.relational_distill(x, torch.randn(5, 8), 2.0, t, torch.randn(5, 6), 3.0)
    with pytest.raises(ValueError, match="kind"):
        rr.relational_distill(x, x, 2.0, t, t, 3.0, kind="js")
