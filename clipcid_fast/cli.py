"""The ``clipcid-fast`` command (also ``python -m clipcid_fast``).

``info``  which backends this process uses, and how the extension was built.
``demo``  every reference loss, and the fused ops built so far against it, on a built-in example:
          a synthetic teacher/student pair of CLIP embeddings with 8 semantic clusters, near
          duplicates planted (the trainer replaces this once it lands).
``balance``  streaming semantic balance (SemDeDup keep rule, or CLIP-CID's union-find variant) of
          embeddings in .npy files, resumable, under torchrun too (see clipcid_fast/pipeline/balance/).
``cluster``  k-means of the kept embeddings into N pseudo-classes (centroids, labels, top-k centres)
          for the cluster-discrimination loss (format in clipcid_fast/pipeline/balance/).
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


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _add_balance_parsers(sub) -> None:
    b = sub.add_parser(
        "balance",
        help="streaming semantic dedup (SemDeDup / union-find) of .npy embeddings",
        description="k-means, assignment, per-cluster keep rule; resumable; splits clusters over torchrun ranks.",
    )
    b.add_argument("embeddings", help=".npy [n, D] (fp16/fp32) or a directory of .npy shards")
    b.add_argument("out_dir", help="output directory (rerun the same command in it to resume)")
    b.add_argument("--ids", help=".npy of n int64 ids (default: row numbers)")
    b.add_argument("--k", type=int, default=1024, help="k-means clusters (default 1024)")
    b.add_argument("--niter", type=int, default=20)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-points-per-centroid", type=int, default=256, help="k-means sample = k × this (faiss's)")
    b.add_argument("--method", choices=["semdedup", "unionfind"], default="semdedup")
    b.add_argument(
        "--eps", type=_floats, default=[0.01, 0.02, 0.05, 0.1, 0.2], help="semdedup eps list, e.g. 0.01,0.05"
    )
    b.add_argument("--delta", type=_floats, default=[0.2, 0.3, 0.4, 0.5], help="unionfind distance thresholds")
    b.add_argument("--keep", choices=["hard", "easy", "random"], default="hard", help="SemDeDup order in a cluster")
    b.add_argument("--batch-clusters", type=int, default=64, help="clusters per checkpointed batch")
    b.add_argument("--chunk-rows", type=int, default=65536, help="rows read per chunk")
    b.add_argument("--tile", type=int, default=1024, help="unionfind tile rows")
    b.add_argument("--invalid", choices=["error", "remove"], default="error", help="NaN/inf/zero rows")
    b.add_argument("--centroids", help="use these [k, D] centroids (.npy) instead of k-means")
    b.add_argument(
        "--ops",
        choices=["auto", "reference"],
        default="auto",
        help="per-chunk/per-cluster functions: the fused op when it imports (auto) or the reference",
    )
    b.add_argument("--no-plot", action="store_true")
    b.add_argument("--no-progress", action="store_true")

    c = sub.add_parser(
        "cluster",
        help="k-means of kept embeddings into N pseudo-classes",
        description="Writes centroids.npy [N, D] float32 (L2-normalised), labels.npy [n] int64 (-1 = not kept), "
        "optionally topk.npy / topk_sim.npy [n, k], and cluster.json.",
    )
    c.add_argument("embeddings", help=".npy [n, D] or a directory of .npy shards")
    c.add_argument("out_dir")
    c.add_argument("--n-classes", type=int, required=True)
    c.add_argument("--keep", help="bool mask [n] (.npy), e.g. balance's keep_eps0.05.npy; default all rows")
    c.add_argument("--topk", type=int, default=0, help="also write the k nearest centres per row")
    c.add_argument("--niter", type=int, default=20)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--max-points-per-centroid", type=int, default=256)
    c.add_argument("--chunk-rows", type=int, default=65536)
    c.add_argument("--invalid", choices=["error", "remove"], default="error")


def _run_balance_cmd(args) -> None:
    from .pipeline import balance

    t0 = time.perf_counter()
    fns = {}
    if args.ops == "reference":
        fns = {"assign_fn": reference.nearest_centroid, "max_sim_fn": reference.masked_max_similarity}
    summary = balance.run_balance(
        args.embeddings,
        args.out_dir,
        ids=args.ids,
        k=args.k,
        niter=args.niter,
        seed=args.seed,
        max_points_per_centroid=args.max_points_per_centroid,
        method=args.method,
        eps=args.eps,
        delta=args.delta,
        keep=args.keep,
        batch_clusters=args.batch_clusters,
        chunk_rows=args.chunk_rows,
        tile=args.tile,
        invalid=args.invalid,
        centroids=args.centroids,
        progress=not args.no_progress,
        plot=not args.no_plot,
        **fns,
    )
    if summary:  # rank 0
        print(f"\n{summary['method']} of {summary['n_rows']} rows (D={summary['dim']}, k={summary['k']}), "
              f"{summary['n_invalid']} invalid")  # fmt: skip
        for r in summary["thresholds"]:
            kind = summary["threshold_kind"]
            print(f"  {kind}={r[kind]:<8g} kept {r['kept']:>12d}   removed fraction {r['removed_fraction']:.4f}")
        print(f"outputs in {args.out_dir} (summary.json, timings.json); done in {time.perf_counter() - t0:.1f} s")


def _run_cluster_cmd(args) -> None:
    from .pipeline import balance

    meta = balance.run_cluster(
        args.embeddings,
        args.out_dir,
        args.n_classes,
        keep=args.keep,
        topk=args.topk,
        niter=args.niter,
        seed=args.seed,
        max_points_per_centroid=args.max_points_per_centroid,
        chunk_rows=args.chunk_rows,
        invalid=args.invalid,
    )
    print(f"\n{meta['n_labelled']} rows into {meta['n_classes']} pseudo-classes; outputs in {args.out_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clipcid-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="which backend runs where")
    p_demo = sub.add_parser("demo", help="reference losses on the built-in example")
    p_demo.add_argument("--batch", type=int, default=256)
    p_demo.add_argument("--dim", type=int, default=64)
    p_demo.add_argument("--seed", type=int, default=0)
    _add_balance_parsers(sub)
    args = parser.parse_args(argv)
    print(_backend.summary())
    if args.cmd == "demo":
        if args.batch < 2 or args.dim < 1:
            parser.error(f"--batch must be >= 2 and --dim >= 1, got {args.batch} and {args.dim}")
        t0 = time.perf_counter()
        results = demo(args.batch, args.dim, args.seed)
        width = max(map(len, results))
        print(f"\nbuilt-in example: B={args.batch}, D={args.dim}, seed={args.seed}")
        for name, value in results.items():
            print(f"  {name:<{width}}  {value:.6f}")
        print(f"done in {time.perf_counter() - t0:.2f} s")
    elif args.cmd in ("balance", "cluster"):
        try:
            (_run_balance_cmd if args.cmd == "balance" else _run_cluster_cmd)(args)
        except ValueError as e:
            parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
