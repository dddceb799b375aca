"""Loss modules with open_clip's contract: constructor takes the distributed config, and

    forward(image_features, text_features, logit_scale,
            dist_image_features, dist_text_features, dist_logit_scale, output_dict=False)

``output_dict=True`` returns ``{"<name>_loss": tensor}`` (already weighted: a trainer sums the
values, as open_clip's does); otherwise a tuple in the same order. Every B×B similarity softmax goes
through the fused relational-rows op (``ops/relational_rows.py``); ``impl`` picks its backend.

Teacher features (``dist_*``) are treated as constants: the fused op gives them no gradient
(open_clip's teacher runs under ``torch.no_grad``; CLIP-KD and CLIP-RD detach their targets).

Hot path: a forward (and its backward) checks shapes, dtypes and devices only. It reads no tensor's values and
never syncs the host — no ``.item()`` / ``bool(tensor)`` / ``float(tensor)``, no ``nonzero`` or other
data-dependent shapes, no host→device copy of a Python number (logit scales may be floats or one-element
tensors, on the features' device). Values are checked once where data enters
(:meth:`ClusterDiscriminationLoss.check_labels`, :meth:`ClusterDiscriminationLoss.check_centres`, which
``from_centroids`` runs at load), or every step behind the explicit debug flag
``ClusterDiscriminationLoss(check_values=True)``; a NaN shows in the loss value the step already has.
``python_tests/test_no_host_sync.py`` holds every module to this.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .distributed import gather_rows, global_logsumexp, shard_range, sharded_margin_softmax_rows
from .ops.margin_softmax import check_labels, check_rows, cluster_discrimination_loss, margin_softmax_stats
from .ops.mlcd import check_label_rows, mlcd_loss, mlcd_stats, softplus0
from .ops.relational_rows import relational_distill, relational_kd_rows

__all__ = [
    "ClipKDLoss",
    "ClipRDLoss",
    "ClusterDiscriminationLoss",
    "FusedDistillClipLoss",
    "InstanceDiscriminationLoss",
]

LN_INV_007 = math.log(1 / 0.07)
"""CLIP-KD / CLIP-RD's initial raw logit-scale parameters (used without exp)."""


def _mean_pair(pair: tuple[Tensor, Tensor]) -> Tensor:
    return (pair[0].mean() + pair[1].mean()) / 2


class _GatheredLoss(nn.Module):
    """open_clip's distributed constructor arguments and its feature gather.

    ``local_loss`` is honoured by ``FusedDistillClipLoss`` only (open_clip's DistillClipLoss); the CLIP-KD / RD and
    instance losses accept it and compute the loss over the global batch on every rank either way.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: launch with torchrun (torch.distributed)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: labels are implicit (a diagonal)
        self.rank = rank
        self.world_size = world_size
        self.impl = impl

    def _gather(self, x: Tensor, local_slot_grad: bool = True) -> Tensor:
        # local_slot_grad=True: this rank's own rows keep their gradient inside the gathered batch, as every loss
        # over the global batch needs (without it, and without gather_with_grad, the student would get none).
        # Only FusedDistillClipLoss's local-loss branch, which takes its own rows from the caller, passes False.
        return gather_rows(
            x,
            rank=self.rank,
            world_size=self.world_size,
            with_grad=self.gather_with_grad,
            local_slot_grad=local_slot_grad,
        )

    def _gather_teacher(self, x: Tensor) -> Tensor:
        return gather_rows(x.detach(), rank=self.rank, world_size=self.world_size, with_grad=False)

    @staticmethod
    def _check(**tensors: Tensor) -> None:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        for k, v in tensors.items():
            if not isinstance(v, Tensor) or v.dim() != 2:
                raise ValueError(f"{k} must be a 2-D tensor [batch, dim], got {shapes.get(k, type(v).__name__)}")
        batches = {v.shape[0] for v in tensors.values()}
        if len(batches) != 1:
            raise ValueError(f"all features must have the same batch size, got {shapes}")


class FusedDistillClipLoss(_GatheredLoss):
    """Drop-in for ``open_clip.loss.DistillClipLoss``: same constructor, forward, values and student gradients.

    Returns ``(contrastive_loss, distill_loss)`` or ``{"contrastive_loss", "distill_loss"}``. With
    ``world_size > 1`` features are all-gathered as open_clip does; ``local_loss=True`` computes only
    this rank's rows (its images against all texts and its texts against all images), otherwise every
    rank computes the global loss. Extra memory is O(B), never B×B.
    """

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        dist_image_features: Tensor,
        dist_text_features: Tensor,
        dist_logit_scale: Tensor | float,
        output_dict: bool = False,
    ):
        self._check(
            image_features=image_features,
            text_features=text_features,
            dist_image_features=dist_image_features,
            dist_text_features=dist_text_features,
        )
        own = not self.local_loss  # open_clip's gather: with local_loss the own rows come from the caller
        img, txt = self._gather(image_features, own), self._gather(text_features, own)
        t_img, t_txt = self._gather_teacher(dist_image_features), self._gather_teacher(dist_text_features)
        if self.world_size > 1 and self.local_loss:
            offset = image_features.shape[0] * self.rank
            kw = dict(impl=self.impl)
            hard_i = relational_kd_rows(image_features, txt, logit_scale, kind="ce", target_offset=offset, **kw)
            hard_t = relational_kd_rows(text_features, img, logit_scale, kind="ce", target_offset=offset, **kw)
            local_t_img, local_t_txt = dist_image_features.detach(), dist_text_features.detach()
            soft_i = relational_kd_rows(image_features, txt, logit_scale, local_t_img, t_txt, dist_logit_scale,
                                        kind="ce", **kw)  # fmt: skip
            soft_t = relational_kd_rows(text_features, img, logit_scale, local_t_txt, t_img, dist_logit_scale,
                                        kind="ce", **kw)  # fmt: skip
            contrastive = (hard_i.mean() + hard_t.mean()) / 2
            distill = (soft_i.mean() + soft_t.mean()) / 2
        else:
            hr, hc, sr, sc = relational_distill(img, txt, logit_scale, t_img, t_txt, dist_logit_scale, kind="ce",
                                                impl=self.impl)  # fmt: skip
            contrastive = (hr.mean() + hc.mean()) / 2
            distill = (sr.mean() + sc.mean()) / 2
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class ClipKDLoss(_GatheredLoss):
    """CLIP-KD (Yang et al., CVPR 2024): ``task + α_crd·CRD + α_icl·ICL + α_fd·FD + α_cross·crossKD``.

    Defaults are CLIP-KD's recipe (α_crd = 1, α_icl = 1, α_fd = 2000, cross-KD off). Holds CLIP-KD's
    ``cross_logit_scale`` parameter (raw multiplier, init ln(1/0.07)). Student features are
    L2-normalised here (``normalize_student``), as CLIP-KD's loss does; teacher features are used as
    given (normalised by the teacher model). Losses are over the global (all-gathered) batch.
    Keys: ``task_loss, crd_loss, icl_loss, fd_loss, cross_kd_loss`` (zero-weight terms are skipped).
    """

    def __init__(
        self,
        crd_weight: float = 1.0,
        icl_weight: float = 1.0,
        fd_weight: float = 2000.0,
        cross_kd_weight: float = 0.0,
        cross_logit_scale_init: float = LN_INV_007,
        normalize_student: bool = True,
        **dist_kwargs,
    ) -> None:
        super().__init__(**dist_kwargs)
        self.weights = {"crd": crd_weight, "icl": icl_weight, "fd": fd_weight, "cross_kd": cross_kd_weight}
        self.cross_logit_scale = nn.Parameter(torch.tensor(float(cross_logit_scale_init)))
        self.normalize_student = normalize_student

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        dist_image_features: Tensor,
        dist_text_features: Tensor,
        dist_logit_scale: Tensor | float,
        output_dict: bool = False,
    ):
        s_i, s_t, t_i, t_t = self._prepare(image_features, text_features, dist_image_features, dist_text_features)
        out = self._terms(s_i, s_t, t_i, t_t, logit_scale, dist_logit_scale)
        return out if output_dict else tuple(out.values())

    def _prepare(self, image_features, text_features, dist_image_features, dist_text_features):
        """Check, normalise the student (CLIP-KD does it in the loss) and all-gather, once per forward."""
        self._check(image_features=image_features, text_features=text_features,
                    dist_image_features=dist_image_features, dist_text_features=dist_text_features)  # fmt: skip
        if self.normalize_student:
            image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        return (
            self._gather(image_features),
            self._gather(text_features),
            self._gather_teacher(dist_image_features),
            self._gather_teacher(dist_text_features),
        )

    def _terms(self, s_i, s_t, t_i, t_t, logit_scale, dist_logit_scale) -> dict[str, Tensor]:
        w, k, impl = self.weights, self.cross_logit_scale, self.impl
        out = {}
        if w["crd"]:
            hr, hc, sr, sc = relational_distill(s_i, s_t, logit_scale, t_i, t_t, dist_logit_scale, kind="kl", impl=impl)
            out["task_loss"] = (hr.mean() + hc.mean()) / 2
            out["crd_loss"] = w["crd"] * (sr.mean() + sc.mean()) / 2
        else:
            out["task_loss"] = _mean_pair(relational_kd_rows(s_i, s_t, logit_scale, kind="ce", direction="both",
                                                             impl=impl))  # fmt: skip
        if w["icl"]:
            icl = relational_kd_rows(s_i, t_t, k, kind="ce", impl=impl).mean()
            icl = icl + relational_kd_rows(s_t, t_i, k, kind="ce", impl=impl).mean()
            out["icl_loss"] = w["icl"] * icl / 2
        if w["fd"]:
            out["fd_loss"] = w["fd"] * (F.mse_loss(s_i, t_i) + F.mse_loss(s_t, t_t))
        if w["cross_kd"]:
            ck = relational_kd_rows(s_i, t_t, k, t_i, t_t, dist_logit_scale, kind="kl", impl=impl).mean()
            ck = ck + relational_kd_rows(s_t, t_i, k, t_t, t_i, dist_logit_scale, kind="kl", impl=impl).mean()
            out["cross_kd_loss"] = w["cross_kd"] * ck / 2
        return out


class ClipRDLoss(ClipKDLoss):
    """CLIP-RD: CLIP-KD's terms plus VRD and XRD (``Rosieyang01/CLIP-RD`` ``KDClipLoss``).

    ``task + α_hrd·HRD + α_icl·ICL + α_fd·FD + α_vrd·(VRD_kl + VRD_ce_image + VRD_ce_text) + α_xrd·XRD``,
    defaults from its ``ViT_T_16_RD.sh`` (all 1, α_fd = 2000). HRD is CLIP-KD's CRD. Holds the
    ``image_logit_scale``, ``text_logit_scale`` and ``cross_logit_scale`` parameters (raw, init
    ln(1/0.07)). Keys: ``task_loss, hrd_loss, icl_loss, fd_loss, vrd_loss, xrd_loss``.
    """

    def __init__(
        self,
        hrd_weight: float = 1.0,
        icl_weight: float = 1.0,
        fd_weight: float = 2000.0,
        vrd_weight: float = 1.0,
        xrd_weight: float = 1.0,
        logit_scale_init: float = LN_INV_007,
        normalize_student: bool = True,
        **dist_kwargs,
    ) -> None:
        super().__init__(
            crd_weight=hrd_weight,
            icl_weight=icl_weight,
            fd_weight=fd_weight,
            cross_logit_scale_init=logit_scale_init,
            normalize_student=normalize_student,
            **dist_kwargs,
        )
        self.weights.update(vrd=vrd_weight, xrd=xrd_weight)
        self.image_logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
        self.text_logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def _terms(self, s_i, s_t, t_i, t_t, logit_scale, dist_logit_scale) -> dict[str, Tensor]:
        out = super()._terms(s_i, s_t, t_i, t_t, logit_scale, dist_logit_scale)
        if "crd_loss" in out:
            out["hrd_loss"] = out.pop("crd_loss")
        out = {k: out[k] for k in ("task_loss", "hrd_loss", "icl_loss", "fd_loss") if k in out}
        w, impl = self.weights, self.impl
        k_i, k_t, k_c = self.image_logit_scale, self.text_logit_scale, self.cross_logit_scale
        if w["vrd"]:
            # rows: KL(κ_I T_I S_Iᵀ ‖ sg κ_T T_T S_Tᵀ); columns: the same pair transposed = KL(ST_I ‖ sg ST_T)
            kl = _mean_pair(relational_kd_rows(t_i, s_i, k_i, t_t, s_t, k_t, kind="kl", direction="both", impl=impl))
            ce_i = _mean_pair(relational_kd_rows(t_i, s_i, k_i, kind="ce", direction="both", impl=impl))
            ce_t = _mean_pair(relational_kd_rows(t_t, s_t, k_t, kind="ce", direction="both", impl=impl))
            out["vrd_loss"] = w["vrd"] * (kl + ce_i + ce_t)
        if w["xrd"]:
            # TIST vs TTSI (rows) and STTI vs SITT (its columns); then the same with roles swapped
            a = relational_kd_rows(t_i, s_t, k_c, t_t, s_i, k_c, kind="kl", direction="both", impl=impl)
            b = relational_kd_rows(t_t, s_i, k_c, t_i, s_t, k_c, kind="kl", direction="both", impl=impl)
            out["xrd_loss"] = w["xrd"] * (a[0].mean() + a[1].mean() + b[0].mean() + b[1].mean()) / 4
        return out


class InstanceDiscriminationLoss(_GatheredLoss):
    """CLIP-CID instance discrimination (reconstruction; see README "Modelling choices" 4).

    ``½ [CE(κ S_I T_Tᵀ) + CE(κ T_T S_Iᵀ)]`` (student image ↔ teacher text, both ways) with a learnable
    raw scale κ (init ln(1/0.07), CLIP-KD's ICL convention); ``use_student_text=True`` switches to
    ``½ [CE(κ S_I T_Tᵀ) + CE(κ S_T T_Iᵀ)]``. ``logit_scale`` / ``dist_logit_scale`` are accepted for
    the open_clip signature and unused. Key: ``instance_loss``.
    """

    def __init__(
        self,
        weight: float = 1.0,
        scale_init: float = LN_INV_007,
        use_student_text: bool = False,
        normalize_student: bool = True,
        **dist_kwargs,
    ) -> None:
        super().__init__(**dist_kwargs)
        self.weight = weight
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.use_student_text = use_student_text
        self.normalize_student = normalize_student

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor | None,
        logit_scale: Tensor | float | None,
        dist_image_features: Tensor | None,
        dist_text_features: Tensor,
        dist_logit_scale: Tensor | float | None = None,
        output_dict: bool = False,
    ):
        if self.normalize_student:
            image_features = F.normalize(image_features, dim=-1)
        s_i, t_t = self._gather(image_features), self._gather_teacher(dist_text_features)
        if self.use_student_text:
            if text_features is None or dist_image_features is None:
                raise ValueError("use_student_text=True needs text_features and dist_image_features")
            if self.normalize_student:
                text_features = F.normalize(text_features, dim=-1)
            s_t, t_i = self._gather(text_features), self._gather_teacher(dist_image_features)
            loss = relational_kd_rows(s_i, t_t, self.scale, kind="ce", impl=self.impl).mean()
            loss = (loss + relational_kd_rows(s_t, t_i, self.scale, kind="ce", impl=self.impl).mean()) / 2
        else:
            loss = _mean_pair(relational_kd_rows(s_i, t_t, self.scale, kind="ce", direction="both", impl=self.impl))
        loss = self.weight * loss
        return {"instance_loss": loss} if output_dict else loss


class ClusterDiscriminationLoss(nn.Module):
    """CLIP-CID cluster discrimination: margin softmax of embeddings against N pseudo-class centres.

    Holds this rank's contiguous block of centres (``distributed.shard_range``; the first
    ``N % world_size`` ranks hold one more). With ``world_size > 1`` the embeddings and labels are
    all-gathered (with autograd), each rank computes the fused per-row statistics over its own centres,
    and only O(B) values are reduced across ranks (``sharded_margin_softmax_rows``). The loss is the mean
    over the global batch's rows that have a label (labels ``−1`` are ignored) and is the same on every
    rank. ``forward(embeddings [B, D], labels [B]) -> scalar`` (``output_dict=True``:
    ``{"cluster_loss": ...}``). Centres init N(0, 0.01) as unicom's PartialFC, or from a centroid file.

    Validation. ``forward`` checks shapes, dtypes and devices only (``ValueError``) and reads no values: no
    host sync, no pass over the centres beyond the loss's own (the C++ kernel still refuses an out-of-range
    label with a RuntimeError, from the labels it reads anyway). Values are checked once where data enters:
    :meth:`check_labels` (every label in ``[−1, num_classes)``; call it on a data set's labels at load) and
    :meth:`check_centres` (this rank's centres finite, no zero row; ``from_centroids`` runs it on the file it
    loads). ``check_values=True`` is a debug flag: every step then runs the functional loss's value checks
    (labels, NaN / inf, zero-norm rows of embeddings and centres), which read the labels and every centre
    and sync the host each step; NaN inputs otherwise show as a NaN loss, which the step already has.

    ``multi_label=True``: MLCD's multi-label loss instead (``ops/mlcd.py``, ``docs/mlcd.md``): ``labels [B, K]``
    (each row's K nearest centres, ``−1`` padding), the positives with the margin, every other centre a negative;
    sharded the same way (both per-row statistics combined by log-sum-exp over ranks).
    """

    def __init__(
        self,
        num_classes: int,
        embed_dim: int,
        margin: tuple[float, float, float] = (1.0, 0.5, 0.0),
        scale: float = 32.0,
        rank: int = 0,
        world_size: int = 1,
        learnable_centres: bool = True,
        weight: float = 1.0,
        impl: str = "auto",
        check_values: bool = False,
        multi_label: bool = False,
    ) -> None:
        super().__init__()
        self.multi_label = bool(multi_label)
        if num_classes < 1 or embed_dim < 1:
            raise ValueError(f"num_classes and embed_dim must be >= 1, got {num_classes} and {embed_dim}")
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.rank, self.world_size = rank, world_size
        self.start, self.stop = shard_range(num_classes, rank, world_size)
        self.margin, self.scale, self.weight, self.impl = tuple(margin), float(scale), float(weight), impl
        self.check_values = bool(check_values)
        centres = torch.randn(self.stop - self.start, embed_dim) * 0.01
        self.centres = nn.Parameter(centres, requires_grad=learnable_centres)

    @classmethod
    def from_centroids(cls, path: str, rank: int = 0, world_size: int = 1, **kwargs) -> ClusterDiscriminationLoss:
        """Initialise from ``centroids.npy`` [N, D] written by ``clipcid-fast cluster``: this rank's block only,
        value-checked once here (:meth:`check_centres`; ``ValueError`` naming the file)."""
        import numpy as np

        full = np.load(path, mmap_mode="r")
        if full.ndim != 2:
            raise ValueError(f"{path} must hold a [N, D] array, got shape {full.shape}")
        mod = cls(full.shape[0], full.shape[1], rank=rank, world_size=world_size, **kwargs)
        with torch.no_grad():  # np.array copies the memory-mapped rows: torch warns on a read-only buffer
            mod.centres.copy_(torch.from_numpy(np.array(full[mod.start : mod.stop], dtype=np.float32)))
        try:
            mod.check_centres()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return mod

    def check_labels(self, labels: Tensor) -> None:
        """Value check for data entering the loop (reads the labels, one host sync; not for every step): global
        class ids in ``[−1, num_classes)``; 1-D ``[n]`` (``multi_label``: 2-D ``[n, K]``, no id twice in a row).
        ``ValueError`` naming the first bad entry."""
        if self.multi_label:
            if not isinstance(labels, Tensor) or labels.dim() != 2 or labels.is_floating_point() or labels.is_complex():
                raise ValueError(
                    f"labels must be a 2-D [n, K] integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}"
                    f" of shape {tuple(getattr(labels, 'shape', ()))}"
                )
            check_label_rows(labels, self.num_classes)
            return
        self._check_labels_1d(labels)

    def _check_labels_1d(self, labels: Tensor) -> None:
        """Value check for data entering the loop (reads the labels, one host sync; not for every step): a 1-D
        integer tensor of global class ids, each in ``[−1, num_classes)`` (−1: no label). ``ValueError`` naming
        the first bad entry. Any length: a batch or a whole data set's labels."""
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(
                f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)} "
                f"of shape {tuple(getattr(labels, 'shape', ()))}"
            )
        check_labels(labels, self.num_classes)

    def check_centres(self) -> None:
        """Value check of this rank's centres (reads them once in slices, one host sync; for load time or after
        loading a checkpoint, not for every step): every entry finite and no row of zero norm (a centre is
        L2-normalised in the loss). ``ValueError`` naming the first bad entry."""
        with torch.no_grad():
            check_rows("centres", self.centres.detach())

    def forward(self, embeddings: Tensor, labels: Tensor, output_dict: bool = False):
        want = 2 if self.multi_label else 1
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != want:
            raise ValueError(
                f"labels must be a {want}-D int64 tensor, got {getattr(labels, 'dtype', type(labels))} "
                f"of shape {tuple(getattr(labels, 'shape', ()))}"
            )
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings must be [B, {self.embed_dim}], got {tuple(getattr(embeddings, 'shape', ()))}")
        if self.multi_label:
            loss = self._multi_label(embeddings, labels)
        elif self.world_size == 1:
            loss = cluster_discrimination_loss(
                embeddings, self.centres, labels, self.scale, self.margin, reduction="mean", impl=self.impl,
                check_values=self.check_values,
            )  # fmt: skip
        else:
            x = gather_rows(embeddings, rank=self.rank, world_size=self.world_size, with_grad=True)
            y = gather_rows(labels, rank=self.rank, world_size=self.world_size, with_grad=False, local_slot_grad=False)
            if self.check_values:
                check_labels(y, self.num_classes)  # the global ids (the local ones are always in range)
            mine = (y >= self.start) & (y < self.stop)
            local = torch.where(mine, y - self.start, -1)
            lse, target = margin_softmax_stats(
                x, self.centres, local, self.scale, self.margin, impl=self.impl, check_values=self.check_values
            )
            rows = sharded_margin_softmax_rows(lse, target, world_size=self.world_size)
            valid = y >= 0
            loss = torch.where(valid, rows, 0.0).sum() / valid.sum().clamp(min=1)
        loss = self.weight * loss
        return {"cluster_loss": loss} if output_dict else loss

    def _multi_label(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """MLCD, mean over the (global) rows with at least one label."""
        if self.world_size == 1:
            return mlcd_loss(embeddings, self.centres, labels, self.scale, self.margin, reduction="mean",
                             impl=self.impl, check_values=self.check_values)  # fmt: skip
        x = gather_rows(embeddings, rank=self.rank, world_size=self.world_size, with_grad=True)
        y = gather_rows(labels, rank=self.rank, world_size=self.world_size, with_grad=False, local_slot_grad=False)
        if self.check_values:
            check_label_rows(y, self.num_classes)
        local = torch.where((y >= self.start) & (y < self.stop), y - self.start, -1)
        neg, pos = mlcd_stats(x, self.centres, local, self.scale, self.margin, impl=self.impl, check_values=False)
        neg, pos = global_logsumexp(neg, self.world_size), global_logsumexp(pos, self.world_size)
        valid = (y >= 0).any(dim=1)
        return torch.where(valid, softplus0(neg) + softplus0(pos), 0.0).sum() / valid.sum().clamp(min=1)
