"""Training recipes as compositions of the library's loss modules (the trainer only sums their terms).

=========  ==========================================================================================
recipe     terms (each weight a flag, defaults the published values; ``config.RecipeWeights``)
=========  ==========================================================================================
baseline   the student's CLIP loss alone (``task_loss``)
distill    open_clip's ``DistillClipLoss`` (``FusedDistillClipLoss``): contrastive + distill
kd         CLIP-KD (``ClipKDLoss``): task + CRD + ICL + 2000·FD
rd         CLIP-RD (``ClipRDLoss``): task + HRD + ICL + 2000·FD + VRD + XRD
cid        CLIP-CID: task + λ_cd · ``ClusterDiscriminationLoss`` (student image embeddings against the
           pseudo-class centres of ``clipcid-fast cluster``, initialised from its centroids, learnable)
           + λ_id · ``InstanceDiscriminationLoss`` (student image ↔ teacher text)
=========  ==========================================================================================

Student features enter un-normalised (every module normalises them, with gradients through the
normalisation, as CLIP-KD's loss does); teacher features are L2-normalised constants. When the student's
embedding width differs from the teacher's, a learnable ``nn.Linear`` (no bias) maps the student image and
text features into the teacher's space, as CLIP-KD does; kd, rd and distill then compute every term (task
included) on the projected features, as CLIP-KD's loss does, and cid computes its task loss on the
student's own features and its cluster / instance terms on the projected image features (the centres live
in the teacher's space). Every parameter of the recipe (projections, CLIP-KD/RD scales, instance scale,
class centres) is a parameter of this module, optimised and saved in every checkpoint.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..distributed import scale_grad
from ..losses import (
    ClipKDLoss,
    ClipRDLoss,
    ClusterDiscriminationLoss,
    FusedDistillClipLoss,
    InstanceDiscriminationLoss,
)
from .config import RECIPES, RecipeWeights


class Recipe(nn.Module):
    def __init__(
        self,
        name: str,
        weights: RecipeWeights,
        student_dim: int,
        teacher_dim: int,
        *,
        centroids: str | None = None,
        impl: str = "auto",
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = False,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        if name not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}; got {name!r}")
        self.name = name
        dist = {"rank": rank, "world_size": world_size, "impl": impl, "local_loss": local_loss,
                "gather_with_grad": gather_with_grad}  # fmt: skip
        # the cluster term's input gradient, on the footing of the replicated terms' (distributed.scale_grad)
        self._cluster_grad_factor = world_size if gather_with_grad else 1
        w = weights
        project = name != "baseline" and student_dim != teacher_dim
        self.proj_image = nn.Linear(student_dim, teacher_dim, bias=False) if project else None
        self.proj_text = nn.Linear(student_dim, teacher_dim, bias=False) if project and name != "cid" else None
        self.cluster = self.instance = None
        if name in ("baseline", "cid"):
            self.loss = ClipKDLoss(crd_weight=0.0, icl_weight=0.0, fd_weight=0.0, **dist)
        elif name == "kd":
            self.loss = ClipKDLoss(crd_weight=w.crd_weight, icl_weight=w.icl_weight, fd_weight=w.fd_weight, **dist)
        elif name == "rd":
            self.loss = ClipRDLoss(hrd_weight=w.crd_weight, icl_weight=w.icl_weight, fd_weight=w.fd_weight,
                                   vrd_weight=w.vrd_weight, xrd_weight=w.xrd_weight, **dist)  # fmt: skip
        else:
            self.loss = FusedDistillClipLoss(**dist)
        self.distill_weight = w.distill_weight
        if name == "cid":
            if centroids is None:
                raise ValueError("recipe cid needs --cluster-dir (the output of clipcid-fast cluster)")
            # values were checked once when the pseudo-classes entered (train._cid_inputs): no per-step scan
            self.cluster = ClusterDiscriminationLoss.from_centroids(
                centroids, margin=(1.0, w.cd_margin, 0.0), scale=w.cd_scale, weight=w.cd_weight, rank=rank,
                world_size=world_size, impl=impl, check_values=False,
            )  # fmt: skip
            if self.cluster.embed_dim != teacher_dim:
                raise ValueError(
                    f"--cluster-dir: centroids have D = {self.cluster.embed_dim}, the teacher's features {teacher_dim}"
                )
            self.instance = InstanceDiscriminationLoss(weight=w.id_weight, scale_init=w.id_scale_init, **dist)
        self.centre_lr_mult = w.centre_lr_mult

    @property
    def needs_labels(self) -> bool:
        return self.cluster is not None

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
        if self.name == "baseline":
            # the module's teacher slots are unused without CRD/ICL/FD: the student's own features stand in
            return self.loss(image_features, text_features, logit_scale, image_features.detach(),
                             text_features.detach(), logit_scale.detach(), output_dict=True)  # fmt: skip
        s_img = self.proj_image(image_features) if self.proj_image is not None else image_features
        if self.name == "cid":
            out = self.loss(image_features, text_features, logit_scale, image_features.detach(),
                            text_features.detach(), logit_scale.detach(), output_dict=True)  # fmt: skip
            out.update(self.cluster(scale_grad(s_img, self._cluster_grad_factor), labels, output_dict=True))
            out.update(self.instance(s_img, None, None, None, dist_text_features, output_dict=True))
            return out
        s_txt = self.proj_text(text_features) if self.proj_text is not None else text_features
        if self.name == "distill":
            # open_clip's DistillClipLoss takes normalised student features (the model normalises them)
            s_img, s_txt = nn.functional.normalize(s_img, dim=-1), nn.functional.normalize(s_txt, dim=-1)
            out = self.loss(s_img, s_txt, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
                            output_dict=True)  # fmt: skip
            out["distill_loss"] = self.distill_weight * out["distill_loss"]
            return out
        return self.loss(s_img, s_txt, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
                         output_dict=True)  # fmt: skip

    def sharded_parameters(self) -> list[nn.Parameter]:
        """Parameters each rank holds a different block of (the class centres): not averaged over ranks."""
        return [self.cluster.centres] if self.cluster is not None else []

    def param_groups(self, lr: float, wd: float) -> list[dict]:
        """Centres at ``centre_lr_mult`` × lr; raw logit scales without weight decay; projections with it."""
        centres = [self.cluster.centres] if self.cluster is not None else []
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
