"""The ``clipcid-fast`` command (also ``python -m clipcid_fast``).

The pipeline a user runs, one stage a command (each reads the previous stage's files; every stage takes
``--config FILE.yaml`` and writes its resolved config beside its outputs):

``export-data``  write a corpus out as PNG + open_clip CSV and as webdataset shards.
``embed``  the frozen teacher encodes a dataset into memory-mapped fp16 shards (resumable).
``balance``  streaming semantic balance (SemDeDup keep rule, or CLIP-CID's union-find variant) of
          embeddings in .npy files, resumable, under torchrun too (see clipcid_fast/pipeline/balance/).
``cluster``  k-means of the kept embeddings into N pseudo-classes (centroids, labels, top-k centres)
          for the cluster-discrimination loss (format in clipcid_fast/pipeline/balance/).
``train``  distil the teacher into the student (recipes cid, rd, kd, distill, cid+rd, baseline), exact resume.
``eval``  zero-shot, retrieval and linear probe of a teacher, a student or a checkpoint.
``export``  a teacher, a student or a checkpoint as an open_clip ``local-dir:`` folder (plain open_clip loads it).
``demo``  all of the above on the offline default (every recipe), then a report (``--quick``: CI sizes).

``info``  which backends this process uses, and how the extension was built.
``losses``  every reference loss and fused op on a built-in synthetic example.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
import torch.nn.functional as F

from . import _backend, reference
from .functional import row_logsumexp


def _example(batch: int, dim: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(8, dim, generator=g), dim=1)
    labels = torch.randint(0, 8, (batch,), generator=g)
    t_img = F.normalize(centres[labels] + 0.35 * torch.randn(batch, dim, generator=g), dim=1)
    t_txt = F.normalize(t_img + 0.30 * torch.randn(batch, dim, generator=g), dim=1)
    # the student sees a noisier version of the teacher's geometry
    s_img = F.normalize(t_img + 0.60 * torch.randn(batch, dim, generator=g), dim=1)
    s_txt = F.normalize(t_txt + 0.60 * torch.randn(batch, dim, generator=g), dim=1)
    t_img[1] = t_img[0]  # an exact duplicate pair for the keep rule
    return dict(s_img=s_img, s_txt=s_txt, t_img=t_img, t_txt=t_txt, centres=centres, labels=labels)


def demo(batch: int = 256, dim: int = 64, seed: int = 0) -> dict[str, float]:
    e = _example(batch, dim, seed)
    s_img, s_txt, t_img, t_txt = e["s_img"], e["s_txt"], e["t_img"], e["t_txt"]
    tau_s, tau_t, kappa = torch.tensor(1 / 0.07), torch.tensor(100.0), torch.tensor(2.659)
    contrastive, distill = reference.distill_clip_loss(s_img, s_txt, tau_s, t_img, t_txt, tau_t)
    vrd_kl, vrd_ci, vrd_ct = reference.vrd_loss(s_img, s_txt, t_img, t_txt, kappa, kappa)
    rows = {
        "clip (student)": reference.clip_loss(s_img, s_txt, tau_s),
        "open_clip distill: contrastive": contrastive,
        "open_clip distill: distill": distill,
        "CLIP-KD CRD": reference.crd_loss(s_img, s_txt, tau_s, t_img, t_txt, tau_t),
        "CLIP-KD ICL": reference.icl_loss(s_img, s_txt, t_img, t_txt, kappa),
        "CLIP-KD FD": reference.fd_loss(s_img, s_txt, t_img, t_txt),
        "CLIP-KD cross-KD": reference.cross_kd_loss(s_img, s_txt, t_img, t_txt, kappa, tau_t),
        "CLIP-RD VRD (kl)": vrd_kl,
        "CLIP-RD VRD (ce image)": vrd_ci,
        "CLIP-RD VRD (ce text)": vrd_ct,
        "CLIP-RD XRD": reference.xrd_loss(s_img, s_txt, t_img, t_txt, kappa),
        "CLIP-CID instance": reference.instance_discrimination_loss(s_img, t_txt, kappa),
        "CLIP-CID cluster (ArcFace 0.5, s=32)": reference.cluster_discrimination_loss(
            s_img, e["centres"], e["labels"]
        ).mean(),
    }
    keep = reference.semdedup_keep(t_img, [0.01, 0.1, 0.3])
    z = (tau_s * s_img) @ s_txt.T
    fused_lse = row_logsumexp(z)
    out = {k: float(v) for k, v in rows.items()}
    out["row_logsumexp max |fused − reference|"] = float((fused_lse - reference.row_logsumexp(z)).abs().max())
    for eps, k in zip([0.01, 0.1, 0.3], keep):
        out[f"semdedup kept fraction, eps={eps}"] = float(k.float().mean())
    return out


@dataclasses.dataclass(frozen=True)
class Stage:
    """One command of the pipeline: its config class (``pipeline.config``), the function that runs it and writes
    the resolved config beside its outputs (``"module:function"`` under ``clipcid_fast.pipeline``, imported when
    the command runs), its help; ``build`` builds the config from the parsed flags when the default
    (``config.config_from_args``) does not."""

    config: str
    run: str
    help: str
    description: str
    build: str | None = None


def _recipe_names() -> str:
    from .recipes import RECIPES

    return ", ".join(RECIPES)


STAGES = {
    "export-data": Stage(
        "ExportConfig", "data:export_command",
        "write a corpus as PNG + CSV and webdataset shards",
        "Writes the Fashion-MNIST teacher / student / test corpus as PNG files + an open_clip CSV and as "
        "webdataset tar shards, so the CSV and webdataset loaders run on real images.",
    ),
    "embed": Stage(
        "EmbedConfig", "embed:run_embed",
        "teacher features -> memory-mapped fp16 .npy shards",
        "The frozen model encodes a dataset's images and captions into out_dir/{image,text,ids,labels}/*.npy "
        "(the input of balance, cluster and train) + embed.json; resumable shard by shard.",
    ),
    "balance": Stage(
        "BalanceConfig", "balance:balance_command",
        "streaming semantic dedup (SemDeDup / union-find) of .npy embeddings",
        "k-means, assignment, per-cluster keep rule; resumable; splits clusters over torchrun ranks.",
    ),
    "cluster": Stage(
        "ClusterConfig", "balance:cluster_command",
        "k-means of kept embeddings into N pseudo-classes",
        "Writes centroids.npy [N, D] float32 (L2-normalised), labels.npy [n] int64 (-1 = not kept), "
        "optionally topk.npy / topk_sim.npy [n, k], and cluster.json.",
    ),
    "train": Stage(
        "TrainConfig", "train:run_train",
        f"distil the teacher into the student: recipes {_recipe_names()}",
        "Trains the student with a recipe (CLIP-CID, CLIP-RD, CLIP-KD, open_clip distillation, or the student's "
        "CLIP loss alone), teacher features from the embed cache; checkpoints resume bit for bit (--resume).",
    ),
    "eval": Stage(
        "EvalConfig", "evaluate:run_eval",
        "zero-shot, retrieval, linear probe of a model",
        "Evaluates the teacher, the student or a clipcid-fast train checkpoint on the held-out split: "
        "zero-shot top-1/top-5 and mean per-class recall, image<->text R@1/5/10, linear probe.",
    ),
    "export": Stage(
        "ExportModelConfig", "export_model:run_export",
        "a model as an open_clip local-dir: folder (no clipcid_fast needed to load it)",
        "Writes the teacher, the student or a clipcid-fast train checkpoint to --out as open_clip_config.json "
        "(model and preprocess config), open_clip_model.safetensors and the tokenizer files, for "
        "open_clip.create_model_and_transforms('local-dir:DIR') and open_clip.get_tokenizer('local-dir:DIR'); "
        "--force replaces a non-empty folder.",
    ),
    "demo": Stage(
        "DemoConfig", "demo:run_demo",
        "every stage on the offline default, every recipe, then the report",
        f"embed -> balance -> cluster -> train {_recipe_names()} -> eval, on the offline default "
        "(student: 10k images, 40 % noisy captions; teacher: the clean 60k); each stage reused on a rerun; "
        "report.json / report.md / PNG plots in --out-dir. --quick: reduced sizes (CI).",
        build="demo:config_from_args",
    ),
}  # fmt: skip


def _pipeline_function(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(f"clipcid_fast.pipeline.{module}"), name)


def _add_stage_parsers(sub) -> None:
    from .pipeline import config

    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help, description=stage.description)
        config.add_config_flags(p, getattr(config, stage.config))


def _run_stage(name: str, args) -> None:
    from .pipeline import config

    stage = STAGES[name]
    if stage.build is not None:
        cfg = _pipeline_function(stage.build)(args)
    else:
        cfg = config.config_from_args(getattr(config, stage.config), args)
    _pipeline_function(stage.run)(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clipcid-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="which backend runs where")
    _add_stage_parsers(sub)
    p_losses = sub.add_parser("losses", help="reference losses and fused ops on a built-in synthetic example")
    p_losses.add_argument("--batch", type=int, default=256)
    p_losses.add_argument("--dim", type=int, default=64)
    p_losses.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(_backend.summary())
    if args.cmd == "losses":
        if args.batch < 2 or args.dim < 1:
            parser.error(f"--batch must be >= 2 and --dim >= 1, got {args.batch} and {args.dim}")
        t0 = time.perf_counter()
        results = demo(args.batch, args.dim, args.seed)
        width = max(map(len, results))
        print(f"\nbuilt-in example: B={args.batch}, D={args.dim}, seed={args.seed}")
        for name, value in results.items():
            print(f"  {name:<{width}}  {value:.6f}")
        print(f"done in {time.perf_counter() - t0:.2f} s")
    elif args.cmd in STAGES:
        try:
            _run_stage(args.cmd, args)
        except ValueError as e:  # bad input found while running: its one line, exit 2, no usage block
            print(f"clipcid-fast {args.cmd}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
