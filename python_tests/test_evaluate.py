"""pipeline/metrics on hand-checked features, and pipeline/evaluate on real Fashion-MNIST images.

The model is a stock open_clip config (ViT-S-32, shrunk) saved as JSON + a checkpoint of random weights and loaded
through ``models.load_model`` (``_tiny_open_clip``): its numbers are near chance, the tests check the protocol.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from _tiny_open_clip import one_thread, write_checkpoint  # noqa: F401 (one_thread: an autouse fixture)

from clipcid_fast.pipeline import evaluate, metrics
from clipcid_fast.pipeline.config import DataConfig, EvalConfig
from clipcid_fast.pipeline.data import export_corpus
from clipcid_fast.pipeline.models import load_model


def unit(*v: float) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


# ---------------------------------------------------------------------------------------------------------------
# metrics, with answers worked out by hand


def test_zeroshot_on_hand_placed_features():
    # class c's two prompts lean towards the next axis by ±0.5: their mean points along e_c, so W = identity
    e = torch.eye(3)
    prompts = torch.stack([torch.stack([e[c] + 0.5 * e[(c + 1) % 3], e[c] - 0.5 * e[(c + 1) % 3]]) for c in range(3)])
    prompts = prompts / prompts.norm(dim=-1, keepdim=True)
    w = metrics.class_classifier(prompts)
    torch.testing.assert_close(w, torch.eye(3))
    images = torch.tensor([
        [1.0, 0.0, 0.0],  # label 0: ranks 0,·,·     top-1 hit
        unit(0, 0.8, 0.6),  # label 2: ranks 1, 2, 0  top-1 miss, top-2 hit
        unit(0.6, 0, 0.8),  # label 2: ranks 2, 0, 1  top-1 hit
        unit(0.8, 0.6, 0),  # label 1: ranks 0, 1, 2  top-1 miss, top-2 hit
        [0.0, 1.0, 0.0],  # label 1: top-1 hit
        unit(0.2, 0.6, 0.8),  # label 0: ranks 2, 1, 0  top-1 and top-2 miss, top-3 hit
        [1.0, 0.0, 0.0],  # label 0: top-1 hit
    ])  # fmt: skip
    labels = torch.tensor([0, 2, 2, 1, 1, 0, 0])
    acc = metrics.ZeroShotAccumulator(w, topk=(1, 2, 3))
    acc.update(images[:4], labels[:4])  # streamed in two batches
    acc.update(images[4:], labels[4:])
    r = acc.result()
    assert (r["top1"], r["top2"], r["top3"], r["n"]) == (4 / 7, 6 / 7, 1.0, 7)
    # per class: class 0 has 2 of 3 right, class 1 1 of 2, class 2 1 of 2
    assert r["mean_per_class_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3, rel=1e-12)


def test_zeroshot_rejects_labels_outside_the_classes():
    acc = metrics.ZeroShotAccumulator(torch.eye(3))
    with pytest.raises(ValueError, match="labels must be in"):
        acc.update(torch.eye(3), torch.tensor([0, 1, -1]))


def test_retrieval_with_repeated_captions_counts_groups():
    # 4 images, 2 distinct captions: images 0, 1 share caption A (text 0), images 2, 3 caption B (text 1)
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    image_group, text_group = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1])
    # image -> text cosines: img0 (1, .6) -> A right; img1 (.6, 1) -> B wrong; img2 (0, .8) -> B right;
    #                        img3 (.8, .96) -> B right.                         R@1 = 3/4, R@2 = 1
    # text -> image: A (1, .6, 0, .8) -> img0, in A: right; B (.6, 1, .8, .96) -> img1 (A, wrong), then img3 (B).
    #                                                                           R@1 = 1/2, R@2 = 1
    for block in (1, 3, 4096):
        r = metrics.retrieval_recall(images, texts, image_group, text_group, ks=(1, 2), block=block)
        assert r == {"image_to_text_R@1": 0.75, "image_to_text_R@2": 1.0, "text_to_image_R@1": 0.5,
                     "text_to_image_R@2": 1.0, "n_images": 4, "n_texts": 2}  # fmt: skip


def test_linear_probe_separates_separable_classes():
    rng = np.random.default_rng(0)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    train_y, test_y = np.repeat(np.arange(3), 20), np.array([0, 1, 2, 2, 1, 0])
    train_x = centres[train_y] + rng.normal(0, 0.3, (60, 2))
    r = metrics.linear_probe(train_x, train_y, centres[test_y] + 0.1, test_y, c=1.0)
    assert r == {"top1": 1.0, "n_train": 60, "n_test": 6, "C": 1.0}
    # a test point on the wrong side: 5 of 6 right
    wrong = centres[test_y].copy()
    wrong[0] = centres[1]
    assert metrics.linear_probe(train_x, train_y, wrong, test_y)["top1"] == 5 / 6


# ---------------------------------------------------------------------------------------------------------------
# evaluate / run_eval on real images


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def models_cfg(root):
    return write_checkpoint(str(root / "model"), seed=0)


def eval_config(out, models_cfg, **kw) -> EvalConfig:
    base = {"eval_samples": 400, "probe_train_samples": 300, "batch_size": 200, "progress": False}
    return EvalConfig(out=str(out), models=models_cfg, **{**base, **kw})


@pytest.fixture(scope="module")
def report(root, models_cfg):
    cfg = eval_config(root / "eval.json", models_cfg)
    first = evaluate.run_eval(cfg)
    return cfg, first, open(cfg.out, "rb").read()


def drop_seconds(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "seconds"}


def test_report_holds_every_task_the_model_and_the_regime(report, models_cfg):
    _, r, _ = report
    loaded = load_model(models_cfg, "teacher", progress=False)
    assert r["tasks"] == ["zeroshot", "retrieval", "linear_probe"] and r["skipped"] == {}
    assert set(r["zeroshot"]) == {"top1", "top5", "mean_per_class_recall", "n"} and r["zeroshot"]["n"] == 400
    assert 0 <= r["zeroshot"]["top1"] <= r["zeroshot"]["top5"] <= 1
    ret = r["retrieval"]
    assert ret["n_images"] == 400 and ret["n_texts"] == ret["n_distinct_captions"] <= 60  # 10 classes × 6 templates
    assert all(0 <= ret[f"{d}_R@{k}"] <= 1 for d in ("image_to_text", "text_to_image") for k in (1, 5, 10))
    assert r["linear_probe"]["n_train"] == 300 and r["linear_probe"]["n_test"] == 400
    assert r["probe_data"]["corpus"] == "student" and r["probe_data"]["num_wrong_captions"] == 0
    scale = float(loaded.model.logit_scale.detach().exp())
    assert r["model"] == {"which": "teacher", "name": models_cfg.teacher, "fingerprint": loaded.fingerprint,
                          "info": loaded.info, "logit_scale": pytest.approx(scale)}  # fmt: skip
    assert r["data"]["corpus"] == "test" and r["data"]["summary"]["split"] == "test"
    assert r["config"]["eval_samples"] == 400
    assert set(r["seconds"]) >= {"load_model", "heldout_images", "retrieval", "linear_probe", "total"}
    assert json.loads(report[2]) == json.loads(json.dumps(r))


def test_a_model_evaluated_twice_gives_the_same_json_but_for_seconds(report):
    cfg, first, first_bytes = report
    second = evaluate.run_eval(cfg)
    assert drop_seconds(json.loads(open(cfg.out, "rb").read())) == drop_seconds(json.loads(first_bytes))
    assert drop_seconds(second) == drop_seconds(first)


def test_evaluate_zeroshot_alone_is_the_same_and_writes_nothing(root, report, models_cfg):
    _, first, _ = report
    loaded = load_model(models_cfg, "teacher", progress=False)
    loaded.model.train()  # as a training loop hands it over
    quiet = eval_config(root / "never-written.json", models_cfg)
    r = evaluate.evaluate(loaded, quiet, tasks=("zeroshot",))
    assert loaded.model.training  # handed back in its own mode
    assert r["zeroshot"] == first["zeroshot"] and "retrieval" not in r and "linear_probe" not in r
    assert not os.path.exists(quiet.out)


def test_csv_source_without_class_names_runs_retrieval_only(root, models_cfg):
    export = export_corpus(DataConfig(corpus="test"), str(root / "export"), formats=("csv",), limit=120)
    cfg = eval_config(root / "csv.json", models_cfg, data=DataConfig(dataset="csv", train_data=export["csv"]))
    r = evaluate.run_eval(cfg)
    assert set(r["skipped"]) == {"zeroshot", "linear_probe"}
    assert "no class names" in r["skipped"]["zeroshot"] and "no labelled train split" in r["skipped"]["linear_probe"]
    assert "zeroshot" not in r and "linear_probe" not in r and r["retrieval"]["n_images"] == 120


def test_bad_settings_are_named(root, models_cfg):
    loaded = load_model(models_cfg, "teacher", progress=False)
    cases = [
        ({"tasks": "zeroshot,probe"}, "'probe' is not a task"),
        ({"block": 0}, "block must be an int >= 1, got 0"),
        ({"eval_samples": -1}, "eval_samples must be an int >= 0"),
        ({"probe_train_samples": 1}, r"probe_train_samples must be an int in \[2, 60000\], got 1"),
        ({"probe_c": 0.0}, "probe_c must be > 0"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate.evaluate(loaded, eval_config(root / "x.json", models_cfg, **kw))
