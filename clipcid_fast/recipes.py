"""The recipe table: name → the library's loss modules a recipe composes, and what it needs.

=========  ==========================================================================================
recipe     terms (each weight a flag; defaults: ``WEIGHTS``, the published values; cid's measured)
=========  ==========================================================================================
baseline   the student's CLIP loss alone (``task_loss``)
distill    open_clip's ``DistillClipLoss`` (``FusedDistillClipLoss``): contrastive + distill
kd         CLIP-KD (``ClipKDLoss``): task + CRD + ICL + 2000·FD
rd         CLIP-RD (``ClipRDLoss``): task + HRD + ICL + 2000·FD + VRD + XRD
cid        CLIP-CID: task + λ_cd · ``ClusterDiscriminationLoss`` (student image embeddings against the
           pseudo-class centres of ``clipcid-fast cluster``: its centroids, fixed by default,
           ``centre_lr_mult`` > 0 learns them) + λ_id · ``InstanceDiscriminationLoss`` (student image ↔
           teacher text; ``id_student_text``: student text ↔ teacher image too); ``cd_topk = k > 0``: the
           cluster term is MLCD's multi-label loss on each row's k nearest centres instead
cid+rd     a composite: rd's terms + cid's cluster and instance terms (every weight of both; the cluster and
           instance terms read the projected image features, as in cid)
=========  ==========================================================================================

Every trainer builds its loss here: ``clipcid-fast train`` (``pipeline/train.py``), the open_clip_train
plug-in (``open_clip_train.py``) and the benchmarks. Adding a recipe is one entry of ``RECIPES``; a composite
is an entry whose main loss is another recipe's and whose ``labels=True`` adds cid's two terms to it.

Student features enter un-normalised (every module normalises them, with gradients through the
normalisation, as CLIP-KD's loss does; ``normalized_students=True`` when the model already normalises them,
as open_clip's models do); teacher features are L2-normalised constants. When the student's embedding width
differs from the teacher's, a learnable ``nn.Linear`` (no bias) maps the student image and text features into
the teacher's space, as CLIP-KD does; kd, rd and distill then compute every term (task included) on the
projected features, as CLIP-KD's loss does, and cid computes its task loss on the student's own features and
its cluster / instance terms on the projected image features (the centres live in the teacher's space). Every
parameter of the recipe (projections, CLIP-KD/RD scales, instance scale, class centres) is a parameter of the
module, optimised and saved in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch.nn as nn
from torch import Tensor

from .distributed import scale_grad
from .losses import (
    ClipKDLoss,
    ClipRDLoss,
    ClusterDiscriminationLoss,
    FusedDistillClipLoss,
    InstanceDiscriminationLoss,
)

__all__ = ["RECIPES", "WEIGHTS", "Recipe", "RecipeSpec"]


def _default(cls: type, arg: str) -> Any:
    return inspect.signature(cls.__init__).parameters[arg].default


WEIGHTS: dict[str, float | bool] = {
    # CLIP-KD (winycg/CLIP-KD ViT_T_16_kd.sh) and CLIP-RD (Rosieyang01/CLIP-RD ViT_T_16_RD.sh)
    "crd_weight": _default(ClipKDLoss, "crd_weight"),
    "icl_weight": _default(ClipKDLoss, "icl_weight"),
    "fd_weight": _default(ClipKDLoss, "fd_weight"),
    "vrd_weight": _default(ClipRDLoss, "vrd_weight"),
    "xrd_weight": _default(ClipRDLoss, "xrd_weight"),
    # open_clip's DistillClipLoss sums its two terms with weight 1 (no loss constructor holds this weight)
    "distill_weight": 1.0,
    # CLIP-CID publishes no values. Weights and scale: unicom's ArcFace defaults. Margin and centre lr: measured
    # (docs/cid_defaults.md, the recipe study over 5 seeds): unicom's m = 0.5 exceeds the 0.23 rad between
    # neighbouring teacher centroids and its learnable centres at 3x lr drift away from them; m = 0.2 with the
    # centres fixed at the teacher's centroids keeps the teacher's cluster structure as the target.
    "cd_weight": _default(ClusterDiscriminationLoss, "weight"),
    "id_weight": _default(InstanceDiscriminationLoss, "weight"),
    "id_scale_init": _default(InstanceDiscriminationLoss, "scale_init"),
    "id_student_text": _default(InstanceDiscriminationLoss, "use_student_text"),
    "cd_margin": 0.2,
    "cd_scale": _default(ClusterDiscriminationLoss, "scale"),
    # the centres' lr multiplier (unicom's lr_pfc_weight is 3; an optimiser setting: no loss constructor holds it)
    "centre_lr_mult": 0.0,
    # MLCD's multi-label cluster loss on each row's k nearest centres (topk.npy of clipcid-fast cluster --topk);
    # 0 = CLIP-CID's single-label cluster term
    "cd_topk": 0,
}
"""Every recipe weight's default (the published values; cid's from the recipe study, docs/cid_defaults.md);
``pipeline.config.RecipeWeights`` and the plug-in's flags read them from here."""


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
    """One recipe: its main loss module and what it needs."""

    help: str
    weights: tuple[str, ...]  # the ``WEIGHTS`` keys it reads (each a flag of the trainers)
    build: Callable[[Mapping[str, float], dict], nn.Module]  # (weights, distributed kwargs) -> the main loss
    teacher: bool = True  # reads teacher features
    labels: bool = False  # reads pseudo-labels and centroids (the output of clipcid-fast cluster)
    project: tuple[str, ...] = ("image", "text")  # student towers projected into the teacher's width
    on_student: bool = False  # the main loss compares the student with itself (its teacher slots unused)


def _task_only(w, dist):  # the task loss alone: CLIP-KD's module with its distillation terms off
    return ClipKDLoss(crd_weight=0.0, icl_weight=0.0, fd_weight=0.0, **dist)


def _kd(w, dist):
    return ClipKDLoss(crd_weight=w["crd_weight"], icl_weight=w["icl_weight"], fd_weight=w["fd_weight"], **dist)


def _rd(w, dist):
    return ClipRDLoss(
        hrd_weight=w["crd_weight"], icl_weight=w["icl_weight"], fd_weight=w["fd_weight"], vrd_weight=w["vrd_weight"],
        xrd_weight=w["xrd_weight"], **dist,
    )  # fmt: skip


def _distill(w, dist):
    return FusedDistillClipLoss(**dist)


# the order is the one every report and table lists the recipes in
RECIPES: dict[str, RecipeSpec] = {
    "cid": RecipeSpec("CLIP-CID: task + cluster discrimination + instance discrimination",
                      ("cd_weight", "id_weight", "id_scale_init", "id_student_text", "cd_margin", "cd_scale",
                       "centre_lr_mult", "cd_topk"),
                      _task_only, labels=True, project=("image",), on_student=True),
    "rd": RecipeSpec("CLIP-RD", ("crd_weight", "icl_weight", "fd_weight", "vrd_weight", "xrd_weight"), _rd),
    "kd": RecipeSpec("CLIP-KD", ("crd_weight", "icl_weight", "fd_weight"), _kd),
    "distill": RecipeSpec("FusedDistillClipLoss (open_clip's DistillClipLoss)", ("distill_weight",), _distill),
    # composites: the main loss of one recipe with cid's cluster and instance terms added (labels=True adds them)
    "cid+rd": RecipeSpec("CLIP-RD + CLIP-CID's cluster and instance terms",
                         ("crd_weight", "icl_weight", "fd_weight", "vrd_weight", "xrd_weight", "cd_weight",
                          "id_weight", "id_scale_init", "id_student_text", "cd_margin", "cd_scale", "centre_lr_mult",
                          "cd_topk"),
                         _rd, labels=True),
    "baseline": RecipeSpec("the student's CLIP loss alone", (), _task_only, teacher=False, project=(), on_student=True),
}  # fmt: skip


class Recipe(nn.Module):
    """The loss of recipe ``name``: ``forward(<open_clip's six features>, labels=None) -> {"<term>_loss": ...}``.

    ``weights``: a mapping or a dataclass of ``WEIGHTS`` keys (missing keys take their defaults). Widths
    ``student_dim`` / ``teacher_dim`` (either ``None``: unknown, no projection). ``normalized_students``: the
    student's features arrive L2-normalised (open_clip's models), so distill does not normalise them again.
    """

    def __init__(
        self,
        name: str,
        weights: Any = None,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        *,
        centroids: str | None = None,
        impl: str = "auto",
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        use_horovod: bool = False,
        normalized_students: bool = False,
    ) -> None:
        super().__init__()
        if name not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}; got {name!r}")
        self.name = name
        self.spec = spec = RECIPES[name]
        if weights is not None and not isinstance(weights, Mapping):
            weights = dataclasses.asdict(weights)
        w = {**WEIGHTS, **(weights or {})}
        self.normalized_students = normalized_students
        dist = {"rank": rank, "world_size": world_size, "impl": impl, "local_loss": local_loss,
                "gather_with_grad": gather_with_grad}  # fmt: skip
        if use_horovod:
            dist["use_horovod"] = use_horovod
        # the cluster term's input gradient, on the footing of the replicated terms' (distributed.scale_grad)
        self._cluster_grad_factor = world_size if gather_with_grad else 1
        project = None not in (student_dim, teacher_dim) and student_dim != teacher_dim
        self.proj_image = (
            nn.Linear(student_dim, teacher_dim, bias=False) if project and "image" in spec.project else None
        )
        # cid's instance term reads the student's text only with id_student_text (student text <-> teacher image)
        text_read = "text" in spec.project or (spec.labels and bool(w["id_student_text"]))
        self.proj_text = nn.Linear(student_dim, teacher_dim, bias=False) if project and text_read else None
        self.cluster = self.instance = None
        self.loss = spec.build(w, dist)
        self.distill_weight = w["distill_weight"]
        if spec.labels:
            if centroids is None:
                raise ValueError(f"recipe {name} needs --cluster-dir (the output of clipcid-fast cluster)")
            # values were checked once when the pseudo-classes entered the trainer: no per-step scan
            self.cluster = ClusterDiscriminationLoss.from_centroids(
                centroids, margin=(1.0, w["cd_margin"], 0.0), scale=w["cd_scale"], weight=w["cd_weight"], rank=rank,
                world_size=world_size, impl=impl, check_values=False, multi_label=int(w["cd_topk"]) > 0,
            )  # fmt: skip
            if self.cluster.embed_dim != teacher_dim:
                raise ValueError(
                    f"--cluster-dir: centroids have D = {self.cluster.embed_dim}, the teacher's features {teacher_dim}"
                )
            self.instance = InstanceDiscriminationLoss(
                weight=w["id_weight"],
                scale_init=w["id_scale_init"],
                use_student_text=bool(w["id_student_text"]),
                **dist,
            )
        self.centre_lr_mult = w["centre_lr_mult"]

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        dist_image_features: Tensor | None,
        dist_text_features: Tensor | None,
        dist_logit_scale: Tensor | float | None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Weighted loss terms ``{"<name>_loss": scalar}``; the step's loss is their sum."""
        s_img = self.proj_image(image_features) if self.proj_image is not None else image_features
        s_txt = self.proj_text(text_features) if self.proj_text is not None else text_features
        if self.spec.on_student:
            # the module's teacher slots are unused without CRD/ICL/FD: the student's own features stand in
            out = self.loss(image_features, text_features, logit_scale, image_features.detach(),
                            text_features.detach(), logit_scale.detach(), output_dict=True)  # fmt: skip
        elif isinstance(self.loss, FusedDistillClipLoss):
            # open_clip's DistillClipLoss takes normalised student features (its models normalise them)
            n_img, n_txt = (s_img, s_txt) if self.normalized_students else (
                nn.functional.normalize(s_img, dim=-1), nn.functional.normalize(s_txt, dim=-1))  # fmt: skip
            out = self.loss(n_img, n_txt, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
                            output_dict=True)  # fmt: skip
            out["distill_loss"] = self.distill_weight * out["distill_loss"]
        else:
            out = self.loss(s_img, s_txt, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
                            output_dict=True)  # fmt: skip
        if self.cluster is not None:  # CLIP-CID's terms, on top of whichever main loss the recipe has
            out.update(self.cluster(scale_grad(s_img, self._cluster_grad_factor), labels, output_dict=True))
            out.update(self.instance(s_img, s_txt if self.instance.use_student_text else None, None,
                                     dist_image_features, dist_text_features, output_dict=True))  # fmt: skip
        return out

    def sharded_parameters(self) -> list[nn.Parameter]:
        """Parameters each rank holds a different block of (the class centres): not averaged over ranks."""
        return [self.cluster.centres] if self.cluster is not None else []

    def param_groups(self, wd: float) -> list[dict]:
        """Projections with weight decay ``wd``, raw logit scales (0-D) without, centres at ``centre_lr_mult`` × the
        learning rate (``lr_mult``); empty groups left out."""
        centres = self.sharded_parameters()
        ids = {id(p) for p in centres}
        decay, no_decay = [], []
        for p in self.parameters():
            if id(p) in ids or not p.requires_grad:
                continue
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": wd, "lr_mult": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}]  # fmt: skip
        if centres and centres[0].requires_grad:
            groups.append({"params": centres, "weight_decay": wd, "lr_mult": self.centre_lr_mult})
        return [g for g in groups if g["params"]]
