"""benchmarks/data_efficiency.py without training: the eps calibration, the same-size random subsets, the paired
statistics (against scipy, computed independently) and the CSV rows."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `benchmarks` imports
from benchmarks import data_efficiency as de
from clipcid_fast.pipeline.config import DemoConfig
from clipcid_fast.pipeline.demo_report import METRICS


def test_calibration_takes_the_nearest_removed_fraction():
    summary = {"thresholds": [{"eps": e, "removed_fraction": f} for e, f in
                              ((0.001, 0.03), (0.002, 0.12), (0.004, 0.33), (0.005, 0.42), (0.006, 0.5))]}  # fmt: skip
    assert de.calibrate(summary, [0.1, 0.3, 0.45]) == {0.1: (0.002, 0.12), 0.3: (0.004, 0.33), 0.45: (0.005, 0.42)}


def test_random_subsets_have_the_size_asked_are_seeded_and_differ_by_seed():
    a, again, b = (de.random_mask(1000, 613, 0.3, s) for s in (0, 0, 1))
    assert a.dtype == np.bool_ and a.sum() == 613 and b.sum() == 613
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, de.random_mask(1000, 613, 0.45, 0))  # another fraction, another draw


def test_a_mask_file_is_never_silently_replaced(tmp_path):
    path = str(tmp_path / "m.npy")
    mask = de.random_mask(50, 20, 0.1, 0)
    de._save_mask(path, mask)
    de._save_mask(path, mask.copy())  # the same mask: fine
    np.testing.assert_array_equal(np.load(path), mask)
    with pytest.raises(RuntimeError, match="holds another mask"):
        de._save_mask(path, ~mask)


def fake_results(seeds, rng) -> dict:
    n = 1000
    arms = [de.Arm("all", 0.0, None, n), de.Arm("balance", 0.3, 0.004, 700), de.Arm("random", 0.3, 0.004, 700)]
    runs = {(r, a.tag, s): {**{m: float(rng.uniform(0.7, 0.9)) for m in METRICS}, "train_seconds": 1.0}
            for r in ("cid", "kd") for a in arms for s in seeds}  # fmt: skip
    return {"arms": arms, "n": n, "runs": runs, "teacher": {m: 0.9 for m in METRICS}}


def test_analyse_pairs_by_seed_and_the_csv_holds_it(tmp_path):
    seeds = [0, 1, 2, 3]
    res = fake_results(seeds, np.random.default_rng(0))
    stats = de.analyse(res, ["cid", "kd"], seeds)
    m = "zeroshot_top1"
    bal = np.array([res["runs"]["cid", "balance-f0.3", s][m] for s in seeds])
    ran = np.array([res["runs"]["cid", "random-f0.3", s][m] for s in seeds])
    full = np.array([res["runs"]["cid", "all", s][m] for s in seeds])
    d = stats["cid", "balance-f0.3", m]["vs_random"]
    assert d.mean == pytest.approx((bal - ran).mean())
    assert d.se == pytest.approx(sps.sem(bal - ran))
    assert d.mean / d.se == pytest.approx(sps.ttest_rel(bal, ran).statistic)
    assert stats["cid", "random-f0.3", m]["vs_all"].mean == pytest.approx((ran - full).mean())
    assert "vs_random" not in stats["cid", "random-f0.3", m] and "vs_all" not in stats["cid", "all", m]

    path = tmp_path / "de.csv"
    cfg = DemoConfig()
    de.append_csv(path, de.csv_rows(cfg, res, stats, ["cid", "kd"], seeds), columns=de.COLUMNS)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(de.COLUMNS)
    diff = [r for r in rows if r["recipe"] == "cid" and r["arm"] == "balance" and r["metric"] == m
            and r["stat"] == "diff" and r["versus"] == "random"]  # fmt: skip
    assert len(diff) == 1 and float(diff[0]["value"]) == pytest.approx((bal - ran).mean(), abs=1e-6)
    assert float(diff[0]["removed_fraction"]) == pytest.approx(0.3) and diff[0]["kept_rows"] == "700"
    values = [r for r in rows if r["stat"] == "value"]
    assert len(values) == 2 * 3 * len(seeds) * len(METRICS)  # recipes x arms x seeds x metrics


def test_planted_corpus_holds_the_copies_it_says(tmp_path):
    """Every planted row shows an augmented copy of its source image (close in pixels, not equal), with the
    source's caption; the originals are the corpus's own images; the counts are the flags'."""
    import argparse

    from benchmarks import planted_duplicates as pd_
    from clipcid_fast.pipeline.config import DataConfig
    from clipcid_fast.pipeline.data.fashion_mnist import FashionMnistCorpus

    args = argparse.Namespace(originals=20, duplicated=5, copies=2, student_samples=200, caption_noise=0.4)
    csv_path, planted, source = pd_.build_corpus(args, str(tmp_path / "corpus"))
    corpus = FashionMnistCorpus(DataConfig(student_samples=200, caption_noise=0.4))
    with open(csv_path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == 30 and planted.sum() == 10 and len(np.unique(source)) == 20
    from PIL import Image

    for row, copy, src in zip(rows, planted, source):
        img = np.asarray(Image.open(tmp_path / "corpus" / row["filepath"]), dtype=np.float32)
        orig = corpus.images[corpus.ids[src]].astype(np.float32)
        assert row["title"] == corpus.caption(int(src)) and int(row["label"]) == corpus.labels[src]
        if copy:
            assert 0 < np.abs(img - orig).mean() < 0.1 * orig.mean() + 8
        else:
            np.testing.assert_array_equal(img, orig)
    assert all(np.sum(source[planted] == s) == 2 for s in np.unique(source[planted]))
