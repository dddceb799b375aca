"""The geometry behind cid's margin and centre defaults: how far apart the teacher's pseudo-class centroids are,
what cluster loss the teacher's own features score at each margin, and where learned centres end up.

    .venv/bin/python benchmarks/cid_geometry.py runs/study/noisy-n10000-noise0.4 \\
        [--runs runs/study/noisy-n10000-noise0.4/train/steps300-b256/cid-*/cid-seed*]

``REGIME_DIR`` is a recipe-study regime folder (``recipe_study.py``: ``embed/`` and ``cluster/<name>/``). No
training: the teacher's image features (the embed cache) against the centroids of ``clipcid-fast cluster``,
margin-softmax loss from ``clipcid_fast.reference`` (float64). ``--runs``: finished cid runs whose final
checkpoint holds learned centres; their cosine with the teacher's centroids is printed per run.
Markdown tables on stdout (docs/cid_defaults.md quotes them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import glob
import math
import os

import numpy as np
import torch

from clipcid_fast import reference
from clipcid_fast.pipeline.balance import EmbeddingSource

MARGINS = (0.0, 0.1, 0.2, 0.3, 0.5)


def _rows(src: EmbeddingSource) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64) for a in src.shards])


def load(regime_dir: str, cluster: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(teacher image features [n, D] of the labelled rows, their labels, centroids [N, D], cluster folder)."""
    dirs = sorted(glob.glob(os.path.join(regime_dir, "cluster", cluster or "*")))
    if len(dirs) != 1:
        raise ValueError(f"--cluster: {len(dirs)} cluster folders match in {regime_dir!r}: {dirs}; name one")
    x = torch.from_numpy(_rows(EmbeddingSource(os.path.join(regime_dir, "embed", "image"))))
    labels = torch.from_numpy(np.load(os.path.join(dirs[0], "labels.npy")))
    cent = torch.from_numpy(np.load(os.path.join(dirs[0], "centroids.npy")).astype(np.float64))
    keep = labels >= 0
    return x[keep], labels[keep], cent, dirs[0]


def centroid_angles(cent: torch.Tensor) -> torch.Tensor:
    """Angle (rad) from each centroid to its nearest other centroid."""
    c = torch.nn.functional.normalize(cent, dim=-1)
    cos = c @ c.T
    cos.fill_diagonal_(-2.0)
    return torch.arccos(cos.max(dim=1).values.clamp(-1, 1))


def margin_table(x, labels, cent, scale: float) -> list[str]:
    xn = torch.nn.functional.normalize(x, dim=-1)
    cos = xn @ torch.nn.functional.normalize(cent, dim=-1).T
    target = cos.gather(1, labels[:, None]).squeeze(1)
    theta = torch.arccos(target.clamp(-1, 1))
    best_other = cos.scatter(1, labels[:, None], -2.0).max(dim=1).values
    lines = [f"| margin m | teacher's cluster loss (s = {scale:g}) | rows with cos(θ_y + m) < best other cos |",
             "| --- | --- | --- |"]  # fmt: skip
    for m in MARGINS:
        loss = reference.cluster_discrimination_loss(x, cent, labels, scale, 1.0, m, 0.0).mean()
        beaten = (torch.cos(theta + m) < best_other).double().mean()
        lines.append(f"| {m:g} | {loss.item():.3f} | {100 * beaten.item():.1f} % |")
    lines.append(f"| (chance: ln N) | {math.log(len(cent)):.3f} | |")
    return lines


def drift(runs: list[str], cent: torch.Tensor) -> list[str]:
    c0 = torch.nn.functional.normalize(cent.float(), dim=-1)
    lines = ["| run | mean cos(learned, teacher centroid) | median nearest-centre angle (rad) |", "| --- | --- | --- |"]
    for run in runs:
        ckpt = torch.load(os.path.join(run, "checkpoints", "latest.pt"), map_location="cpu", weights_only=False)
        state = ckpt.get("recipe", ckpt)
        w = next((v for k, v in _flat(state) if k.endswith("cluster.centres")), None)
        if w is None:
            lines.append(f"| {run} | (no centres in its checkpoint) | |")
            continue
        w = torch.nn.functional.normalize(w.float(), dim=-1)
        lines.append(
            f"| {run} | {(w * c0).sum(1).mean().item():.3f} | {centroid_angles(w.double()).median().item():.3f} |"
        )
    return lines


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flat(v, f"{prefix}{k}.")
    elif isinstance(obj, torch.Tensor):
        yield prefix[:-1], obj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("regime_dir")
    p.add_argument("--cluster", default=None, help="the cluster/ subfolder (default: the only one)")
    p.add_argument("--scale", type=float, default=32.0, help="margin-softmax scale s (default 32)")
    p.add_argument("--runs", nargs="*", default=[], help="cid run folders whose learned centres to compare")
    args = p.parse_args(argv)
    try:
        x, labels, cent, where = load(args.regime_dir, args.cluster)
    except ValueError as e:
        p.error(str(e))
    ang = centroid_angles(cent)
    print(f"{where}: {len(x)} labelled rows, N = {len(cent)} centroids, D = {cent.shape[1]}")
    print(f"nearest-other-centroid angle (rad): min {ang.min():.3f}, median {ang.median():.3f}, max {ang.max():.3f}\n")
    print("\n".join(margin_table(x, labels, cent, args.scale)))
    if args.runs:
        print("\n" + "\n".join(drift(args.runs, cent)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
