"""``clipcid-fast demo``: the --quick preset under YAML and flags; --quick end to end; a rerun reuses every stage.

The end-to-end test runs the real pipeline at the quick sizes (600 student images, 20 steps of 64 per recipe,
1000 held-out images). Its teacher is the default teacher trained 2 epochs on 10k images, trained once (about a
minute on 2 cores) and cached in ``CLIPCID_CACHE`` / ``~/.cache/clipcid_fast``, so the first run on a fresh
machine pays for it.
"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from clipcid_fast.cli import main as cli_main
from clipcid_fast.pipeline import demo
from clipcid_fast.pipeline.config import DemoConfig
from clipcid_fast.pipeline.demo_report import METRICS

STAGES = ("teacher", "embed", "balance", "cluster", "train", "eval")


def test_quick_preset_sits_under_yaml_and_flags(tmp_path):
    cfg = demo.build_demo_config(None, {"quick": True, "steps": 5})
    assert cfg.steps == 5  # the flag beats the preset
    assert cfg.batch_size == demo.QUICK["batch_size"] and cfg.data.student_samples == 600
    assert cfg.models.teacher_epochs == 2 and cfg.models.teacher_samples == 10000
    y = tmp_path / "d.yaml"
    y.write_text(yaml.safe_dump({"quick": True, "n_classes": 7, "data": {"caption_noise": 0.1}}))
    cfg = demo.build_demo_config(str(y), {"probe_train_samples": 50})
    assert cfg.n_classes == 7 and cfg.data.caption_noise == 0.1 and cfg.probe_train_samples == 50
    assert cfg.steps == demo.QUICK["steps"] and cfg.data.student_samples == 600
    full = demo.build_demo_config()
    assert full.steps == 300 and full.data.student_samples == 10000 and full.models.teacher_epochs == 3


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--recipes", "cid,nope"], "--recipes"),
        (["--balance-eps", "3"], "--balance-eps"),
        (["--balance-keep", "middle"], "--balance-keep"),
        (["--steps", "0"], "--steps"),
        (["--dataset", "csv"], "--dataset"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli_main(["demo", "--quick", "--out-dir", str(tmp_path / "d"), *argv])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before any stage ran


def _mtimes(root) -> dict[str, int]:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith((".pt", ".npy")):
                path = os.path.join(folder, f)
                out[path] = os.stat(path).st_mtime_ns
    return out


def test_quick_demo_end_to_end_and_rerun_reuses_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [row["recipe"] for row in report["rows"]] == DemoConfig().recipes.split(",")
    for row in [*report["rows"], report["teacher"]]:
        for metric in METRICS:
            assert 0.0 <= row[metric] <= 1.0, (row["recipe"], metric, row[metric])
    assert (
        report["teacher"]["zeroshot_top1"] > 0.5
    )  # even the quick teacher (2 epochs on 10k) is far above chance (0.1)
    assert report["regime"]["student_samples"] == 600 and report["regime"]["caption_noise"] == 0.4
    bal = report["balance"]
    assert 0.0 < bal["removed_fraction"][f"{bal['eps']:g}"] < 0.5  # a real but moderate fraction
    for name in ("report.md", "loss_curves.png", "accuracy.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| teacher |" in printed and "caption noise 0.4" in printed and str(out / "report.json") in printed

    before = _mtimes(out)
    assert cli_main(["demo", "--quick", "--out-dir", str(out), "--no-progress"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["rows"] == report["rows"] and again["teacher"] == report["teacher"]
    assert again["stage_reused"] == dict.fromkeys(STAGES, True)
    assert _mtimes(out) == before  # no checkpoint, feature or mask file was rewritten
    assert sum(again["stage_seconds_this_run"].values()) < 30


@pytest.mark.parametrize("recipe", ["kd", "cid"])
def test_finished_run_reused_unless_a_weight_it_reads_changed(tmp_path, recipe):
    """A finished run is reused when only weights its recipe does not read differ (a changed cid default leaves
    kd's runs alone), and not when one it reads differs."""
    import dataclasses

    from clipcid_fast.pipeline.config import write_config
    from clipcid_fast.recipes import RECIPES as TABLE

    cfg = demo.build_demo_config(None, {"out_dir": str(tmp_path)})
    layout = demo.Layout(str(tmp_path))
    tcfg = demo.train_config(cfg, layout, recipe, 0)
    old = dataclasses.replace(tcfg, weights=dataclasses.replace(tcfg.weights, cd_margin=tcfg.weights.cd_margin + 0.1))
    write_config(old, tcfg.out_dir)
    with open(os.path.join(tcfg.out_dir, "summary.json"), "w") as f:
        json.dump({"final": {"step": tcfg.steps}}, f)
    reused = demo._finished_run(tcfg)
    assert (reused is not None) == ("cd_margin" not in TABLE[recipe].weights)
