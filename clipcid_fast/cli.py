"""The ``clipcid-fast`` command (also ``python -m clipcid_fast``).

The pipeline a user runs, one stage a command (each reads the previous stage's files; every stage takes
``--config FILE.yaml`` and writes its resolved config beside its outputs):

``export-data``  write a corpus out as PNG + open_clip CSV and as webdataset shards.
``embed``  the frozen teacher encodes a dataset into memory-mapped fp16 shards (resumable).
``balance``  streaming semantic balance (SemDeDup keep rule, or CLIP-CID's union-find variant) of
          embeddings in .npy files, resumable, under torchrun too (see clipcid_fast/pipeline/balance/).
``cluster``  k-means of the kept embeddings into N pseudo-classes (centroids, labels, top-k centres)
          for the cluster-discrimination loss (format in clipcid_fast/pipeline/balance/).
``train``  distil the teacher into the student (recipes cid, rd, kd, distill, baseline), exact resume.
``eval``  zero-shot, retrieval and linear probe of a teacher, a student or a checkpoint.
``demo``  all of the above on the offline default (every recipe), then a report (``--quick``: CI sizes).

``info``  which backends this process uses, and how the extension was built.
``losses``  every reference loss and fused op on a built-in synthetic example.
"""

from __future__ import annotations

import argparse
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


def _stage_parser(sub, name: str, cfg_cls, help_text: str, description: str):
    from .pipeline import config

    p = sub.add_parser(name, help=help_text, description=description)
    config.add_config_flags(p, cfg_cls)
    p.set_defaults(cfg_cls=cfg_cls)
    return p


def _run_export(cfg) -> None:
    from .pipeline import config, data

    t0 = time.perf_counter()
    formats = tuple(f.strip() for f in cfg.formats.split(",") if f.strip())
    manifest = data.export_corpus(cfg.data, cfg.out_dir, formats=formats, shard_size=cfg.shard_size, limit=cfg.limit)
    config.write_config(cfg, cfg.out_dir, "export_config.yaml")
    wrong = manifest.get("num_wrong_captions")
    print(f"exported {manifest.get('num_samples')} samples ({wrong} captions naming another class) to {cfg.out_dir}:")
    for key in ("csv", "wds"):
        if key in manifest:
            print(f"  {key}: {manifest[key]}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


def _run_embed(cfg) -> None:
    from .pipeline import embed

    embed.run_embed(cfg)


def _run_train(cfg) -> None:
    from .pipeline import train

    train.run_train(cfg)


def _run_eval(cfg) -> None:
    from .pipeline import evaluate

    evaluate.run_eval(cfg)


def _run_balance(cfg) -> None:
    from .pipeline import balance, config

    t0 = time.perf_counter()
    fns = {}
    if cfg.ops == "reference":
        fns = {"assign_fn": reference.nearest_centroid, "max_sim_fn": reference.masked_max_similarity}
    elif cfg.ops != "auto":
        raise ValueError(f"ops must be auto or reference, got {cfg.ops!r}")
    summary = balance.run_balance(
        cfg.embeddings,
        cfg.out_dir,
        ids=cfg.ids,
        k=cfg.k,
        niter=cfg.niter,
        seed=cfg.seed,
        max_points_per_centroid=cfg.max_points_per_centroid,
        method=cfg.method,
        eps=cfg.eps,
        delta=cfg.delta,
        keep=cfg.keep,
        batch_clusters=cfg.batch_clusters,
        chunk_rows=cfg.chunk_rows,
        tile=cfg.tile,
        invalid=cfg.invalid,
        centroids=cfg.centroids,
        progress=cfg.progress,
        plot=cfg.plot,
        **fns,
    )
    if summary:  # rank 0
        config.write_config(cfg, cfg.out_dir, "balance_config.yaml")
        print(f"\n{summary['method']} of {summary['n_rows']} rows (D={summary['dim']}, k={summary['k']}), "
              f"{summary['n_invalid']} invalid")  # fmt: skip
        for r in summary["thresholds"]:
            kind = summary["threshold_kind"]
            print(f"  {kind}={r[kind]:<8g} kept {r['kept']:>12d}   removed fraction {r['removed_fraction']:.4f}")
        print(f"outputs in {cfg.out_dir} (summary.json, timings.json); done in {time.perf_counter() - t0:.1f} s")


def _run_cluster(cfg) -> None:
    from .pipeline import balance, config

    if cfg.n_classes < 1:
        raise ValueError(f"--n-classes must be >= 1, got {cfg.n_classes}")
    meta = balance.run_cluster(
        cfg.embeddings,
        cfg.out_dir,
        cfg.n_classes,
        keep=cfg.keep,
        topk=cfg.topk,
        niter=cfg.niter,
        seed=cfg.seed,
        max_points_per_centroid=cfg.max_points_per_centroid,
        chunk_rows=cfg.chunk_rows,
        invalid=cfg.invalid,
    )
    config.write_config(cfg, cfg.out_dir, "cluster_config.yaml")
    print(f"\n{meta['n_labelled']} rows into {meta['n_classes']} pseudo-classes; outputs in {cfg.out_dir}")


def _run_demo(args) -> None:
    from .pipeline import demo

    demo.run_demo(demo.config_from_args(args))


STAGES = {
    "export-data": _run_export,
    "embed": _run_embed,
    "balance": _run_balance,
    "cluster": _run_cluster,
    "train": _run_train,
    "eval": _run_eval,
}


STAGE_HELP = {
    "export-data": (
        "write a corpus as PNG + CSV and webdataset shards",
        "Writes the Fashion-MNIST teacher / student / test corpus as PNG files + an open_clip CSV and as "
        "webdataset tar shards, so the CSV and webdataset loaders run on real images.",
    ),
    "embed": (
        "teacher features -> memory-mapped fp16 .npy shards",
        "The frozen model encodes a dataset's images and captions into out_dir/{image,text,ids,labels}/*.npy "
        "(the input of balance, cluster and train) + embed.json; resumable shard by shard.",
    ),
    "balance": (
        "streaming semantic dedup (SemDeDup / union-find) of .npy embeddings",
        "k-means, assignment, per-cluster keep rule; resumable; splits clusters over torchrun ranks.",
    ),
    "cluster": (
        "k-means of kept embeddings into N pseudo-classes",
        "Writes centroids.npy [N, D] float32 (L2-normalised), labels.npy [n] int64 (-1 = not kept), "
        "optionally topk.npy / topk_sim.npy [n, k], and cluster.json.",
    ),
    "train": (
        "distil the teacher into the student: recipes cid, rd, kd, distill, baseline",
        "Trains the student with a recipe (CLIP-CID, CLIP-RD, CLIP-KD, open_clip distillation, or the student's "
        "CLIP loss alone), teacher features from the embed cache; checkpoints resume bit for bit (--resume).",
    ),
    "eval": (
        "zero-shot, retrieval, linear probe of a model",
        "Evaluates the teacher, the student or a clipcid-fast train checkpoint on the held-out split: "
        "zero-shot top-1/top-5 and mean per-class recall, image<->text R@1/5/10, linear probe.",
    ),
    "demo": (
        "every stage on the offline default, every recipe, then the report",
        "embed -> balance -> cluster -> train cid, rd, kd, distill, baseline -> eval, on the offline default "
        "(student: 10k images, 40 % noisy captions; teacher: the clean 60k); each stage reused on a rerun; "
        "report.json / report.md / PNG plots in --out-dir. --quick: reduced sizes (CI).",
    ),
}


def _add_stage_parsers(sub) -> None:
    from .pipeline import config

    classes = {
        "export-data": config.ExportConfig,
        "embed": config.EmbedConfig,
        "balance": config.BalanceConfig,
        "cluster": config.ClusterConfig,
        "train": config.TrainConfig,
        "eval": config.EvalConfig,
        "demo": config.DemoConfig,
    }
    for name, (help_text, description) in STAGE_HELP.items():
        _stage_parser(sub, name, classes[name], help_text, description)


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
    elif args.cmd == "demo":
        try:
            _run_demo(args)
        except ValueError as e:
            parser.error(str(e))
    elif args.cmd in STAGES:
        from .pipeline import config

        try:
            cfg = config.config_from_args(args.cfg_cls, args)
            STAGES[args.cmd](cfg)
        except ValueError as e:
            parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
