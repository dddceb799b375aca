"""A user's labelled set (pipeline/data/labelled_set.py) in ``eval`` and in training's periodic zero-shot.

The reference is the default path itself: a copy of Fashion-MNIST cut to its first few hundred images (same idx
files, fewer rows) is evaluated once as the default held-out split and once as ``export-data``'s class folders
(or its CSV with a class-names file) of the same images; PNG is lossless, so the zero-shot numbers must be equal,
not close, although the folders number the classes in another order (sorted folder names). The model is the
tiny random-weight open_clip ViT of ``_tiny_open_clip``: its predictions spread over several classes (checked),
so a class mixed up on one side would change the numbers (its top-1 is near chance: the test checks the protocol).
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from _tiny_open_clip import one_thread, write_checkpoint  # noqa: F401 (one_thread: an autouse fixture)

from clipcid_fast import cli
from clipcid_fast.pipeline import evaluate
from clipcid_fast.pipeline.config import DataConfig, EvalConfig, TrainConfig
from clipcid_fast.pipeline.data import build_dataset, export_corpus, fashion_mnist_arrays
from clipcid_fast.pipeline.data.fashion_mnist import CLASS_NAMES, TEMPLATES
from clipcid_fast.pipeline.data.labelled_set import LabelledSet, default_templates, read_templates, render
from clipcid_fast.pipeline.models import image_features, load_model

N_TEST, N_TRAIN = 300, 400


def write_idx(path: str, magic: int, arr: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("labelled")


@pytest.fixture(scope="module")
def fmnist(root) -> str:
    """Fashion-MNIST cut to the first N_TEST test and N_TRAIN train images, in the Debian package's file layout."""
    out = root / "fmnist"
    out.mkdir()
    for split, stem, n in (("test", "t10k", N_TEST), ("train", "train", N_TRAIN)):
        images, labels = fashion_mnist_arrays(DataConfig(), split)
        write_idx(str(out / f"{stem}-images-idx3-ubyte.gz"), 2051, images[:n])
        write_idx(str(out / f"{stem}-labels-idx1-ubyte.gz"), 2049, labels[:n])
    return str(out)


@pytest.fixture(scope="module")
def model(root):
    return write_checkpoint(str(root / "model"), seed=2)


@pytest.fixture(scope="module")
def exported(root, fmnist):
    """``export-data`` of the cut test split as class folders and as a CSV, through the command line."""
    out = str(root / "export")
    assert cli.main(["export-data", "--corpus", "test", "--formats", "folders,csv", "--out-dir", out,
                     "--fashion-mnist-dir", fmnist]) == 0  # fmt: skip
    return out


def predicted_classes(model, fmnist: str) -> int:
    """How many classes the model's zero-shot answers on the cut test split (features and prompts as eval makes)."""
    loaded = load_model(model, "teacher", progress=False)
    data = DataConfig(corpus="test", fashion_mnist_dir=fmnist)
    cfg = EvalConfig(models=model, data=data, batch_size=128, progress=False)
    ds = build_dataset(data, loaded.preprocess, loaded.tokenizer)
    with torch.inference_mode():
        loaded.model.eval()
        w = evaluate._zeroshot_classifier(loaded.model, loaded, cfg, evaluate._default_prompts(data))
        feats = image_features(loaded.model, torch.stack([ds[i]["image"] for i in range(len(ds))]))
    return len(set((feats @ w.T).argmax(dim=1).tolist()))


def run_eval(root, model, name: str, *flags: str) -> dict:
    out = str(root / f"{name}.json")
    m = model
    argv = ["eval", "--model", "teacher", "--teacher", m.teacher, "--teacher-weights", m.teacher_weights,
            "--out", out, "--no-progress", "--batch-size", "128", *flags]  # fmt: skip
    assert cli.main(argv) == 0
    with open(out) as f:
        return json.load(f)


def test_class_folders_give_the_default_paths_zeroshot_exactly(root, fmnist, model, exported):
    default = run_eval(root, model, "default", "--fashion-mnist-dir", fmnist, "--tasks", "zeroshot")
    folders = os.path.join(exported, "test-folders")
    assert sorted(os.listdir(folders)) == sorted(CLASS_NAMES)
    assert sum(len(os.listdir(os.path.join(folders, c))) for c in CLASS_NAMES) == N_TEST
    mine = run_eval(root, model, "folders", "--eval-data", folders)  # every task asked: retrieval, probe skipped
    z = default["zeroshot"]
    assert z["n"] == N_TEST and predicted_classes(model, fmnist) >= 3  # not a model that answers one class
    assert mine["zeroshot"] == z  # top1, top5, mean per-class recall, n: equal, not approximately
    assert mine["data"]["summary"] == {"dataset": "class-folders", "path": folders, "num_samples": N_TEST,
                                       "num_classes": 10, "classnames": "folder names",
                                       "templates": "default"}  # fmt: skip
    assert set(mine["skipped"]) == {"retrieval", "linear_probe"} and "--probe-data" in mine["skipped"]["linear_probe"]
    assert "retrieval" not in mine and "linear_probe" not in mine

    # the exported CSV (integer labels) with a class-names file and a templates file in CLIP_benchmark's spelling
    names, temps = root / "classnames.txt", root / "templates.txt"
    names.write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    temps.write_text("\n".join(default_templates()) + "\n")
    csv = run_eval(root, model, "csv", "--eval-data", os.path.join(exported, "test.csv"), "--classnames",
                   str(names), "--templates", str(temps), "--tasks", "zeroshot")  # fmt: skip
    assert csv["zeroshot"] == z

    # a CSV whose labels are class names (numbered in sorted order, as folders are), its own column and separator
    table = pd.read_csv(os.path.join(exported, "test.csv"), sep="\t")
    named = pd.DataFrame({"image": [os.path.join(exported, p) for p in table["filepath"]],
                          "label": [CLASS_NAMES[i] for i in table["label"]]})  # fmt: skip
    named.to_csv(root / "named.csv", index=False)
    by_name = run_eval(root, model, "named", "--eval-data", str(root / "named.csv"), "--csv-img-key", "image",
                       "--csv-separator", ",", "--tasks", "zeroshot")  # fmt: skip
    assert by_name["zeroshot"] == z and by_name["data"]["summary"]["num_classes"] == 10


def test_a_smaller_export_over_a_larger_one_leaves_only_its_own_images(root, fmnist):
    out = str(root / "re-export")
    cfg = DataConfig(corpus="test", fashion_mnist_dir=fmnist)
    export_corpus(cfg, out, formats=("folders",))
    small = export_corpus(cfg, out, formats=("folders",), limit=12)
    _, labels = fashion_mnist_arrays(cfg, "test")
    want = {(CLASS_NAMES[int(labels[i])], f"{i:05d}.png") for i in range(12)}
    found = {(c, f) for c in os.listdir(small["folders"]) for f in os.listdir(os.path.join(small["folders"], c))}
    assert found == want  # stale PNGs gone, and no empty folder for a class the 12 images lack
    assert len({c for c, _ in want}) < 10


def test_a_templates_file_sets_the_prompts(root, exported):
    one = root / "one-template.txt"
    one.write_text("a photo of the {c}.\n")
    assert read_templates(str(one)) == ["a photo of the {c}."]
    ds = LabelledSet(os.path.join(exported, "test-folders"), lambda im: im, flag="--eval-data", templates=str(one))
    assert ds.prompts() == [[f"a photo of the {c}."] for c in sorted(CLASS_NAMES)]
    # the default templates render to the default path's prompts
    assert [render(t, "ankle boot") for t in default_templates()] == [t.format("ankle boot") for t in TEMPLATES]


def test_linear_probe_on_a_labelled_train_split(root, fmnist, model, exported):
    # the probe's train images: the default path's (the student corpus' seeded subset, clean captions), exported
    probe = export_corpus(DataConfig(corpus="student", student_samples=200, caption_noise=0.0,
                                     fashion_mnist_dir=fmnist), str(root / "probe"), formats=("folders",))  # fmt: skip
    default = run_eval(root, model, "probe-default", "--fashion-mnist-dir", fmnist, "--tasks", "linear_probe",
                       "--probe-train-samples", "200")  # fmt: skip
    mine = run_eval(root, model, "probe-folders", "--eval-data", os.path.join(exported, "test-folders"),
                    "--probe-data", probe["folders"], "--tasks", "linear_probe")  # fmt: skip
    d, m = default["linear_probe"], mine["linear_probe"]
    assert (m["n_train"], m["n_test"]) == (d["n_train"], d["n_test"]) == (200, N_TEST)
    # the same features in another row order: L-BFGS sums them in another order, so allow one image's flip
    assert abs(m["top1"] - d["top1"]) <= 1 / N_TEST
    assert mine["probe_data"]["num_samples"] == 200 and mine["probe_data"]["dataset"] == "class-folders"
    # --probe-train-samples caps a larger probe set with a seeded subset
    capped = run_eval(root, model, "probe-capped", "--eval-data", os.path.join(exported, "test-folders"),
                      "--probe-data", probe["folders"], "--tasks", "linear_probe",
                      "--probe-train-samples", "50")  # fmt: skip
    assert capped["linear_probe"]["n_train"] == 50


def test_training_probe_on_class_folders_equals_the_default_one(root, fmnist, model, exported):
    loaded = load_model(model, "teacher", progress=False)
    data = DataConfig(fashion_mnist_dir=fmnist)
    default = evaluate.ZeroShotProbe(data, loaded, seed=3, samples=N_TEST)(loaded.model)
    folders = os.path.join(exported, "test-folders")
    mine = evaluate.ZeroShotProbe(data, loaded, seed=3, samples=N_TEST, zeroshot_data=folders)(loaded.model)
    assert mine == default and 0 < default["eval_zeroshot_top1"] < 1
    # what train builds from its flags: the labelled set when given; none (with a note) for a source without names
    probe = evaluate.periodic_probe(TrainConfig(zeroshot_data=folders, eval_samples=N_TEST, seed=3, data=data), loaded)
    assert probe(loaded.model) == default
    assert evaluate.periodic_probe(TrainConfig(data=DataConfig(dataset="csv", train_data="x.csv")), loaded) is None
    with pytest.raises(ValueError, match=r"--templates 't\.txt' applies to a labelled set: give --zeroshot-data too"):
        evaluate.periodic_probe(TrainConfig(templates="t.txt", data=data), loaded)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one line naming the file, exit code 2 at the command line


def bad_eval(capsys, model, *flags: str) -> str:
    m = model
    argv = ["eval", "--model", "teacher", "--teacher", m.teacher, "--teacher-weights", m.teacher_weights,
            "--out", "/nonexistent/never.json", "--no-progress", *flags]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    return message


def test_bad_labelled_inputs_are_one_line_naming_the_file(root, model, exported, capsys):
    folders = os.path.join(exported, "test-folders")
    nine = root / "nine-names.txt"
    nine.write_text("".join(f"{c}\n" for c in CLASS_NAMES[:9]))
    msg = bad_eval(capsys, model, "--eval-data", folders, "--classnames", str(nine))
    assert f"--classnames '{nine}': 9 lines, but --eval-data '{folders}' has 10 classes" in msg

    empty_tree = root / "with-empty"
    (empty_tree / "cat").mkdir(parents=True)
    (empty_tree / "dog").mkdir()
    (empty_tree / "cat" / "a.png").write_bytes(open(os.path.join(folders, "bag", os.listdir(
        os.path.join(folders, "bag"))[0]), "rb").read())  # fmt: skip
    msg = bad_eval(capsys, model, "--eval-data", str(empty_tree))
    assert f"class folder '{empty_tree / 'dog'}' holds no image" in msg

    no_c = root / "no-c.txt"
    no_c.write_text("a photo of the {c}.\na photo of a thing.\n")
    msg = bad_eval(capsys, model, "--eval-data", folders, "--templates", str(no_c))
    assert f"--templates '{no_c}': line 2 ('a photo of a thing.') has no {{c}}" in msg

    missing = root / "no-such-folder"
    msg = bad_eval(capsys, model, "--eval-data", str(missing))
    assert f"--eval-data '{missing}': no such file or folder" in msg
    msg = bad_eval(capsys, model, "--eval-data", folders, "--classnames", str(root / "absent.txt"))
    assert f"--classnames '{root / 'absent.txt'}': file not found" in msg

    # integer labels without names, a label past the names, --classnames without a labelled set
    csv = os.path.join(exported, "test.csv")
    msg = bad_eval(capsys, model, "--eval-data", csv)
    assert f"--eval-data '{csv}': integer labels need --classnames FILE" in msg
    msg = bad_eval(capsys, model, "--eval-data", csv, "--classnames", str(nine))
    assert f"--eval-data '{csv}': row" in msg and "is outside [0, 9)" in msg
    msg = bad_eval(capsys, model, "--classnames", str(nine))
    assert "--classnames" in msg and "give --eval-data too" in msg

    # a probe train split with a class the evaluation set lacks
    msg = bad_eval(capsys, model, "--eval-data", folders, "--probe-data", str(empty_tree), "--tasks", "linear_probe")
    assert f"--probe-data '{empty_tree}': class 'cat' is not a class of the evaluation set '{folders}'" in msg
