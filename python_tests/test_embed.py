"""pipeline/embed: a frozen open_clip model's features of real Fashion-MNIST images as fp16 shards, resume, refusals.

The model is a stock open_clip config (ViT-S-32, shrunk) saved as a JSON file plus a checkpoint of random weights,
loaded through ``models.load_model`` as a user's own teacher would be (``_tiny_open_clip``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _tiny_open_clip import one_thread, write_checkpoint  # noqa: F401 (one_thread: an autouse fixture)

from clipcid_fast.pipeline import embed
from clipcid_fast.pipeline.config import DataConfig, EmbedConfig, to_yaml
from clipcid_fast.pipeline.data import FashionMnistCorpus, build_dataset, collate, export_corpus
from clipcid_fast.pipeline.models import load_model

SAMPLES, SHARD_ROWS, BATCH = 300, 128, 32  # shards of 128, 128 and 44 rows; 4 batches in a full shard
SHARD_SIZES = [128, 128, 44]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("embed")


@pytest.fixture(scope="module")
def models_cfg(root):
    return write_checkpoint(str(root / "model"), seed=0)


@pytest.fixture(scope="module")
def loaded(models_cfg):
    return load_model(models_cfg, "teacher", progress=False)


def embed_config(out_dir, models_cfg, **data) -> EmbedConfig:
    data = {"corpus": "student", "student_samples": SAMPLES, **data}
    return EmbedConfig(out_dir=str(out_dir), batch_size=BATCH, shard_rows=SHARD_ROWS, progress=False,
                       data=DataConfig(**data), models=models_cfg)  # fmt: skip


@pytest.fixture(scope="module")
def whole(root, models_cfg):
    """An uninterrupted run: (out_dir, embed.json's dict)."""
    out = root / "whole"
    return str(out), embed.run_embed(embed_config(out, models_cfg))


def shard_bytes(out_dir) -> dict[str, bytes]:
    return {
        f"{sub}/{name}": open(os.path.join(out_dir, sub, name), "rb").read()
        for sub in embed.SHARD_DIRS
        for name in sorted(os.listdir(os.path.join(out_dir, sub)))
    }


def without_timing(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("seconds", "images_per_second")}


def test_shards_hold_normalised_features_ids_and_labels_that_balance_reads(whole, loaded):
    from clipcid_fast.pipeline.balance.sources import EmbeddingSource, load_ids

    out, meta = whole
    assert sorted(os.listdir(os.path.join(out, "image"))) == ["00000.npy", "00001.npy", "00002.npy"]
    corpus = FashionMnistCorpus(DataConfig(corpus="student", student_samples=SAMPLES))
    image = np.concatenate([np.load(os.path.join(out, "image", embed.shard_name(k))) for k in range(3)])
    text = np.concatenate([np.load(os.path.join(out, "text", embed.shard_name(k))) for k in range(3)])
    ids = np.concatenate([np.load(os.path.join(out, "ids", embed.shard_name(k))) for k in range(3)])
    labels = np.concatenate([np.load(os.path.join(out, "labels", embed.shard_name(k))) for k in range(3)])
    assert [len(np.load(os.path.join(out, "ids", embed.shard_name(k)))) for k in range(3)] == SHARD_SIZES
    assert image.dtype == text.dtype == np.float16 and image.shape == text.shape == (SAMPLES, 64)
    assert ids.dtype == labels.dtype == np.int64
    np.testing.assert_array_equal(ids, corpus.ids)
    np.testing.assert_array_equal(labels, corpus.labels)  # the image's true class, not the (noisy) caption's
    for f in (image, text):
        np.testing.assert_allclose(np.linalg.norm(f.astype(np.float32), axis=1), 1.0, atol=2e-3)

    assert meta["count"] == SAMPLES and meta["dim"] == 64 and meta["shards"] == 3 and meta["shard_rows"] == SHARD_ROWS
    assert meta["dtype"] == "float16" and meta["normalized"] is True
    assert meta["model"]["fingerprint"] == loaded.fingerprint and meta["model"]["model_cfg"] == loaded.model_cfg
    assert meta["model"]["logit_scale"] == pytest.approx(float(loaded.model.logit_scale.detach().exp()), rel=1e-6)
    assert meta["dataset"]["student_samples"] == SAMPLES and meta["dataset"]["summary"]["num_wrong_captions"] == 120
    assert meta["images_per_second"] > 0
    assert os.path.isfile(os.path.join(out, "config.yaml"))

    source = EmbeddingSource(os.path.join(out, "image"))  # the next stage's reader
    assert (source.n, source.d) == (SAMPLES, 64)
    np.testing.assert_array_equal(load_ids(os.path.join(out, "ids"), SAMPLES), corpus.ids)


def test_rows_equal_encoding_each_batch_directly(whole, loaded):
    """Image rows are the model's features of each 32-image batch; text rows, encoded once per distinct caption of
    the shard, are byte-identical to encoding every caption of the batch."""
    out, _ = whole
    ds = build_dataset(DataConfig(corpus="student", student_samples=SAMPLES), loaded.preprocess, loaded.tokenizer)
    image = np.concatenate([np.load(os.path.join(out, "image", embed.shard_name(k))) for k in range(3)])
    text = np.concatenate([np.load(os.path.join(out, "text", embed.shard_name(k))) for k in range(3)])
    starts = [s for k, size in enumerate(SHARD_SIZES) for s in range(k * SHARD_ROWS, k * SHARD_ROWS + size, BATCH)]
    with torch.inference_mode():
        for s in starts:
            stop = min(s + BATCH, (s // SHARD_ROWS) * SHARD_ROWS + SHARD_ROWS, SAMPLES)
            batch = collate([ds[i] for i in range(s, stop)])
            direct_image = embed.image_features(loaded.model, batch["image"]).half().numpy()
            direct_text = embed.text_features(loaded.model, batch["text"], BATCH).half().numpy()
            assert direct_image.tobytes() == image[s:stop].tobytes(), f"image rows {s}:{stop}"
            assert direct_text.tobytes() == text[s:stop].tobytes(), f"text rows {s}:{stop}"


def test_rerun_of_a_finished_directory_writes_nothing(whole, models_cfg):
    out, meta = whole
    stamps = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in shard_bytes(out)}
    assert embed.run_embed(embed_config(out, models_cfg)) == meta
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in stamps} == stamps


CHILD = r"""
import sys, time
import torch
torch.set_num_threads(int(sys.argv[1]))
from clipcid_fast.pipeline import embed
from clipcid_fast.pipeline.config import EmbedConfig, build_config

encode = embed.image_features
def slow(model, images):  # >= 0.25 s a batch, so the kill lands after the first shard and before the last
    time.sleep(0.25)
    return encode(model, images)
embed.image_features = slow
embed.run_embed(build_config(EmbedConfig, sys.argv[2]))
"""


def test_embed_killed_after_its_first_shard_resumes_byte_identical(root, models_cfg, whole):
    out = root / "killed"
    cfg = embed_config(out, models_cfg)
    yaml_path = root / "killed.yaml"
    yaml_path.write_text(to_yaml(cfg))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(torch.get_num_threads()), str(yaml_path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    first_shard = out / "labels" / "00000.npy"  # the last of shard 0's four files
    deadline = time.monotonic() + 240
    while not first_shard.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    _, err = child.communicate()
    assert child.returncode == -signal.SIGKILL, f"the child ended before the kill: {err.decode()[-2000:]}"
    assert first_shard.exists() and not (out / "embed.json").exists()
    assert not (out / "labels" / "00002.npy").exists(), "killed too late: every shard was written"

    finished_mtime = first_shard.stat().st_mtime_ns
    meta = embed.run_embed(cfg)
    assert first_shard.stat().st_mtime_ns == finished_mtime  # shard 0 reused, not redone
    assert not [f for sub in embed.SHARD_DIRS for f in os.listdir(out / sub) if ".tmp-" in f]
    assert shard_bytes(out) == shard_bytes(whole[0])
    assert without_timing(meta) == without_timing(whole[1])


def test_restart_with_another_model_dataset_or_layout_is_refused_in_one_line(root, whole, models_cfg):
    # a finished directory (embed.json) and a half-done one (manifest.json only, a shard missing)
    partial = root / "partial"
    shutil.copytree(whole[0], partial)
    os.remove(partial / "embed.json")
    for sub in embed.SHARD_DIRS:
        os.remove(partial / sub / "00002.npy")
    other_model = write_checkpoint(str(root / "model"), seed=1)
    cases = [
        (whole[0], embed_config(whole[0], other_model), "manifest.json", "fingerprint"),
        (partial, embed_config(partial, other_model), "manifest.json", "fingerprint"),
        (partial, embed_config(partial, models_cfg, student_samples=200), "manifest.json", "student_samples"),
        (partial, embed_config(partial, models_cfg, corpus="teacher"), "manifest.json", "corpus"),
    ]
    relayout = embed_config(partial, models_cfg)
    relayout.shard_rows = 64
    cases.append((partial, relayout, "manifest.json", "shard_rows"))
    for out, cfg, source, field in cases:
        before = shard_bytes(out)
        with pytest.raises(ValueError) as e:
            embed.run_embed(cfg)
        message = str(e.value)
        assert "\n" not in message and source in message and f"{field} = " in message, message
        assert shard_bytes(out) == before  # nothing written
    assert not (partial / "embed.json").exists()


def test_load_embeddings_checks_model_and_dataset_in_one_line(whole, loaded):
    out, _ = whole
    same_data = DataConfig(corpus="student", student_samples=SAMPLES)
    emb = embed.load_embeddings(out, expect_model=loaded, expect_dataset=same_data)
    assert emb["meta"]["count"] == SAMPLES
    embed.load_embeddings(out, expect_model=loaded.fingerprint, expect_dataset={"split": "train", "corpus": "student"})
    bad = [
        ({"expect_model": "0" * 64}, "fingerprint"),
        ({"expect_model": {"name": "default-teacher"}}, "name"),
        ({"expect_dataset": {"corpus": "teacher"}}, "'corpus'"),
        ({"expect_dataset": DataConfig(corpus="student", student_samples=200)}, "'student_samples'"),
    ]
    for kwargs, field in bad:
        with pytest.raises(ValueError) as e:
            embed.load_embeddings(out, **kwargs)
        assert "\n" not in str(e.value) and field in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=r"no embed\.json"):
        embed.load_embeddings(os.path.join(out, "image"))


def test_load_embeddings_reads_rows_across_shards_and_looks_ids_up(whole):
    out, _ = whole
    emb = embed.load_embeddings(out)
    files = np.concatenate([np.load(os.path.join(out, "image", embed.shard_name(k))) for k in range(3)])
    image = emb["image"]
    assert image.shape == (SAMPLES, 64) and image.dtype == np.float16 and len(image) == SAMPLES
    np.testing.assert_array_equal(np.asarray(image), files)
    np.testing.assert_array_equal(image[100:260], files[100:260])  # spans three shards
    np.testing.assert_array_equal(image[-1], files[-1])
    rows = np.array([299, 0, 128, 127, 5, 5])
    np.testing.assert_array_equal(image[rows], files[rows])
    ids = emb["ids"]
    np.testing.assert_array_equal(emb["row_of"](ids[rows]), rows)
    missing = int(ids.max()) + 1
    with pytest.raises(ValueError, match=f"1 of 2 ids are not embedded .the first: {missing}"):
        emb["row_of"]([ids[0], missing])


def test_webdataset_stream_embeds_the_same_bytes_as_the_map_style_source(root, models_cfg, whole):
    """The iterable path (no length, shards read in order) cuts the same batches and shards."""
    export = export_corpus(DataConfig(corpus="student", student_samples=SAMPLES), str(root / "export"),
                           formats=("wds",), shard_size=50)  # fmt: skip
    out = root / "wds"
    cfg = embed_config(out, models_cfg, dataset="wds", train_data=export["wds"])
    meta = embed.run_embed(cfg)
    assert meta["count"] == SAMPLES and meta["shards"] == 3
    assert shard_bytes(out) == shard_bytes(whole[0])


def test_bad_settings_are_named():
    for field, value in (("batch_size", 0), ("shard_rows", -1)):
        cfg = EmbedConfig()
        setattr(cfg, field, value)
        with pytest.raises(ValueError, match=f"{field} must be an int >= 1, got {value}"):
            embed.run_embed(cfg)


def test_sigterm_finishes_the_shard_and_a_rerun_completes_byte_identical(root, models_cfg, whole, monkeypatch, capsys):
    """SIGTERM while shard 1 is being encoded: shard 1 is finished and written, one line, exit 143; the rerun reuses
    shards 0-1 and ends byte-identical to the uninterrupted run."""
    out = root / "sigterm"
    cfg = embed_config(out, models_cfg)
    encode, calls = embed.image_features, {"n": 0}
    per_shard = cfg.shard_rows // cfg.batch_size

    def encode_and_signal(model, images):
        if calls["n"] == per_shard:  # the first batch of shard 1
            os.kill(os.getpid(), signal.SIGTERM)
        calls["n"] += 1
        return encode(model, images)

    monkeypatch.setattr(embed, "image_features", encode_and_signal)
    with pytest.raises(SystemExit) as e:
        embed.run_embed(cfg)
    assert e.value.code == 128 + signal.SIGTERM
    assert "embed: stopped after shard 1 (" in capsys.readouterr().out
    assert (out / "labels" / "00001.npy").exists() and not (out / "image" / "00002.npy").exists()
    assert not (out / "embed.json").exists()
    monkeypatch.setattr(embed, "image_features", encode)
    embed.run_embed(cfg)
    assert shard_bytes(out) == shard_bytes(whole[0])


def test_a_tar_cut_on_a_sample_boundary_is_named_before_anything_is_embedded(root, models_cfg):
    """A tar rewritten with its first 20 of 50 samples is a valid tar whose header count places every later row; its
    img2dataset ``_stats.json`` (export-data writes one) names the loss: one line, no shard written."""
    import io
    import tarfile

    export = export_corpus(DataConfig(corpus="student", student_samples=SAMPLES), str(root / "export_cut"),
                           formats=("wds",), shard_size=50)  # fmt: skip
    shard = str(root / "export_cut" / "student-wds" / "student-00002.tar")
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keep = sorted({m.name.split(".")[0] for m, _ in members})[:20]
    with tarfile.open(shard, "w") as tar:
        for info, content in members:
            if info.name.split(".")[0] in keep:
                tar.addfile(info, io.BytesIO(content))
    out = root / "cut_tar"
    cfg = embed_config(out, models_cfg, dataset="wds", train_data=export["wds"])
    with pytest.raises(ValueError, match=r"student-00002\.tar'?: holds 20 samples, its student-00002_stats\.json says "
                       r"50 \(successes\): cut short or rewritten") as info:  # fmt: skip
        embed.run_embed(cfg)
    assert "\n" not in str(info.value) and os.listdir(out / "image") == []
