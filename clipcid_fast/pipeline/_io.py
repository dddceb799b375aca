"""Atomic file writes shared by the pipeline stages.

Every output is written to a temporary name beside its final path, flushed to disk, then moved into place
with ``os.replace``, so a reader (or a resumed run) sees either the whole old file or the whole new one,
never a torn write. A killed writer leaves only ``*.tmp-*`` files behind; ``clean_tmp`` removes them when
the stage starts again.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import uuid

import numpy as np


def tmp_name(path: str) -> str:
    """A temporary name beside ``path``, unique per process and call (ranks may share a directory)."""
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _replacing(path: str, durable: bool = True):
    """A binary file to write ``path``'s new content into; it replaces ``path`` only once fully written.

    ``durable`` (the default) fsyncs before the rename, so the new file survives a machine crash too; many
    small files that a manifest written durably after them vouches for (exported PNGs) can skip it."""
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        yield f
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_bytes(path: str, data: bytes, *, durable: bool = True) -> None:
    with _replacing(path, durable) as f:
        f.write(data)


class _Hashing:
    """A write-only file that also feeds every byte to a SHA-256 (torch.save only calls ``write``)."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_torch(path: str, obj) -> str:
    """``torch.save(obj)`` to ``path`` atomically (streamed into the temporary file, no in-memory copy); returns
    the SHA-256 (hex) of the bytes written, hashed as they stream."""
    import torch

    with _replacing(path) as f:
        hashing = _Hashing(f)
        torch.save(obj, hashing)
    return hashing.sha.hexdigest()


def atomic_npy(path: str, arr: np.ndarray) -> None:
    with _replacing(path) as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)


def atomic_npz(path: str, **arrays) -> None:
    with _replacing(path) as f:
        np.savez(f, **arrays)


def atomic_json(path: str, obj) -> None:
    """``obj`` as indented JSON with sorted keys, so equal objects give equal bytes."""
    atomic_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def clean_tmp(*dirs: str) -> None:
    """Remove the temporary files a killed writer left in ``dirs``."""
    for d in dirs:
        for f in glob.glob(os.path.join(d, "*.tmp-*")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
