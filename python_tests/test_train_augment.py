"""train --augment: each sample of each epoch trains on one view of the teacher cache's K, its crop replayed into the
student's input and the cache's features of that view read as the teacher's; ranks see the views one process
sees; a resumed run (with --accum-freq) ends bit for bit where an uninterrupted one ends; a view setting the cache
was not embedded with is one line naming the flag and the cache's recorded spec, and nothing is written.

96 Fashion-MNIST images of the student corpus, the small 192-d ViT teacher of ``test_train`` (random weights),
its cache embedded with 3 views in shards of 64 rows (the id lookup crosses a shard end), batches of 32 (three
steps an epoch, so six steps cross two epoch ends).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from test_train import all_bytes, assert_same_tensors, raises_one_line, teacher_model_cfg

from clipcid_fast.pipeline import augment, models, train
from clipcid_fast.pipeline.batches import BatchBuilder, SampleStream
from clipcid_fast.pipeline.config import DataConfig, EmbedConfig, ModelConfig, TrainConfig
from clipcid_fast.pipeline.embed import run_embed

N, BATCH, K, AUG_SEED = 96, 32, 3, 5
SPEC = "scale=0.4:1,hflip=0.5"
RECORDED = "'scale=0.4:1,ratio=0.75:1.33333,hflip=0.5'"  # SPEC as the cache records it (canonical)


@pytest.fixture(scope="module", autouse=True)
def _cpu_one_thread():
    """The CPU fp32 trainer (as test_train), one intra-op thread (2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield
    torch.set_num_threads(before)


@dataclasses.dataclass
class Assets:
    models: ModelConfig
    views: str  # the cache with K views
    plain: str  # the same teacher and corpus without views


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("train_augment")
    with open(root / "teacher.json", "w") as f:
        json.dump(teacher_model_cfg(), f)
    torch.manual_seed(1)
    torch.save(models.build_open_clip(teacher_model_cfg()).state_dict(), root / "teacher.pt")
    m = ModelConfig(teacher=str(root / "teacher.json"), teacher_weights=str(root / "teacher.pt"))
    a = Assets(m, str(root / "views"), str(root / "plain"))
    common = dict(batch_size=64, shard_rows=64, progress=False, data=DataConfig(student_samples=N), models=m)
    run_embed(EmbedConfig(out_dir=a.views, views=K, augment=SPEC, augment_seed=AUG_SEED, **common))
    run_embed(EmbedConfig(out_dir=a.plain, **common))
    return a


def make_cfg(a: Assets, out_dir, recipe: str = "kd", **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), recipe=recipe, steps=6, batch_size=BATCH, warmup=0, eval_every=0, ckpt_every=2,
                progress=False, data=DataConfig(student_samples=N), models=a.models, views=K, augment=SPEC,
                augment_seed=AUG_SEED)  # fmt: skip
    if recipe != "baseline":
        base["teacher_cache"] = a.views
    base.update(kw)
    return TrainConfig(**base)


def cache_views(path: str) -> tuple[np.ndarray, dict[int, int]]:
    """The cache's image_views [n, K, D] and id -> row, read from the files (not the trainer's reader)."""

    def col(sub):
        folder = os.path.join(path, sub)
        return np.concatenate([np.load(os.path.join(folder, f)) for f in sorted(os.listdir(folder))])

    ids = col("ids")
    return col("image_views"), {int(i): r for r, i in enumerate(ids)}


@pytest.mark.parametrize("recipe", ["kd", "baseline"])
def test_each_sample_trains_on_its_drawn_view_with_that_views_teacher_features(recipe, assets, tmp_path):
    p = train.prepare(make_cfg(assets, tmp_path / "run", recipe))
    views, row = cache_views(assets.views)
    ds, spec = p.builder.ds, augment.parse_spec(SPEC)
    drawn: dict[int, set[int]] = {}
    try:
        for step in range(6):  # two epoch ends
            b = p.batch(step)
            for j, (sid, v) in enumerate(zip(b["id"].tolist(), b["view"].tolist())):
                assert 0 <= v < K
                drawn.setdefault(sid, set()).add(v)
                i = int(np.flatnonzero(ds.ids == sid)[0])  # ascending ids, natural order: index of the sample
                box = augment.view_params(spec, AUG_SEED, sid, v, (28, 28))
                want = ds.preprocess(augment.apply_view(ds.raw_image(i), box))
                assert torch.equal(b["image"][j], want), f"step {step} id {sid} view {v}: not its replayed crop"
                if recipe == "kd":
                    np.testing.assert_array_equal(b["dist_image"][j].numpy(), views[row[sid], v].astype(np.float32))
            p.step(b)
    finally:
        p.comm.close()
    assert all(len(v) >= 1 for v in drawn.values()) and len(drawn) == N  # 6 x 32 rows = two epochs of 96
    assert sum(len(v) > 1 for v in drawn.values()) > N // 3  # a sample's view changes between its epochs
    assert {v for s in drawn.values() for v in s} == set(range(K))


def test_ranks_together_see_the_views_of_one_process(assets, tmp_path):
    """A world-2 run's ranks build halves of the batch a single process builds (views, images, teacher rows)."""
    p = train.prepare(make_cfg(assets, tmp_path / "run"))
    try:
        ds, cache, views = p.builder.ds, p.builder.teacher, p.builder.views
        index = np.arange(len(ds))
        for step in (2, 3):  # step 3 starts epoch 1
            whole = p.batch(step)
            parts = []
            for rank in range(2):
                s = SampleStream(N, BATCH, 0, rank=rank, world_size=2)
                parts.append(BatchBuilder(ds, index, cache, None, views=views, seed=0)(s.rows(step), s.epochs(step)))
            for key in ("image", "view", "dist_image", "dist_text", "id"):
                assert torch.equal(torch.cat([q[key] for q in parts]), whole[key]), key
    finally:
        p.comm.close()


def test_resume_with_augment_and_accumulation_is_bit_identical(assets, tmp_path, capsys):
    """A run cut back to its step-2 checkpoint (what a kill leaves) and resumed ends where the uninterrupted one
    ends: student.pt bitwise, metrics.jsonl byte for byte (test_train's SIGKILL tests check the cut itself)."""
    full = make_cfg(assets, tmp_path / "full", accum_freq=2, keep_checkpoints=10)
    train.run_train(full)
    cut = tmp_path / "cut"
    shutil.copytree(full.out_dir, cut)
    for name in ("student.pt", "summary.json"):
        os.remove(cut / name)
    for name in os.listdir(cut / "checkpoints"):
        if not name.startswith("step-00000002.pt"):
            os.remove(cut / "checkpoints" / name)
    assert os.listdir(cut / "checkpoints"), "the step-2 checkpoint's name changed"
    capsys.readouterr()
    train.run_train(dataclasses.replace(full, out_dir=str(cut), resume=True))
    assert f"resumed {cut} at step 2" in capsys.readouterr().out
    a = torch.load(os.path.join(full.out_dir, "student.pt"), weights_only=True)
    b = torch.load(cut / "student.pt", weights_only=True)
    assert_same_tensors(a, b, "student.pt")
    assert all_bytes(str(cut))["metrics.jsonl"] == all_bytes(full.out_dir)["metrics.jsonl"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(teacher_cache="plain"), r"--augment 'scale=0.4:1,.*': --teacher-cache .* holds no views"),
        (
            dict(views=K + 1),
            rf"--views 4 differs from --teacher-cache .*'s views \(augment {RECORDED}, views 3, augment_seed 5\)",
        ),
        (dict(augment_seed=0), r"--augment-seed 0 differs from --teacher-cache .*'s views \(augment 'scale=0.4:1,"),
        (dict(augment="scale=0.5:1"), r"--augment 'scale=0.5:1,ratio=0.75:1.33333,hflip=0' differs from"),
        (dict(augment="zoom=2"), r"--augment 'zoom=2': unknown key 'zoom'"),
        (dict(augment=""), r"--views 3 needs --augment"),
    ],
    ids=["no-views", "count", "seed", "spec", "unknown-key", "views-without-spec"],
)
def test_a_view_setting_the_cache_lacks_is_one_line_and_writes_nothing(kw, match, assets, tmp_path):
    if kw.get("teacher_cache") == "plain":
        kw = {**kw, "teacher_cache": assets.plain}
    cfg = make_cfg(assets, tmp_path / "never", **kw)
    raises_one_line(ValueError, match, train.run_train, cfg)
    assert not os.path.exists(cfg.out_dir)
