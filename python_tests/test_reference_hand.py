"""Hand-computed tiny cases for every public function of ``clipcid_fast.reference``.

Every expected value is a closed form written with :mod:`math`, derived on paper in the comment next
to it. Inputs are basis vectors (or rows whose normalisation gives basis vectors) so that every logit
is 0, ±1 or ±1/√2 times a scale. No expected value is produced by another reference function or by
torch's softmax / cross-entropy.

Notation used in the comments: ``σ(t) = 1 / (1 + e^{−t})``, ``L(s) = log(1 + e^s)``,
``H(a) = −a log a − (1 − a) log(1 − a)`` (binary entropy). Two facts used repeatedly:

* a row of logits ``[s, 0]`` has log-softmax ``[s − L(s), −L(s)]``, and CE to column 0 is
  ``L(s) − s = log(1 + e^{−s})``;
* for a 2-column row, soft CE against ``p = [a, 1 − a]`` of student logits ``[s, 0]`` is
  ``−a (s − L) − (1 − a)(−L) = L(s) − a s``, and KL = soft CE − H(a).
"""

import math

import pytest
import torch

from clipcid_fast import reference as R

F64 = torch.float64
TOL = 1e-12


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def e(i: int, d: int = 3) -> list[float]:
    v = [0.0] * d
    v[i] = 1.0
    return v


E1, E2, E3 = e(0), e(1), e(2)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def L(s: float) -> float:
    return math.log1p(math.exp(s))


def H(a: float) -> float:
    return -a * math.log(a) - (1.0 - a) * math.log(1.0 - a)


def close(actual, expected: float, tol: float = TOL) -> None:
    a = float(actual.detach()) if isinstance(actual, torch.Tensor) else float(actual)
    assert math.isclose(a, expected, rel_tol=tol, abs_tol=tol), (a, expected, a - expected)


def close_vec(actual: torch.Tensor, expected: list[float], tol: float = TOL) -> None:
    assert actual.shape == (len(expected),), (actual.shape, len(expected))
    for a, x in zip(actual.tolist(), expected):
        assert math.isclose(a, x, rel_tol=tol, abs_tol=tol), (actual.tolist(), expected)


# --------------------------------------------------------------------------------------------------
# relational_rows_loss
# --------------------------------------------------------------------------------------------------


def test_relational_rows_ce_no_teacher_orthonormal():
    # q = k = [e1, e2], z = s·I. Row i: logits [s, 0] with target s → log(1 + e^{−s}).
    s = 2.0
    out = R.relational_rows_loss(t(E1, E2), t(E1, E2), s, kind="ce")
    close_vec(out, [math.log1p(math.exp(-s))] * 2)


def test_relational_rows_ce_no_teacher_grad_wrt_scale():
    # ℓ_i = log(1 + e^{−s}) → dℓ_i/ds = −e^{−s}/(1 + e^{−s}) = −1/(1 + e^s); the sum over 2 rows doubles it.
    s = torch.tensor(1.5, dtype=F64, requires_grad=True)
    R.relational_rows_loss(t(E1, E2), t(E1, E2), s, kind="ce").sum().backward()
    close(s.grad, -2.0 / (1.0 + math.exp(1.5)))


def test_relational_rows_ce_target_offset():
    # q = [e1, e2] (R = 2), k = [e3, e1, e2] (C = 3): z = s·[[0, 1, 0], [0, 0, 1]].
    # offset 1 → row i targets column i + 1, whose logit is s: ℓ = log(e^s + 2) − s = log(1 + 2e^{−s}).
    s = 2.0
    out = R.relational_rows_loss(t(E1, E2), t(E3, E1, E2), s, kind="ce", target_offset=1)
    close_vec(out, [math.log1p(2 * math.exp(-s))] * 2)
    # offset 0 → targets columns 0 and 1, both logit 0: ℓ = log(e^s + 2) − 0.
    out0 = R.relational_rows_loss(t(E1, E2), t(E3, E1, E2), s, kind="ce", target_offset=0)
    close_vec(out0, [math.log(math.exp(s) + 2)] * 2)


def _teacher_case():
    # Student q_s = k_s = [e1, e2] (D_s = 3), scale s → z_s = s·I, log p_s rows [s−L, −L], [−L, s−L].
    # Teacher q_t = [e1, e2], k_t = [e1, e3], scale τ → z_t = τ·[[1, 0], [0, 0]]:
    #   p_t row 0 = [a, 1 − a] with a = σ(τ); p_t row 1 = [½, ½].
    s, tau = 2.0, 3.0
    return (t(E1, E2), t(E1, E2), s, t(E1, E2), t(E1, E3), tau)


def test_relational_rows_soft_ce_with_teacher():
    # row 0: L(s) − a s ; row 1: −½(−L) − ½(s − L) = L(s) − s/2.
    q_s, k_s, s, q_t, k_t, tau = _teacher_case()
    a = sig(tau)
    out = R.relational_rows_loss(q_s, k_s, s, q_t, k_t, tau, kind="ce")
    close_vec(out, [L(s) - a * s, L(s) - s / 2])


def test_relational_rows_kl_with_teacher():
    # KL = soft CE − H(p_t): row 0 subtracts H(a), row 1 subtracts H(½) = log 2.
    q_s, k_s, s, q_t, k_t, tau = _teacher_case()
    a = sig(tau)
    out = R.relational_rows_loss(q_s, k_s, s, q_t, k_t, tau, kind="kl")
    close_vec(out, [L(s) - a * s - H(a), L(s) - s / 2 - math.log(2.0)])


def test_relational_rows_kl_zero_teacher_probability():
    # Teacher logits [1000, 0]: p_t = [1, e^{−1000}] underflows to [1, 0]; xlogy keeps 0·log 0 = 0.
    # Student z_s = s·I: KL row 0 = 1·(0 − (s − L)) = L − s = log(1 + e^{−s}), finite.
    s = 2.0
    out = R.relational_rows_loss(t(E1), t(E1, E2), s, t(E1), t(E1, E2), 1000.0, kind="kl")
    close_vec(out, [math.log1p(math.exp(-s))])


def test_relational_rows_argument_errors():
    with pytest.raises(ValueError):
        R.relational_rows_loss(t(E1), t(E1), 1.0, kind="mse")
    with pytest.raises(ValueError):
        R.relational_rows_loss(t(E1), t(E1), 1.0, kind="kl")
    with pytest.raises(ValueError):
        R.relational_rows_loss(t(E1), t(E1), 1.0, t(E1), None, 1.0, kind="kl")


# --------------------------------------------------------------------------------------------------
# open_clip: clip_loss, distill_clip_loss
# --------------------------------------------------------------------------------------------------


def test_clip_loss_orthonormal_value_and_grad():
    # I = T = [e1, e2, e3], logits τ·I both ways. Each row: log(e^τ + 2) − τ = log(1 + 2e^{−τ}).
    # dL/dτ = −2e^{−τ}/(1 + 2e^{−τ}) = −2/(e^τ + 2).
    tau = torch.tensor(2.5, dtype=F64, requires_grad=True)
    feats = t(E1, E2, E3)
    loss = R.clip_loss(feats, feats.clone(), tau)
    close(loss, math.log1p(2 * math.exp(-2.5)))
    loss.backward()
    close(tau.grad, -2.0 / (math.exp(2.5) + 2.0))


def test_clip_loss_asymmetric():
    # I = [e1, e2], T = [e1, u] with u = (e1 + e2)/√2 (D = 2), r = 1/√2.
    # image→text logits τ·[[1, r], [0, r]]:
    #   row 0: log(e^τ + e^{τr}) − τ ; row 1: log(1 + e^{τr}) − τr.
    # text→image logits τ·[[1, 0], [r, r]]:
    #   row 0: log(e^τ + 1) − τ ; row 1: log(2e^{τr}) − τr = log 2.
    tau = 3.0
    r = math.sqrt(0.5)
    img = t([1.0, 0.0], [0.0, 1.0])
    txt = t([1.0, 0.0], [r, r])
    i2t = (math.log(math.exp(tau) + math.exp(tau * r)) - tau + math.log1p(math.exp(tau * r)) - tau * r) / 2
    t2i = (math.log1p(math.exp(-tau)) + math.log(2.0)) / 2
    close(R.clip_loss(img, txt, tau), (i2t + t2i) / 2)


def test_distill_clip_loss_value_and_teacher_grad():
    # Student I_s = T_s = [e1, e2], τ_s = s: contrastive = log(1 + e^{−s}).
    # Teacher I_t = [e1, e2], T_t = [e2, e1], τ_t = τ: both directions' teacher logits are τ·[[0, 1], [1, 0]],
    # so p_t rows are [1−a, a] and [a, 1−a] with a = σ(τ); each row's soft CE = L(s) − (1 − a)s.
    # distill = L(s) − s/(1 + e^τ); d distill/dτ = s·e^τ/(1 + e^τ)² = s·a(1 − a) (teacher not detached).
    s = 2.0
    tau = torch.tensor(1.0, dtype=F64, requires_grad=True)
    a = sig(1.0)
    contrastive, distill = R.distill_clip_loss(t(E1, E2), t(E1, E2), s, t(E1, E2), t(E2, E1), tau)
    close(contrastive, math.log1p(math.exp(-s)))
    close(distill, L(s) - s / (1 + math.exp(1.0)))
    distill.backward()
    close(tau.grad, s * a * (1 - a))


# --------------------------------------------------------------------------------------------------
# CLIP-KD: crd, icl, fd, cross-KD
# --------------------------------------------------------------------------------------------------


def test_crd_loss():
    # Student S_I = S_T = [e1, e2], scale s: both directions z_s = s·I.
    # Teacher T_I = [e1, e2], T_T = [e1, e1], scale τ:
    #   image dir T_I T_Tᵀ = [[1, 1], [0, 0]]·τ → both rows uniform: KL row = L − s/2 − log 2 (both rows);
    #   text dir  T_T T_Iᵀ = [[1, 0], [1, 0]]·τ → both rows [a, 1−a]:
    #     row 0 CE = L − a s, row 1 CE = L − (1−a)s, mean CE = L − s/2, KL mean = L − s/2 − H(a).
    # crd = ½[(L − s/2 − log 2) + (L − s/2 − H(a))].
    s, tau = 2.0, 3.0
    a = sig(tau)
    t_scale = torch.tensor(tau, dtype=F64, requires_grad=True)
    s_image = t(E1, E2).requires_grad_()
    t_image = t(E1, E2).requires_grad_()
    loss = R.crd_loss(s_image, t(E1, E2), s, t_image, t(E1, E1), t_scale)
    close(loss, L(s) - s / 2 - (math.log(2.0) + H(a)) / 2)
    loss.backward()
    assert t_scale.grad is None and t_image.grad is None  # the teacher is stop-gradient
    assert s_image.grad is not None


def test_crd_loss_zero_when_teacher_is_student():
    # Same features and same scale: every row KL is KL(p ‖ p) = 0.
    f = t(E1, E2)
    close(R.crd_loss(f, t(E1, E3), 2.0, f, t(E1, E3), 2.0), 0.0)


def test_icl_loss():
    # S_I = [e1, e2], S_T = [e2, e2], T_I = [e2, e1], T_T = [e1, e3]; scale κ.
    # A = CE(κ S_I T_Tᵀ): S_I T_Tᵀ = [[1, 0], [0, 0]] → row 0 log(1 + e^{−κ}), row 1 log 2.
    # B = CE(κ S_T T_Iᵀ): S_T T_Iᵀ = [[1, 0], [1, 0]] → row 0 log(1 + e^{−κ}), row 1 log(1 + e^κ).
    # icl = ½(A + B) with A, B the row means.
    k = 2.0
    A = (math.log1p(math.exp(-k)) + math.log(2.0)) / 2
    B = (math.log1p(math.exp(-k)) + math.log1p(math.exp(k))) / 2
    close(R.icl_loss(t(E1, E2), t(E2, E2), t(E2, E1), t(E1, E3), k), (A + B) / 2)


def test_fd_loss():
    # S_I − T_I = [[1, −1], [0, 0]] → mean square 2/4; S_T − T_T = [[0, 0], [0, 2]] → 4/4. Total 1.5.
    s_i, t_i = t([1.0, 0.0], [0.0, 1.0]), t([0.0, 1.0], [0.0, 1.0])
    s_t, t_t = t([1.0, 0.0], [0.0, 1.0]), t([1.0, 0.0], [0.0, -1.0])
    close(R.fd_loss(s_i, s_t, t_i, t_t), 1.5)


def test_cross_kd_loss():
    # Teacher T_I = T_T = [e1, e2], τ: teacher rows [a, 1−a], [1−a, a] (both directions), a = σ(τ).
    # Term 1 student κ S_I T_Tᵀ with S_I = [e1, e2]: κ·I → row CEs L − aκ (both rows), KL = L − aκ − H(a).
    # Term 2 student κ S_T T_Iᵀ with S_T = [e2, e1]: κ·[[0, 1], [1, 0]] → row CE L − (1−a)κ, KL − H(a).
    # cross = ½[(L − aκ − H) + (L − (1−a)κ − H)] = L(κ) − κ/2 − H(a).
    k, tau = 2.0, 0.5
    a = sig(tau)
    close(R.cross_kd_loss(t(E1, E2), t(E2, E1), t(E1, E2), t(E1, E2), k, tau), L(k) - k / 2 - H(a))


# --------------------------------------------------------------------------------------------------
# CLIP-RD: vrd, xrd
# --------------------------------------------------------------------------------------------------


def test_vrd_loss_all_three_outputs_and_gradient_side():
    # T_I = S_I = [e1, e2] → TS_I = ST_I = κ_I·I. T_T = [e1, e2], S_T = [e1, e1]:
    #   TS_T = κ_T T_T S_Tᵀ = κ_T·[[1, 1], [0, 0]] → rows uniform;
    #   ST_T = κ_T S_T T_Tᵀ = κ_T·[[1, 0], [1, 0]] → rows [b, 1−b], b = σ(κ_T).
    # kl = ½[KL(κ_I I ‖ uniform) + KL(κ_I I ‖ rows [b, 1−b])]
    #    = ½[(L_I − κ_I/2 − log 2) + (L_I − κ_I/2 − H(b))]          (L_I = L(κ_I); cf. test_crd_loss)
    # ce_image = ½[CE(κ_I I) + CE(κ_I I)] = log(1 + e^{−κ_I}).
    # ce_text = ½[CE(TS_T) + CE(ST_T)]: TS_T rows are constant → log 2;
    #   ST_T row 0 target logit κ_T vs 0 → log(1 + e^{−κ_T}); row 1 target 0 vs κ_T → log(1 + e^{κ_T}).
    ki, kt = 2.0, 1.0
    b = sig(kt)
    s_image = t(E1, E2).requires_grad_()
    s_text = t(E1, E1).requires_grad_()
    kl, ce_i, ce_t = R.vrd_loss(s_image, s_text, t(E1, E2), t(E1, E2), ki, kt)
    close(kl, L(ki) - ki / 2 - (math.log(2.0) + H(b)) / 2)
    close(ce_i, math.log1p(math.exp(-ki)))
    close(ce_t, (math.log(2.0) + (math.log1p(math.exp(-kt)) + math.log1p(math.exp(kt))) / 2) / 2)
    kl.backward()
    assert s_text.grad is None  # the text modality is the detached target
    assert s_image.grad is not None and s_image.grad.abs().sum() > 0


def test_vrd_loss_asymmetric_teacher_student_matrices():
    # Here TS ≠ STᵀ-equivalent rows, so each CE term and each KL term is pinned separately.
    # T_I = [e1, e2], S_I = [e1, e1]: TS_I = κ_I[[1, 1], [0, 0]] (rows uniform → CE log 2 each),
    #   ST_I = κ_I[[1, 0], [1, 0]] (rows logits [κ_I, 0]: CE row 0 log(1 + e^{−κ_I}), row 1 log(1 + e^{κ_I})).
    # T_T = [e1, e2], S_T = [e2, e2]: TS_T = κ_T[[0, 0], [1, 1]] (rows uniform → CE log 2 each),
    #   ST_T = κ_T[[0, 1], [0, 1]] (rows logits [0, κ_T] → p = [1 − b_T, b_T]: CE row 0 log(1 + e^{κ_T}),
    #   row 1 log(1 + e^{−κ_T})).
    # kl = ½[KL(uniform ‖ uniform) + KL(rows [κ_I, 0] ‖ rows [1 − b_T, b_T])]
    #    = ½[0 + L(κ_I) − (1 − b_T)κ_I − H(b_T)].
    ki, kt = 2.0, 0.7
    bt = sig(kt)
    kl, ce_i, ce_t = R.vrd_loss(t(E1, E1), t(E2, E2), t(E1, E2), t(E1, E2), ki, kt)
    close(kl, (L(ki) - (1 - bt) * ki - H(bt)) / 2)
    close(ce_i, (math.log(2.0) + (math.log1p(math.exp(-ki)) + math.log1p(math.exp(ki))) / 2) / 2)
    close(ce_t, (math.log(2.0) + (math.log1p(math.exp(kt)) + math.log1p(math.exp(-kt))) / 2) / 2)


def test_xrd_loss():
    # T_I = S_T = [e1, e2] → TIST = κ T_I S_Tᵀ = κ I, STTI = TISTᵀ = κ I.
    # T_T = [e1, e2], S_I = [e1, e1] → TTSI = κ T_T S_Iᵀ = κ[[1, 1], [0, 0]] (rows uniform),
    #   SITT = TTSIᵀ = κ[[1, 0], [1, 0]] (student rows [b, 1−b], log p = [κ − L, −L]), b = σ(κ).
    # KL(TIST ‖ TTSI) = L − κ/2 − log 2          (student κI vs uniform teacher)
    # KL(TTSI ‖ TIST) = log 2 − H(b)             (uniform student vs teacher rows [b, 1−b], [1−b, b])
    # KL(STTI ‖ SITT) = L − κ/2 − H(b)           (student κI vs teacher rows [b, 1−b] twice)
    # KL(SITT ‖ STTI) = L − κ/2 − H(b)           (row CEs L − bκ, L − (1−b)κ; mean L − κ/2)
    # xrd = ¼ Σ = ¾ (L − κ/2 − H(b)).
    k = 1.5
    b = sig(k)
    close(R.xrd_loss(t(E1, E1), t(E1, E2), t(E1, E2), t(E1, E2), k), 0.75 * (L(k) - k / 2 - H(b)))


def test_xrd_loss_four_distinct_terms():
    # A case where the four KL terms all differ (so a duplicated / mis-oriented term shows up).
    # T_I = [e1, e2], S_T = [e1, e3] → TIST = κA, A = [[1, 0], [0, 0]] (A = Aᵀ, so STTI = κA too):
    #   rows of κA: row 0 logits [κ, 0] → p = [b, 1−b], log p = [κ − L, −L]; row 1 uniform.
    # T_T = [e1, e2], S_I = [e2, e2] → TTSI = κC, C = [[0, 0], [1, 1]] (both rows uniform);
    #   SITT = κCᵀ, Cᵀ = [[0, 1], [0, 1]] (both rows logits [0, κ] → p = [1−b, b]).
    # With X = L − κ/2 − log 2, Y = log 2 − H(b), Z = L − (1−b)κ − H(b):
    #   KL(TIST ‖ TTSI) = (X + 0)/2   (row 0 [b, 1−b] vs uniform; row 1 uniform vs uniform)
    #   KL(TTSI ‖ TIST) = (Y + 0)/2   (row 0 uniform vs [b, 1−b]; row 1 uniform vs uniform)
    #   KL(STTI ‖ SITT) = (Z + Y)/2   (row 0 log p [κ−L, −L] vs [1−b, b]: CE L − (1−b)κ; row 1 uniform vs [1−b, b])
    #   KL(SITT ‖ STTI) = (Z + X)/2   (row 0 log p [−L, κ−L] vs [b, 1−b]: CE L − (1−b)κ; row 1 vs uniform)
    # xrd = ¼ (X + Y + Z).
    k = 1.5
    b = sig(k)
    X = L(k) - k / 2 - math.log(2.0)
    Y = math.log(2.0) - H(b)
    Z = L(k) - (1 - b) * k - H(b)
    assert min(abs(X - Y), abs(Y - Z), abs(X - Z)) > 1e-3  # the terms really differ
    close(R.xrd_loss(t(E2, E2), t(E1, E3), t(E1, E2), t(E1, E2), k), (X + Y + Z) / 4)


# --------------------------------------------------------------------------------------------------
# CLIP-CID: instance discrimination, margins, cluster discrimination
# --------------------------------------------------------------------------------------------------


def test_instance_discrimination_single_tower():
    # S_I = [e1, e2], T_T = [e1, e1]; M = S_I T_Tᵀ = [[1, 1], [0, 0]].
    # CE(κM): row 0 logits [κ, κ] → log 2; row 1 [0, 0] → log 2. Mean log 2.
    # CE(κMᵀ), Mᵀ = [[1, 0], [1, 0]]: row 0 log(1 + e^{−κ}), row 1 (target 0 vs κ) log(1 + e^κ).
    k = 2.0
    sec = (math.log1p(math.exp(-k)) + math.log1p(math.exp(k))) / 2
    close(R.instance_discrimination_loss(t(E1, E2), t(E1, E1), k), (math.log(2.0) + sec) / 2)


def test_instance_discrimination_two_tower_is_icl():
    # Same inputs as test_icl_loss: ½(A + B) with the closed forms derived there.
    k = 2.0
    A = (math.log1p(math.exp(-k)) + math.log(2.0)) / 2
    B = (math.log1p(math.exp(-k)) + math.log1p(math.exp(k))) / 2
    out = R.instance_discrimination_loss(t(E1, E2), t(E1, E3), k, s_text=t(E2, E2), t_image=t(E2, E1))
    close(out, (A + B) / 2)
    with pytest.raises(ValueError):
        R.instance_discrimination_loss(t(E1, E2), t(E1, E3), k, s_text=t(E2, E2))


def _cm(c: float, **kw) -> float:
    return float(R.combined_margin(torch.tensor([c], dtype=F64), **kw)[0])


def test_combined_margin_plain_softmax_is_identity():
    # m1 = 1, m2 = 0, m3 = 0: ψ(c) = c, no clamp (even slightly outside [−1, 1]), gradient 1.
    for c in (-1.0, -0.3, 0.0, 0.7, 1.0, 1.0 + 1e-7):
        assert _cm(c, m1=1.0, m2=0.0, m3=0.0) == c
    c = torch.tensor([1.0], dtype=F64, requires_grad=True)
    R.combined_margin(c, 1.0, 0.0, 0.0).sum().backward()
    close(c.grad[0], 1.0)


def test_combined_margin_cosface():
    # m1 = 1, m2 = 0, m3 = 0.35: ψ(c) = c − 0.35.
    for c in (-1.0, -0.2, 0.0, 0.5, 1.0):
        close(_cm(c, m1=1.0, m2=0.0, m3=0.35), c - 0.35)


def test_combined_margin_arcface_inside_boundary():
    m = 0.5
    # c = 0: θ = π/2, ψ = cos(π/2 + m) = −sin m.
    close(_cm(0.0, m1=1.0, m2=m), -math.sin(m))
    # c = ½: θ = π/3, ψ = cos(π/3 + m) = ½ cos m − (√3/2) sin m.
    close(_cm(0.5, m1=1.0, m2=m), 0.5 * math.cos(m) - math.sqrt(3) / 2 * math.sin(m))
    # c = −0.87 > −cos m ≈ −0.8776 (θ + m < π): ψ = c cos m − √(1 − c²) sin m.
    c = -0.87
    close(_cm(c, m1=1.0, m2=m), c * math.cos(m) - math.sqrt(1 - c * c) * math.sin(m))
    # c = 1 is clamped to c' = 1 − ACOS_EPS: ψ = c' cos m − √((1 − c')(1 + c')) sin m.
    cp = 1.0 - R.ACOS_EPS
    close(_cm(1.0, m1=1.0, m2=m), cp * math.cos(m) - math.sqrt((1 - cp) * (1 + cp)) * math.sin(m))
    # ArcFace + CosFace combined (m3 = 0.2) at c = 0: −sin m − 0.2.
    close(_cm(0.0, m1=1.0, m2=m, m3=0.2), -math.sin(m) - 0.2)


def test_combined_margin_arcface_past_boundary():
    # θ + m > π ⇔ c < cos(π − m) = −cos m. Fallback (insightface): ψ = c − m sin m (cos θ* = −cos m cancels).
    m = 0.5
    for c in (-0.88, -0.9, -1.0):
        close(_cm(c, m1=1.0, m2=m), c - m * math.sin(m))
    # with m3: ψ = c − m3 − m sin m
    close(_cm(-0.95, m1=1.0, m2=m, m3=0.1), -0.95 - 0.1 - m * math.sin(m))


def test_combined_margin_arcface_grad():
    # ψ = cos(acos c + m): dψ/dc = sin(θ + m)/sin θ. At c = 0: sin(π/2 + m) = cos m.
    # At c = ½: sin(π/3 + m)/(√3/2). At c = 1 the clamp is active: gradient 0.
    # Past the boundary (c = −0.9): ψ = c − m sin m, gradient 1.
    m = 0.5
    c = torch.tensor([0.0, 0.5, 1.0, -0.9], dtype=F64, requires_grad=True)
    R.combined_margin(c, 1.0, m, 0.0).sum().backward()
    close_vec(c.grad, [math.cos(m), math.sin(math.pi / 3 + m) / (math.sqrt(3) / 2), 0.0, 1.0])


def test_combined_margin_sphereface_m1_2():
    # m1 = 2, m2 = 0: θ* = π/2, mm = 0 + cos 0 + cos(π/2) = 1.
    # c ≥ 0 (θ ≤ π/2): ψ = cos 2θ = 2c² − 1.  c < 0: ψ = c − 1 (continuous at c = 0: both −1).
    for c in (0.0, 0.3, 0.6, 0.9):
        close(_cm(c, m1=2.0, m2=0.0), 2 * c * c - 1)
    for c in (-0.1, -0.6, -1.0):
        close(_cm(c, m1=2.0, m2=0.0), c - 1 - math.cos(math.pi / 2))
    # c = 1 is clamped: 2(1 − ACOS_EPS)² − 1.
    close(_cm(1.0, m1=2.0, m2=0.0), 2 * (1 - R.ACOS_EPS) ** 2 - 1)
    # Monotonic: ψ is non-increasing in θ, i.e. non-decreasing in c, across the whole range.
    cs = torch.linspace(-1.0, 1.0, 4001, dtype=F64)
    psi = R.combined_margin(cs, 2.0, 0.0, 0.0)
    assert bool((psi[1:] - psi[:-1] >= -1e-15).all())
    # and strictly below the plain cosine away from c = 1 (the margin makes the target harder)
    assert bool((psi[:-1] < cs[:-1]).all())


def test_margin_softmax_shard_stats_hand():
    # embeddings [[2, 0], [0, 3], [−1, −1]] → x = e1, e2, v = −(e1 + e2)/√2;
    # centres [[1, 0], [0, 5], [−1, 0]] → w = e1, e2, −e1. cos = [[1, 0, −1], [0, 1, 0], [−r, −r, r]], r = 1/√2.
    # ArcFace m2 = ½, s = 2, labels [1, −1, 0]:
    #   row 0: target cos 0 → ψ = −sin m; logits [2, −2 sin m, −2]; target −2 sin m.
    #   row 1: no target on this shard → plain logits [0, 2, 0], lse log(2 + e²), target 0.
    #   row 2: target cos −r → θ = 3π/4, θ + m < π → ψ = cos(3π/4 + m) = −r cos m − r sin m;
    #          logits [2ψ, −2r, 2r].
    m, s, r = 0.5, 2.0, math.sqrt(0.5)
    emb = t([2.0, 0.0], [0.0, 3.0], [-1.0, -1.0])
    cen = t([1.0, 0.0], [0.0, 5.0], [-1.0, 0.0])
    labels = torch.tensor([1, -1, 0])
    lse, tgt = R.margin_softmax_shard_stats(emb, cen, labels, s, 1.0, m, 0.0)
    psi2 = -r * math.cos(m) - r * math.sin(m)
    close_vec(tgt, [-2 * math.sin(m), 0.0, 2 * psi2])
    close_vec(
        lse,
        [
            math.log(math.exp(2) + math.exp(-2 * math.sin(m)) + math.exp(-2)),
            math.log(2 + math.exp(2)),
            math.log(math.exp(2 * psi2) + math.exp(-2 * r) + math.exp(2 * r)),
        ],
    )


def test_margin_softmax_shard_stats_past_boundary_target():
    # x = e1, target centre −e1 (cos −1, θ = π): fallback ψ = −1 − m sin m; other centre e2 (cos 0).
    # logits [s ψ, 0] → lse = log(e^{sψ} + 1).
    m, s = 0.5, 3.0
    lse, tgt = R.margin_softmax_shard_stats(t([1.0, 0.0]), t([-1.0, 0.0], [0.0, 1.0]), torch.tensor([0]), s)
    psi = -1.0 - m * math.sin(m)
    close_vec(tgt, [s * psi])
    close_vec(lse, [math.log1p(math.exp(s * psi))])


def test_cluster_discrimination_loss_hand():
    # Same set-up as test_margin_softmax_shard_stats_hand: ℓ = lse − target, 0 for the −1 row.
    m, s, r = 0.5, 2.0, math.sqrt(0.5)
    emb = t([2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]).requires_grad_()
    cen = t([1.0, 0.0], [0.0, 5.0], [-1.0, 0.0])
    labels = torch.tensor([1, -1, 0])
    out = R.cluster_discrimination_loss(emb, cen, labels, scale=s, m1=1.0, m2=m, m3=0.0)
    psi2 = -r * math.cos(m) - r * math.sin(m)
    l0 = math.log(math.exp(2) + math.exp(-2 * math.sin(m)) + math.exp(-2)) + 2 * math.sin(m)
    l2 = math.log(math.exp(2 * psi2) + math.exp(-2 * r) + math.exp(2 * r)) - 2 * psi2
    close_vec(out, [l0, 0.0, l2])
    out.sum().backward()
    assert bool((emb.grad[1] == 0).all())  # the −1 row gets no gradient
    assert bool(emb.grad[0].abs().sum() > 0)


def test_cluster_discrimination_loss_defaults():
    # Defaults s = 32, m1 = 1, m2 = ½: x = e1, centres [e1, e2], label 0. Target cos 1 is clamped to
    # c' = 1 − ACOS_EPS: ψ = c' cos m − √((1 − c')(1 + c')) sin m; other logit 0.
    # ℓ = log(e^{32ψ} + 1) − 32ψ = log(1 + e^{−32ψ}).
    m = 0.5
    cp = 1.0 - R.ACOS_EPS
    psi = cp * math.cos(m) - math.sqrt((1 - cp) * (1 + cp)) * math.sin(m)
    out = R.cluster_discrimination_loss(t([1.0, 0.0]), t([1.0, 0.0], [0.0, 1.0]), torch.tensor([0]))
    close_vec(out, [math.log1p(math.exp(-32 * psi))])


def test_cluster_discrimination_loss_cosface_and_sphereface():
    # CosFace m3 = 0.35, s = 4: x = e1, centres [e1, e2], label 0 → ψ = 0.65, ℓ = log(1 + e^{−4·0.65}).
    x, cen, lab = t([1.0, 0.0]), t([1.0, 0.0], [0.0, 1.0]), torch.tensor([0])
    close_vec(R.cluster_discrimination_loss(x, cen, lab, 4.0, 1.0, 0.0, 0.35), [math.log1p(math.exp(-2.6))])
    # SphereFace m1 = 2, s = 4: x = (3, 4)/5, target e1 (c = 0.6) → ψ = 2·0.36 − 1 = −0.28;
    # other centre e2: cos 0.8. ℓ = log(e^{4ψ} + e^{3.2}) − 4ψ = log(1 + e^{3.2 − 4ψ}).
    x2 = t([3.0, 4.0])
    out = R.cluster_discrimination_loss(x2, cen, lab, 4.0, 2.0, 0.0, 0.0)
    close_vec(out, [math.log1p(math.exp(3.2 + 4 * 0.28))])


# --------------------------------------------------------------------------------------------------
# Semantic balance and assignment
# --------------------------------------------------------------------------------------------------


def _mms_case():
    # rows [1, 0], [0, 2], [3, 3], [−1, 0] → e1, e2, u = (e1 + e2)/√2, −e1 (D = 2).
    # cos(0,1) = 0, cos(0,2) = r, cos(1,2) = r (exact tie), cos(0,3) = −1, cos(1,3) = 0, cos(2,3) = −r.
    return t([1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0])


def test_masked_max_similarity_hand():
    # M_0 = −inf (idx −1); M_1 = cos(0,1) = 0 (idx 0); M_2 = max(r, r) = r, tie → idx 0;
    # M_3 = max(−1, 0, −r) = 0 (idx 1).
    m, idx = R.masked_max_similarity(_mms_case())
    r = math.sqrt(0.5)
    assert math.isinf(m[0].item()) and m[0].item() < 0
    close_vec(m[1:], [0.0, r, 0.0])
    assert idx.tolist() == [-1, 0, 0, 1]
    assert idx.dtype == torch.int64


def test_masked_max_similarity_all_duplicates_ties_to_first():
    # 12 copies of one row: every M_j = 1 (up to rounding), ties → idx 0.
    m, idx = R.masked_max_similarity(t(*([[1.0, 2.0, 2.0]] * 12)))
    close_vec(m[1:], [1.0] * 11, tol=1e-15)
    assert idx.tolist() == [-1] + [0] * 11
    # a single row: no predecessor
    m1, idx1 = R.masked_max_similarity(t([0.5, 0.5]))
    assert idx1.tolist() == [-1] and math.isinf(m1[0].item())


def test_semdedup_keep_hand():
    # M = [−inf, 0, r, 0]; drop j iff M_j > 1 − eps (strict).
    # eps 0.1 (1 − eps = 0.9): keep all.  eps 0.5 (0.5): drop row 2 (r ≈ 0.707).
    # eps 1.0 (0.0): 0 > 0 is false → rows 1, 3 kept, row 2 dropped.  eps 1.5 (−0.5): drop 1, 2, 3.
    # eps 2.5 (−1.5): row 0 still kept (−inf).
    keep = R.semdedup_keep(_mms_case(), [0.1, 0.5, 1.0, 1.5, 2.5])
    assert keep.dtype == torch.bool
    assert keep.tolist() == [
        [True, True, True, True],
        [True, True, False, True],
        [True, True, False, True],
        [True, False, False, False],
        [True, False, False, False],
    ]
    # eps as a tensor, and exact duplicates: [a, b, a] with tiny eps drops only the copy.
    keep2 = R.semdedup_keep(t([1.0, 0.0], [0.0, 1.0], [1.0, 0.0]), torch.tensor([1e-6]))
    assert keep2.tolist() == [[True, True, False]]


def test_nearest_centroid_hand():
    # centroids [[1, 0], [0, 5], [−1, −1]] → e1, e2, −(e1 + e2)/√2.
    # x0 = [2, 0] → cos [1, 0, −r] → (1, 0).
    # x1 = [1, 2] → (1, 2)/√5: cos [1/√5, 2/√5, −3/√10] → (2/√5, 1).
    # x2 = [0, −3] → −e2: cos [0, −1, r] → (r, 2).
    r = math.sqrt(0.5)
    sim, idx = R.nearest_centroid(t([2.0, 0.0], [1.0, 2.0], [0.0, -3.0]), t([1.0, 0.0], [0.0, 5.0], [-1.0, -1.0]))
    close_vec(sim, [1.0, 2 / math.sqrt(5), r])
    assert idx.tolist() == [0, 1, 2]


def test_row_logsumexp_hand():
    # row 0: log(1 + 2 + 3) = log 6; row 1: 1000 + log 2 (no overflow); row 2: log(3e^{−1}) = log 3 − 1.
    x = t([0.0, math.log(2.0), math.log(3.0)], [1000.0, 1000.0, -math.inf], [-1.0, -1.0, -1.0])
    close_vec(R.row_logsumexp(x), [math.log(6.0), 1000.0 + math.log(2.0), math.log(3.0) - 1.0])
    assert R.row_logsumexp(x).dtype == F64


def test_row_logsumexp_half_inputs_computed_in_float32():
    # fp16 [60000, 60000]: 60000 + log 2 = 60000.693… needs float32 (fp16 spacing at 6e4 is 32).
    for dt in (torch.float16, torch.bfloat16):
        x = torch.tensor([[60000.0, 60000.0], [0.0, 0.0]], dtype=dt)
        out = R.row_logsumexp(x)
        assert out.dtype == torch.float32
        base = float(x[0, 0])  # bf16 rounds 60000 to a nearby representable value
        close(out[0], base + math.log(2.0), tol=1e-6)
        close(out[1], math.log(2.0), tol=1e-6)
