"""pipeline/augment and embed --augment: the SPEC parser's refusals, view parameters as a pure function, and a
K-view cache whose every view is the teacher's feature of the replayed crop, bit for bit.

The teacher is the shrunk stock ViT-S-32 of ``_tiny_open_clip`` (random weights, 32-px images), on 40 images of
the Fashion-MNIST student corpus in shards of 32 rows and batches of 16 (a shard of two batches and one of 8 rows).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from _tiny_open_clip import one_thread, write_checkpoint  # noqa: F401 (one_thread: an autouse fixture)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipcid_fast.pipeline import augment, embed
from clipcid_fast.pipeline.config import DataConfig, EmbedConfig
from clipcid_fast.pipeline.data import build_dataset
from clipcid_fast.pipeline.models import image_features, load_model

SAMPLES, SHARD_ROWS, BATCH, K = 40, 32, 16, 3
SPEC = "scale=0.5:1,ratio=0.75:1.333,hflip=0.5"


# ---------------------------------------------------------------------------------------------------------------
# SPEC


def test_spec_parses_its_keys_and_defaults_the_others():
    s = augment.parse_spec("hflip=0.25, scale=0.3:0.8")
    assert s == augment.AugmentSpec(scale=(0.3, 0.8), ratio=(3 / 4, 4 / 3), hflip=0.25)
    assert s.canonical() == "scale=0.3:0.8,ratio=0.75:1.33333,hflip=0.25"
    assert augment.parse_spec(s.canonical()).canonical() == s.canonical()  # the recorded form reads back as itself


BAD_SPECS = [
    ("", "empty spec"),
    ("zoom=2", "unknown key 'zoom'"),
    ("color_jitter=0.4", "unknown key 'color_jitter'"),
    ("hflip", "is not key=value"),
    ("hflip=0.5,hflip=0.2", "hflip given twice"),
    ("hflip=1.5", r"hflip is a probability in \[0, 1\]"),
    ("hflip=nan", "is not finite"),
    ("scale=0.5", "scale takes LO:HI"),
    ("scale=0.8:0.5", "needs 0 < LO <= HI"),
    ("scale=0:1", "needs 0 < LO <= HI"),
    ("scale=0.5:1.5", r"HI <= 1"),
    ("ratio=a:1", "'a' is not a number"),
]


@pytest.mark.parametrize("text, why", BAD_SPECS)
def test_bad_spec_is_one_line_naming_the_flag_and_the_value(text, why):
    with pytest.raises(ValueError, match=why) as info:
        augment.parse_spec(text)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"--augment {text!r}:")


@settings(max_examples=80, deadline=None)
@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12), value=st.text(max_size=8))
def test_any_other_key_is_refused(key, value):
    if key in ("scale", "ratio", "hflip"):
        return
    text = f"{key}={value}".replace(",", ";")
    with pytest.raises(ValueError, match="unknown key") as info:
        augment.parse_spec(text)
    assert "\n" not in str(info.value) and "--augment" in str(info.value)


def test_flag_combinations():
    assert augment.views_of("", 1, 0) is None
    bad = [(("", 4, 0), "--views 4 needs --augment"), ((SPEC, 1, 0), "needs --views >= 2"),
           ((SPEC, 0, 0), "--views must be an int >= 1"), ((SPEC, 2, -1), "--augment-seed must be")]  # fmt: skip
    for args, match in bad:
        with pytest.raises(ValueError, match=match):
            augment.views_of(*args)


# ---------------------------------------------------------------------------------------------------------------
# view_params: pure, in range


def _spec(s0, s1, r0, r1, p) -> augment.AugmentSpec:
    return augment.AugmentSpec(scale=(min(s0, s1), max(s0, s1)), ratio=(min(r0, r1), max(r0, r1)), hflip=p)


specs = st.builds(_spec, st.floats(0.05, 1.0), st.floats(0.05, 1.0), st.floats(0.2, 5.0), st.floats(0.2, 5.0),
                  st.floats(0.0, 1.0))  # fmt: skip
ids = st.integers(0, 2**40)


@settings(max_examples=150, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**31), sid=ids, view=st.integers(0, 64),
       hw=st.tuples(st.integers(1, 300), st.integers(1, 300)))  # fmt: skip
def test_view_params_are_a_pure_function_and_a_box_inside_the_image(spec, seed, sid, view, hw):
    p = augment.view_params(spec, seed, sid, view, hw)
    assert p == augment.view_params(dataclasses.replace(spec), seed, sid, view, tuple(hw))  # same inputs, same box
    h, w = hw
    assert 0 <= p.top and p.top + p.height <= h and 0 <= p.left and p.left + p.width <= w
    assert p.height >= 1 and p.width >= 1
    if view == 0:
        assert p == augment.ViewParams(0, 0, h, w, False)
    if spec.hflip == 0.0:
        assert not p.flip


@settings(max_examples=150, deadline=None)
@given(lo=st.floats(0.1, 0.7), span=st.floats(0.0, 0.05), r0=st.floats(0.75, 1.0), r1=st.floats(1.0, 4 / 3),
       side=st.integers(64, 256), sid=ids, view=st.integers(1, 64))  # fmt: skip
def test_a_drawn_crop_has_an_area_and_ratio_in_the_ranges(lo, span, r0, r1, side, sid, view):
    """On a square image with scale <= 0.75 and ratio within [3/4, 4/3] the first draw always fits (no fallback),
    so the box's area fraction and aspect ratio are the drawn ones up to rounding to whole pixels."""
    spec = augment.AugmentSpec(scale=(lo, lo + span), ratio=(r0, r1), hflip=1.0)
    p = augment.view_params(spec, 7, sid, view, (side, side))
    assert p.flip
    tol_area = (p.width + p.height + 1) / side**2
    assert lo - tol_area <= p.width * p.height / side**2 <= lo + span + tol_area
    ratio = p.width / p.height
    assert r0 * (1 - 1 / p.width) * (1 - 1 / p.height) <= ratio + 1e-12
    assert ratio <= r1 * (1 + 1 / p.width) * (1 + 1 / p.height) + 1e-12


def test_views_differ_across_seeds_ids_and_views_and_hflip_flips():
    spec = augment.AugmentSpec(scale=(0.2, 0.9), hflip=0.5)
    boxes = {augment.view_params(spec, s, i, v, (100, 120)) for s in range(3) for i in range(10) for v in range(1, 5)}
    assert len(boxes) == 120  # 120 draws of a continuous box: all distinct
    flips = [b.flip for b in boxes]
    assert 30 < sum(flips) < 90  # hflip=0.5: about half, never all or none


def test_apply_view_is_resized_crop_then_flip():
    """An independent reading of a view: crop with PIL, resize with PIL's bilinear filter back to the image size,
    then mirror; compared with torchvision's functional path within one grey level."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    p = augment.ViewParams(top=3, left=5, height=20, width=17, flip=True)
    got = np.asarray(augment.apply_view(img, p), dtype=np.int16)
    want = img.crop((5, 3, 22, 23)).resize((28, 28), Image.BILINEAR).transpose(Image.FLIP_LEFT_RIGHT)
    assert got.shape == (28, 28)
    assert np.abs(got - np.asarray(want, dtype=np.int16)).max() <= 1
    assert augment.apply_view(img, augment.ViewParams(0, 0, 28, 28, False)) is img  # view 0: nothing resampled


# ---------------------------------------------------------------------------------------------------------------
# embed --augment


@pytest.fixture(scope="module", autouse=True)
def _embed_on_cpu():
    """The exactness test replays views through the CPU fp32 teacher; on a CUDA machine (scripts/gpu_check.sh runs
    every test) embed would pick the GPU and bf16, so it is shown no GPU here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("augment")


@pytest.fixture(scope="module")
def models_cfg(root):
    return write_checkpoint(str(root / "model"), seed=0)


def embed_cfg(out, models_cfg, **kw) -> EmbedConfig:
    return EmbedConfig(out_dir=str(out), batch_size=BATCH, shard_rows=SHARD_ROWS, progress=False,
                       data=DataConfig(student_samples=SAMPLES), models=models_cfg, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def plain_run(root, models_cfg):
    return embed.run_embed(embed_cfg(root / "plain", models_cfg)), str(root / "plain")


@pytest.fixture(scope="module")
def views_run(root, models_cfg):
    return embed.run_embed(embed_cfg(root / "views", models_cfg, views=K, augment=SPEC, augment_seed=3)), str(
        root / "views"
    )


def files(d: str, subs) -> dict[str, bytes]:
    out = {}
    for sub in subs:
        for name in sorted(os.listdir(os.path.join(d, sub))):
            with open(os.path.join(d, sub, name), "rb") as f:
                out[f"{sub}/{name}"] = f.read()
    return out


def test_views_leave_every_store_of_a_plain_run_byte_identical(plain_run, views_run):
    """image/, text/, ids/, labels/ and the id index of a K-view run are a K = 1 run's bytes (balance and cluster
    read them), and a K = 1 manifest records no views (it is the manifest written before views existed)."""
    (plain, plain_dir), (meta, views_dir) = plain_run, views_run
    subs = (*embed.SHARD_DIRS, "id_index")
    assert files(plain_dir, subs) == files(views_dir, subs)
    assert "views" not in plain and not os.path.exists(os.path.join(plain_dir, embed.VIEWS_DIR))
    assert meta["views"] == {"augment": augment.parse_spec(SPEC).canonical(), "views": K, "augment_seed": 3}
    drop = lambda m: {k: v for k, v in m.items() if k not in ("views", "seconds", "images_per_second")}  # noqa: E731
    assert drop(meta) == drop(plain)


def test_every_cached_view_is_the_teacher_on_the_replayed_crop_bit_for_bit(views_run, models_cfg):
    """The exactness test: for every view of every row, the teacher run now on the crop replayed from (seed, id,
    view) alone, in the rows' embed batches (shard-aligned batches of 16: CPU float sums depend on the batch
    shape, not on anything else), gives the cached float16 bits. View 0 is the plain image's feature."""
    _, out = views_run
    teacher = load_model(models_cfg, "teacher", progress=False)
    ds = build_dataset(DataConfig(student_samples=SAMPLES), teacher.preprocess, teacher.tokenizer)
    views = augment.views_of(SPEC, K, 3)
    cached = np.concatenate([np.load(os.path.join(out, embed.VIEWS_DIR, f)) for f in ("00000.npy", "00001.npy")])
    image = np.concatenate([np.load(os.path.join(out, "image", f)) for f in ("00000.npy", "00001.npy")])
    assert cached.shape == (SAMPLES, K, 64) and cached.dtype == np.float16
    np.testing.assert_array_equal(cached[:, 0].view(np.uint16), image.view(np.uint16))
    batches = [range(0, 16), range(16, 32), range(32, 40)]  # shard 0: two batches; shard 1: one of 8 rows
    with torch.inference_mode():
        for rows in batches:
            for v in range(K):
                replayed = torch.stack(
                    [views.image(ds.raw_image(i), teacher.preprocess, int(ds.ids[i]), v) for i in rows]
                )
                got = image_features(teacher.model, replayed).to(torch.float16).numpy()
                np.testing.assert_array_equal(got.view(np.uint16), cached[rows.start : rows.stop, v].view(np.uint16))
    # the views are augmented: not the plain image's feature, and not all alike
    assert (cached[:, 1] != cached[:, 0]).any(axis=1).all() and (cached[:, 2] != cached[:, 1]).any(axis=1).all()
    loaded = embed.load_embeddings(out)
    np.testing.assert_array_equal(loaded["image_views"][np.array([39, 0, 33])], cached[[39, 0, 33]])


def test_a_lost_views_shard_is_redone_to_the_same_bytes(views_run, models_cfg, tmp_path):
    import shutil

    _, out = views_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.remove(copy / "embed.json")
    os.remove(copy / embed.VIEWS_DIR / "00001.npy")  # a killed run's shard: its views file never landed
    embed.run_embed(embed_cfg(copy, models_cfg, views=K, augment=SPEC, augment_seed=3))
    assert files(str(copy), embed.shard_dirs({"views": 1})) == files(out, embed.shard_dirs({"views": 1}))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(views=K, augment=SPEC, augment_seed=4), "holds another run's features .*views"),
        (dict(views=K + 1, augment=SPEC, augment_seed=3), "holds another run's features .*views"),
        (dict(), "holds another run's features .*views"),
    ],
    ids=["seed", "count", "none"],
)
def test_another_view_setting_is_refused_in_the_same_directory(kw, match, views_run, models_cfg):
    _, out = views_run
    before = files(out, embed.shard_dirs({"views": 1}))
    with pytest.raises(ValueError, match=match) as info:
        embed.run_embed(embed_cfg(out, models_cfg, **kw))
    assert "\n" not in str(info.value)
    assert files(out, embed.shard_dirs({"views": 1})) == before


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(views=K, augment="zoom=2"), "--augment 'zoom=2': unknown key 'zoom'"),
        (dict(views=K), "--views 3 needs --augment"),
        (dict(views=K, augment=SPEC, data=DataConfig(dataset="wds", train_data="x/{0..1}.tar")), "not --dataset wds"),
    ],
    ids=["key", "no-spec", "wds"],
)
def test_bad_view_flags_write_nothing(kw, match, models_cfg, tmp_path):
    out = tmp_path / "never"
    cfg = dataclasses.replace(embed_cfg(out, models_cfg), **kw)
    with pytest.raises(ValueError, match=match) as info:
        embed.run_embed(cfg)
    assert "\n" not in str(info.value)
    assert not out.exists()
