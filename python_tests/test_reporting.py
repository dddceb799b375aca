# ruff: noqa: F811 (test_train's module fixtures are imported by name and taken as arguments)
"""``--report-to``: TensorBoard (and W&B where installed) carry every scalar of ``metrics.jsonl`` at its step, plus
samples/s; a resumed run replaces the steps logged after its checkpoint; an unknown reporter is one line."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
from test_train import _trainer_on_cpu, assets, kill_cfg, raises_one_line  # noqa: F401 (module fixtures)

from clipcid_fast.pipeline import train

pytest.importorskip("tensorboard")


def tensorboard_scalars(out_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} read back from the run's event files (the last value of a step wins, as TensorBoard
    shows it after a purge)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_carries_every_metrics_scalar(assets, tmp_path):
    cfg = dataclasses.replace(kill_cfg(assets, tmp_path / "run", "baseline"), report_to="tensorboard")
    train.run_train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    got = tensorboard_scalars(cfg.out_dir)
    want_tags = {k for line in lines for k in line if k != "step"} | {"samples_per_second"}
    assert set(got) == want_tags
    assert any("eval_zeroshot_top1" in line for line in lines)  # the periodic zero-shot is among them
    for line in lines:
        for k, v in line.items():
            if k != "step":
                assert got[k][line["step"]] == np.float32(v), (k, line["step"])  # TensorBoard keeps float32
    assert sorted(got["samples_per_second"]) == [line["step"] for line in lines]
    assert all(v > 0 for v in got["samples_per_second"].values())
    assert glob.glob(os.path.join(cfg.out_dir, "tensorboard", "events.out.tfevents.*"))


def test_unknown_reporter_is_one_line(assets, tmp_path):
    cfg = dataclasses.replace(kill_cfg(assets, tmp_path / "run", "baseline"), report_to="tensorboard,mlflow")
    raises_one_line(ValueError, r"--report-to must be a comma-separated subset of tensorboard, wandb; got "
                    r"'tensorboard,mlflow'", train.run_train, cfg)  # fmt: skip
    assert not os.path.exists(cfg.out_dir)


def test_wandb_offline_carries_the_scalars(assets, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = dataclasses.replace(kill_cfg(assets, tmp_path / "run", "baseline"), report_to="wandb")
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", lambda self, d, step=None, **kw: (
        logged.append((step, d)), real_log(self, d, step=step, **kw))[1])  # fmt: skip
    train.run_train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [s for s, _ in logged] == [line["step"] for line in lines]
    for (_, d), line in zip(logged, lines):
        assert {k: v for k, v in d.items() if k != "samples_per_second"} == {
            k: v for k, v in line.items() if k != "step"
        }
    assert glob.glob(os.path.join(cfg.out_dir, "wandb", "offline-run-*"))
