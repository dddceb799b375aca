"""K3 semantic balance pipeline (clipcid_fast.pipeline.balance): the keep rule against the reference and a dense
numpy formulation, union-find against brute-force connected components, batch-size / kill-resume /
two-process invariance (byte for byte), bad inputs, the ``cluster`` command, and real Fashion-MNIST."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal

import numpy as np
import pytest
import torch

from clipcid_fast import reference
from clipcid_fast.cli import main as cli_main
from clipcid_fast.pipeline import balance

EPS = [0.001, 0.01, 0.03, 0.1, 0.3, 0.6, 1.0, 1.5, 1.99]
DELTAS = [0.05, 0.2, 0.5, 1.0]
FMNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
# bookkeeping that legitimately differs between runs (wall-clock seconds)
NOT_COMPARED = {"timings.json"}


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _random(rng, n=600, d=24):
    return rng.standard_normal((n, d)).astype(np.float32)


def _planted(rng, n=450, d=24, return_src=False):
    """Clumps around a few centres, plus near copies (noise 1e-3 … 3e-2) of earlier rows."""
    c = rng.standard_normal((6, d))
    x = c[rng.integers(0, 6, n)] + 0.6 * rng.standard_normal((n, d))
    src = rng.choice(n, 150, replace=False)
    noise = rng.choice([1e-3, 1e-2, 3e-2], (150, 1)) * rng.standard_normal((150, d))
    out = np.concatenate([x, x[src] + noise]).astype(np.float32)
    return (out, src) if return_src else out


def _exact(rng, n=250, d=24):
    """Every row repeated 1-4 times (exact duplicates), shuffled."""
    x = rng.standard_normal((n, d))
    x = np.repeat(x, rng.integers(1, 5, n), axis=0)
    return x[rng.permutation(len(x))].astype(np.float32)


DATASETS = {"random": _random, "planted": _planted, "exact": _exact}


def _save(tmp_path, x, name="emb.npy", dtype=np.float32):
    path = str(tmp_path / name)
    np.save(path, x.astype(dtype))
    return path


def _run(emb, out, **kw):
    kw = {"k": 6, "eps": EPS, "progress": False, "plot": False, "niter": 8, **kw}
    return balance.run_balance(emb, str(out), **kw)


def _clusters(out):
    order, offsets = np.load(out / "order.npy"), np.load(out / "offsets.npy")
    return [order[offsets[c] : offsets[c + 1]] for c in range(len(offsets) - 1)]


def _dense_numpy_keep(rows: np.ndarray, eps) -> np.ndarray:
    """SemDeDup as written (full c×c matrix, upper triangle, column max), in numpy float64."""
    x = rows.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s = x @ x.T
    s[np.tril_indices(len(x))] = -np.inf  # keep i < j only (row i earlier than column j)
    m = s.max(axis=0)
    return np.stack([~(m > 1 - e) for e in eps])


def _file_bytes(out) -> dict[str, bytes]:
    files = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isfile(path) and name not in NOT_COMPARED:
            with open(path, "rb") as f:
                files[name] = f.read()
    return files


def _assert_same_files(a, b):
    fa, fb = _file_bytes(a), _file_bytes(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"


# ------------------------------------------------------------------------------------------------
# the keep rule
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["hard", "easy", "random"])
@pytest.mark.parametrize("data", sorted(DATASETS))
def test_keep_masks_equal_reference_and_dense_per_cluster(tmp_path, data, keep):
    x = DATASETS[data](np.random.default_rng(1))
    emb = _save(tmp_path, x)
    out = tmp_path / "out"
    summary = _run(emb, out, keep=keep)
    masks = np.stack([np.load(out / f"keep_eps{e:g}.npy") for e in EPS])
    want_ref = np.zeros_like(masks)
    sim = np.load(out / "assign_sim.npy")
    for rows in _clusters(out):
        if not len(rows):
            continue
        raw = x[rows]  # the rows in the pipeline's cluster order
        want_ref[:, rows] = reference.semdedup_keep(torch.from_numpy(raw), EPS).numpy()
        assert (_dense_numpy_keep(raw, EPS) == want_ref[:, rows]).all()
        s = sim[rows]
        if keep == "hard":  # SemDeDup: farthest from the centroid (smallest cosine) first
            assert (np.diff(s) >= 0).all()
        elif keep == "easy":
            assert (np.diff(s) <= 0).all()
    np.testing.assert_array_equal(masks, want_ref)
    # counts add up; the first row of each cluster is always kept; kept ids = rows
    for r, m in zip(summary["thresholds"], masks):
        assert r["kept"] == m.sum() and r["kept"] + r["removed_duplicates"] + r["removed_invalid"] == len(x)
        assert abs(r["removed_fraction"] - (1 - m.mean())) < 1e-12
    for e, m in zip(EPS, masks):
        np.testing.assert_array_equal(np.load(out / f"kept_ids_eps{e:g}.npy"), np.flatnonzero(m))
    if data == "exact":  # exactly one copy of each distinct row survives (unless two land in different clusters)
        distinct = len(np.unique(x, axis=0))
        assert distinct <= masks[0].sum() <= distinct + 6


def test_masks_monotone_in_eps_and_planted_copies_removed(tmp_path):
    x, src = _planted(np.random.default_rng(2), return_src=True)
    out = tmp_path / "out"
    _run(_save(tmp_path, x), out)
    masks = np.stack([np.load(out / f"keep_eps{e:g}.npy") for e in EPS])
    assert (masks[:-1] >= masks[1:]).all()  # a larger eps never keeps more
    copies = np.arange(450, 600)
    ci = {e: i for i, e in enumerate(EPS)}
    same_cluster = np.load(out / "assign.npy")[src] == np.load(out / "assign.npy")[copies]
    hit = ~masks[ci[0.01], src] | ~masks[ci[0.01], copies]
    assert same_cluster.mean() > 0.9 and hit[same_cluster].all()  # every planted pair loses a member
    m = np.load(out / "max_sim.npy")
    nn = np.load(out / "nearest_earlier.npy")
    removed = np.flatnonzero(~masks[ci[0.01]])
    assert (m[removed] > 0.99).all() and (nn[removed] >= 0).all()
    a = np.load(out / "assign.npy")
    assert (a[nn[removed]] == a[removed]).all()  # the nearest earlier row is in the same cluster


def test_fp16_input_and_shard_directory_with_ids(tmp_path):
    x = _planted(np.random.default_rng(3))
    one = _save(tmp_path, x, dtype=np.float16)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    bounds = [0, 100, 101, 380, len(x)]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        np.save(shard_dir / f"part_{i:03d}.npy", x[lo:hi].astype(np.float16))
    ids = np.arange(len(x), dtype=np.int64) * 7 + 1000
    np.save(tmp_path / "ids.npy", ids)
    _run(one, tmp_path / "a")
    _run(str(shard_dir), tmp_path / "b", ids=str(tmp_path / "ids.npy"))
    for e in EPS:
        keep = np.load(tmp_path / "a" / f"keep_eps{e:g}.npy")
        np.testing.assert_array_equal(keep, np.load(tmp_path / "b" / f"keep_eps{e:g}.npy"))
        np.testing.assert_array_equal(np.load(tmp_path / "b" / f"kept_ids_eps{e:g}.npy"), ids[keep])


def test_pluggable_functions_are_used(tmp_path):
    calls = {"assign": 0, "max": 0}

    def assign_fn(x, c):
        calls["assign"] += 1
        return reference.nearest_centroid(x, c)

    def max_sim_fn(x):
        calls["max"] += 1
        return reference.masked_max_similarity(x)

    s = _run(
        _save(tmp_path, _random(np.random.default_rng(4), 200)),
        tmp_path / "o",
        assign_fn=assign_fn,
        max_sim_fn=max_sim_fn,
    )
    assert calls["assign"] >= 1 and calls["max"] >= 1
    assert s["functions"]["max_sim_fn"].endswith("max_sim_fn")
    a, m, names = balance.resolve_fns()
    assert callable(a) and callable(m) and set(names) == {"assign_fn", "max_sim_fn"}


# ------------------------------------------------------------------------------------------------
# CLIP-CID's union-find variant
# ------------------------------------------------------------------------------------------------


def _components(adj: np.ndarray) -> np.ndarray:
    """Connected components by breadth-first search; label = smallest member."""
    n = len(adj)
    lab = np.full(n, -1)
    for s in range(n):
        if lab[s] >= 0:
            continue
        lab[s], frontier = s, [s]
        while frontier:
            nxt = np.flatnonzero(adj[frontier].any(axis=0) & (lab < 0))
            lab[nxt] = s
            frontier = nxt.tolist()
    return lab


def _brute_reps(x_rows: np.ndarray, rows: np.ndarray, delta: float) -> np.ndarray:
    x = x_rows.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
    lab = _components(dist < delta)
    rep = np.empty(len(x), np.int64)
    for g in np.unique(lab):
        members = np.flatnonzero(lab == g)
        d2 = ((x[members] - x[members].mean(0)) ** 2).sum(1)  # nearest the group's mean, ties to the smaller row
        rep[members] = rows[members][d2 <= d2.min() + balance.TIE_D2].min()
    return rep


@pytest.mark.parametrize("data", ["planted", "exact", "random"])
def test_unionfind_matches_brute_force_components(tmp_path, data):
    x = (
        DATASETS[data](np.random.default_rng(5), d=12)
        if data != "random"
        else _random(np.random.default_rng(5), 300, 3)
    )
    out = tmp_path / "out"
    summary = _run(_save(tmp_path, x), out, method="unionfind", delta=DELTAS, tile=16, k=4)
    for t, delta in enumerate(DELTAS):
        rep = np.load(out / f"rep_delta{delta:g}.npy")
        keep = np.load(out / f"keep_delta{delta:g}.npy")
        for rows in _clusters(out):
            np.testing.assert_array_equal(rep[rows], _brute_reps(x[rows], rows, delta), err_msg=f"delta={delta}")
        np.testing.assert_array_equal(keep, rep == np.arange(len(x)))
        r = summary["thresholds"][t]
        assert r["kept"] == keep.sum() == len(np.unique(rep))
    if data == "exact":
        assert np.load(out / f"keep_delta{DELTAS[0]:g}.npy").sum() >= len(np.unique(x, axis=0))


def test_unionfind_tiles_equal_one_tile():
    rng = np.random.default_rng(6)
    x = _planted(rng, n=200, d=5)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    thr = [1 - d * d / 2 for d in DELTAS]
    whole = balance.unionfind_groups(x, thr, tile=10_000)
    for tile in (5, 7, 64):
        np.testing.assert_array_equal(balance.unionfind_groups(x, thr, tile=tile), whole)


# ------------------------------------------------------------------------------------------------
# streaming, resume, scale-out
# ------------------------------------------------------------------------------------------------


class _Kill(RuntimeError):
    pass


def _killer(event: str, count: int, log: list):
    seen = {"n": 0}

    def hook(ev, **info):
        log.append(ev)
        if ev == event:
            if seen["n"] == count:
                raise _Kill(f"killed at {ev} #{count}")
            seen["n"] += 1

    return hook


RESUME_KW = {"batch_clusters": 2, "assign_block_rows": 150, "plot": True, "k": 9}


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    x = _planted(np.random.default_rng(7))
    x[17] = np.nan  # invalid rows are part of the result too
    x[33] = 0.0
    emb = _save(tmp, x)
    ref = tmp / "ref"
    _run(emb, ref, invalid="remove", **{**RESUME_KW, "batch_clusters": 1})
    return emb, ref


@pytest.mark.parametrize("batch_clusters", [3, 64])
def test_result_independent_of_batch_size(tmp_path, resume_data, batch_clusters):
    emb, ref = resume_data
    _run(emb, tmp_path / "o", invalid="remove", **{**RESUME_KW, "batch_clusters": batch_clusters})
    _assert_same_files(ref, tmp_path / "o")


@pytest.mark.parametrize(
    "event,count",
    [("kmeans", 0), ("assign_block", 1), ("assign", 0), ("order", 0), ("batch_start", 0), ("batch_start", 2),
     ("batch_done", 1), ("batch_done", 4), ("merge", 0)],
)  # fmt: skip
def test_kill_and_resume_is_byte_identical_and_redoes_at_most_one_batch(tmp_path, resume_data, event, count):
    emb, ref = resume_data
    out = tmp_path / "o"
    log1, log2 = [], []
    with pytest.raises(_Kill):
        _run(emb, out, invalid="remove", hook=_killer(event, count, log1), **RESUME_KW)
    _run(emb, out, invalid="remove", hook=lambda ev, **i: log2.append(ev), **RESUME_KW)
    _assert_same_files(ref, out)
    n_batches = -(-9 // RESUME_KW["batch_clusters"])
    finished_before = log1.count("batch_done")
    assert log2.count("batch_start") == n_batches - finished_before  # only the unfinished ones
    assert log1.count("batch_start") - finished_before <= 1  # at most one batch was in flight
    if log1.count("kmeans"):
        assert "kmeans" not in log2  # centroids reused
    if log1.count("assign"):
        assert "assign" not in log2 and "assign_block" not in log2  # assignments reused


_KILL_SCRIPT = """
import sys, time
from clipcid_fast import reference
from clipcid_fast.pipeline import balance

def slow_max_sim(x):
    time.sleep(0.15)
    return reference.masked_max_similarity(x)

balance.run_balance(sys.argv[1], sys.argv[2], k=9, niter=8, eps=%r, batch_clusters=1, progress=False,
                    max_sim_fn=slow_max_sim, invalid="remove", assign_block_rows=150)
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_byte_identical(tmp_path, resume_data):
    """A real kill (SIGKILL of a subprocess once some batches are on disk), then a normal rerun."""
    import signal
    import subprocess
    import sys
    import time

    emb, _ = resume_data
    out = tmp_path / "o"
    script = _KILL_SCRIPT % (EPS,)
    proc = subprocess.Popen([sys.executable, "-c", script, emb, str(out)])
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "batches").glob("batch_c*.npz"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list((out / "batches").glob("batch_c*.npz"))) < 9  # killed mid-way
    _run(emb, out, invalid="remove", max_sim_fn=reference.masked_max_similarity, **{**RESUME_KW, "plot": False})
    full = tmp_path / "full"
    _run(emb, full, invalid="remove", max_sim_fn=reference.masked_max_similarity, **{**RESUME_KW, "plot": False})
    _assert_same_files(full, out)


def test_resume_with_other_parameters_is_refused_but_new_eps_is_a_merge(tmp_path):
    emb = _save(tmp_path, _random(np.random.default_rng(8), 200))
    out = tmp_path / "o"
    _run(emb, out)
    with pytest.raises(ValueError, match="different run"):
        _run(emb, out, seed=1)
    log = []
    s = _run(emb, out, eps=[0.5, 0.7], hook=lambda ev, **i: log.append(ev))
    assert "batch_start" not in log and [r["eps"] for r in s["thresholds"]] == [0.5, 0.7]


def _dist_worker(rank, world, init_file, emb, out_semdedup, out_uf):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.distributed as dist

    from clipcid_fast.pipeline import balance

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    kw = {"k": 9, "niter": 8, "progress": False, "batch_clusters": 2, "assign_block_rows": 150, "invalid": "remove"}
    balance.run_balance(emb, out_semdedup, eps=EPS, plot=True, **kw)
    balance.run_balance(emb, out_uf, method="unionfind", delta=DELTAS, plot=False, tile=32, **kw)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path, resume_data):
    import torch.multiprocessing as mp

    emb, ref = resume_data
    a, b = str(tmp_path / "sd"), str(tmp_path / "uf")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), emb, a, b), nprocs=2, join=True)
    _assert_same_files(ref, a)
    one = tmp_path / "uf1"
    _run(emb, one, method="unionfind", delta=DELTAS, tile=32, invalid="remove", **{**RESUME_KW, "plot": False})
    _assert_same_files(one, b)
    # both ranks did batches: rank r owns the clusters c % 2 == r
    firsts = {int(f[len("batch_c") : -len(".npz")]) % 2 for f in os.listdir(os.path.join(a, "batches"))}
    assert firsts == {0, 1}


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf", "zero"])
def test_invalid_rows_error_or_are_removed_and_counted(tmp_path, bad):
    x = _random(np.random.default_rng(9), 300)
    rows = [5, 123, 299]
    x[rows] = {"nan": np.nan, "inf": np.inf, "zero": 0.0}[bad]
    emb = _save(tmp_path, x)
    with pytest.raises(ValueError, match="row 5 is NaN/inf or all zeros"):
        _run(emb, tmp_path / "err")
    out = tmp_path / "rm"
    s = _run(emb, out, invalid="remove")
    assert s["n_invalid"] == 3 and s["n_valid"] == 297
    np.testing.assert_array_equal(np.load(out / "invalid_rows.npy"), rows)
    assert (np.load(out / "assign.npy")[rows] == -1).all()
    for r in s["thresholds"]:
        keep = np.load(out / r["keep_file"])
        assert not keep[rows].any()
        assert r["kept"] + r["removed_duplicates"] + r["removed_invalid"] == 300


def test_bad_shapes_dtypes_and_parameters(tmp_path):
    good = _save(tmp_path, _random(np.random.default_rng(10), 50, 8))
    cases = {
        "1d": (np.zeros(10, np.float32), "2-D"),
        "3d": (np.zeros((4, 3, 2), np.float32), "2-D"),
        "int": (np.zeros((10, 4), np.int32), "float16/float32/float64"),
        "empty": (np.zeros((0, 8), np.float32), "no rows"),
        "nodim": (np.zeros((5, 0), np.float32), "D = 0"),
    }
    for name, (arr, msg) in cases.items():
        path = str(tmp_path / f"{name}.npy")
        np.save(path, arr)
        with pytest.raises(ValueError, match=msg):
            _run(path, tmp_path / f"o_{name}")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "a.npy", np.ones((3, 8), np.float32))
    np.save(mixed / "b.npy", np.ones((3, 9), np.float32))
    with pytest.raises(ValueError, match="same D"):
        _run(str(mixed), tmp_path / "o_mixed")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match=r"no \.npy files"):
        _run(str(tmp_path / "emptydir"), tmp_path / "o_ed")
    with pytest.raises(ValueError, match="neither"):
        _run(str(tmp_path / "missing.npy"), tmp_path / "o_m")
    np.save(tmp_path / "ids.npy", np.arange(49))
    with pytest.raises(ValueError, match="49 entries"):
        _run(good, tmp_path / "o_ids", ids=str(tmp_path / "ids.npy"))
    with pytest.raises(ValueError, match=r"centroids must be \[k, 8\]"):
        _run(good, tmp_path / "o_c", centroids=np.ones((3, 7), np.float32))
    for eps in ([0.0], [2.0], [-0.1], [2.5], [float("nan")], []):
        with pytest.raises(ValueError, match="eps"):
            _run(good, tmp_path / "o_e", eps=eps)
    for delta in ([0.0], [-1.0], [2.1], []):
        with pytest.raises(ValueError, match="delta"):
            _run(good, tmp_path / "o_d", method="unionfind", delta=delta)
    with pytest.raises(ValueError, match="k=60 clusters for only 50 rows"):
        _run(good, tmp_path / "o_k", k=60)
    for kw, msg in [({"keep": "hardest"}, "keep"), ({"method": "x"}, "method"), ({"batch_clusters": 0}, "batch")]:
        with pytest.raises(ValueError, match=msg):
            _run(good, tmp_path / "o_p", **kw)


def test_given_centroids_skip_kmeans(tmp_path):
    x = _planted(np.random.default_rng(11))
    c = x[:5] / np.linalg.norm(x[:5], axis=1, keepdims=True)
    out = tmp_path / "o"
    s = _run(_save(tmp_path, x), out, centroids=c, k=999)
    assert s["k"] == 5
    np.testing.assert_allclose(np.load(out / "centroids.npy"), c, rtol=1e-6, atol=1e-7)
    _, idx = reference.nearest_centroid(torch.from_numpy(x), torch.from_numpy(c))
    np.testing.assert_array_equal(np.load(out / "assign.npy"), idx.numpy())


# ------------------------------------------------------------------------------------------------
# the commands
# ------------------------------------------------------------------------------------------------


def test_cli_balance_and_cluster(tmp_path, capsys):
    x = _planted(np.random.default_rng(12))
    emb = _save(tmp_path, x, dtype=np.float16)
    out = tmp_path / "bal"
    assert cli_main(["balance", emb, str(out), "--k", "5", "--eps", "0.01,0.1", "--niter", "5", "--no-progress"]) == 0
    assert "removed fraction" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [r["eps"] for r in summary["thresholds"]] == [0.01, 0.1]
    assert (out / "balance.png").stat().st_size > 1000 and (out / "clusters.csv").read_text().startswith("cluster,size")
    keep = np.load(out / "keep_eps0.01.npy")

    cl = tmp_path / "cl"
    assert (
        cli_main(["cluster", emb, str(cl), "--n-classes", "7", "--keep", str(out / "keep_eps0.01.npy"), "--topk", "3"])
        == 0
    )
    cent, labels = np.load(cl / "centroids.npy"), np.load(cl / "labels.npy")
    topk, topk_sim = np.load(cl / "topk.npy"), np.load(cl / "topk_sim.npy")
    assert cent.dtype == np.float32 and cent.shape == (7, 24)
    np.testing.assert_allclose(np.linalg.norm(cent, axis=1), 1, atol=1e-5)
    assert labels.dtype == np.int64 and labels.shape == (len(x),) and topk.shape == (len(x), 3)
    assert (labels[~keep] == -1).all() and (labels[keep] >= 0).all() and (topk[~keep] == -1).all()
    np.testing.assert_array_equal(topk[:, 0], labels)
    xk = torch.from_numpy(x[keep].astype(np.float16).astype(np.float32))
    _, want = reference.nearest_centroid(xk, torch.from_numpy(cent))
    np.testing.assert_array_equal(labels[keep], want.numpy())
    assert (np.diff(topk_sim[keep], axis=1) <= 0).all()
    meta = json.loads((cl / "cluster.json").read_text())
    assert meta["n_labelled"] == keep.sum() and meta["n_not_kept"] == (~keep).sum()
    # the loss takes these directly (-1 = no target)
    lab = torch.from_numpy(labels[:32])
    loss = reference.cluster_discrimination_loss(torch.from_numpy(x[:32]), torch.from_numpy(cent), lab)
    assert torch.isfinite(loss).all() and (loss[lab < 0] == 0).all()
    # a bad argument is a usage error, not a traceback
    with pytest.raises(SystemExit):
        cli_main(["balance", emb, str(tmp_path / "x"), "--eps", "3"])
    assert cli_main(["losses", "--batch", "16", "--dim", "8"]) == 0


def test_cluster_without_topk_and_bad_arguments(tmp_path):
    x = _random(np.random.default_rng(13), 100, 6)
    emb = _save(tmp_path, x)
    meta = balance.run_cluster(emb, str(tmp_path / "c"), 4)
    assert meta["n_labelled"] == 100 and not (tmp_path / "c" / "topk.npy").exists()
    with pytest.raises(ValueError, match="n_classes"):
        balance.run_cluster(emb, str(tmp_path / "c2"), 0)
    with pytest.raises(ValueError, match="bool mask"):
        balance.run_cluster(emb, str(tmp_path / "c3"), 3, keep=np.ones(99, bool))
    with pytest.raises(ValueError, match="for only 2 kept rows"):
        balance.run_cluster(emb, str(tmp_path / "c4"), 3, keep=np.arange(100) < 2)


# ------------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists(FMNIST), reason=f"{FMNIST} absent (Debian package dataset-fashion-mnist)")
def test_fashion_mnist_planted_augmented_copies_are_removed(tmp_path):
    with gzip.open(FMNIST) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    rng = np.random.default_rng(0)
    orig = raw[rng.choice(len(raw), 4500, replace=False)].astype(np.float32)
    src = rng.choice(4500, 500, replace=False)
    a = orig[src]  # augmented copies: contrast / brightness jitter and pixel noise
    copies = np.clip(
        a * rng.uniform(0.92, 1.08, (500, 1)) + rng.uniform(-8, 8, (500, 1)) + rng.normal(0, 5, a.shape), 0, 255
    )
    x = np.concatenate([orig, copies]).astype(np.float32)
    x -= x.mean(axis=0)  # mean-centred pixel vectors
    out = tmp_path / "o"
    _run(_save(tmp_path, x), out, k=10, eps=[0.03], keep="random")
    keep = np.load(out / "keep_eps0.03.npy")
    pair_hit = ~keep[src] | ~keep[4500 + np.arange(500)]  # a member of the planted pair was removed
    assert pair_hit.mean() >= 0.95, pair_hit.mean()
    assert (keep[src] | keep[4500 + np.arange(500)]).mean() >= 0.95  # … and usually one survives
    others = np.setdiff1d(np.arange(4500), src)
    assert (~keep[others]).mean() <= 0.03  # few genuine images go


@pytest.mark.parametrize("sig, event, count", [(signal.SIGTERM, "batch_start", 1), (signal.SIGINT, "assign_block", 0)])
def test_a_stop_signal_finishes_the_batch_and_a_rerun_completes(tmp_path, resume_data, capsys, sig, event, count):
    """SIGTERM during a dedup batch (SIGINT during an assignment block): that batch (block) is written, one line
    says where it stopped, exit code 128 + signal; the rerun does only the rest and its outputs equal the
    uninterrupted run's byte for byte."""
    emb, ref = resume_data
    out = tmp_path / "o"
    seen = {"n": 0}
    handler_before = signal.getsignal(sig)  # SIG_IGN for SIGINT when pytest runs as a background job

    def hook(ev, **info):
        if ev == event:
            if seen["n"] == count:
                os.kill(os.getpid(), sig)  # arrives inside the stage; the handler only records it
            seen["n"] += 1

    log = []
    with pytest.raises(SystemExit) as e:
        _run(emb, out, invalid="remove", hook=lambda ev, **i: (log.append(ev), hook(ev, **i)), **RESUME_KW)
    assert e.value.code == 128 + sig
    where = "dedup batch of clusters" if event == "batch_start" else "assignment block 1 of"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"balance: stopped after {where}") and line.endswith(
        f"by {signal.Signals(sig).name}; rerun the same command to resume"
    ), line
    if event == "batch_start":
        assert log.count("batch_done") == log.count("batch_start") == count + 1  # the batch in flight finished
    assert signal.getsignal(sig) == handler_before  # the stage's handler is gone with the stage
    _run(emb, out, invalid="remove", **RESUME_KW)
    _assert_same_files(ref, out)


def test_trainer_reads_unionfind_masks_too(tmp_path):
    """``load_keep_mask`` (what ``train --balance-dir --balance-eps`` reads) finds union-find's keep_delta mask
    as it finds SemDeDup's keep_eps one; neither or both in one folder is one clear error."""
    x = DATASETS["planted"](np.random.default_rng(3), d=12)
    uf, sd = tmp_path / "uf", tmp_path / "sd"
    _run(_save(tmp_path, x), uf, method="unionfind", delta=[0.2], tile=16, k=4)
    _run(_save(tmp_path, x), sd, eps=[0.2], k=4)
    want_uf, want_sd = np.load(uf / "keep_delta0.2.npy"), np.load(sd / "keep_eps0.2.npy")
    assert not want_uf.all()  # the planted duplicates are removed: the mask says something
    np.testing.assert_array_equal(balance.load_keep_mask(str(uf), 0.2, len(x)), want_uf)
    np.testing.assert_array_equal(balance.load_keep_mask(str(sd), 0.2, len(x)), want_sd)
    with pytest.raises(ValueError, match=r"no keep_eps0\.3\.npy or keep_delta0\.3\.npy"):
        balance.load_keep_mask(str(uf), 0.3, len(x))
    with pytest.raises(ValueError, match="rows, the teacher cache"):
        balance.load_keep_mask(str(uf), 0.2, len(x) + 1)
    np.save(uf / "keep_eps0.2.npy", want_sd)
    with pytest.raises(ValueError, match="holds both"):
        balance.load_keep_mask(str(uf), 0.2, len(x))
