"""``clipcid-fast balance`` and ``clipcid-fast cluster``: ``run_balance`` / ``run_cluster`` from their configs, the
resolved config written beside the outputs, a short report printed."""

from __future__ import annotations

import time

from ... import reference
from ..config import BalanceConfig, ClusterConfig, write_config
from .pseudo_classes import run_cluster
from .stages import run_balance


def balance_command(cfg: BalanceConfig) -> None:
    t0 = time.perf_counter()
    fns = {}
    if cfg.ops == "reference":
        fns = {"assign_fn": reference.nearest_centroid, "max_sim_fn": reference.masked_max_similarity}
    elif cfg.ops != "auto":
        raise ValueError(f"ops must be auto or reference, got {cfg.ops!r}")
    summary = run_balance(
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
        write_config(cfg, cfg.out_dir, "balance_config.yaml")
        print(f"\n{summary['method']} of {summary['n_rows']} rows (D={summary['dim']}, k={summary['k']}), "
              f"{summary['n_invalid']} invalid")  # fmt: skip
        for r in summary["thresholds"]:
            kind = summary["threshold_kind"]
            print(f"  {kind}={r[kind]:<8g} kept {r['kept']:>12d}   removed fraction {r['removed_fraction']:.4f}")
        print(f"outputs in {cfg.out_dir} (summary.json, timings.json); done in {time.perf_counter() - t0:.1f} s")


def cluster_command(cfg: ClusterConfig) -> None:
    if cfg.n_classes < 1:
        raise ValueError(f"--n-classes must be >= 1, got {cfg.n_classes}")
    meta = run_cluster(
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
    write_config(cfg, cfg.out_dir, "cluster_config.yaml")
    print(f"\n{meta['n_labelled']} rows into {meta['n_classes']} pseudo-classes; outputs in {cfg.out_dir}")
