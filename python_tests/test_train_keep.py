# ruff: noqa: F811 (test_train's module fixtures are imported by name and taken as arguments)
"""``train --keep MASK.npy`` (``pipeline/keep_rows.py``): a run trains on exactly the kept cache rows, in the
documented stream order; a bad mask is one line naming ``--keep`` and the value, nothing written; a resume with
another mask behind the same path is refused (issue 21, item 5).

The expected batches are computed here from the files' documented meaning (cache row order, the stream's
``default_rng([seed, epoch]).permutation(n)`` over the training rows in dataset order), not by the trainer's code.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_train import (  # noqa: F401 (module fixtures: assets, _trainer_on_cpu)
    BALANCE_EPS,
    N_SAMPLES,
    _trainer_on_cpu,
    assets,
    make_cfg,
    raises_one_line,
    read_cache,
    student_dataset,
)

from clipcid_fast.cli import main as cli_main
from clipcid_fast.pipeline import train
from clipcid_fast.pipeline.keep_rows import load_keep


def random_mask(n: int, kept: int, seed: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, kept, replace=False)] = True
    return mask


def expected_ids(cfg, ds, kept_ids: np.ndarray, steps: int) -> list[np.ndarray]:
    """The ids of each step's batch: the dataset's samples whose id is kept, in dataset order, drawn through the
    per-epoch seeded permutations (batches run across epoch ends)."""
    train_ids = np.asarray(ds.ids)[np.isin(ds.ids, kept_ids)]
    n = len(train_ids)
    stream = np.concatenate([np.random.default_rng([cfg.seed, e]).permutation(n) for e in range(steps)])
    return [train_ids[stream[s * cfg.batch_size : (s + 1) * cfg.batch_size]] for s in range(steps)]


@pytest.mark.parametrize("recipe", ["kd", "cid"])
def test_keep_trains_on_exactly_the_kept_rows(recipe, assets, tmp_path):
    """120 of the 200 cache rows, seeded; 6 steps of 32 cross an epoch end. cid reads the same mask in place of
    --balance-dir's (and drops the rows k-means left unlabelled, as with a balance mask)."""
    mask = random_mask(N_SAMPLES, 120, seed=3)
    path = str(tmp_path / "keep.npy")
    np.save(path, mask)
    cfg = make_cfg(assets, tmp_path / "run", recipe, keep=path, balance_dir=None, seed=5)
    cache = read_cache(assets.cache)
    kept = mask.copy()
    if recipe == "cid":
        kept &= np.load(os.path.join(cfg.cluster_dir, "labels.npy")) >= 0
    p = train.prepare(cfg)
    ds = student_dataset(cfg)
    assert p.train_samples == int(np.isin(ds.ids, cache["ids"][kept]).sum())
    got = [p.batch(s)["id"].numpy() for s in range(6)]
    want = expected_ids(cfg, ds, cache["ids"][kept], 6)
    for s, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"step {s}")
    # and the teacher features fed with them are the kept rows' own
    b = p.batch(0)
    rows = [cache["row"][int(i)] for i in b["id"]]
    np.testing.assert_array_equal(b["dist_image"].numpy(), cache["image"][rows].astype(np.float32))


def test_a_balance_mask_as_keep_is_the_balance_dir_run(assets, tmp_path):
    """cid --keep keep_eps*.npy draws the batches cid --balance-dir draws (same mask, two spellings)."""
    keep = os.path.join(assets.balance, f"keep_eps{BALANCE_EPS:g}.npy")
    a = train.prepare(make_cfg(assets, tmp_path / "a", "cid"))
    b = train.prepare(make_cfg(assets, tmp_path / "b", "cid", balance_dir=None, keep=keep))
    for s in range(3):
        for key in ("id", "cluster_label"):
            np.testing.assert_array_equal(a.batch(s)[key].numpy(), b.batch(s)[key].numpy())


def _write(tmp_path, what: str) -> str:
    path = str(tmp_path / ("keep.npz" if what == "npz" else "keep.npy"))
    good = random_mask(N_SAMPLES, 100, seed=0)
    if what == "missing":
        return path
    if what == "text":
        with open(path, "w") as f:
            f.write("not an array\n")
    elif what == "npz":
        np.savez(path, keep=good)
    else:
        arr = {"uint8": good.astype(np.uint8), "short": good[:-1], "2d": good[:, None],
               "empty": np.zeros(N_SAMPLES, bool)}[what]  # fmt: skip
        np.save(path, arr)
    return path


@pytest.mark.parametrize(
    "what, match",
    [
        ("missing", r"no such file"),
        ("text", r"not a \.npy array"),
        ("npz", r"not a \.npy array"),
        ("uint8", r"must be a bool mask, got dtype uint8"),
        ("short", rf"has shape \({N_SAMPLES - 1},\), the teacher cache has {N_SAMPLES} rows"),
        ("2d", rf"has shape \({N_SAMPLES}, 1\), the teacher cache has {N_SAMPLES} rows"),
        ("empty", r"keeps no row"),
    ],
)
def test_a_bad_mask_is_one_line_naming_keep(what, match, assets, tmp_path):
    path = _write(tmp_path, what)
    cfg = make_cfg(assets, tmp_path / "run", "kd", keep=path)
    msg = raises_one_line(ValueError, match, train.run_train, cfg)
    assert msg.startswith(f"--keep {path!r}: "), msg
    assert not os.path.exists(os.path.join(cfg.out_dir, "config.yaml"))


@pytest.mark.parametrize(
    "recipe, change, match",
    [
        ("cid", {}, r"--keep '.*' and --balance-dir '.*' both select cid's training rows"),
        ("baseline", {}, r"--keep '.*': recipe baseline reads no --teacher-cache"),
        ("kd", {"online_teacher": True}, r"--keep '.*': recipe kd reads no --teacher-cache"),
    ],
    ids=["cid-with-balance-dir", "baseline", "online-teacher"],
)
def test_keep_where_it_selects_nothing_or_twice(recipe, change, match, assets, tmp_path):
    path = _write(tmp_path, "uint8")  # never read: the flags are refused first
    cfg = make_cfg(assets, tmp_path / "run", recipe, keep=path, **change)
    raises_one_line(ValueError, match, train.run_train, cfg)
    assert not os.path.exists(cfg.out_dir)


def test_cli_bad_keep_exits_2_with_one_line(assets, tmp_path, capsys):
    path = _write(tmp_path, "uint8")
    argv = ["train", "--recipe", "kd", "--teacher-cache", assets.cache, "--keep", path, "--student-samples",
            str(N_SAMPLES), "--teacher", assets.teacher_json, "--teacher-weights", assets.teacher_a,
            "--no-progress", "--out-dir", str(tmp_path / "run")]  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"clipcid-fast train: error: --keep {path!r}: must be a bool mask, got dtype uint8", err


def test_resume_with_another_mask_at_the_same_path_is_refused(assets, tmp_path):
    path = str(tmp_path / "keep.npy")
    np.save(path, random_mask(N_SAMPLES, 120, seed=1))
    cfg = make_cfg(assets, tmp_path / "run", "kd", keep=path, steps=2, ckpt_every=1)
    train.run_train(cfg)
    again = dataclasses.replace(cfg, resume=True)  # the resume check runs on a finished run as on a killed one
    np.save(path, random_mask(N_SAMPLES, 120, seed=2))
    raises_one_line(ValueError, rf"--keep {path!r} holds another content than when the run started",
                    train.run_train, again)  # fmt: skip
    np.save(path, random_mask(N_SAMPLES, 120, seed=1))  # the same mask again: the run is taken as it is
    assert train.run_train(again)["final"]["step"] == 2


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    dtype=st.sampled_from([np.bool_, np.uint8, np.int64, np.float32]),
    shape_delta=st.sampled_from([0, 0, 0, -1, 1, "2d"]),
    seed=st.integers(0, 2**16),
)
def test_load_keep_accepts_exactly_a_nonempty_bool_vector_of_n(tmp_path_factory, n, dtype, shape_delta, seed):
    rng = np.random.default_rng(seed)
    shape = (n, 1) if shape_delta == "2d" else (max(n + shape_delta, 0),)
    arr = (rng.random(shape) < 0.5).astype(dtype)
    path = str(tmp_path_factory.mktemp("keep") / "m.npy")
    np.save(path, arr)
    ok = dtype is np.bool_ and shape == (n,) and arr.any()
    if ok:
        np.testing.assert_array_equal(load_keep(path, n), arr)
    else:
        with pytest.raises(ValueError, match=rf"^--keep {path!r}: ") as e:
            load_keep(path, n)
        assert "\n" not in str(e.value)
