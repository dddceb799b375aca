"""Sample id -> row of an embedding directory, persisted beside the features so readers never re-sort the ids.

``clipcid-fast embed`` writes, before ``embed.json``::

    id_index/ids.npy    int64 [n]  the sample ids, ascending
    id_index/rows.npy   int64 [n]  the row of each of those ids (a stable argsort of the ids in row order)

Readers (``load_embeddings``: train's teacher features, cid's pseudo-classes) memory-map the two files: opening
costs two header reads and a lookup of k ids a binary search over the mapped pages (O(k log n) pages touched),
where building the index costs an O(n log n) argsort of every id on every rank. A directory without the index
(written before it existed) or whose index does not match its row count gets one built in memory, as before.
Ids that repeat have no id -> row map: no index is written, and a lookup is refused (one line naming the id).
"""

from __future__ import annotations

import os

import numpy as np

from ._io import atomic_npy

INDEX_DIR = "id_index"
IDS_FILE, ROWS_FILE = "ids.npy", "rows.npy"


class IdIndex:
    """Sample id -> row: ``index(ids)`` gives the rows (int64) of the given ids.

    ``sorted_ids`` ascending and ``rows`` the row of each (arrays or memory maps); ``repeated`` (id, row, row)
    when ids repeat, which makes every lookup an error."""

    def __init__(self, sorted_ids: np.ndarray, rows: np.ndarray, repeated: tuple[int, int, int] | None = None):
        self.sorted, self.order, self.repeated = sorted_ids, rows, repeated

    @classmethod
    def build(cls, ids: np.ndarray) -> IdIndex:
        """The index of ``ids`` (row order), sorted in memory."""
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        repeat = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        repeated = None
        if repeat.size:
            j = int(repeat[0])
            repeated = (int(sorted_ids[j]), int(order[j]), int(order[j + 1]))
        return cls(sorted_ids, order, repeated)

    def __len__(self) -> int:
        return len(self.sorted)

    def __call__(self, ids) -> np.ndarray:
        """Rows (int64) of the given ids; an id that is not there, or that repeats, is a ValueError."""
        if self.repeated is not None:
            sid, a, b = self.repeated
            raise ValueError(f"embeddings: id {sid} is at rows {a} and {b}: ids repeat, so no id -> row lookup")
        query = np.asarray(ids, dtype=np.int64)
        pos, found = self.find(query)
        if not found.all():
            missing = ~found
            raise ValueError(
                f"embeddings: {int(missing.sum())} of {query.size} ids are not embedded (the first: "
                f"{int(query[missing].flat[0])}); embed the corpus that holds them"
            )
        return np.asarray(self.order[pos], dtype=np.int64)

    def find(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in the sorted ids, whether each id is there); positions of absent ids are clipped, unusable."""
        n = len(self.sorted)
        if n == 0:
            return np.zeros(query.shape, np.int64), np.zeros(query.shape, bool)
        pos = np.minimum(np.searchsorted(self.sorted, query), n - 1)
        return pos, np.asarray(self.sorted[pos]) == query


def index_paths(emb_dir: str) -> tuple[str, str]:
    return os.path.join(emb_dir, INDEX_DIR, IDS_FILE), os.path.join(emb_dir, INDEX_DIR, ROWS_FILE)


def write_index(emb_dir: str, ids: np.ndarray) -> bool:
    """Sort ``ids`` (row order) and write the index files; False (and any older index removed) when ids repeat."""
    index = IdIndex.build(ids)
    ids_path, rows_path = index_paths(emb_dir)
    if index.repeated is not None:
        for path in (ids_path, rows_path):
            if os.path.exists(path):
                os.remove(path)
        return False
    os.makedirs(os.path.dirname(ids_path), exist_ok=True)
    # rows before ids: a reader needs both, and a run killed between the two leaves sizes that disagree or no ids
    atomic_npy(rows_path, index.order)
    atomic_npy(ids_path, index.sorted)
    return True


def open_index(emb_dir: str, count: int, ids=None) -> IdIndex:
    """The persisted index of ``emb_dir`` (memory-mapped) when it is there and covers ``count`` rows, else one built
    from ``ids`` (row order; a callable returning them is called only then)."""
    ids_path, rows_path = index_paths(emb_dir)
    if os.path.isfile(ids_path) and os.path.isfile(rows_path):
        try:
            sorted_ids, rows = np.load(ids_path, mmap_mode="r"), np.load(rows_path, mmap_mode="r")
        except (ValueError, OSError):
            sorted_ids = rows = None
        if (
            sorted_ids is not None
            and sorted_ids.shape == rows.shape == (count,)
            and sorted_ids.dtype == rows.dtype == np.int64
        ):
            return IdIndex(sorted_ids, rows)
    if ids is None:
        raise ValueError(f"embeddings {emb_dir!r}: no id index ({INDEX_DIR}/) and no ids to build one")
    return IdIndex.build(ids() if callable(ids) else ids)
