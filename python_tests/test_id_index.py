"""pipeline/id_index: the id -> row index embed persists (sorted ids + rows), opened memory-mapped by the readers;
a directory without it (an older cache) gets one built in memory, with the same answers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from clipcid_fast.pipeline.id_index import INDEX_DIR, IdIndex, index_paths, open_index, write_index


def shuffled_ids(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(10 * n, size=n, replace=False).astype(np.int64)  # unique, in no order


def test_the_persisted_index_answers_as_a_dict_of_the_ids(tmp_path):
    ids = shuffled_ids(5000, 0)
    assert write_index(str(tmp_path), ids)
    index = open_index(str(tmp_path), len(ids))  # no ids given: it must be the files
    assert isinstance(index.sorted, np.memmap) and isinstance(index.order, np.memmap)
    row_of = {int(i): r for r, i in enumerate(ids)}
    query = np.random.default_rng(1).choice(ids, size=300)
    np.testing.assert_array_equal(index(query), [row_of[int(i)] for i in query])
    absent = int(ids.max()) + 1
    with pytest.raises(ValueError, match=rf"1 of 2 ids are not embedded \(the first: {absent}\)"):
        index([ids[0], absent])


def test_an_old_cache_or_a_stale_index_is_rebuilt_from_the_ids(tmp_path):
    ids = shuffled_ids(1000, 2)
    built = open_index(str(tmp_path), len(ids), ids)  # no index on disk
    assert not isinstance(built.sorted, np.memmap)
    write_index(str(tmp_path), ids[:500])  # another row count than the directory's: not used
    again = open_index(str(tmp_path), len(ids), lambda: ids)
    assert not isinstance(again.sorted, np.memmap)
    np.testing.assert_array_equal(again(ids[::7]), np.arange(len(ids))[::7])
    with pytest.raises(ValueError, match="no id index"):
        open_index(str(tmp_path), len(ids))


def test_repeated_ids_write_no_index_and_refuse_lookups(tmp_path):
    ids = np.array([5, 3, 9, 3], dtype=np.int64)
    write_index(str(tmp_path), np.array([1, 2, 3, 4], dtype=np.int64))
    assert not write_index(str(tmp_path), ids)
    assert not any(os.path.exists(p) for p in index_paths(str(tmp_path)))  # the older index is gone too
    assert os.path.isdir(os.path.join(tmp_path, INDEX_DIR))
    with pytest.raises(ValueError, match=r"id 3 is at rows 1 and 3"):
        IdIndex.build(ids)([5])
