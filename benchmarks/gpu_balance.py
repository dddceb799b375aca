"""Centroids for the GPU check's balance pipeline when faiss is absent: spherical k-means in torch on the device.

A bare GPU machine may lack faiss (the pipeline's k-means). Then ``kmeans_centroids`` samples
``min(n, k · 64)`` rows, starts from k of them and runs ``niter`` assignment / mean steps with the fused
``nearest_centroid`` (empty clusters keep their centre); the pipeline is then given these centroids, so every
other stage runs as usual. With faiss installed it returns None and the pipeline runs its own k-means.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import torch


def kmeans_centroids(data_path: str, k: int, niter: int, device, seed: int = 0) -> dict | None:
    if importlib.util.find_spec("faiss") is not None:
        return None
    from clipcid_fast.ops.masked_max_sim import nearest_centroid

    t0 = time.perf_counter()
    data = np.load(data_path, mmap_mode="r")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(data), min(len(data), k * 64), replace=False))
    x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(data[rows], np.float32)).to(device), dim=1)
    c = x[torch.from_numpy(rng.choice(len(x), k, replace=False)).to(device)].clone()
    for _ in range(niter):
        _, idx = nearest_centroid(x, c, check_values=False)
        s = torch.zeros_like(c).index_add_(0, idx, x)
        filled = torch.linalg.vector_norm(s, dim=1) > 0
        c = torch.where(filled[:, None], torch.nn.functional.normalize(s, dim=1), c)
    return {"centroids": c.cpu().numpy(), "seconds": time.perf_counter() - t0}
