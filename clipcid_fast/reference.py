"""Pure-PyTorch definition of every loss and op in clipcid_fast.

This file is the spec, the CPU fallback, the test oracle and the benchmark baseline. It is written
for clarity, not speed: it forms the full B×B / B×N / c×c matrices the fused kernels never store.
Every function computes in the dtype it is given (call it with float64 inputs for a gold value).

Conventions:

* Image/text features passed to the contrastive / relational losses are **already L2-normalised**
  (open_clip's models return normalised features; the modules in ``losses.py`` normalise the raw
  student features of CLIP-KD / CLIP-RD before calling these). Rows are paired: row i of the image
  features belongs with row i of the text features, so the target of row i is column i.
* ``KL(student ‖ teacher)`` means CLIP-KD's ``DistillKL(T=1)``:
  ``F.kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")``, i.e. the mean over rows
  of KL(p_teacher_row ‖ p_student_row), softmax along each row (dim=1), the teacher side detached.
* Logit scales are multipliers used as given (open_clip passes ``logit_scale.exp()``; CLIP-KD and
  CLIP-RD use their ``*_logit_scale`` parameters raw, without exp).
* ``sg(·)`` = stop-gradient (``.detach()``).

Choices made where the papers are silent are marked **Choice:** in the docstrings and listed in
README.md ("Modelling choices").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACOS_EPS",
    "clip_loss",
    "cluster_discrimination_loss",
    "combined_margin",
    "crd_loss",
    "cross_kd_loss",
    "distill_clip_loss",
    "fd_loss",
    "icl_loss",
    "instance_discrimination_loss",
    "margin_softmax_shard_stats",
    "masked_max_similarity",
    "mlcd_loss",
    "mlcd_shard_stats",
    "nearest_centroid",
    "relational_rows_loss",
    "row_logsumexp",
    "semdedup_keep",
    "vrd_loss",
    "xrd_loss",
]

# --------------------------------------------------------------------------------------------------
# The generic similarity-softmax row loss (the op ``relational_kd_rows`` fuses).
# --------------------------------------------------------------------------------------------------


def relational_rows_loss(
    q_s: Tensor,
    k_s: Tensor,
    scale_s: Tensor | float,
    q_t: Tensor | None = None,
    k_t: Tensor | None = None,
    scale_t: Tensor | float | None = None,
    kind: str = "kl",
    target_offset: int = 0,
) -> Tensor:
    """Per-row loss between a teacher and a student similarity softmax.

    Shapes: ``q_s [R, D_s]``, ``k_s [C, D_s]``, ``q_t [R, D_t]``, ``k_t [C, D_t]``; returns ``[R]``.

    Student logits ``z_s = scale_s · q_s k_sᵀ`` and teacher logits ``z_t = scale_t · q_t k_tᵀ`` (R×C),
    ``log p_s = log_softmax(z_s, dim=1)``, ``p_t = softmax(z_t, dim=1)``. For row i:

    * no teacher (``q_t is None``), hard diagonal target, ``kind="ce"``:
      ``ℓ_i = logsumexp_j z_s[i, j] − z_s[i, i + target_offset]`` (InfoNCE / CLIP cross-entropy);
    * ``kind="ce"`` with a teacher (open_clip ``DistillClipLoss.dist_loss``, soft cross-entropy):
      ``ℓ_i = −Σ_j p_t[i, j] log p_s[i, j]``;
    * ``kind="kl"`` with a teacher (CLIP-KD ``DistillKL``): ``ℓ_i = Σ_j p_t[i, j] (log p_t[i, j] − log p_s[i, j])``.

    The column direction (text→image) is the same function with the roles of q and k swapped.
    Nothing is detached here: losses that stop the teacher's gradient pass detached tensors.
    """
    if kind not in ("kl", "ce"):
        raise ValueError(f"kind must be 'kl' or 'ce', got {kind!r}")
    z_s = _logits(q_s, k_s, scale_s)
    if q_t is None:
        if kind != "ce":
            raise ValueError("a hard diagonal target (no teacher) needs kind='ce'")
        return F.cross_entropy(z_s, _diag_targets(q_s, target_offset), reduction="none")
    if k_t is None or scale_t is None:
        raise ValueError("q_t, k_t and scale_t must be given together")
    z_t = _logits(q_t, k_t, scale_t)
    log_p_s = F.log_softmax(z_s, dim=1)
    p_t = F.softmax(z_t, dim=1)
    if kind == "ce":
        return -(p_t * log_p_s).sum(dim=1)
    # xlogy keeps p_t = 0 entries at exactly 0 (as F.kl_div does).
    return (torch.xlogy(p_t, p_t) - p_t * log_p_s).sum(dim=1)


def _logits(q: Tensor, k: Tensor, scale) -> Tensor:
    # (scale · q) kᵀ: open_clip's order of operations, so float32 results match it bit for bit.
    return (scale * q) @ k.T


def _diag_targets(q: Tensor, offset: int = 0) -> Tensor:
    return torch.arange(q.shape[0], device=q.device) + offset


def _kl(q_s: Tensor, k_s: Tensor, scale_s, q_t: Tensor, k_t: Tensor, scale_t) -> Tensor:
    """mean_i KL(softmax(sg z_t)[i] ‖ softmax(z_s)[i]): the teacher side is detached."""
    return relational_rows_loss(q_s, k_s, scale_s, q_t.detach(), k_t.detach(), _detach(scale_t), kind="kl").mean()


def _ce(q: Tensor, k: Tensor, scale) -> Tensor:
    """mean_i CE(scale · q kᵀ, diag): InfoNCE of rows of q against the columns k.

    Same value as ``relational_rows_loss(q, k, scale, kind="ce").mean()``; written with
    F.cross_entropy's own mean so the float32 sum order is open_clip's."""
    return F.cross_entropy(_logits(q, k, scale), _diag_targets(q))


def _detach(x):
    return x.detach() if isinstance(x, Tensor) else x


# --------------------------------------------------------------------------------------------------
# open_clip contracts
# --------------------------------------------------------------------------------------------------


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP InfoNCE, open_clip ``ClipLoss`` (single process, no logit bias).

    ``image_features, text_features [B, D]`` (normalised), ``logit_scale`` scalar (already exp'ed).
    ``L = ½ [ mean_i CE(τ I Tᵀ, i) + mean_i CE(τ T Iᵀ, i) ]``. Returns a scalar.
    """
    return (_ce(image_features, text_features, logit_scale) + _ce(text_features, image_features, logit_scale)) / 2


def distill_clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    dist_image_features: Tensor,
    dist_text_features: Tensor,
    dist_logit_scale: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """open_clip ``DistillClipLoss``: returns ``(contrastive_loss, distill_loss)``, both scalars.

    ``contrastive_loss`` is :func:`clip_loss` of the student. ``distill_loss`` is the soft
    cross-entropy (not a KL: it includes the teacher's entropy) from teacher to student, both ways:
    ``½ [ mean_i −Σ_j softmax(τ_t I_t T_tᵀ)_ij log softmax(τ_s I_s T_sᵀ)_ij + (same with I, T swapped) ]``.
    As in open_clip the teacher is not detached: gradients reach teacher features that require them.
    """
    contrastive = clip_loss(image_features, text_features, logit_scale)
    distill = (
        relational_rows_loss(
            image_features,
            text_features,
            logit_scale,
            dist_image_features,
            dist_text_features,
            dist_logit_scale,
            kind="ce",
        ).mean()
        + relational_rows_loss(
            text_features,
            image_features,
            logit_scale,
            dist_text_features,
            dist_image_features,
            dist_logit_scale,
            kind="ce",
        ).mean()
    ) / 2
    return contrastive, distill


# --------------------------------------------------------------------------------------------------
# CLIP-KD (winycg/CLIP-KD) — S = student, T = teacher, I = image, T = text features (normalised)
# --------------------------------------------------------------------------------------------------


def crd_loss(s_image: Tensor, s_text: Tensor, s_scale, t_image: Tensor, t_text: Tensor, t_scale) -> Tensor:
    """CLIP-KD CRD (= CLIP-RD HRD): relation KD between the teacher's and student's own B×B softmaxes.

    ``L = ½ [ KL(τ_s S_I S_Tᵀ ‖ sg τ_t T_I T_Tᵀ) + KL(τ_s S_T S_Iᵀ ‖ sg τ_t T_T T_Iᵀ) ]`` (rows, batchmean).
    """
    return (
        _kl(s_image, s_text, s_scale, t_image, t_text, t_scale)
        + _kl(s_text, s_image, s_scale, t_text, t_image, t_scale)
    ) / 2


def icl_loss(s_image: Tensor, s_text: Tensor, t_image: Tensor, t_text: Tensor, cross_scale) -> Tensor:
    """CLIP-KD ICL: student↔teacher cross-modal InfoNCE.

    ``L = ½ [ CE(κ_c S_I T_Tᵀ, diag) + CE(κ_c S_T T_Iᵀ, diag) ]`` with κ_c CLIP-KD's raw
    ``cross_logit_scale`` (init ln(1/0.07), no exp).
    """
    return (_ce(s_image, t_text, cross_scale) + _ce(s_text, t_image, cross_scale)) / 2


def fd_loss(s_image: Tensor, s_text: Tensor, t_image: Tensor, t_text: Tensor) -> Tensor:
    """CLIP-KD FD: ``MSE(S_I, T_I) + MSE(S_T, T_T)``, each ``F.mse_loss`` (mean over B×D)."""
    return F.mse_loss(s_image, t_image) + F.mse_loss(s_text, t_text)


def cross_kd_loss(s_image: Tensor, s_text: Tensor, t_image: Tensor, t_text: Tensor, cross_scale, t_scale) -> Tensor:
    """CLIP-KD cross-KD: the cross student–teacher softmax pulled to the teacher's own.

    ``L = ½ [ KL(κ_c S_I T_Tᵀ ‖ sg τ_t T_I T_Tᵀ) + KL(κ_c S_T T_Iᵀ ‖ sg τ_t T_T T_Iᵀ) ]``.
    """
    return (
        _kl(s_image, t_text, cross_scale, t_image, t_text, t_scale)
        + _kl(s_text, t_image, cross_scale, t_text, t_image, t_scale)
    ) / 2


# --------------------------------------------------------------------------------------------------
# CLIP-RD (Rosieyang01/CLIP-RD, KDClipLoss)
# --------------------------------------------------------------------------------------------------


def vrd_loss(
    s_image: Tensor, s_text: Tensor, t_image: Tensor, t_text: Tensor, image_scale, text_scale
) -> tuple[Tensor, Tensor, Tensor]:
    """CLIP-RD vertical relational distillation. Returns ``(kl, ce_image, ce_text)``.

    With ``TS_I = κ_I T_I S_Iᵀ``, ``ST_I = κ_I S_I T_Iᵀ``, ``TS_T = κ_T T_T S_Tᵀ``, ``ST_T = κ_T S_T T_Tᵀ``:

    * ``kl = ½ [ KL(TS_I ‖ sg TS_T) + KL(ST_I ‖ sg ST_T) ]`` — the image-modality teacher–student
      distribution is pulled to the text-modality one (only the image side gets gradient);
    * ``ce_image = ½ [ CE(TS_I, diag) + CE(ST_I, diag) ]``, ``ce_text = ½ [ CE(TS_T, diag) + CE(ST_T, diag) ]``.

    CLIP-RD's total weights all three with the same α_VRD. κ_I, κ_T are raw parameters (no exp).
    """
    kl = (
        _kl(t_image, s_image, image_scale, t_text, s_text, text_scale)
        + _kl(s_image, t_image, image_scale, s_text, t_text, text_scale)
    ) / 2
    ce_image = (_ce(t_image, s_image, image_scale) + _ce(s_image, t_image, image_scale)) / 2
    ce_text = (_ce(t_text, s_text, text_scale) + _ce(s_text, t_text, text_scale)) / 2
    return kl, ce_image, ce_text


def xrd_loss(s_image: Tensor, s_text: Tensor, t_image: Tensor, t_text: Tensor, cross_scale) -> Tensor:
    """CLIP-RD cross relational distillation (cross-modal teacher↔student, both KL directions).

    ``TIST = κ_c T_I S_Tᵀ``, ``TTSI = κ_c T_T S_Iᵀ``, ``SITT = κ_c S_I T_Tᵀ``, ``STTI = κ_c S_T T_Iᵀ``;
    ``L = ¼ [ KL(TIST ‖ sg TTSI) + KL(TTSI ‖ sg TIST) + KL(STTI ‖ sg SITT) + KL(SITT ‖ sg STTI) ]``.
    """
    k = cross_scale
    return (
        _kl(t_image, s_text, k, t_text, s_image, k)
        + _kl(t_text, s_image, k, t_image, s_text, k)
        + _kl(s_text, t_image, k, s_image, t_text, k)
        + _kl(s_image, t_text, k, s_text, t_image, k)
    ) / 4


# --------------------------------------------------------------------------------------------------
# CLIP-CID
# --------------------------------------------------------------------------------------------------


def instance_discrimination_loss(
    s_image: Tensor,
    t_text: Tensor,
    scale,
    s_text: Tensor | None = None,
    t_image: Tensor | None = None,
) -> Tensor:
    """CLIP-CID instance discrimination: cross-modal student↔teacher InfoNCE.

    **Choice** (the paper's form is not public): with a student image tower only,
    ``L = ½ [ CE(κ S_I T_Tᵀ, diag) + CE(κ T_T S_Iᵀ, diag) ]`` (student image i must pick teacher text i
    and vice versa). With ``s_text`` and ``t_image`` also given it is CLIP-KD's ICL,
    ``½ [ CE(κ S_I T_Tᵀ) + CE(κ S_T T_Iᵀ) ]``.
    """
    if (s_text is None) != (t_image is None):
        raise ValueError("s_text and t_image must be given together")
    if s_text is not None:
        return icl_loss(s_image, s_text, t_image, t_text, scale)
    return (_ce(s_image, t_text, scale) + _ce(t_text, s_image, scale)) / 2


ACOS_EPS = 1e-6
"""Half-width of the band cut off the ends of [−1, 1] before arccos in :func:`combined_margin`."""


def combined_margin(cos: Tensor, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0) -> Tensor:
    """Combined angular margin ψ(c) applied to a target cosine c = cos θ (insightface convention).

    * ``m1 = 1, m2 = 0``: ``ψ = c − m3`` (CosFace; with m3 = 0 the plain softmax), no arccos.
    * otherwise ``ψ = cos(m1·θ + m2) − m3`` while ``m1·θ + m2 ≤ π``;
      past it ``ψ = c − m3 − mm`` with ``mm = m2·sin m2 + cos m2 + cos θ*``, ``θ* = (π − m2)/m1``.

    **Choice:** for ArcFace (m1 = 1) the fallback is exactly insightface's ``cos θ − m·sin m``
    (its ``easy_margin=False`` branch); the extra ``cos m2 + cos θ*`` (zero when m1 = 1) keeps ψ
    decreasing in θ for m1 ≠ 1. On the arccos path c is clamped to ``[−1 + ACOS_EPS, 1 − ACOS_EPS]``:
    dθ/dc = −1/sin θ is unbounded at θ = 0 and π, and fp32 dots of unit vectors can leave [−1, 1].
    The clamp's gradient is 0 outside that band, so an exactly aligned target gets no margin gradient.
    """
    if m1 == 1.0 and m2 == 0.0:
        return cos - m3
    c = cos.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS)
    t = m1 * torch.acos(c) + m2
    theta_star = (math.pi - m2) / m1
    mm = m2 * math.sin(m2) + math.cos(m2) + math.cos(theta_star)
    return torch.where(t <= math.pi, torch.cos(t) - m3, cos - m3 - mm)


def margin_softmax_shard_stats(
    embeddings: Tensor,
    centres: Tensor,
    labels: Tensor,
    scale: float,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-row statistics of the margin softmax over one shard of class centres.

    ``embeddings [B, D]``, ``centres [N, D]`` (both L2-normalised here, gradients through the
    normalisation), ``labels [B]`` int64 in ``[0, N)`` or ``−1`` ("target not on this shard").
    Logits ``z_ij = s·cos θ_ij`` for j ≠ y_i and ``z_iy = s·ψ(cos θ_iy)`` (:func:`combined_margin`).
    Returns ``(lse [B], target_logit [B])``: ``lse_i = logsumexp_j z_ij`` over this shard, and
    ``target_logit_i = z_{i y_i}`` (0 where ``labels == −1``). Across shards the loss is
    ``logsumexp_shards(lse) − Σ_shards target_logit``.
    """
    x = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = centres / centres.norm(dim=1, keepdim=True)
    cos = x @ w.T
    on_shard = labels >= 0
    safe = labels.clamp(min=0)
    rows = torch.arange(x.shape[0], device=x.device)
    target_cos = cos[rows, safe]
    target_logit = torch.where(on_shard, scale * combined_margin(target_cos, m1, m2, m3), 0.0)
    onehot = F.one_hot(safe, cos.shape[1]).to(torch.bool) & on_shard[:, None]
    logits = torch.where(onehot, target_logit[:, None], scale * cos)
    return torch.logsumexp(logits, dim=1), target_logit


def cluster_discrimination_loss(
    embeddings: Tensor,
    centres: Tensor,
    labels: Tensor,
    scale: float = 32.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
) -> Tensor:
    """CLIP-CID cluster discrimination: margin softmax cross-entropy against N class centres.

    ``ℓ_i = −log( e^{s ψ(cos θ_{i y_i})} / (e^{s ψ(cos θ_{i y_i})} + Σ_{j ≠ y_i} e^{s cos θ_ij}) )``,
    θ_ij the angle between embedding i and centre j (both normalised inside). Returns ``[B]``.
    Rows labelled ``−1`` (no target) get loss 0 and no gradient. Defaults s = 32, ArcFace m2 = 0.5
    are unicom's fine-tuning values (**Choice**: CLIP-CID's own values are not public).
    """
    lse, target = margin_softmax_shard_stats(embeddings, centres, labels, scale, m1, m2, m3)
    return torch.where(labels >= 0, lse - target, 0.0)


def _positive_mask(labels: Tensor, num_classes: int) -> Tensor:
    """``[B, N]`` bool: column j is one of row i's labels (−1 entries are padding)."""
    on = labels >= 0
    mask = torch.zeros(labels.shape[0], num_classes, dtype=torch.bool, device=labels.device)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    mask[rows[on], labels[on]] = True
    return mask


def mlcd_shard_stats(
    embeddings: Tensor,
    centres: Tensor,
    labels: Tensor,
    scale: float,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-row statistics of the multi-label cluster loss over one shard of class centres.

    ``embeddings [B, D]``, ``centres [N, D]`` (both L2-normalised here), ``labels [B, K]`` int64 in ``[0, N)``
    or ``−1`` (padding, or "this positive is not on this shard"); P_i = the set of row i's labels.
    Returns ``(neg_lse [B], pos_lse [B])``:

    * ``neg_lse_i = logsumexp_{j ∉ P_i} s·cos θ_ij`` over this shard's centres (−inf if every one is a positive);
    * ``pos_lse_i = logsumexp_{p ∈ P_i} −s·ψ(cos θ_ip)`` (ψ = :func:`combined_margin`; −inf if P_i is empty).

    Across shards each combines by log-sum-exp, and the loss is ``softplus(neg) + softplus(pos)``
    (:func:`mlcd_loss`): ``log(1 + Σ e^a) = softplus(logsumexp a)``.
    """
    x = embeddings / embeddings.norm(dim=1, keepdim=True)
    w = centres / centres.norm(dim=1, keepdim=True)
    cos = x @ w.T
    pos = _positive_mask(labels, w.shape[0])
    neg_lse = _logsumexp_rows(torch.where(pos, float("-inf"), scale * cos))
    on = labels >= 0
    c_pos = torch.gather(cos, 1, labels.clamp(min=0))
    return neg_lse, _logsumexp_rows(torch.where(on, -scale * combined_margin(c_pos, m1, m2, m3), float("-inf")))


def _logsumexp_rows(z: Tensor) -> Tensor:
    """Row log-sum-exp; −inf with a zero gradient (torch.logsumexp gives NaN) on a row that is all −inf."""
    empty = torch.isneginf(z).all(dim=1)
    return torch.logsumexp(torch.where(empty[:, None], 0.0, z), dim=1).masked_fill(empty, float("-inf"))


def mlcd_loss(
    embeddings: Tensor,
    centres: Tensor,
    labels: Tensor,
    scale: float = 32.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
) -> Tensor:
    """MLCD multi-label cluster discrimination (An et al., ECCV 2024, arXiv 2407.17331, Eq. 5).

    The paper (§3.2, Eq. 5) separates the positive and negative parts of the multi-label softmax:
    ``L = log(1 + Σ_{i∈Ω_p} e^{−s_i}) + log(1 + Σ_{j∈Ω'_n} e^{s_j})``, s_i / s_j the cosines of the embedding
    with its l positive centres (its l nearest cluster centres; l = 8 in the paper) and with the negative ones.
    Here, with θ_ij the angle between embedding i and centre j and P_i the set of row i's labels:

    ``ℓ_i = log(1 + Σ_{p ∈ P_i} e^{−s·ψ(cos θ_ip)}) + log(1 + Σ_{j ∉ P_i} e^{s·cos θ_ij})``.

    ``labels [B, K]``: each row's positive centres, ``−1`` for padding (fewer than K positives). Returns ``[B]``;
    a row with no positive gets loss 0 and no gradient (as a ``−1`` row of :func:`cluster_discrimination_loss`).

    **Choice** (Eq. 5 shows raw cosines; the paper says it uses "margin-based PartialFC" without giving s or m):
    the logits are scaled by s and the positives get the same combined margin ψ as the single-label loss
    (:func:`combined_margin`), defaults unicom's s = 32, ArcFace m2 = 0.5. **Choice**: Ω'_n is *every*
    non-positive centre (no negative sampling; the paper samples a ratio r = 0.1 of them per step, Tab. 5b), so
    the loss is exact and deterministic like the single-label op's. **Choice**: repeated labels in a row count
    once in the negative mask but twice in the positive sum; the public functions refuse them.
    With K = 1 this is *not* the single-label loss (``log(1 + Σ_j e^{z_j − z_y})``): the two parts are separate.
    """
    neg, pos = mlcd_shard_stats(embeddings, centres, labels, scale, m1, m2, m3)
    # log(1 + e^a) exactly (F.softplus switches to a above a threshold), 0 at a = −inf
    loss = torch.logaddexp(neg, torch.zeros_like(neg)) + torch.logaddexp(pos, torch.zeros_like(pos))
    return torch.where((labels >= 0).any(dim=1), loss, 0.0)


# --------------------------------------------------------------------------------------------------
# Semantic balance (SemDeDup keep rule) and assignment
# --------------------------------------------------------------------------------------------------


def masked_max_similarity(x: Tensor) -> tuple[Tensor, Tensor]:
    """For ordered rows of one cluster: ``M_j = max_{i<j} cos(x_i, x_j)`` and its argmax.

    ``x [c, D]`` (normalised inside). Returns ``(M [c], idx [c] int64)``; row 0 has no predecessor:
    ``M_0 = −inf``, ``idx_0 = −1``. Ties go to the smallest i.
    """
    xn = x / x.norm(dim=1, keepdim=True)
    sim = xn @ xn.T
    earlier = torch.ones_like(sim, dtype=torch.bool).triu(diagonal=1)  # [i, j] with i < j
    sim = sim.masked_fill(~earlier, float("-inf"))
    m, idx = sim.max(dim=0)
    idx = torch.where(torch.isneginf(m), -1, idx)
    return m, idx


def semdedup_keep(x: Tensor, eps: Sequence[float] | Tensor) -> Tensor:
    """SemDeDup keep rule for one ordered cluster and several thresholds at once.

    Drop row j when ``max_{i<j} cos(x_i, x_j) > 1 − eps`` (earlier rows count whether kept or not,
    as in SemDeDup). Returns ``keep [len(eps), c]`` bool; row 0 is always kept.
    """
    m, _ = masked_max_similarity(x)
    eps_t = torch.as_tensor(eps, dtype=m.dtype, device=m.device).reshape(-1, 1)
    return ~(m[None, :] > 1 - eps_t)


def nearest_centroid(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Spherical assignment. ``x [n, D]``, ``centroids [K, D]`` → ``(max_k cos(x_i, c_k) [n], argmax_k [n])``."""
    xn = x / x.norm(dim=1, keepdim=True)
    cn = centroids / centroids.norm(dim=1, keepdim=True)
    sim, idx = (xn @ cn.T).max(dim=1)
    return sim, idx


# --------------------------------------------------------------------------------------------------
# Infrastructure op (proves the C++ / Triton / CUDA plumbing)
# --------------------------------------------------------------------------------------------------


def row_logsumexp(x: Tensor) -> Tensor:
    """``logsumexp_j x[i, j]`` for ``x [R, C]``, computed in float32 at least. Returns ``[R]``."""
    return torch.logsumexp(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1)
