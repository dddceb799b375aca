"""The benchmark harness (benchmarks/_harness.py) measures what it says: timing quantiles, fresh-process
peak memory, the CSV schema and the plots. About 15 s (each peak-memory call spawns a process)."""

from __future__ import annotations

import csv
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `benchmarks` imports

from benchmarks import _harness as H

ALLOC = "benchmarks.workloads:_alloc_test"


def test_time_fn_quantiles_ordered_and_measure_a_sleep():
    t = H.time_fn(lambda: time.sleep(0.02), warmup=1, repeats=5, device="cpu")
    assert t["p20"] <= t["p50"] <= t["p80"]
    assert len(t["times_ms"]) == 5
    assert 19.5 <= t["p20"] and 19.5 <= t["p50"] <= 40.0, t


def test_time_fn_runs_setup_untimed():
    calls = []
    t = H.time_fn(
        lambda: calls.append("run"),
        setup=lambda: (calls.append("setup"), time.sleep(0.05)),
        warmup=1,
        repeats=3,
        device="cpu",
    )
    assert calls == ["setup", "run"] * 4
    assert t["p80"] < 20.0, "setup time leaked into the timed region"


def test_time_fn_budget_cuts_repeats_but_not_below_min():
    t = H.time_fn(lambda: time.sleep(0.05), warmup=1, repeats=10, device="cpu", max_seconds=0.2, min_repeats=3)
    assert t["repeats"] == len(t["times_ms"]) == 3
    t = H.time_fn(lambda: None, warmup=1, repeats=10, device="cpu", max_seconds=0.2)
    assert t["repeats"] == 10


@pytest.fixture(scope="module")
def peaks():
    """The three peak-memory measurements, each in its own fresh process, run side by side (the
    measurements are per process, so running them concurrently does not change them; it halves the wait)."""
    jobs = {
        "alloc200": dict(kwargs={"mb": 200}),
        "alloc0": dict(kwargs={"mb": 0}, fn=H.peak_memory_mb),
        "sampled200": dict(kwargs={"mb": 200}, method="sampled"),
    }
    with pytest.warns(RuntimeWarning, match="psutil"), ThreadPoolExecutor(len(jobs)) as ex:
        futs = {
            k: ex.submit(
                j.get("fn", H.peak_memory), ALLOC, j["kwargs"], "full", device="cpu", method=j.get("method", "auto")
            )
            for k, j in jobs.items()
        }
        return {k: f.result() for k, f in futs.items()}


def test_peak_memory_of_200_mb_allocation(peaks):
    res = peaks["alloc200"]
    assert res["method"] == "clear_refs_vmhwm", res
    assert 190.0 <= res["peak_mb"] <= 260.0, res


def test_peak_memory_of_no_allocation_is_small(peaks):
    assert isinstance(peaks["alloc0"], float)  # peak_memory_mb returns the bare number
    assert 0.0 <= peaks["alloc0"] < 20.0, peaks["alloc0"]


def test_peak_memory_fallback_sampler_sees_the_allocation(peaks):
    res = peaks["sampled200"]
    assert res["method"] == "psutil_sampled", res
    assert 150.0 <= res["peak_mb"] <= 260.0, res


def _row(**kw):
    base = dict(
        op="test_op",
        provider="p",
        mode="fwd",
        x_name="B",
        x_value=1024,
        p20_ms=1.0,
        p50_ms=2.0,
        p80_ms=3.0,
        peak_mb=10.0,
        gflops=5.0,
        device="cpu",
        note="n",
    )
    return {**base, **kw}


def test_append_rows_writes_header_once_and_every_column(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    assert H.append_rows(path, [_row(), _row(mode="bwd")]) == 2
    H.append_rows(path, [_row(x_value=2048, note="with, comma")])
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(H.COLUMNS)
    assert sum(line.startswith("op,") for line in lines) == 1
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for r in rows:
        assert list(r) == list(H.COLUMNS)
        for col in ("op", "provider", "mode", "x_name", "x_value", "p50_ms", "device", "threads", "torch", "timestamp"):
            assert r[col], f"column {col} is empty"
    assert rows[0]["device"] != "cpu"  # turned into the CPU model name
    assert rows[2]["x_value"] == "2048" and rows[2]["note"] == "with, comma"
    assert rows[0]["timestamp"].endswith("+00:00")
    with pytest.raises(KeyError):
        H.append_rows(path, [{**_row(), "bogus": 1}])


def test_append_rows_refuses_a_foreign_header(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="header"):
        H.append_rows(path, [_row()])


def test_plot_writes_a_png_from_the_latest_rows(tmp_path):
    path = tmp_path / "r.csv"
    rows = [
        _row(mode=m, x_value=x, p50_ms=x / 100, p20_ms=x / 120, p80_ms=x / 80, peak_mb=x / 10)
        for m in ("fwd", "full")
        for x in (512, 1024, 2048)
    ]
    H.append_rows(path, rows)
    H.append_rows(path, [_row(x_value=1024, p50_ms=99.0)])  # a newer row for the same point
    latest = H.latest_rows(H.read_rows(path), ("provider", "mode", "x_value"))
    assert len(latest) == 6
    assert [float(r["p50_ms"]) for r in latest if r["mode"] == "fwd" and r["x_value"] == "1024"] == [99.0]
    out = H.plot(path, "test_op", tmp_path / "plots" / "test_op.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_without_memory_rows_and_timed_row(tmp_path):
    """Rows from a --no-memory run (peak NaN everywhere) still plot (a log axis of no data used to raise),
    and timed_row maps time_fn's quantiles onto the p20/p50/p80 columns."""
    path = tmp_path / "r.csv"
    t = {"p20": 1.0, "p50": 2.0, "p80": 3.0}
    rows = [H.timed_row("test_op", "p", "fwd", "B", x, t, device="cpu", note="n", peak_mb=float("nan")) for x in (1, 2)]
    assert rows[0]["p20_ms"] == 1.0 and rows[0]["p50_ms"] == 2.0 and rows[0]["p80_ms"] == 3.0
    H.append_rows(path, rows)
    read = H.read_rows(path)
    assert [r["p80_ms"] for r in read] == ["3", "3"] or [float(r["p80_ms"]) for r in read] == [3.0, 3.0]
    out = H.plot(path, "test_op", tmp_path / "test_op.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
