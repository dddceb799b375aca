"""``python -m clipcid_fast.open_clip_train``: open_clip_train's own training loop with a clipcid-fast loss.

::

    python -m clipcid_fast.open_clip_train <open_clip_train flags> \\
        --distill-model TEACHER --distill-pretrained WEIGHTS --clipcid-loss distill|kd|rd [--clipcid-* ...]

Our flags (``--clipcid-*``, listed by ``--help`` before open_clip_train's) are taken out of argv; the rest goes to
``open_clip_train.main.main`` unchanged, so the run is open_clip_train's: its data, model, optimizer, schedule,
logging and checkpoints. While it runs, names in ``open_clip_train.main``'s namespace are replaced (and restored
when it returns or raises):

- ``parse_args``: open_clip_train's parser, then our checks (a teacher is given, ``--accum-freq 1``, ...);
- ``create_loss``: our loss instead of open_clip's ``DistillClipLoss`` (``distill`` → ``FusedDistillClipLoss``
  with the distributed arguments open_clip passes; ``kd`` → ``ClipKDLoss``; ``rd`` → ``ClipRDLoss``);
- under ``torchrun``, kd's and rd's loss is returned inside ``DistributedDataParallel`` (its scales and projections
  averaged over ranks like the model's; see ``_Plugin.data_parallel``);
- ``optim`` (kd and rd only): ``optim.AdamW`` gets the loss's parameters as extra param groups (the CLIP-KD/RD
  logit scales without weight decay, the projections below with ``--wd``), and the optimizer's ``state_dict``
  carries the loss's parameters under ``"clipcid_loss"``, so open_clip_train's checkpoints save them and its
  ``--resume`` restores them (with their AdamW moments). The model's own ``state_dict`` stays a plain open_clip
  checkpoint.

kd and rd compare student and teacher features directly (FD, ICL, CRD), so when the student's embedding width
differs from the teacher's, a learnable ``nn.Linear`` (no bias) per tower maps the student's features into the
teacher's width, as CLIP-KD does (seeded by ``--seed`` in a forked RNG, so the data order is not changed).
distill compares only similarity matrices and needs none.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ._backend import IMPLS
from .recipes import RECIPES, WEIGHTS, Recipe

__all__ = ["LOSSES", "OpenClipTrainLoss", "PluginError", "main", "parse_plugin_args"]

LOSSES = ("distill", "kd", "rd")
STATE_KEY = "clipcid_loss"
"""Key of the loss's parameters in the optimizer's ``state_dict`` (and so in open_clip_train's checkpoints)."""

PROG = "python -m clipcid_fast.open_clip_train"

# flag -> (recipe weight, help); the losses it applies to are the recipes that read the weight (recipes.RECIPES)
_WEIGHT_FLAGS = {
    "crd": ("crd_weight", "kd: CRD weight; rd: HRD weight"),
    "icl": ("icl_weight", "kd, rd: ICL weight"),
    "fd": ("fd_weight", "kd, rd: feature-distillation weight"),
    "vrd": ("vrd_weight", "rd: VRD weight"),
    "xrd": ("xrd_weight", "rd: XRD weight"),
    "distill": ("distill_weight", "distill: weight of distill_loss (open_clip's is 1)"),
}


def _losses_reading(field: str) -> tuple[str, ...]:
    return tuple(kind for kind in LOSSES if field in RECIPES[kind].weights)


class PluginError(ValueError):
    """A bad flag or an unsupported combination; the command line prints it as one ``error:`` line (exit 2)."""


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        add_help=False,
        allow_abbrev=False,  # never take a prefix of one of open_clip_train's flags
        description="clipcid-fast flags; every other flag goes to open_clip_train (its help follows).",
    )
    p.add_argument(
        "--clipcid-loss", choices=LOSSES, required=True,
        help="distill: FusedDistillClipLoss (open_clip's DistillClipLoss); kd: CLIP-KD; rd: CLIP-RD",
    )  # fmt: skip
    p.add_argument("--clipcid-impl", choices=IMPLS, default="auto", help="backend of the fused ops; default auto")
    for name, (field, text) in _WEIGHT_FLAGS.items():
        p.add_argument(f"--clipcid-{name}-weight", type=_weight, default=None, metavar="W",
                       help=f"{text}; default {WEIGHTS[field]:g}")  # fmt: skip
    p.add_argument("--clipcid-model-config", action="append", default=[], metavar="PATH",
                   help="a model config JSON (or a folder of them) to register with open_clip.add_model_config, "
                        "so that --model / --distill-model can name it (repeatable)")  # fmt: skip
    return p


def parse_plugin_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` into our options (with the loss weights resolved) and open_clip_train's flags."""
    opts, rest = _parser().parse_known_args(argv)
    stray = [a for a in rest if a.startswith("--clipcid")]
    if stray:
        raise PluginError(f"unknown clipcid-fast flag {stray[0]} (see {PROG} --help)")
    opts.weights = {}  # the weights of this loss only
    for name, (field, _) in _WEIGHT_FLAGS.items():
        given = getattr(opts, f"clipcid_{name}_weight")
        losses = _losses_reading(field)
        if opts.clipcid_loss in losses:
            opts.weights[field] = WEIGHTS[field] if given is None else given
        elif given is not None:
            raise PluginError(
                f"--clipcid-{name}-weight applies to --clipcid-loss {' / '.join(losses)}, "
                f"not to --clipcid-loss {opts.clipcid_loss}"
            )
    return opts, rest


class OpenClipTrainLoss(Recipe):
    """The loss open_clip_train's loop calls as ``loss(**model_out, output_dict=True)``: the recipe table's loss.

    ``model_out`` is the student's ``image_features, text_features, logit_scale`` and the teacher's
    ``dist_image_features, dist_text_features, dist_logit_scale`` (open_clip's models normalise them). Holds the
    clipcid-fast module (``.loss``) and, for kd / rd with a student narrower or wider than the teacher,
    ``proj_image`` / ``proj_text``.
    """

    def __init__(
        self,
        kind: str,
        weights: dict[str, float],
        *,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        impl: str = "auto",
        local_loss: bool = False,
        gather_with_grad: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
    ) -> None:
        if kind not in LOSSES:
            raise PluginError(f"--clipcid-loss must be one of {', '.join(LOSSES)}; got {kind!r}")
        if kind == "distill":  # distill compares only similarity matrices: no projection
            student_dim = teacher_dim = None
        super().__init__(kind, weights, student_dim, teacher_dim, impl=impl, local_loss=local_loss,
                         gather_with_grad=gather_with_grad, rank=rank, world_size=world_size, use_horovod=use_horovod,
                         normalized_students=True)  # fmt: skip
        self.kind = kind

    def param_groups(self, wd: float) -> list[dict]:
        """The raw logit scales (0-D) without weight decay, the projections with ``wd``; empty groups left out (in
        this order, the one open_clip_train's checkpoints of this plug-in hold)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
                  {"params": [p for p in params if p.ndim >= 2], "weight_decay": wd}]  # fmt: skip
        return [g for g in groups if g["params"]]

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        dist_image_features: Tensor,
        dist_text_features: Tensor,
        dist_logit_scale: Tensor,
        output_dict: bool = False,
        **extra: Any,
    ):
        if extra:
            raise ValueError(
                f"--clipcid-loss {self.kind}: the models returned outputs this loss does not use: {sorted(extra)} "
                "(a SigLIP model's logit_bias? the clipcid-fast losses are softmax CLIP losses)"
            )
        if self.proj_image is not None:  # the recipe projects them
            dtype = self.proj_image.weight.dtype
            image_features, text_features = image_features.to(dtype), text_features.to(dtype)
        elif self.kind != "distill" and image_features.shape[-1] != dist_image_features.shape[-1]:
            raise ValueError(
                f"--clipcid-loss {self.kind}: student features are {image_features.shape[-1]}-d and teacher features "
                f"{dist_image_features.shape[-1]}-d, and no projection was built (the widths read from the model "
                "configs were equal or unknown)"
            )
        out = super().forward(image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                              dist_logit_scale)  # fmt: skip
        return out if output_dict else tuple(out.values())


def _embed_dim(model_name: str) -> int | None:
    """The ``embed_dim`` of an open_clip model config (built-in, registered, local-dir: or a cached hf-hub: one)."""
    import open_clip

    try:
        cfg = open_clip.get_model_config(model_name)
    except Exception:  # an unreadable config: the forward check reports a width mismatch
        return None
    if not cfg:
        cfg = open_clip.get_model_config(model_name.replace("/", "-"))
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


class _Plugin:
    """What the patched names of ``open_clip_train.main`` share during one run."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.kind = opts.clipcid_loss
        self.args = None
        self.loss: OpenClipTrainLoss | None = None
        self.optimizer = None

    # --- parse_args -------------------------------------------------------------------------------------------
    def check_args(self, args) -> None:
        flag = f"--clipcid-loss {self.kind}"
        if args.distill_model is None or args.distill_pretrained is None:
            raise PluginError(
                f"{flag} distils from a teacher: give both --distill-model and --distill-pretrained "
                f"(got --distill-model {args.distill_model}, --distill-pretrained {args.distill_pretrained})"
            )
        if args.accum_freq != 1:
            raise PluginError(
                f"--accum-freq {args.accum_freq}: open_clip_train does not distil with gradient accumulation (its "
                "loop runs the teacher only at --accum-freq 1; an assert marked FIXME in open_clip_train/main.py). "
                "clipcid-fast's own trainer accumulates exactly: clipcid-fast train --accum-freq"
            )
        if "coca" in args.model.lower():
            raise PluginError(f"--model {args.model}: open_clip_train does not distil CoCa models")
        if args.siglip:
            raise PluginError(f"{flag} with --siglip: the clipcid-fast losses are softmax CLIP losses")
        if args.horovod:
            raise PluginError(f"{flag} with --horovod: launch with torchrun (torch.distributed) instead")
        if self.kind != "distill" and args.opt.lower() != "adamw":
            raise PluginError(
                f"{flag} with --opt {args.opt}: the CLIP-KD/RD scales are added to open_clip_train's own AdamW; "
                "use --opt adamw"
            )

    def parse_args(self, original):
        def parse_args(argv):
            args = original(argv)
            self.check_args(args)
            self.args = args
            return args

        return parse_args

    # --- the loss ----------------------------------------------------------------------------------------------
    def build_loss(self) -> OpenClipTrainLoss:
        a = self.args
        dims = {}
        if self.kind != "distill":
            dims = dict(student_dim=_embed_dim(a.model), teacher_dim=_embed_dim(a.distill_model))
            if dims["student_dim"] != dims["teacher_dim"] and None not in dims.values():
                logging.info(f"clipcid-fast: student {dims['student_dim']}-d, teacher {dims['teacher_dim']}-d: "
                             "learnable projections of the student's features (CLIP-KD's)")  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # the projections' init must not move open_clip_train's RNG
            torch.manual_seed(a.seed)
            loss = OpenClipTrainLoss(
                self.kind, self.opts.weights, impl=self.opts.clipcid_impl, local_loss=a.local_loss,
                gather_with_grad=a.gather_with_grad, rank=a.rank, world_size=a.world_size, use_horovod=a.horovod,
                **dims,
            )  # fmt: skip
        return loss.to(a.device)

    def create_loss(self, args):
        if self.loss is None:
            if self.kind != "distill":
                raise RuntimeError(f"--clipcid-loss {self.kind}: open_clip_train built no AdamW for the loss's scales")
            self.loss = self.build_loss()
        logging.info(
            f"clipcid-fast: --clipcid-loss {self.kind}: {type(self.loss.loss).__name__} "
            f"(impl {self.opts.clipcid_impl}, {self.opts.weights}) replaces open_clip's DistillClipLoss"
        )
        return self.data_parallel(self.loss, args)

    @staticmethod
    def data_parallel(loss: OpenClipTrainLoss, args) -> nn.Module:
        """Under torchrun, kd / rd's scales and projections train in DDP, as open_clip_train's model does.

        Their gradients differ between ranks: a projection sees only its rank's rows (the gathered copies of the
        other ranks' rows carry no gradient here). Left alone, every rank would step its own copy and the copies
        would drift apart (and only rank 0's would be saved). DDP averages them as it averages the model's, so
        both follow open_clip's gradient convention (exact with ``--gather-with-grad``; without it the
        projections' gradients are scaled by 1/world like the model's weights'). ``static_graph``: a zero-weight
        term leaves its scale unused, the same one on every step.
        """
        if not getattr(args, "distributed", False) or not any(p.requires_grad for p in loss.parameters()):
            return loss
        device = torch.device(args.device)
        ids = [device] if device.type == "cuda" else None  # torch refuses device_ids for a CPU module
        return nn.parallel.DistributedDataParallel(loss, device_ids=ids, static_graph=True)

    # --- the optimizer (kd, rd) --------------------------------------------------------------------------------
    def adamw(self, params, **kwargs):
        self.loss = self.build_loss()
        groups = list(params) + self.loss.param_groups(self.args.wd)
        opt = torch.optim.AdamW(groups, **kwargs)
        opt.register_state_dict_post_hook(self._save)
        opt.register_load_state_dict_pre_hook(self._load)
        self.optimizer = opt
        return opt

    def _save(self, optimizer, state_dict):
        sd = {k: v.detach().clone() for k, v in self.loss.state_dict().items()}
        state_dict[STATE_KEY] = {"loss": self.kind, "state_dict": sd}
        return state_dict

    def _load(self, optimizer, state_dict):
        saved = state_dict.pop(STATE_KEY, None)  # a shallow copy: the caller's checkpoint is not changed
        where = f"--resume {self.args.resume}" if self.args is not None else "the optimizer state"
        if saved is None:
            raise PluginError(
                f"{where}: the checkpoint has no clipcid-fast loss state (it was not written by {PROG} "
                f"--clipcid-loss {self.kind}); start a new run with --pretrained to fine-tune its weights"
            )
        if saved.get("loss") != self.kind:
            raise PluginError(f"{where}: written with --clipcid-loss {saved.get('loss')}, not {self.kind}")
        try:
            self.loss.load_state_dict(saved["state_dict"])
        except RuntimeError as e:
            raise PluginError(f"{where}: the saved {self.kind} loss does not fit this run's: {e}") from None
        return state_dict

    # --- the patch ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def patched(self, ocm):
        """Replace the names in ``open_clip_train.main`` (module ``ocm``) for the duration of the block."""
        saved = {name: getattr(ocm, name) for name in ("parse_args", "create_loss", "optim")}
        try:
            ocm.parse_args = self.parse_args(saved["parse_args"])
            ocm.create_loss = self.create_loss
            if self.kind != "distill":
                ocm.optim = _OptimNamespace(saved["optim"], self.adamw)
            yield
        finally:
            for name, value in saved.items():
                setattr(ocm, name, value)


class _OptimNamespace:
    """``torch.optim`` as ``open_clip_train.main`` sees it, with ``AdamW`` building ours."""

    def __init__(self, optim, adamw) -> None:
        self._optim, self.AdamW = optim, adamw

    def __getattr__(self, name):
        return getattr(self._optim, name)


def main(argv: list[str] | None = None):
    """Run open_clip_train with ``argv`` (default ``sys.argv[1:]``) and the loss ``--clipcid-loss`` names.

    Returns what ``open_clip_train.main.main`` returns (``-1`` when it refuses, e.g. an existing ``--name``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        print("\nopen_clip_train's flags:\n")
        import open_clip_train.main as ocm

        return ocm.main(["--help"])
    opts, rest = parse_plugin_args(argv)
    import open_clip
    import open_clip_train.main as ocm

    for path in opts.clipcid_model_config:
        open_clip.add_model_config(path)
    plugin = _Plugin(opts)
    with plugin.patched(ocm):
        return ocm.main(rest)


if __name__ == "__main__":
    try:
        rc = main()
    except PluginError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if rc not in (None, 0) else 0)
