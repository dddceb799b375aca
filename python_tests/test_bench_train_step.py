"""benchmarks/bench_train_step.py: its ``--quick`` run writes well-formed rows for every provider, and the steps it
compares are the same computation: this trainer's step (a) / (b) and open_clip_train's loop (c) give the same
contrastive and distill loss from the same weights on the same batch, on the first step and after one AdamW
update (so the initial weights, the teacher, the batch, the optimiser's hyper-parameters and the schedule all
agree; the teacher features of (a) come from the fp16 cache, (c)'s from its online teacher in fp32).

Both tests run the trainer on the CPU in fp32 (a GPU is hidden from them). About 15 s and 2-3 min on 2 cores
(the second is marked slow: ``scripts/gpu_check.sh`` skips it).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `benchmarks` imports

from benchmarks import _harness as H
from benchmarks import bench_train_step as T

pytest.importorskip("open_clip_train")

BATCH = 16


@pytest.fixture(scope="module", autouse=True)
def _cpu_fp32():
    """The trainer picks CUDA (and bf16 autocast) when it sees a GPU; these checks are about the fp32 CPU step."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_train_step")


@pytest.fixture(scope="module")
def assets(work) -> T.Assets:
    return T.build_assets("tiny", work)


def _two_steps(step) -> list[dict]:
    out = []
    for _ in range(2):
        step()
        out.append(step.loss_values())
    return out


def _close(a: dict, c: dict, keys=("contrastive_loss", "distill_loss", "loss"), rtol: float = 1e-4) -> list[str]:
    return [f"{k}: {a[k]:.7g} vs {c[k]:.7g}" for k in keys if not math.isclose(a[k], c[k], rel_tol=rtol)]


def test_trainer_and_open_clip_train_compute_the_same_distill_loss(assets):
    a = T.make_step("fused", assets, "distill", BATCH)
    # (c) builds its batch the pipeline's way, independently of (a)'s prepare(): the same rows, preprocess, tokens
    batch = T.pipeline_batch(assets, BATCH)
    assert torch.equal(batch["image"], a.batch["image"]) and torch.equal(batch["text"], a.batch["text"])
    c = T.OpenClipTrainStep(assets, BATCH)
    # the same initial student: (c) loads the file the trainer's seeded student was saved to
    sa, sc = a.p.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sc.keys() and all(torch.equal(sa[k], sc[k]) for k in sa)
    va, vc = _two_steps(a), _two_steps(c)
    assert va[0]["distill_loss"] > 0 and va[0]["contrastive_loss"] > 0
    assert va[0]["distill_loss"] != pytest.approx(va[1]["distill_loss"], rel=1e-3)  # the update changed something
    for step, (x, y) in enumerate(zip(va, vc)):
        bad = _close(x, y)
        assert not bad, f"step {step + 1}: (a) vs (c): {bad}"
    vb = _two_steps(T.make_step("reference", assets, "distill", BATCH))
    for step, (x, y) in enumerate(zip(vb, vc)):
        bad = _close(x, y)
        assert not bad, f"step {step + 1}: (b) vs (c): {bad}"


def test_the_comparison_would_see_another_teacher(assets, work):
    """The check above has power: (c) with another teacher's weights gives another distill loss."""
    other = os.path.join(work, "other-teacher.pt")
    sd = torch.load(assets.oc_teacher_pt, map_location="cpu", weights_only=True)
    torch.manual_seed(123)
    torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}, other)
    a = T.make_step("fused", assets, "distill", BATCH)
    c = T.OpenClipTrainStep(dataclasses.replace(assets, oc_teacher_pt=other), BATCH)
    a()
    c()
    va, vc = a.loss_values(), c.loss_values()
    assert math.isclose(va["contrastive_loss"], vc["contrastive_loss"], rel_tol=1e-4)  # the student is the same
    assert not math.isclose(va["distill_loss"], vc["distill_loss"], rel_tol=1e-3)


def test_fit_and_solve():
    c = T.fit_memory([100, 200, 400, 800], [1000 + 2 * b + 0.01 * b * b for b in (100, 200, 400, 800)])
    assert c == pytest.approx((1000, 2, 0.01), rel=1e-6)
    b = T.solve_batch(c, 24000)
    assert T.predict_mb(c, b) == pytest.approx(24000, rel=1e-9)
    lin = T.fit_memory([10, 20, 40], [500, 520, 560])  # exactly linear: c2 = 0
    assert lin[2] == pytest.approx(0, abs=1e-9) and T.solve_batch(lin, 24000) == pytest.approx((24000 - 480) / 2)


def test_the_verified_point_chooses_the_model():
    # a plateau (the first step's optimiser state sets the peak), then 50 MB per sample: a fit through every point
    # misses the held-out point by more than 5 %; the line through the tail predicts it
    batches = [8, 16, 32, 64]
    totals = [2845.0, 2937.0, 1700 + 50 * 32, 1700 + 50 * 64]
    naive = T.fit_memory(batches, totals)
    assert abs(T.predict_mb(naive, 96) - (1700 + 50 * 96)) > 0.05 * (1700 + 50 * 96)
    fit = T.choose_fit(batches, totals, (96, 1700 + 50 * 96))
    assert fit["model"] == "linear" and fit["series_points"] == [32, 64] and abs(fit["error_pct"]) < 1e-6
    assert fit["c"] == pytest.approx((1700, 50, 0), rel=1e-6) and fit["points"] == [32, 64, 96]
    assert T.solve_batch(fit["c"]) == pytest.approx((T.LIMIT_MB - 1700) / 50)
    # a real B² term (the stock loss) is kept when it predicts the point
    q = lambda b: 1200 + 0.5 * b + 4e-5 * b * b  # noqa: E731
    fit = T.choose_fit([1024, 2048, 4096], [q(1024), q(2048), q(4096)], (8192, q(8192)))
    assert fit["model"] == "quadratic" and fit["c"] == pytest.approx((1200, 0.5, 4e-5), rel=1e-6)
    # without a verified point: the conservative quadratic of fit_memory
    assert T.choose_fit(batches, totals)["c"] == pytest.approx(naive)


@pytest.mark.slow
def test_quick_mode_writes_well_formed_rows(assets, work):
    csv_path, png = work / "train_step.csv", work / "train_step.png"
    rc = T.main(["--quick", "--threads", "1", "--csv", str(csv_path), "--plot", str(png), "--work-dir", str(work)])
    assert rc == 0
    with open(csv_path) as f:
        assert tuple(f.readline().strip().split(",")) == H.COLUMNS
    rows = H.read_rows(csv_path)
    assert rows and all(r["op"] == "train_step_tiny" for r in rows)
    steps = {(r["provider"], int(r["x_value"])): r for r in rows if r["mode"] == "step"}
    for provider in T.PROVIDERS:
        for batch in (16, 32):
            r = steps[f"{provider}:distill", batch]
            note = T._parse_note(r["note"])
            assert 0 < float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
            assert float(r["peak_mb"]) > 0 and float(note["baseline_mb"]) > 0
            assert float(note["samples_s"]) == pytest.approx(1000 * batch / float(r["p50_ms"]), rel=1e-3)
            assert 0 < float(note["loss_share"]) < 1 and float(note["loss_ms"]) > 0
            assert note["teacher"] == ("online" if provider == "open_clip_train" else "cached")
            assert r["device"] and int(r["threads"]) == 1 and r["torch"] == torch.__version__ and r["timestamp"]
    for provider in ("fused", "reference"):  # the other quick recipe, (a) and (b) only
        assert float(steps[f"{provider}:cid", 32]["p50_ms"]) > 0
    assert not any(p.startswith("open_clip_train:") and not p.endswith(":distill") for p, _ in steps)
    losses = [r for r in rows if r["mode"] == "loss"]
    assert len(losses) == len(steps) and all(float(r["p50_ms"]) > 0 for r in losses)
    for provider in ("fused", "open_clip_train"):
        mem = [r for r in rows if r["mode"] == "memory" and r["provider"] == f"{provider}:distill"]
        assert len(mem) >= 2 and all(float(r["peak_mb"]) > 0 for r in mem)
        pred = [r for r in rows if r["mode"] == "max_batch" and r["provider"] == f"{provider}:distill"]
        assert [r["x_name"] for r in pred] == ["B_pred"] and float(pred[0]["x_value"]) > 0
        assert T._parse_note(pred[0]["note"])["fit"].endswith("MB")
    micro = {
        T._parse_note(r["note"])["micro_batch"] for r in rows if r["mode"] == "memory" and "fused" in r["provider"]
    }
    assert micro == {"16"}  # (a)'s series: accumulation over micro-batches of 16
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = T.summary_table(csv_path)
    assert "(c) open_clip_train" in table and "largest B in 24 GB" in table
