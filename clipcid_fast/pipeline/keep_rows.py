"""``train --keep MASK.npy``: the rows of the teacher cache a run trains on, for any recipe that reads the cache.

The mask is a bool ``[n]`` over the rows of ``--teacher-cache`` (embed's row order: the order balance's
``keep_eps*.npy`` masks are in, so a balance mask is a valid ``--keep``), and a run trains on the dataset samples
whose ids are in the kept rows. It lets a recipe other than cid train on a dedup-kept subset, or on a random
subset of the same size (``benchmarks/data_efficiency.py``). cid takes its rows from ``--keep`` or from
``--balance-dir``, never both (one rule, no precedence to remember).
"""

from __future__ import annotations

import os

import numpy as np


def check_keep_flags(
    keep: str | None, balance_dir: str | None, recipe_reads_balance: bool, recipe_reads_cache: bool, recipe: str
) -> None:
    """ValueError (one line) when ``--keep`` is given to a run that reads no teacher cache (its rows are what the
    mask selects), or together with cid's ``--balance-dir`` (both would select the training rows)."""
    if keep is None:
        return
    if not recipe_reads_cache:
        raise ValueError(
            f"--keep {keep!r}: recipe {recipe} reads no --teacher-cache here (baseline, or --online-teacher), and "
            "--keep selects rows of that cache"
        )
    if balance_dir is not None and recipe_reads_balance:
        raise ValueError(
            f"--keep {keep!r} and --balance-dir {balance_dir!r} both select cid's training rows; give one "
            "(--keep accepts a balance mask such as keep_eps0.002.npy)"
        )


def load_keep(path: str, n_rows: int) -> np.ndarray:
    """The bool ``[n_rows]`` mask in ``path`` (a copy: the file is not held open); ValueError naming ``--keep`` and
    the value when it is missing, not a bool 1-D array of ``n_rows``, or keeps no row."""
    if not os.path.isfile(path):
        raise ValueError(f"--keep {path!r}: no such file")
    try:
        mask = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"--keep {path!r}: not a .npy array ({e})") from None
    if not isinstance(mask, np.ndarray):  # an .npz archive loads as a mapping of arrays (an open file)
        mask.close()
        raise ValueError(f"--keep {path!r}: not a .npy array (an .npz archive)")
    if mask.dtype != np.bool_:
        raise ValueError(f"--keep {path!r}: must be a bool mask, got dtype {mask.dtype}")
    if mask.shape != (n_rows,):
        raise ValueError(f"--keep {path!r}: has shape {mask.shape}, the teacher cache has {n_rows} rows")
    if not mask.any():
        raise ValueError(f"--keep {path!r}: keeps no row")
    return np.array(mask)
