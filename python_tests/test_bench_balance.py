"""The whole-pipeline K3 benchmark (benchmarks/bench_balance.py): the synthetic dataset is what it claims
(deterministic, reused byte for byte, fp16 memory map of the right shape, planted near-duplicates with
cosine > 0.99, realistic within-cluster cosines), the pipeline it runs removes the planted duplicates, its
figures are consistent with the run's outputs, and the CSV rows / plot are written. About 15-25 s."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `benchmarks` imports

from benchmarks import _harness as H
from benchmarks import bench_balance as B


def _files(meta: dict) -> dict:
    return {k: Path(meta["paths"][k]).read_bytes() for k in ("data", "labels", "dups")}


def _unit64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------------


def test_generator_is_deterministic_for_a_seed_and_reuses_its_files(tmp_path):
    spec = B.DataSpec(n=2500, d=64, k_true=12, seed=3, chunk_rows=1000)  # last chunk is partial
    a = B.generate_dataset(spec, tmp_path / "a", progress=False)
    b = B.generate_dataset(spec, tmp_path / "b", progress=False)
    assert not a["reused"] and not b["reused"]
    assert _files(a) == _files(b)  # same bytes from two independent writes
    mtime = os.stat(a["paths"]["data"]).st_mtime_ns
    again = B.generate_dataset(spec, tmp_path / "a", progress=False)
    assert again["reused"] and os.stat(a["paths"]["data"]).st_mtime_ns == mtime
    assert _files(again) == _files(a)
    assert not list((tmp_path / "a").glob("*.tmp-*"))  # no temporary files left behind
    other = B.generate_dataset(B.DataSpec(n=2500, d=64, k_true=12, seed=4, chunk_rows=1000), tmp_path / "a")
    assert other["paths"]["data"] != a["paths"]["data"]  # other parameters: another file, the first kept
    assert _files(other)["data"] != _files(a)["data"] and Path(a["paths"]["data"]).exists()


def test_a_stale_or_damaged_dataset_is_rewritten(tmp_path):
    spec = B.DataSpec(n=1500, d=32, k_true=5, chunk_rows=512)
    a = B.generate_dataset(spec, tmp_path, progress=False)
    good = _files(a)
    with open(a["paths"]["data"], "r+b") as f:  # truncated: size no longer matches the sidecar
        f.truncate(1000)
    b = B.generate_dataset(spec, tmp_path, progress=False)
    assert not b["reused"] and _files(b) == good
    meta = json.loads(Path(a["paths"]["meta"]).read_text())
    meta["params"]["dup_frac"] = 0.5  # a sidecar whose parameters differ
    Path(a["paths"]["meta"]).write_text(json.dumps(meta))
    c = B.generate_dataset(spec, tmp_path, progress=False)
    assert not c["reused"] and _files(c) == good


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_shapes_dtype_and_sidecar(tmp_path, dtype):
    spec = B.DataSpec(n=1200, d=48, dtype=dtype, k_true=7, chunk_rows=500)
    meta = B.generate_dataset(spec, tmp_path, progress=False)
    x = np.load(meta["paths"]["data"], mmap_mode="r")
    assert isinstance(x, np.memmap) and x.shape == (1200, 48) and x.dtype == np.dtype(dtype)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x, np.float64), axis=1), 1.0, atol=2e-3)
    labels, dups = np.load(meta["paths"]["labels"]), np.load(meta["paths"]["dups"])
    assert labels.shape == (1200,) and labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < 7
    assert dups.ndim == 2 and dups.shape[1] == 2 and dups.dtype == np.int64
    side = json.loads(Path(meta["paths"]["meta"]).read_text())
    assert side["params"]["n"] == 1200 and side["params"]["dtype"] == dtype and side["params"]["k_true"] == 7
    assert side["n_planted_duplicates"] == len(dups)
    assert Path(meta["paths"]["data"]).stat().st_size == side["bytes"]["data"]


def test_planted_duplicates_and_cluster_geometry(tmp_path):
    spec = B.DataSpec(n=6000, d=512, k_true=6, seed=1, chunk_rows=4096)
    meta = B.generate_dataset(spec, tmp_path, progress=False)
    x = _unit64(np.load(meta["paths"]["data"]))  # fp16 on disk, as the pipeline reads it
    labels, dups = np.load(meta["paths"]["labels"]), np.load(meta["paths"]["dups"])
    dst, src = dups[:, 0], dups[:, 1]
    assert 0.07 * spec.n < len(dups) < 0.13 * spec.n  # dup_frac = 0.1
    assert len(np.unique(dst)) == len(dst) and not np.isin(src, dst).any()  # sources are original rows
    assert (src < dst).all() and (labels[src] == labels[dst]).all()
    assert (dst // spec.chunk_rows == src // spec.chunk_rows).all()  # from the same chunk
    cos = np.einsum("ij,ij->i", x[dst], x[src])
    assert cos.min() > 0.99 and cos.max() < 0.99999  # near, not exact, copies
    orig = np.setdiff1d(np.arange(spec.n), dst)
    for c in range(3):
        r = x[orig[labels[orig] == c]][:400]
        g = r @ r.T
        off = g[np.triu_indices(len(r), 1)]
        assert 0.45 < off.mean() < 0.85, (c, off.mean())  # realistic within-cluster cosines
        assert off.max() < 0.95  # originals are not near-duplicates of each other
    a, b = x[orig[labels[orig] == 0]][:200], x[orig[labels[orig] == 1]][:200]
    assert (a @ b.T).mean() < 0.35  # other clusters are farther


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_balance")
    spec = B.DataSpec(n=4000, d=512, k_true=10, seed=2, chunk_rows=2048)
    meta = B.generate_dataset(spec, tmp / "data", progress=False)
    res = B.run_pipeline(meta["paths"]["data"], tmp / "run", k=8, eps=(0.01, 0.2), mm_repeats=1, progress=False)
    return meta, res


def test_pipeline_removes_the_planted_duplicates(tiny_run):
    meta, res = tiny_run
    out = Path(res["out_dir"])
    dups = np.load(meta["paths"]["dups"])
    assign = np.load(out / "assign.npy")
    keep = np.load(out / "keep_eps0.01.npy")
    dst, src = dups[:, 0], dups[:, 1]
    same = assign[dst] == assign[src]
    assert same.mean() > 0.95  # near copies land in the same k-means cluster
    assert not (keep[dst] & keep[src])[same].any()  # of every planted pair in one cluster, one is removed
    removed = int((~keep).sum())
    assert res["removed_rows"][0.01] == removed
    # at eps = 0.01 exactly the planted copies go (each star of copies keeps one member), nothing natural
    assert int(same.sum()) <= removed <= len(dups)
    assert res["removed"][0.2] >= res["removed"][0.01]


def test_pipeline_figures_match_its_outputs(tiny_run):
    _, res = tiny_run
    out = Path(res["out_dir"])
    n, k, d = 4000, 8, 512
    assert (res["n"], res["k"], res["d"], res["dtype"]) == (n, k, d, "float16")
    with open(out / "clusters.csv") as f:
        sizes = np.array([int(r["size"]) for r in csv.DictReader(f)], np.float64)
    assert res["sum_c2"] == float((sizes**2).sum())
    st = res["stages"]
    assert set(st) == set(B.STAGES)
    assert st["assign"]["gflops"] == pytest.approx(2.0 * n * k * d / st["assign"]["seconds"] / 1e9)
    assert st["dedup"]["gflops"] == pytest.approx(res["sum_c2"] * d / st["dedup"]["seconds"] / 1e9)
    timings = json.loads((out / "timings.json").read_text())
    assert st["dedup"]["seconds"] == timings["dedup"]["seconds_rank0"]
    assert timings["dedup"]["flops_rank0"] == pytest.approx(res["sum_c2"] * d)
    # each stage reads the embeddings at most once: the sample, then every row once, then once more by cluster
    assert st["assign"]["rows_read"] == n and st["dedup"]["rows_read"] == n
    assert st["kmeans"]["rows_read"] == min(n, k * 256)
    assert st["order"]["rows_read"] == st["merge"]["rows_read"] == 0
    assert res["ceiling"] == max(res["mm_before"], res["mm_after"]) > 0
    for name in ("assign", "dedup"):
        assert st[name]["ratio"] == pytest.approx(st[name]["gflops"] / res["ceiling"])
    assert res["maxrss_mb"] > res["peak_anon_mb"] > 0
    lines = "\n".join(B.report(res))
    assert "bar of issue 6" in lines and "assign at" in lines and "extrapolated" in lines


def test_extrapolation_scales_each_stage_by_its_own_law():
    st = {s: {"seconds": 10.0} for s in B.STAGES}
    res = {"n": 1_000_000, "k": 1024, "sum_c2": 2.0e9, "stages": st, "probe": {"c": 10_000, "seconds": 2.0}}
    est = B.extrapolate(res, n_target=10_000_000, k_target=1024)
    assert est["kmeans"] == pytest.approx(10.0)  # same sample (k · 256 rows) and k
    assert est["assign"] == pytest.approx(100.0)  # n · k
    assert est["order"] == est["merge"] == pytest.approx(100.0)  # n
    assert est["sum_c2"] == pytest.approx(2.0e11) and est["dedup"] == pytest.approx(1000.0)  # n² / k
    assert est["dedup_probe"] == pytest.approx(2.0 * 2.0e11 / 1e8)
    assert est["total"] == pytest.approx(10 + 100 + 100 + 1000 + 100)
    half_k = B.extrapolate({**res, "k": 512}, n_target=10_000_000, k_target=1024)
    assert half_k["assign"] == pytest.approx(200.0) and half_k["dedup"] == pytest.approx(500.0)


def test_run_directory_guard(tmp_path):
    (tmp_path / "notes.txt").write_text("not a balance run")
    with pytest.raises(ValueError, match="not a balance run"):
        B._fresh_dir(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_main_appends_one_row_per_stage_and_plots(tmp_path, capsys):
    path = tmp_path / "r.csv"
    argv = ["--rows", "3000", "--k", "8", "--k-true", "10", "--dim", "64", "--data-dir", str(tmp_path / "d")]
    argv += ["--csv", str(path), "--mm-repeats", "1", "--no-progress", "--no-probe", "--eps", "0.01", "0.1"]
    B.main(argv)
    text = capsys.readouterr().out
    assert "bar of issue 6" in text and "removed fraction" in text
    rows = H.read_rows(path)
    assert [r["mode"] for r in rows] == ["kmeans", "assign", "order", "dedup", "merge", "total"]
    assert list(rows[0]) == list(H.COLUMNS)
    for r in rows:
        key = (r["op"], r["provider"], r["x_name"], r["x_value"])
        assert key == ("balance_pipeline", "clipcid_fast", "rows", "3000")
        assert r["p20_ms"] == r["p50_ms"] == r["p80_ms"] and float(r["p50_ms"]) >= 0
        assert "k=8 D=64 dtype=float16" in r["note"] and "load1=" in r["note"]
    by = {r["mode"]: r for r in rows}
    for s in ("kmeans", "assign", "dedup"):
        assert float(by[s]["gflops"]) > 0 and "of mm" in by[s]["note"] and "rows/s" in by[s]["note"]
    assert by["order"]["gflops"] == by["merge"]["gflops"] == by["total"]["gflops"] == ""
    assert "eps 0.01" in by["total"]["note"] and float(by["total"]["peak_mb"]) > 0
    png = tmp_path / "balance_pipeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    B.main(argv)  # a second run reuses the dataset and appends another set of rows
    assert "(reused)" in capsys.readouterr().out
    assert len(H.read_rows(path)) == 2 * (len(B.STAGES) + 1)
