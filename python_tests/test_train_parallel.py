"""The trainer at scale: ``torchrun`` data parallel and ``--accum-freq`` give the one-process, one-batch run.

For every recipe, on the same global batch: 2 gloo processes (``torchrun --nproc-per-node 2 -m clipcid_fast.cli
train``, the command users run) and 1 process with 2 micro-batches per step reach the per-step losses and the
final student, recipe parameters (class centres gathered from their 2 shards) and AdamW moments of the plain
1-process run, within fp32 tolerance; cid also under both at once. A 1-process run interrupted after its step-2
checkpoint and resumed by 2 processes ends where the uninterrupted run ends (each rank takes its block of the
centres and of their moments from the one-process checkpoint).

The student is a small ViT (no batch-norm: batch statistics differ between micro-batches and ranks, which no
accumulation or data-parallel scheme makes exact) of another width than the teacher, so the recipes'
projections are exercised; the teacher, caches, balance and cluster outputs are built as in ``test_train.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _host_sync import why_it_syncs
from torch.utils._python_dispatch import TorchDispatchMode

from clipcid_fast.pipeline import checkpoint, models, train
from clipcid_fast.pipeline.balance import run_balance, run_cluster
from clipcid_fast.pipeline.config import RECIPES, DataConfig, EmbedConfig, ModelConfig, TrainConfig, to_yaml
from clipcid_fast.pipeline.embed import run_embed
from clipcid_fast.recipes import RECIPES as TABLE

pytestmark = pytest.mark.distributed

N_SAMPLES, BATCH, STEPS, N_CLASSES = 160, 16, 3, 6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _vit(embed_dim: int, width: int) -> dict:
    text = {"hf_tokenizer_name": models.minilm_path(), "vocab_size": 30522, "context_length": 16, "width": width,
            "heads": 2, "layers": 1, "pool_type": "eos", "eos_id": 102, "pad_id": 0}  # fmt: skip
    vision = {"layers": 1, "width": width, "head_width": 32, "patch_size": 8, "image_size": 32, "mlp_ratio": 2,
              "pool_type": "avg"}  # fmt: skip
    return {"embed_dim": embed_dim, "vision_cfg": vision, "text_cfg": text}


@dataclasses.dataclass
class Assets:
    models: ModelConfig
    cache: str
    balance: str
    cluster: str


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = str(tmp_path_factory.mktemp("parallel_assets"))
    paths = {}
    for name, cfg in (("teacher", _vit(48, 64)), ("student", _vit(32, 32))):
        paths[name] = os.path.join(root, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(cfg, f)
    torch.manual_seed(1)
    weights = os.path.join(root, "teacher.pt")
    torch.save(models.build_open_clip(_vit(48, 64)).state_dict(), weights)
    mcfg = ModelConfig(teacher=paths["teacher"], teacher_weights=weights, student=paths["student"])
    cache, balance, cluster = (os.path.join(root, n) for n in ("cache", "balance", "cluster"))
    run_embed(EmbedConfig(out_dir=cache, batch_size=64, progress=False, data=DataConfig(student_samples=N_SAMPLES),
                          models=mcfg))  # fmt: skip
    run_balance(os.path.join(cache, "image"), balance, ids=os.path.join(cache, "ids"), k=3, niter=5, eps=[0.01],
                progress=False, plot=False)  # fmt: skip
    run_cluster(os.path.join(cache, "image"), cluster, N_CLASSES, keep=os.path.join(balance, "keep_eps0.01.npy"),
                niter=5)  # fmt: skip
    return Assets(mcfg, cache, balance, cluster)


def make_cfg(assets: Assets, out_dir, recipe: str, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), recipe=recipe, steps=STEPS, batch_size=BATCH, warmup=0, eval_every=0,
                ckpt_every=STEPS, progress=False, lr=2e-3, seed=5, data=DataConfig(student_samples=N_SAMPLES),
                models=assets.models)  # fmt: skip
    if recipe != "baseline":
        base["teacher_cache"] = assets.cache
    if TABLE[recipe].labels:
        base.update(cluster_dir=assets.cluster, balance_dir=assets.balance, balance_eps=0.01)
    base.update(kw)
    return TrainConfig(**base)


def torchrun(cfg: TrainConfig, nproc: int = 2) -> None:
    path = os.path.join(os.path.dirname(cfg.out_dir), os.path.basename(cfg.out_dir) + ".yaml")
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "clipcid_fast.cli", "train", "--config", path]  # fmt: skip
    if cfg.resume:
        cmd.append("--resume")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]


def outcome(cfg: TrainConfig) -> dict:
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    ck = torch.load(checkpoint.newest(os.path.join(cfg.out_dir, "checkpoints")), weights_only=False)
    return {"lines": lines, "model": ck["model"], "recipe": ck["recipe"], "opt": ck["optimizer"]["state"]}


def assert_same_run(got: dict, want: dict, what: str) -> None:
    assert [r["step"] for r in got["lines"]] == [r["step"] for r in want["lines"]] == list(range(1, STEPS + 1))
    for g, w in zip(got["lines"], want["lines"]):
        for k in w:
            if k.endswith("_loss") or k in ("loss", "grad_norm", "logit_scale", "lr"):
                assert g[k] == pytest.approx(w[k], rel=2e-5, abs=2e-6), f"{what}: step {w['step']} {k}"
    for part in ("model", "recipe"):
        assert got[part].keys() == want[part].keys()
        for k in want[part]:
            g, w = got[part][k].float(), want[part][k].float()
            if k.endswith("attn.in_proj_bias"):
                # the key bias shifts every logit of a softmax row alike: its exact gradient is 0, so AdamW turns
                # each run's rounding noise there into steps of its own (up to ~1e-5 here); compared loosely
                third = w.shape[0] // 3
                torch.testing.assert_close(g[third : 2 * third], w[third : 2 * third], atol=1e-4, rtol=0)
                g, w = torch.cat([g[:third], g[2 * third :]]), torch.cat([w[:third], w[2 * third :]])
            # weights move by ~lr per step: fp32 rounding of reordered sums leaves ~1e-6 of it
            torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-4,
                                       msg=lambda m, k=k, part=part: f"{what}: {part}.{k}: {m}")  # fmt: skip
    assert got["opt"].keys() == want["opt"].keys()
    for i in want["opt"]:
        for k in ("exp_avg", "exp_avg_sq"):
            # gradient entries with cancellation carry fp32 noise relative to the tensor's scale, not their own
            w = want["opt"][i][k]
            torch.testing.assert_close(got["opt"][i][k], w, atol=1e-4 * float(w.abs().max()) + 1e-12, rtol=2e-4,
                                       msg=lambda m, i=i, k=k: f"{what}: optimizer state {i}.{k}: {m}")  # fmt: skip


@pytest.fixture(scope="module")
def plain(assets, tmp_path_factory) -> dict:
    """The reference: one process, one batch per step, for every recipe."""
    runs = {}
    for recipe in RECIPES:
        cfg = make_cfg(assets, tmp_path_factory.mktemp(f"plain_{recipe}") / "run", recipe)
        train.run_train(cfg)
        runs[recipe] = outcome(cfg)
    return runs


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_equal_one(recipe, assets, plain, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", recipe)
    torchrun(cfg)
    got = outcome(cfg)
    assert_same_run(got, plain[recipe], f"{recipe} torchrun x2")
    if TABLE[recipe].labels:  # the checkpoint holds every centre, in the one-process layout
        assert got["recipe"]["cluster.centres"].shape[0] == N_CLASSES


@pytest.mark.parametrize("recipe", RECIPES)
def test_accumulation_equals_one_batch(recipe, assets, plain, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", recipe, accum_freq=2)
    train.run_train(cfg)
    assert_same_run(outcome(cfg), plain[recipe], f"{recipe} --accum-freq 2")


def test_accumulation_under_torchrun_and_a_changed_micro_batch(assets, plain, tmp_path):
    """cid (sharded centres, the projection's gradient through the cached features) with 2 processes x 2
    micro-batches; distill with --local-loss; 4 micro-batches of rd."""
    cfg = make_cfg(assets, tmp_path / "run", "cid", accum_freq=2)
    torchrun(cfg)
    assert_same_run(outcome(cfg), plain["cid"], "cid torchrun x2 --accum-freq 2")
    local = make_cfg(assets, tmp_path / "local", "distill", local_loss=True)
    torchrun(local)  # each rank's rows only: the logged terms are the ranks' mean
    assert_same_run(outcome(local), plain["distill"], "distill torchrun x2 --local-loss")
    cfg4 = make_cfg(assets, tmp_path / "run4", "rd", accum_freq=4)
    train.run_train(cfg4)
    assert_same_run(outcome(cfg4), plain["rd"], "rd --accum-freq 4")


def test_one_process_checkpoint_resumed_by_two(assets, plain, tmp_path, monkeypatch):
    cfg = make_cfg(assets, tmp_path / "run", "cid", ckpt_every=2)
    real_save = train.checkpoint.save

    class Killed(Exception):
        pass

    def save_then_die(*args, **payload):
        real_save(*args, **payload)
        raise Killed

    monkeypatch.setattr(train.checkpoint, "save", save_then_die)
    with pytest.raises(Killed):
        train.run_train(cfg)
    monkeypatch.setattr(train.checkpoint, "save", real_save)
    assert torch.load(checkpoint.newest(os.path.join(cfg.out_dir, "checkpoints")), weights_only=False)["step"] == 2
    torchrun(dataclasses.replace(cfg, resume=True))
    assert_same_run(outcome(cfg), plain["cid"], "cid: 1 process to step 2, 2 processes after")


def test_batch_not_divisible(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", "kd", batch_size=18, accum_freq=4)
    with pytest.raises(ValueError, match=r"--batch-size 18 must be a multiple of world size x --accum-freq = 1 x 4"):
        train.run_train(cfg)
    with pytest.raises(ValueError, match=r"--accum-freq must be >= 1, got 0"):
        train.run_train(dataclasses.replace(cfg, batch_size=16, accum_freq=0))
    with pytest.raises(ValueError, match=r"--local-loss applies to --recipe distill .*; kd's losses are over"):
        train.run_train(dataclasses.replace(cfg, batch_size=16, local_loss=True))
    assert not os.path.exists(cfg.out_dir)


def test_plain_runs_are_not_trivially_equal(plain):
    """The comparisons above can fail: two recipes' runs differ far beyond their tolerance."""
    a, b = plain["kd"]["model"], plain["rd"]["model"]
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff > 1e-4
    assert np.isfinite([r["loss"] for r in plain["cid"]["lines"]]).all()


# ---------------------------------------------------------------------------------------------------------------
# the step reads nothing back from the device


class _ReadBacks(TorchDispatchMode):
    """Records every op that makes the host wait for the device (``_host_sync.why_it_syncs``: .item(), bool(),
    nonzero, unique, boolean-mask indexing, copies between devices, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if why_it_syncs(func, args, kwargs) is not None:
            self.seen.append((str(func.overloadpacket), args[0]))
        return func(*args, **kwargs)


def _device_read_backs(p, batch: dict, seen) -> list[str]:
    """What would sync a GPU: everything but AdamW's step counters (host tensors by design, torch keeps them on
    the CPU) and the caption dedup's torch.unique on the batch's token tensor (the host's, before any copy)."""
    steps = [s["step"] for s in p.optimizer.state.values()]
    host = batch["text"].untyped_storage().data_ptr()
    out = []
    for name, t in seen:
        if any(t is s for s in steps):
            continue
        if name in ("aten._unique2", "aten.unique_dim") and t.untyped_storage().data_ptr() == host:
            continue
        out.append(f"{name} on {tuple(t.shape)} {t.dtype}")
    return out


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("accum", [1, 2])
def test_a_step_reads_nothing_back(recipe, accum, assets, tmp_path):
    p = train.prepare(make_cfg(assets, tmp_path / "run", recipe, accum_freq=accum))
    p.step(p.batch(0))  # the first step creates AdamW's state
    batch = p.batch(1)
    with _ReadBacks() as watch:
        values = p.step(batch)
    assert _device_read_backs(p, batch, watch.seen) == []
    assert {"loss" not in values, "grad_norm" in values} == {True}  # terms, the norm, the scale: device tensors
    if TABLE[recipe].labels:  # the watch catches a per-step value scan: the cluster loss's debug checks
        p.recipe.cluster.check_values = True
        batch = p.batch(2)
        with _ReadBacks() as watch:
            p.step(batch)
        assert any(r.startswith("aten._local_scalar_dense") for r in _device_read_backs(p, batch, watch.seen))


def test_batch_builder_cache_is_bounded(assets, tmp_path):
    """Preprocessed images are kept up to cache_bytes; past it they are recomputed, and batches are the same."""
    p = train.prepare(make_cfg(assets, tmp_path / "run", "kd"))
    one = p.builder.ds[0]
    per_item = sum(v.nbytes for v in one.values() if isinstance(v, torch.Tensor))
    small = train.BatchBuilder(p.builder.ds, p.builder.train_index, p.builder.teacher, None, cache_bytes=3 * per_item)
    rows = np.arange(8)
    first, again = small(rows), small(rows)
    assert len(small._items) == 3 and small._cached_bytes == 3 * per_item
    for k in ("image", "text", "dist_image"):
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], p.builder(rows)[k])


def test_accumulation_replays_dropout_in_pass_2(assets, tmp_path):
    """A student with dropout (ViT patch dropout 0.5): pass 2 re-encodes each micro-batch with pass 1's RNG
    state, so the graph it backpropagates is the one whose features the loss saw (bit for bit); the guard shows
    the dropout draws (a third encode, without the replay, gives other features)."""
    cfg_path = str(tmp_path / "dropout_student.json")
    student = _vit(32, 32)
    student["vision_cfg"]["patch_dropout"] = 0.5
    with open(cfg_path, "w") as f:
        json.dump(student, f)
    mcfg = dataclasses.replace(assets.models, student=cfg_path)
    p = train.prepare(make_cfg(assets, tmp_path / "run", "kd", accum_freq=2, models=mcfg))
    seen = []
    hook = p.step.encoder.register_forward_hook(lambda mod, args, out: seen.append(out[0].detach().clone()))
    batch = p.batch(0)
    p.step(batch)
    assert len(seen) == 4  # pass 1: micro-batches 0, 1; pass 2: 0, 1
    for k in range(2):
        assert torch.equal(seen[k], seen[2 + k]), f"micro-batch {k}: pass 2's features differ from pass 1's"
    with torch.no_grad():
        p.step._encode(batch["image"][: BATCH // 2], p.step._texts(batch["text"][: BATCH // 2]))
    hook.remove()
    assert not torch.allclose(seen[4], seen[0], atol=1e-3)
