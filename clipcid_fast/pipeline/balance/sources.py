"""Embedding sources: rows of one ``.npy`` or a directory of shards, memory-mapped, read as float32; ids;
the L2 normalisation every stage applies and the invalid-row check that goes with it."""

from __future__ import annotations

import glob
import os

import numpy as np
import torch

# what to do with NaN / inf / zero-norm rows (the package docstring, "Input")
INVALID_POLICIES = ("error", "remove")


def load_npy(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # numpy cannot memory-map a zero-byte data region
        return np.load(path, allow_pickle=False)


def _npy_files(path: str, what: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.npy")))
        if not files:
            raise ValueError(f"{what}: directory {path!r} holds no .npy files")
        return files
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path!r} is neither a .npy file nor a directory of .npy shards")
    return [path]


class EmbeddingSource:
    """Rows ``[n, D]`` of one .npy or a directory of shards, memory-mapped; reads return float32."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.files = _npy_files(path, "embeddings")
        self.shards: list[np.ndarray] = []
        dims = set()
        for f in self.files:
            a = load_npy(f)
            if a.ndim != 2:
                raise ValueError(f"embeddings must be 2-D [n, D]; {f!r} has shape {a.shape}")
            if a.dtype not in (np.float16, np.float32, np.float64):
                raise ValueError(f"embeddings must be float16/float32/float64; {f!r} has dtype {a.dtype}")
            dims.add(a.shape[1])
            self.shards.append(a)
        if len(dims) != 1:
            raise ValueError(f"all embedding shards must have the same D, got {sorted(dims)}")
        self.d = dims.pop()
        if self.d < 1:
            raise ValueError("embeddings have D = 0")
        self.starts = np.cumsum([0] + [len(a) for a in self.shards]).astype(np.int64)
        self.n = int(self.starts[-1])
        self.dtypes = sorted({str(a.dtype) for a in self.shards})
        self.itemsize = max(a.dtype.itemsize for a in self.shards)

    def fingerprint(self) -> dict:
        return {
            "files": [[os.path.basename(f), os.path.getsize(f)] for f in self.files],
            "n": self.n,
            "d": self.d,
            "dtypes": self.dtypes,
        }

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a new float32 array."""
        out = np.empty((stop - start, self.d), dtype=np.float32)
        s = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            a, base = self.shards[s], int(self.starts[s])
            hi = min(stop, base + len(a))
            _cast_rows(out[pos - start : hi - start], a[pos - base : hi - base])
            pos, s = hi, s + 1
        return out

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the given indices (any order) as a new float32 array, read in ascending row order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.d), dtype=np.float32)
        if len(rows) == 0:
            return out
        perm = np.argsort(rows, kind="stable")
        srt = rows[perm]
        shard = np.searchsorted(self.starts, srt, side="right") - 1
        bounds = np.flatnonzero(np.diff(shard)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(srt)]):
            s = int(shard[lo])
            out[perm[lo:hi]] = self.shards[s][srt[lo:hi] - self.starts[s]]
        return out


def _cast_rows(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` for a float32 ``dst``. float16 blocks are copied as they are (a memcpy out of the
    memory map) and widened by torch (exact, vectorised, threaded): numpy's float16 → float32 cast took
    1.5-1.7 µs a 512-wide row here against 0.7-0.9 µs, i.e. ~8 % of the assignment stage at k = 1024."""
    if src.dtype != np.float16 or not len(src):
        dst[...] = src
        return
    buf = np.empty(src.shape, src.dtype)
    buf[...] = src
    torch.from_numpy(dst).copy_(torch.from_numpy(buf))


def load_ids(path: str | None, n: int) -> np.ndarray:
    if path is None:
        return np.arange(n, dtype=np.int64)
    parts = []
    for f in _npy_files(path, "ids"):
        a = load_npy(f)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"ids must be 1-D integers; {f!r} has shape {a.shape} and dtype {a.dtype}")
        parts.append(np.asarray(a, dtype=np.int64))
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but the embeddings have {n} rows")
    return ids


def normalize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise float32 rows in place; returns ``(x, valid)``. Invalid rows (non-finite or zero
    norm) are set to e_0 so that downstream matmuls stay finite; callers mask them out."""
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    valid = np.isfinite(norms) & (norms > 0)
    x /= np.where(valid, norms, 1.0)[:, None]
    if not valid.all():
        x[~valid] = 0.0
        x[~valid, 0] = 1.0
    return x, valid


def invalid_error(rows: np.ndarray) -> ValueError:
    return ValueError(
        f"embeddings row {int(rows[0])} is NaN/inf or all zeros ({len(rows)} such rows seen so far, "
        f"first ones {rows[:8].tolist()}); clean them or pass invalid='remove' to remove and report them"
    )
