"""The ``clipcid-fast`` command (also ``python -m clipcid_fast``).

``info``  which backends this process uses, and how the extension was built.
``demo``  every reference loss, and the fused ops built so far against it, on a built-in example:
          a synthetic teacher/student pair of CLIP embeddings with 8 semantic clusters, near
          duplicates planted (the trainer replaces this once it lands).
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
