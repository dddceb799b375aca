"""The recipe study's variant syntax, run folders and statistics (benchmarks/study_variants.py, paired_stats.py,
recipe_study.analyse): statistics against numpy / scipy computed independently, no training."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `benchmarks` imports
from benchmarks import recipe_study
from benchmarks.paired_stats import best_other, paired, summarize, t_value
from benchmarks.study_variants import parse_variant, parse_variants
from clipcid_fast.pipeline.config import DemoConfig
from clipcid_fast.pipeline.demo_report import METRICS
from clipcid_fast.recipes import WEIGHTS


def test_variant_label_is_canonical_and_typed():
    v = parse_variant(" cid:centre-lr-mult=0 , cd_margin=0.20,id_student_text=True,balance_keep=easy")
    assert v.label == "cid:balance_keep=easy,cd_margin=0.2,centre_lr_mult=0,id_student_text=true"
    assert v.weights == {"centre_lr_mult": 0.0, "cd_margin": 0.2, "id_student_text": True}
    assert v.stages == {"balance_keep": "easy"}
    cfg = v.config(DemoConfig())
    assert cfg.weights.cd_margin == 0.2 and cfg.weights.id_student_text is True and cfg.balance_keep == "easy"
    assert parse_variant("kd").label == "kd" and parse_variant("kd").weights == {}


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("nope", "recipe must be one of"),
        ("kd:cd_margin=0.2", "kd does not read 'cd_margin'"),
        ("kd:balance_eps=0.01", "kd does not read 'balance_eps'"),  # kd trains on every row
        ("cid:cd_margin", "is not KEY=VALUE"),
        ("cid:cd_margin=abc", "not a float"),
        ("cid:id_student_text=maybe", "expected true or false"),
        ("cid:balance_keep=middle", "balance_keep must be one of"),
        ("cid:cd_margin=0.2,cd-margin=0.3", "given twice"),
    ],
)
def test_bad_variant_names_itself(spec, needle):
    with pytest.raises(ValueError, match=needle) as e:
        parse_variant(spec)
    assert spec in str(e.value) or "recipe must be one of" in str(e.value)


def test_same_label_twice_is_refused():
    with pytest.raises(ValueError, match="given twice"):
        parse_variants(["cid:cd_margin=0.2", "cid:cd-margin=0.20"])


def test_run_folder_follows_the_resolved_settings_not_the_spelling():
    base = DemoConfig()
    plain = parse_variant("cid").run_key(base)
    # the default spelled out is the same run; the table's default is read, not a number written here
    assert parse_variant(f"cid:cd_margin={WEIGHTS['cd_margin']!r}").run_key(base) == plain
    assert parse_variant("cid:cd_margin=0.123").run_key(base) != plain
    assert parse_variant("cid:balance_keep=random").run_key(base) != plain
    # a setting the recipe does not read leaves its folder alone
    other = DemoConfig(weights=parse_variant("cid:cd_margin=0.123").config(base).weights)
    assert parse_variant("kd").run_key(other) == parse_variant("kd").run_key(base)
    assert parse_variant("kd").run_key(base).startswith("kd-")


def test_summary_and_paired_difference_match_scipy():
    rng = np.random.default_rng(0)
    a = {s: float(v) for s, v in zip(range(5), rng.normal(0.8, 0.01, 5))}
    b = {s: a[s] - float(d) for s, d in zip(range(5), rng.normal(0.01, 0.004, 5))}
    b[7] = 0.5  # a seed only one side has is not paired
    s = summarize(a.values())
    assert s.mean == pytest.approx(np.mean(list(a.values())))
    assert s.se == pytest.approx(sps.sem(list(a.values())))
    d = paired(a, b)
    ref = sps.ttest_rel([a[k] for k in range(5)], [b[k] for k in range(5)])
    assert d.n == 5 and t_value(d) == pytest.approx(ref.statistic)
    assert d.mean == pytest.approx(np.mean([a[k] - b[k] for k in range(5)]))
    assert math.isnan(summarize([1.0]).se) and math.isnan(t_value(summarize([1.0])))
    with pytest.raises(ValueError, match="no common seeds"):
        paired({0: 1.0}, {1: 1.0})


def test_best_other_skips_the_same_recipe_and_baseline():
    means = {"baseline": 0.9, "kd": 0.8, "rd": 0.82, "cid:a=1": 0.85, "cid": 0.7}
    recipe_of = {"baseline": "baseline", "kd": "kd", "rd": "rd", "cid:a=1": "cid", "cid": "cid"}
    assert best_other(means, "cid", recipe_of) == "rd"
    assert best_other(means, "rd", recipe_of) == "cid:a=1"
    assert best_other({"cid": 0.7}, "cid", {"cid": "cid"}) is None


def _fake_results(variants, seeds, rng):
    runs = {(v.label, s): {m: float(rng.uniform(0.7, 0.9)) for m in METRICS} | {"train_seconds": 1.0}
            for v in variants for s in seeds}  # fmt: skip
    return {"runs": runs, "teacher": dict.fromkeys(METRICS, 0.9), "keys": {v.label: v.label for v in variants}}


def test_analyse_and_csv_rows(tmp_path):
    variants = parse_variants(["baseline", "kd", "rd", "cid", "cid:cd_margin=0.2"])
    seeds = [0, 1, 2]
    res = _fake_results(variants, seeds, np.random.default_rng(1))
    st = recipe_study.analyse(res, variants, seeds, versus="cid")
    for metric in METRICS:
        zs = {v.label: [res["runs"][v.label, s][metric] for s in seeds] for v in variants}
        for label in ("cid", "cid:cd_margin=0.2"):
            row = st[metric][label]
            assert row["baseline"][0] == "baseline"
            assert row["baseline"][1].mean == pytest.approx(np.mean(np.subtract(zs[label], zs["baseline"])))
            best = max(("kd", "rd"), key=lambda r: np.mean(zs[r]))
            assert row["best_other"][0] == best
            assert row["best_other"][1].se == pytest.approx(sps.sem(np.subtract(zs[label], zs[best])))
        d = st[metric]["cid:cd_margin=0.2"]["versus"]
        assert d[0] == "cid" and d[1].mean == pytest.approx(np.mean(np.subtract(zs["cid:cd_margin=0.2"], zs["cid"])))
        assert "versus" not in st[metric]["cid"]
        assert "baseline" not in st[metric]["baseline"]
    rows = recipe_study.csv_rows("noisy", DemoConfig(), variants, res, st, seeds)
    path = tmp_path / "study.csv"
    recipe_study.append_csv(path, rows)
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(rows)
    mean = next(r for r in got if r["variant"] == "kd" and r["stat"] == "mean" and r["metric"] == "zeroshot_top1")
    assert float(mean["value"]) == pytest.approx(np.mean([res["runs"]["kd", s]["zeroshot_top1"] for s in seeds]),
                                                 rel=1e-5)  # fmt: skip
    assert mean["n_seeds"] == "3"
    (path.parent / "other.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="another header"):
        recipe_study.append_csv(path.parent / "other.csv", rows)
