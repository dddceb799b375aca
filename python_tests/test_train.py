"""pipeline/train: every recipe learns, one step equals the spec (``clipcid_fast.reference``), a SIGKILLed run
resumes bit for bit, and bad input is one clear error that overwrites nothing.

The data are a few hundred real Fashion-MNIST images of the student corpus. The teacher is a small stock open_clip
model written here (a one-block ViT image tower with average pooling + a one-layer text transformer on MiniLM's
tokenizer, 192-d, so the recipes' learnable projection from the 384-d default student is exercised) with random
weights saved to a file, because the default teacher trains for minutes on first use. A random ResNet tower maps
every image to nearly the same direction (cosines > 0.9999, which would leave semantic balance nothing to keep);
this ViT's features are spread out and still cluster by class. Its cache (``run_embed``), balance and cluster
outputs are made once per module.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcid_fast import reference as R
from clipcid_fast.pipeline import checkpoint, models, train
from clipcid_fast.pipeline.balance import run_balance, run_cluster
from clipcid_fast.pipeline.batches import BatchBuilder, SampleStream
from clipcid_fast.pipeline.config import (
    RECIPES,
    DataConfig,
    EmbedConfig,
    ModelConfig,
    RecipeWeights,
    TrainConfig,
    to_yaml,
)
from clipcid_fast.pipeline.data import build_dataset
from clipcid_fast.pipeline.embed import run_embed
from clipcid_fast.recipes import RECIPES as TABLE
from clipcid_fast.recipes import Recipe

N_SAMPLES = 200  # student corpus images
BATCH = 32
TEACHER_DIM = 192
BALANCE_EPS = 0.01  # keeps about 3/4 of these 200 rows (0.05 keeps about 2/5)
N_CLASSES = 8
LN_100 = math.log(100.0)


def teacher_model_cfg() -> dict:
    text = {"hf_tokenizer_name": models.minilm_path(), "vocab_size": 30522, "context_length": 16, "width": 64,
            "heads": 2, "layers": 1, "pool_type": "eos", "eos_id": 102, "pad_id": 0}  # fmt: skip
    vision = {"layers": 1, "width": 64, "head_width": 32, "patch_size": 8, "image_size": 32, "mlp_ratio": 2,
              "pool_type": "avg"}  # fmt: skip
    return {"embed_dim": TEACHER_DIM, "vision_cfg": vision, "text_cfg": text}


def data_cfg(n: int = N_SAMPLES) -> DataConfig:
    return DataConfig(student_samples=n)


@dataclasses.dataclass
class Assets:
    root: str
    teacher_json: str
    teacher_a: str  # weights of teacher A (the one the caches were embedded with)
    teacher_b: str  # another teacher's weights, same config
    cache: str  # teacher A on the 200-image corpus
    cache_b: str  # teacher B on the same corpus
    cache_small: str  # teacher A on a 150-image corpus
    balance: str
    cluster: str  # pseudo-classes of `cache` (kept rows)
    cluster_b: str  # of `cache_b`: same row count, other embeddings
    cluster_small: str  # of `cache_small`: other row count

    def models(self, teacher_weights: str | None = None) -> ModelConfig:
        return ModelConfig(teacher=self.teacher_json, teacher_weights=teacher_weights or self.teacher_a)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = str(tmp_path_factory.mktemp("train_assets"))
    p = lambda *names: os.path.join(root, *names)  # noqa: E731
    with open(p("teacher.json"), "w") as f:
        json.dump(teacher_model_cfg(), f)
    for name, seed in (("teacher_a.pt", 1), ("teacher_b.pt", 2)):
        torch.manual_seed(seed)
        torch.save(models.build_open_clip(teacher_model_cfg()).state_dict(), p(name))
    a = Assets(root, p("teacher.json"), p("teacher_a.pt"), p("teacher_b.pt"), p("cache"), p("cache_b"),
               p("cache_small"), p("balance"), p("cluster"), p("cluster_b"), p("cluster_small"))  # fmt: skip
    for out, weights, n in ((a.cache, a.teacher_a, N_SAMPLES), (a.cache_b, a.teacher_b, N_SAMPLES),
                            (a.cache_small, a.teacher_a, 150)):  # fmt: skip
        # 96-row shards: the trainer's id -> row lookup crosses shard ends
        run_embed(EmbedConfig(out_dir=out, batch_size=64, shard_rows=96, progress=False, data=data_cfg(n),
                              models=a.models(weights)))  # fmt: skip
    run_balance(os.path.join(a.cache, "image"), a.balance, ids=os.path.join(a.cache, "ids"), k=4, niter=5,
                eps=[BALANCE_EPS, 0.05], progress=False, plot=False)  # fmt: skip
    keep = os.path.join(a.balance, f"keep_eps{BALANCE_EPS:g}.npy")
    run_cluster(os.path.join(a.cache, "image"), a.cluster, N_CLASSES, keep=keep, niter=5)
    run_cluster(os.path.join(a.cache_b, "image"), a.cluster_b, N_CLASSES, keep=keep, niter=5)
    run_cluster(os.path.join(a.cache_small, "image"), a.cluster_small, N_CLASSES, niter=5)
    return a


_CUDA_IS_AVAILABLE = torch.cuda.is_available


@pytest.fixture(scope="module", autouse=True)
def _trainer_on_cpu():
    """These tests check the CPU fp32 trainer (tolerances, bitwise resume); on a CUDA machine (scripts/gpu_check.sh
    runs every test) it would pick the GPU and bf16 autocast, so it is shown no GPU here (the SIGKILL children get
    CUDA_VISIBLE_DEVICES=""). test_teacher_recipes_run_on_cuda runs it on the GPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


def make_cfg(assets: Assets, out_dir, recipe: str, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), recipe=recipe, steps=4, batch_size=BATCH, warmup=0, eval_every=0,
                ckpt_every=2, progress=False, data=data_cfg(), models=assets.models())  # fmt: skip
    if recipe != "baseline":
        base["teacher_cache"] = assets.cache
    if recipe in TABLE and TABLE[recipe].labels:  # an unknown name reaches the trainer, which refuses it
        base.update(cluster_dir=assets.cluster, balance_dir=assets.balance, balance_eps=BALANCE_EPS)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------------------------
# independent readers of the inputs (not the trainer's code): cache shards, training rows, batches


def read_cache(path: str) -> dict:
    def column(sub):
        d = os.path.join(path, sub)
        return np.concatenate([np.load(os.path.join(d, f)) for f in sorted(os.listdir(d)) if f.endswith(".npy")])

    ids = column("ids")
    return {"image": column("image"), "text": column("text"), "ids": ids, "row": {int(i): r for r, i in enumerate(ids)}}


@functools.lru_cache(maxsize=4)
def _fresh_student(seed: int) -> models.LoadedModel:
    return models.load_model(ModelConfig(), "student", seed=seed)


def fresh_student(cfg: TrainConfig) -> tuple[torch.nn.Module, int]:
    """(a copy of the student the trainer starts from: the default config, initialised from cfg.seed; its width)."""
    loaded = _fresh_student(cfg.seed)
    return copy.deepcopy(loaded.model), loaded.info["embed_dim"]


@functools.lru_cache(maxsize=4)
def _student_dataset(seed: int, data: str):
    loaded = _fresh_student(seed)
    return build_dataset(DataConfig(**json.loads(data)), loaded.preprocess, loaded.tokenizer)


def student_dataset(cfg: TrainConfig):
    return _student_dataset(cfg.seed, json.dumps(dataclasses.asdict(cfg.data)))


def training_rows(cfg: TrainConfig, ds) -> tuple[np.ndarray, np.ndarray | None]:
    """(dataset indices the run trains on, pseudo-label per cache row or None), from the files' documented meaning."""
    if not TABLE[cfg.recipe].labels:
        return np.arange(len(ds)), None
    cache = read_cache(cfg.teacher_cache)
    labels = np.load(os.path.join(cfg.cluster_dir, "labels.npy"))
    keep = np.load(os.path.join(cfg.balance_dir, f"keep_eps{cfg.balance_eps:g}.npy")) & (labels >= 0)
    return np.flatnonzero(np.isin(ds.ids, cache["ids"][keep])), labels


def make_batch(cfg: TrainConfig, ds, index: np.ndarray, labels: np.ndarray | None) -> dict:
    items = [ds[int(i)] for i in index]
    out = {"image": torch.stack([it["image"] for it in items]), "text": torch.stack([it["text"] for it in items])}
    if cfg.recipe != "baseline":
        cache = read_cache(cfg.teacher_cache)
        rows = [cache["row"][it["id"]] for it in items]
        out["t_img"] = torch.from_numpy(cache["image"][rows].astype(np.float32))
        out["t_txt"] = torch.from_numpy(cache["text"][rows].astype(np.float32))
        if labels is not None:
            out["labels"] = torch.from_numpy(labels[rows].astype(np.int64))
    return out


def teacher_scale(assets: Assets) -> float:
    return float(torch.load(assets.teacher_a, weights_only=True)["logit_scale"].exp())


# ---------------------------------------------------------------------------------------------------------------
# the trainer's recipe, watched: its initial state and, per step, what it was given and returned


def spy_recipe(monkeypatch) -> dict:
    seen: dict = {"init": None, "calls": []}

    class Spy(Recipe):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["init"] = {k: v.detach().clone() for k, v in self.state_dict().items()}

        def forward(self, *args):
            terms = super().forward(*args)
            keep = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
            seen["calls"].append({"args": keep, "terms": {k: float(v.detach()) for k, v in terms.items()}})
            return terms

    monkeypatch.setattr(train, "Recipe", Spy)
    return seen


# ---------------------------------------------------------------------------------------------------------------
# SampleStream: the data position is the step


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    local=st.integers(1, 9),
    world=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    epochs=st.integers(1, 3),
)
def test_sample_stream_epochs_ranks_and_purity(n, local, world, seed, epochs):
    batch = local * world
    ranks = [SampleStream(n, batch, seed, r, world) for r in range(world)]
    steps = -(-epochs * n // batch) + 1
    glob = [ranks[0].global_rows(s) for s in range(steps)]
    stream = np.concatenate(glob)
    for e in range(len(stream) // n):  # every full epoch is its documented permutation: each row exactly once
        np.testing.assert_array_equal(stream[e * n : (e + 1) * n], np.random.default_rng([seed, e]).permutation(n))
    for s in range(steps):
        assert len(glob[s]) == batch
        parts = [r.rows(s) for r in ranks]
        assert all(len(p) == local for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), glob[s])  # the rank slices partition the global batch
    # a pure function of (seed, step): a new stream asked in another order gives the same rows
    fresh = SampleStream(n, batch, seed, world - 1, world)
    for s in reversed(range(steps)):
        np.testing.assert_array_equal(fresh.rows(s), ranks[world - 1].rows(s))


def test_sample_stream_bad_sizes():
    with pytest.raises(ValueError, match="training set is empty"):
        SampleStream(0, 4, 0)
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        SampleStream(10, 4, 0, 0, 3)


# ---------------------------------------------------------------------------------------------------------------
# the spec of every recipe, composed from clipcid_fast.reference


def reference_terms(name: str, w: RecipeWeights, img, txt, tau, t_img, t_txt, tau_t, p: dict, labels) -> dict:
    """The recipe's weighted terms from the reference losses. ``img, txt``: the student's raw features; ``p``: the
    recipe's parameters by state-dict name (projections, raw scales, centres)."""
    n = lambda x: F.normalize(x, dim=-1)  # noqa: E731
    if name == "baseline":
        return {"task_loss": R.clip_loss(n(img), n(txt), tau)}
    s_img = img @ p["proj_image.weight"].T if "proj_image.weight" in p else img
    if name == "cid":  # task on the student's own features; cluster / instance terms in the teacher's space
        return {"task_loss": R.clip_loss(n(img), n(txt), tau), **cid_terms(w, s_img, t_txt, p, labels)}
    if name == "cid+rd":  # rd's terms, then cid's two on the same projected image features
        return {**reference_terms("rd", w, img, txt, tau, t_img, t_txt, tau_t, p, labels),
                **cid_terms(w, s_img, t_txt, p, labels)}  # fmt: skip
    s_txt = txt @ p["proj_text.weight"].T if "proj_text.weight" in p else txt
    s_i, s_t = n(s_img), n(s_txt)
    if name == "distill":
        contrastive, distill = R.distill_clip_loss(s_i, s_t, tau, t_img, t_txt, tau_t)
        return {"contrastive_loss": contrastive, "distill_loss": w.distill_weight * distill}
    k_c = p["loss.cross_logit_scale"]
    out = {
        "task_loss": R.clip_loss(s_i, s_t, tau),
        ("hrd_loss" if name == "rd" else "crd_loss"): w.crd_weight * R.crd_loss(s_i, s_t, tau, t_img, t_txt, tau_t),
        "icl_loss": w.icl_weight * R.icl_loss(s_i, s_t, t_img, t_txt, k_c),
        "fd_loss": w.fd_weight * R.fd_loss(s_i, s_t, t_img, t_txt),
    }
    if name == "rd":
        kl, ce_i, ce_t = R.vrd_loss(s_i, s_t, t_img, t_txt, p["loss.image_logit_scale"], p["loss.text_logit_scale"])
        out["vrd_loss"] = w.vrd_weight * (kl + ce_i + ce_t)
        out["xrd_loss"] = w.xrd_weight * R.xrd_loss(s_i, s_t, t_img, t_txt, k_c)
    return out


def cid_terms(w: RecipeWeights, s_img, t_txt, p: dict, labels) -> dict:
    """CLIP-CID's cluster and instance terms on the (projected) student image features ``s_img``."""
    cluster = R.cluster_discrimination_loss(s_img, p["cluster.centres"], labels, w.cd_scale, 1.0, w.cd_margin, 0.0)
    return {
        "cluster_loss": w.cd_weight * cluster.mean(),
        "instance_loss": w.id_weight * R.instance_discrimination_loss(F.normalize(s_img, dim=-1), t_txt,
                                                                      p["instance.scale"]),
    }  # fmt: skip


def spec_groups(cfg: TrainConfig, model: torch.nn.Module, recipe_state: dict) -> list[tuple[list[str], float, float]]:
    """(parameter names, lr, weight decay) per AdamW group as the trainer documents them: the student's matrices
    with weight decay, its gains / biases / logit scale without; the recipe's projections with, its raw scales
    without, its centres with, at centre_lr_mult × lr. Order: student, then recipe (the optimizer's)."""
    student = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = dict(model.named_parameters())
    recipe = list(recipe_state)
    centres = [n for n in recipe if n == "cluster.centres"]
    groups = [
        ([n for n in student if shapes[n].ndim >= 2], cfg.lr, cfg.wd),
        ([n for n in student if shapes[n].ndim < 2], cfg.lr, 0.0),
        (["recipe." + n for n in recipe if n not in centres and recipe_state[n].ndim >= 2], cfg.lr, cfg.wd),
        (["recipe." + n for n in recipe if n not in centres and recipe_state[n].ndim < 2], cfg.lr, 0.0),
        (["recipe." + n for n in centres], cfg.lr * cfg.weights.centre_lr_mult, cfg.wd),
    ]
    return [g for g in groups if g[0]]


# the published defaults would hide a swapped weight (CRD and ICL are both 1): every weight different here
ODD_WEIGHTS = RecipeWeights(crd_weight=0.7, icl_weight=1.3, fd_weight=300.0, vrd_weight=0.8, xrd_weight=1.2,
                            distill_weight=0.6, cd_weight=0.9, id_weight=1.1, cd_margin=0.3, cd_scale=16.0,
                            centre_lr_mult=2.5)  # fmt: skip


def assert_close(got: torch.Tensor, want: torch.Tensor, scale: float, rtol: float, name: str) -> None:
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale, f"{name}: max |trainer - spec| = {err:.3e} > {rtol:.0e} x {scale:.3e}"


def latest(cfg: TrainConfig) -> dict:
    path = checkpoint.newest(os.path.join(cfg.out_dir, "checkpoints"))
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------------------------
# one short run per recipe, watched, shared by tests 1 and 2

LEARN_STEPS = 8


@pytest.fixture(scope="module", params=RECIPES)
def trained(request, assets, tmp_path_factory) -> dict:
    """``LEARN_STEPS`` steps of one recipe (the odd weights of ODD_WEIGHTS, every step checkpointed). Recorded: the
    recipe's initial state and, per step, its inputs and terms (``spy_recipe``), and the step-1 checkpoint payload
    as the trainer hands it to ``checkpoint.save`` (only the last one is written to disk, to save time)."""
    recipe = request.param
    out = tmp_path_factory.mktemp(f"run_{recipe}")
    cfg = make_cfg(assets, out, recipe, steps=LEARN_STEPS, ckpt_every=1, lr=1e-3, seed=3, weights=ODD_WEIGHTS)
    payloads = {}
    real_save = train.checkpoint.save

    def save(ckpt_dir, step, **payload):
        if step == 1:
            payloads[1] = copy.deepcopy({**payload, "step": step})
        if step == cfg.steps:
            return real_save(ckpt_dir, step, **payload)
        return checkpoint.path_of(ckpt_dir, step)

    with pytest.MonkeyPatch.context() as mp:
        seen = spy_recipe(mp)
        mp.setattr(train.checkpoint, "save", save)
        summary = train.run_train(cfg)
    assert len(seen["calls"]) == LEARN_STEPS and 1 in payloads
    return {"cfg": cfg, "summary": summary, "step1": payloads[1], **seen}


# ---------------------------------------------------------------------------------------------------------------
# 1. every recipe learns


@torch.no_grad()
def mean_loss(cfg: TrainConfig, assets: Assets, model_state: dict, recipe_state: dict, batches: list[dict]) -> float:
    """The recipe's total loss over fixed batches for the given student and recipe states (train-mode forward, as
    the trainer's: batch-norm on batch statistics)."""
    model, s_dim = fresh_student(cfg)
    model.load_state_dict(model_state)
    model.train()
    centroids = os.path.join(cfg.cluster_dir, "centroids.npy") if TABLE[cfg.recipe].labels else None
    recipe = Recipe(cfg.recipe, cfg.weights, s_dim, s_dim if cfg.recipe == "baseline" else TEACHER_DIM,
                    centroids=centroids)  # fmt: skip
    recipe.load_state_dict(recipe_state)
    tau_t = torch.tensor(teacher_scale(assets))
    totals = []
    for b in batches:
        terms = recipe(model.encode_image(b["image"]), model.encode_text(b["text"]), model.logit_scale.exp(),
                       b.get("t_img"), b.get("t_txt"), tau_t, b.get("labels"))  # fmt: skip
        totals.append(float(sum(terms.values())))
    return float(np.mean(totals))


def test_every_recipe_lowers_its_loss(trained, assets):
    """A few steps on a few hundred images lower the recipe's loss on fixed batches of the training rows (the same
    batches scored with the initial and the final student + recipe state, so batch-to-batch noise cancels)."""
    cfg = trained["cfg"]
    ds = student_dataset(cfg)
    index, labels = training_rows(cfg, ds)
    assert trained["summary"]["train_samples"] == len(index) and len(index) >= 4 * BATCH
    fixed = [make_batch(cfg, ds, index[s : s + BATCH], labels) for s in range(0, len(index) - BATCH + 1, BATCH)]
    initial = fresh_student(cfg)[0].state_dict()
    final = torch.load(os.path.join(cfg.out_dir, "student.pt"), weights_only=True)["model"]
    before = mean_loss(cfg, assets, initial, trained["init"], fixed)
    after = mean_loss(cfg, assets, final, latest(cfg)["recipe"], fixed)
    # Observed (seeds 0, 1, 3): 0.69-0.85 x the initial loss for kd, rd, cid; 0.89-0.94 for baseline (40 % of
    # the captions name a wrong class) and 0.93-0.95 for distill (its soft cross-entropy includes the teacher's
    # entropy, a floor no training removes). The run is deterministic, so the margin only has to cover other
    # machines' rounding; 3 % is far above that, and a recipe that does not learn (or climbs) fails.
    assert after < 0.97 * before, f"{cfg.recipe}: loss on the fixed batches {before:.4f} -> {after:.4f}"
    # the trainer logged exactly the terms the recipe returned, and their sum, at every step
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["step"] for r in lines] == list(range(1, cfg.steps + 1))
    for r, call in zip(lines, trained["calls"]):
        assert {k: r[k] for k in call["terms"]} == call["terms"]
        assert r["loss"] == pytest.approx(sum(call["terms"].values()), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 2. one optimisation step equals the spec's step


def test_first_step_equals_the_reference_step(trained, assets):
    """The first run_train step against the same step written by hand: the reference losses composed as the recipes'
    spec says (the non-default weights of ODD_WEIGHTS), autograd in float64, the trainer's gradient clipping,
    and AdamW's first step by its formula over the documented parameter groups. Compared: what the recipe was
    fed, each loss term, every gradient (the optimizer's first moment m = (1 − β1) g holds it), every weight,
    raw scale, centre and batch-norm statistic after the step."""
    cfg, seen, ck = trained["cfg"], trained, trained["step1"]
    recipe = cfg.recipe
    assert ck["step"] == 1 and cfg.warmup == 0  # so step 0 ran at the full lr (cosine factor 1)

    # the step-0 batch: positions [0, B) of the documented stream default_rng([seed, 0]).permutation(n)
    ds = student_dataset(cfg)
    index, labels = training_rows(cfg, ds)
    rows = np.random.default_rng([cfg.seed, 0]).permutation(len(index))[:BATCH]
    batch = make_batch(cfg, ds, index[rows], labels)

    # what the trainer gave the recipe: the teacher rows of these ids (fp16 cache widened exactly), their labels
    got_img, got_txt, _, got_t_img, got_t_txt, got_tau_t, got_labels = seen["calls"][0]["args"]
    if recipe == "baseline":
        assert got_t_img is None and got_t_txt is None and got_tau_t is None
        tau_t = t_img = t_txt = None
    else:
        assert torch.equal(got_t_img, batch["t_img"]) and torch.equal(got_t_txt, batch["t_txt"])
        tau_t = teacher_scale(assets)
        assert float(got_tau_t) == pytest.approx(tau_t, rel=1e-6)
        t_img, t_txt = batch["t_img"].double(), batch["t_txt"].double()
    if TABLE[recipe].labels:
        assert torch.equal(got_labels, batch["labels"])
    else:
        assert got_labels is None

    # the hand-written step (float64)
    model = fresh_student(cfg)[0].double().train()
    params = dict(model.named_parameters())
    rp = {k: v.double().clone().requires_grad_(True) for k, v in seen["init"].items()}
    img, txt = model.encode_image(batch["image"].double()), model.encode_text(batch["text"])
    assert_close(got_img, img, img.abs().max().item(), 1e-4, "student image features")
    assert_close(got_txt, txt, txt.abs().max().item(), 1e-4, "student text features")
    terms = reference_terms(recipe, cfg.weights, img, txt, params["logit_scale"].exp(), t_img, t_txt, tau_t, rp,
                            batch.get("labels"))  # fmt: skip
    got_terms = seen["calls"][0]["terms"]
    assert list(got_terms) == list(terms)
    for k, v in terms.items():
        assert got_terms[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    names = [*params, *("recipe." + k for k in rp)]
    before = dict(zip(names, [p.detach().clone() for p in (*params.values(), *rp.values())]))
    grads = dict(zip(names, torch.autograd.grad(sum(terms.values()), [*params.values(), *rp.values()],
                                                allow_unused=True)))  # fmt: skip
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values() if g is not None))
    clip = min(1.0, cfg.grad_clip / (norm + 1e-6))  # torch's clip_grad_norm_ coefficient
    assert clip < 1.0  # the clip is active (norms 10-30 here), so the check covers it
    groups = spec_groups(cfg, model, seen["init"])
    # fp32 gradient noise scales with the gradients that cancel into an element, not with the element: the key
    # bias of the attention pool has an exactly zero gradient (softmax is shift-invariant) that fp32 sees as
    # ~1e-8 of the largest gradient. So each gradient is compared within 1e-4 of its own tensor's largest entry
    # plus 1e-6 of the largest entry of all.
    g_all = clip * max(float(g.abs().max()) for g in grads.values() if g is not None)

    # the optimizer's groups and state are the documented ones
    opt = ck["optimizer"]
    assert [(len(g["params"]), g["initial_lr"], g["weight_decay"]) for g in opt["param_groups"]] == [
        (len(n), lr, wd) for n, lr, wd in groups
    ]
    order = [n for g in groups for n in g[0]]
    assert sorted(order) == sorted(names)
    state = {order[i]: s for i, s in opt["state"].items()}
    assert set(state) == {n for n, g in grads.items() if g is not None}, "AdamW state for exactly the used params"

    got_after = {**ck["model"], **{"recipe." + k: v for k, v in ck["recipe"].items()}}
    for group_names, lr, wd in groups:
        for n in group_names:
            p0, g = before[n], grads[n]
            if g is None:  # not in the graph: AdamW skips it, no decay either
                assert torch.equal(got_after[n], p0.float()), n
                continue
            g = g * clip
            got_g = state[n]["exp_avg"].double() / (1 - cfg.beta1)
            g_tol = 1e-4 * g.abs().max().item() + 1e-6 * g_all
            assert_close(got_g, g, g_tol, 1.0, f"gradient of {n}")
            # AdamW's first step, bias-corrected: m̂ = g, v̂ = g², so p ← p (1 − lr·wd) − lr · g / (|g| + eps)
            want = p0 * (1 - lr * wd) - lr * g / (g.abs() + cfg.eps)
            if n == "logit_scale":
                want = want.clamp(0, LN_100)
            # Tolerance: the update is at most lr per element, and a gradient error δ moves it by at most
            # lr·δ·eps/(|g| + eps)² (the slope of g/(|g| + eps)); δ ≤ g_tol from the gradient check above. On top,
            # the fp32 rounding of the stored weight (a few ulps of |p|).
            tol = lr * (1e-4 + g_tol * cfg.eps / (g.abs() + cfg.eps) ** 2) + 4 * 2.0**-24 * want.abs()
            err = (got_after[n].double() - want).abs()
            worst = int(torch.argmax(err - tol))
            assert (err <= tol).all(), (
                f"{n}: weight after the step off by {err.flatten()[worst]:.3e} > tol {tol.flatten()[worst]:.3e} "
                f"(update {float((want - p0).flatten()[worst]):.3e})"
            )
    for n, b in model.named_buffers():
        if n == "attn_mask":
            continue
        if b.dtype == torch.int64:
            assert torch.equal(ck["model"][n], b), n
        else:
            assert_close(ck["model"][n], b, b.abs().max().item(), 1e-4, f"buffer {n}")


# ---------------------------------------------------------------------------------------------------------------
# 3. a SIGKILLed run resumes bit for bit

KILL_STEPS = 8
KILL_CKPT_EVERY = 2
KILL_RECIPES = ("baseline", "cid")
CHILD = """
import sys

import torch

from clipcid_fast.pipeline.config import TrainConfig, build_config
from clipcid_fast.pipeline.train import run_train

torch.set_num_threads(int(sys.argv[2]))  # the parent's: the fused kernels' summation order follows the threads
run_train(build_config(TrainConfig, sys.argv[1]))
"""


def kill_cfg(assets: Assets, out_dir, recipe: str, **kw) -> TrainConfig:
    extra = {"eval_every": 5, "eval_samples": 40} if recipe == "baseline" else {}  # eval lines in metrics.jsonl too
    return make_cfg(assets, out_dir, recipe, steps=KILL_STEPS, ckpt_every=KILL_CKPT_EVERY, warmup=3, lr=2e-3, **extra,
                    **kw)  # fmt: skip


def count_lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def killed_runs(assets, tmp_path_factory) -> dict:
    """One child process per recipe of KILL_RECIPES, all started at once (their start-up overlaps), each SIGKILLed by
    a watcher thread once its metrics.jsonl holds k lines, k drawn from a seeded RNG in [ckpt_every + 1, steps - 3]:
    the kill lands in step k + 1 or in the checkpoint write after step k, after a first checkpoint (the line of
    step s is written before the checkpoint of step s), and before the end."""
    root = tmp_path_factory.mktemp("killed")
    script = os.path.join(root, "child.py")
    with open(script, "w") as f:
        f.write(CHILD)
    runs = {}
    for i, recipe in enumerate(KILL_RECIPES):
        cfg = kill_cfg(assets, os.path.join(root, recipe), recipe)
        yaml_path = os.path.join(root, f"{recipe}.yaml")
        with open(yaml_path, "w") as f:
            f.write(to_yaml(cfg))
        k = int(np.random.default_rng([20261201, i]).integers(KILL_CKPT_EVERY + 1, KILL_STEPS - 2))
        log = open(os.path.join(root, f"{recipe}.log"), "wb")
        proc = subprocess.Popen([sys.executable, script, yaml_path, str(torch.get_num_threads())], stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
        run = {"cfg": cfg, "k": k, "proc": proc, "log": log.name, "threads": torch.get_num_threads()}

        def watch(run=run):
            metrics = os.path.join(run["cfg"].out_dir, "metrics.jsonl")
            while run["proc"].poll() is None:
                if count_lines(metrics) >= run["k"]:
                    run["proc"].send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
            run["proc"].wait()

        run["watcher"] = threading.Thread(target=watch, daemon=True)
        run["watcher"].start()
        runs[recipe] = run
    yield runs
    for run in runs.values():
        if run["proc"].poll() is None:
            run["proc"].kill()
        run["proc"].wait()


@pytest.fixture(scope="module", autouse=True)
def _start_the_kills_early(request, _trainer_on_cpu):
    """When a SIGKILL test is selected, its children start before the module's first test: their start-up (a fresh
    interpreter importing torch, open_clip, transformers) overlaps the other tests instead of stalling the kill
    tests."""
    if any(item.module is request.module and "sigkill" in item.name for item in request.session.items):
        request.getfixturevalue("killed_runs")


def all_bytes(d: str) -> dict[str, bytes]:
    out = {}
    for base, _, files in os.walk(d):
        for f in files:
            with open(os.path.join(base, f), "rb") as fh:
                out[os.path.relpath(os.path.join(base, f), d)] = fh.read()
    return out


def assert_same_tensors(a, b, where: str) -> None:
    """Nested dicts / lists of tensors and plain values: same structure, torch.equal tensors (bitwise)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where}: the tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("recipe", KILL_RECIPES)
def test_sigkill_then_resume_is_bit_identical(recipe, killed_runs, assets, tmp_path, capsys):
    """A run SIGKILLed at a random step, then resumed (resume=True) to the end, ends exactly where an
    uninterrupted run ends: the same student.pt tensors (bitwise), the same recipe parameters (cid's centres and
    instance scale, its projection) and optimizer state in its newest checkpoint, and a byte-identical
    metrics.jsonl (eval lines included for baseline)."""
    run = killed_runs[recipe]
    threads = torch.get_num_threads()
    torch.set_num_threads(run["threads"])  # the child's (an earlier test module may have changed ours)
    try:
        check_kill_and_resume(recipe, run, kill_cfg(assets, tmp_path / "full", recipe), capsys)
    finally:
        torch.set_num_threads(threads)


def check_kill_and_resume(recipe: str, run: dict, full: TrainConfig, capsys) -> None:
    train.run_train(full)  # meanwhile the child runs and is killed
    run["watcher"].join(timeout=600)
    with open(run["log"], "rb") as f:
        child_log = f.read().decode(errors="replace")[-2000:]
    assert run["proc"].returncode == -signal.SIGKILL, f"the child was not killed mid-run:\n{child_log}"
    killed_dir = run["cfg"].out_dir
    assert not os.path.exists(os.path.join(killed_dir, "student.pt"))
    ckpt = checkpoint.newest(os.path.join(killed_dir, "checkpoints"))
    resumed_from = torch.load(ckpt, weights_only=False)["step"] if ckpt else 0
    lines_at_kill = count_lines(os.path.join(killed_dir, "metrics.jsonl"))
    assert run["k"] <= lines_at_kill < KILL_STEPS  # killed mid-run
    assert KILL_CKPT_EVERY <= resumed_from <= lines_at_kill  # from a checkpoint, with the steps after it to redo

    capsys.readouterr()
    train.run_train(dataclasses.replace(run["cfg"], resume=True))
    out = capsys.readouterr().out
    assert f"resumed {killed_dir} at step {resumed_from}" in out

    a = torch.load(os.path.join(full.out_dir, "student.pt"), weights_only=True)
    b = torch.load(os.path.join(killed_dir, "student.pt"), weights_only=True)
    assert_same_tensors(a, b, "student.pt")
    ca, cb = latest(full), latest(run["cfg"])
    assert ca["step"] == cb["step"] == KILL_STEPS
    if recipe == "cid":
        assert {"proj_image.weight", "cluster.centres", "instance.scale"} <= set(cb["recipe"])
    for key in ("model", "recipe", "optimizer", "scheduler", "metrics"):
        assert_same_tensors(ca[key], cb[key], f"checkpoint[{key!r}]")
    with open(os.path.join(full.out_dir, "metrics.jsonl"), "rb") as f:
        want = f.read()
    with open(os.path.join(killed_dir, "metrics.jsonl"), "rb") as f:
        got = f.read()
    assert got == want
    assert want.count(b"\n") == KILL_STEPS
    if recipe == "baseline":
        assert b"eval_zeroshot_top1" in want


def test_a_signal_checkpoints_its_step_and_the_resume_is_bit_identical(assets, tmp_path, monkeypatch, capsys):
    """SIGTERM, SIGINT and SIGUSR1, each delivered to the process during a seeded random step k that is not a
    checkpoint step: the run finishes step k, writes a checkpoint of it, prints one line and exits with 128 + the
    signal number; resumed, it ends exactly where an uninterrupted run ends (student.pt, the checkpoint's model,
    recipe, optimizer, scheduler and metrics bitwise, metrics.jsonl byte for byte)."""
    full = kill_cfg(assets, tmp_path / "full", "baseline")
    train.run_train(full)
    real_prepare = train.prepare
    for i, sig in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)):
        steps = [k for k in range(1, KILL_STEPS - 1) if (k + 1) % KILL_CKPT_EVERY]
        k = int(np.random.default_rng([20261207, i]).choice(steps))  # 0-based: the step the signal arrives in

        def prepare(cfg, comm=None, k=k, sig=sig):
            p = real_prepare(cfg, comm)
            calls = iter(range(KILL_STEPS))

            def step(batch):
                if next(calls) == k:
                    os.kill(os.getpid(), sig)  # delivered now, in the middle of the step
                return p.step(batch)

            return dataclasses.replace(p, step=step)

        cut = kill_cfg(assets, tmp_path / signal.Signals(sig).name, "baseline")
        handler_before = signal.getsignal(sig)
        monkeypatch.setattr(train, "prepare", prepare)
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            train.run_train(cut)
        monkeypatch.setattr(train, "prepare", real_prepare)
        assert info.value.code == 128 + sig
        out = capsys.readouterr().out
        assert f"stopped at step {k + 1} by {signal.Signals(sig).name}; resume with --resume" in out
        assert latest(cut)["step"] == k + 1
        assert count_lines(os.path.join(cut.out_dir, "metrics.jsonl")) == k + 1
        assert not os.path.exists(os.path.join(cut.out_dir, "student.pt"))
        assert signal.getsignal(sig) == handler_before  # the run's handler is gone with the run

        train.run_train(dataclasses.replace(cut, resume=True))
        a = torch.load(os.path.join(full.out_dir, "student.pt"), weights_only=True)
        b = torch.load(os.path.join(cut.out_dir, "student.pt"), weights_only=True)
        assert_same_tensors(a, b, f"{signal.Signals(sig).name}: student.pt")
        ca, cb = latest(full), latest(cut)
        for key in ("model", "recipe", "optimizer", "scheduler", "metrics"):
            assert_same_tensors(ca[key], cb[key], f"{signal.Signals(sig).name}: checkpoint[{key!r}]")
        with (
            open(os.path.join(full.out_dir, "metrics.jsonl"), "rb") as f,
            open(os.path.join(cut.out_dir, "metrics.jsonl"), "rb") as g,
        ):
            assert f.read() == g.read()


# ---------------------------------------------------------------------------------------------------------------
# 4. bad input: one clear error, nothing overwritten


def raises_one_line(exc, match: str, fn, *args):
    with pytest.raises(exc, match=match) as info:
        fn(*args)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> TrainConfig:
    cfg = make_cfg(assets, tmp_path_factory.mktemp("finished"), "baseline", steps=1, ckpt_every=1)
    train.run_train(cfg)
    return cfg


def test_wrong_recipe_name(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", "clip-kd", teacher_cache=assets.cache)
    msg = r"--recipe must be one of cid, rd, kd, distill, cid\+rd, baseline; got 'clip-kd'"
    raises_one_line(ValueError, msg, train.run_train, cfg)
    assert not os.path.exists(cfg.out_dir)
    raises_one_line(ValueError, "recipe must be one of", Recipe, "clip-kd", RecipeWeights(), 384, 384)


@pytest.mark.parametrize(
    "which, match",
    [
        ("cluster_small", r"--cluster-dir .*labels.npy has 150 rows, the teacher cache 200"),
        ("cluster_b", r"--cluster-dir .*labels.npy does not match the teacher cache"),
    ],
    ids=["other-row-count", "same-row-count"],
)
def test_cluster_dir_of_other_embeddings(which, match, assets, tmp_path):
    """Pseudo-classes made from another cache: one with another row count, and one with the same rows embedded by
    another teacher (labels and centres of other embeddings: every shape fits)."""
    cfg = make_cfg(assets, tmp_path / "run", "cid", cluster_dir=getattr(assets, which))
    raises_one_line(ValueError, match, train.run_train, cfg)
    assert not os.path.exists(cfg.out_dir)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        ("label", r"labels.npy row 7 is 8, outside \[-1, 8\)"),
        ("nan", r"centroids.npy row 3 is not finite or has zero norm"),
        ("zero", r"centroids.npy row 5 is not finite or has zero norm"),
    ],
)
def test_bad_pseudo_class_values_are_refused_once_at_load(corrupt, match, assets, tmp_path):
    """The cluster loss does not scan its inputs every step: bad labels and centres are refused when they enter."""
    import shutil

    bad = str(tmp_path / "cluster")
    shutil.copytree(assets.cluster, bad)
    labels, cent = np.load(os.path.join(bad, "labels.npy")), np.load(os.path.join(bad, "centroids.npy"))
    if corrupt == "label":
        labels[7] = N_CLASSES
    else:
        cent[3 if corrupt == "nan" else 5] = np.nan if corrupt == "nan" else 0.0
    np.save(os.path.join(bad, "labels.npy"), labels)
    np.save(os.path.join(bad, "centroids.npy"), cent)
    raises_one_line(ValueError, match, train.run_train, make_cfg(assets, tmp_path / "run", "cid", cluster_dir=bad))


def test_teacher_cache_of_another_model_or_dataset(assets, tmp_path):
    """Cache embedded by teacher A, training with teacher B (same architecture, other weights); and a cache of
    another corpus."""
    cfg = make_cfg(assets, tmp_path / "run", "kd", models=assets.models(assets.teacher_b))
    raises_one_line(ValueError, r"--teacher-cache .* was embedded by .*not this teacher", train.run_train, cfg)
    cfg = make_cfg(assets, tmp_path / "run", "rd", teacher_cache=assets.cache_small)
    raises_one_line(ValueError, r"holds another dataset: student_samples: 150 \(cache\) vs 200 \(now\)",
                    train.run_train, cfg)  # fmt: skip
    assert not os.path.exists(cfg.out_dir)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"resume": True, "lr": 5e-3}, r"another config: lr: 0.002 \(checkpoint\) vs 0.005 \(now\)"),
        ({"resume": False}, r"already holds a run \(checkpoints/\): pass --resume"),
    ],
    ids=["resume-other-lr", "no-resume"],
)
def test_existing_run_is_never_overwritten(change, match, finished_run):
    before = all_bytes(finished_run.out_dir)
    assert {"metrics.jsonl", "student.pt", "config.yaml"} <= set(before)
    assert any(k.startswith("checkpoints/step-") for k in before)
    raises_one_line(ValueError, match, train.run_train, dataclasses.replace(finished_run, **change))
    assert all_bytes(finished_run.out_dir) == before


def test_nan_weight_stops_at_step_one_with_the_terms(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", "kd", weights=RecipeWeights(fd_weight=float("nan")))
    msg = raises_one_line(FloatingPointError, r"non-finite loss at step 1: ", train.run_train, cfg)
    assert "'fd_loss': nan" in msg and "'task_loss': " in msg and "'crd_loss': " in msg
    assert checkpoint.newest(os.path.join(cfg.out_dir, "checkpoints")) is None
    assert not os.path.exists(os.path.join(cfg.out_dir, "student.pt"))


def test_nan_midway_keeps_the_last_good_checkpoint(assets, tmp_path, monkeypatch):
    """A batch that turns the loss to NaN at step 3 (checkpoints every 2 steps): the run stops naming step 3 and its
    terms, the newest checkpoint is byte for byte the step-2 one, and no student.pt is written."""
    cfg = make_cfg(assets, tmp_path / "run", "rd", steps=6, ckpt_every=2)
    ckpt = checkpoint.path_of(os.path.join(cfg.out_dir, "checkpoints"), 2)
    snapshot = {}

    class Poisoned(BatchBuilder):
        calls = 0

        def __call__(self, rows, epochs=None):
            batch = super().__call__(rows, epochs)
            Poisoned.calls += 1
            if Poisoned.calls == 3:  # step 3's batch: the step-2 checkpoint is on disk
                with open(ckpt, "rb") as f:
                    snapshot["latest"] = f.read()
                batch["image"] = torch.full_like(batch["image"], float("nan"))
            return batch

    monkeypatch.setattr(train, "BatchBuilder", Poisoned)
    msg = raises_one_line(FloatingPointError, r"non-finite loss at step 3: ", train.run_train, cfg)
    for term in ("task_loss", "hrd_loss", "icl_loss", "fd_loss", "vrd_loss", "xrd_loss"):
        assert f"'{term}': nan" in msg
    with open(ckpt, "rb") as f:
        assert f.read() == snapshot["latest"]
    assert latest(cfg)["step"] == 2
    assert not os.path.exists(os.path.join(cfg.out_dir, "student.pt"))
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# the online teacher, and the trainer on a GPU


def test_online_teacher_feeds_what_the_cache_holds(assets, tmp_path, monkeypatch):
    """--online-teacher (no cache) runs the frozen teacher on each step's batch: the recipe gets the cache's
    features up to the cache's fp16 rounding."""
    seen = spy_recipe(monkeypatch)
    cfg = make_cfg(assets, tmp_path / "run", "kd", steps=1, ckpt_every=1, online_teacher=True, teacher_cache=None)
    train.run_train(cfg)
    ds = student_dataset(cfg)
    rows = np.random.default_rng([cfg.seed, 0]).permutation(len(ds))[:BATCH]
    batch = make_batch(dataclasses.replace(cfg, teacher_cache=assets.cache), ds, rows, None)
    _, _, _, t_img, t_txt, tau_t, _ = seen["calls"][0]["args"]
    for got, want in ((t_img, batch["t_img"]), (t_txt, batch["t_txt"])):
        assert not torch.equal(got, want)  # computed now, not read from the cache
        torch.testing.assert_close(got, want, rtol=0, atol=2.0**-11)  # fp16 keeps 11 bits of a value below 1
    assert float(tau_t) == pytest.approx(teacher_scale(assets), rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe, online", [("baseline", False), ("kd", False), ("rd", True), ("cid", True)])
def test_teacher_recipes_run_on_cuda(recipe, online, assets, tmp_path, monkeypatch):
    """On CUDA (bf16 autocast): a few steps of each kind of run, cached and online teacher, finite and saved."""
    monkeypatch.setattr(torch.cuda, "is_available", _CUDA_IS_AVAILABLE)
    cfg = make_cfg(assets, tmp_path / "run", recipe, steps=3, online_teacher=online)
    summary = train.run_train(cfg)
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 3 and all(math.isfinite(r["loss"]) for r in lines)
    assert summary["final"]["step"] == 3 and latest(cfg)["step"] == 3


# ---------------------------------------------------------------------------------------------------------------
# cid with --cd-topk: MLCD's multi-label cluster term on topk.npy


@pytest.fixture(scope="module")
def cluster_topk(assets, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("cluster_topk"))
    keep = os.path.join(assets.balance, f"keep_eps{BALANCE_EPS:g}.npy")
    run_cluster(os.path.join(assets.cache, "image"), out, N_CLASSES, keep=keep, niter=5, topk=3)
    return out


@pytest.mark.parametrize("k", [2, 3], ids=["k<K", "k=K"])
def test_cd_topk_feeds_the_k_nearest_centres_to_the_multi_label_term(k, assets, cluster_topk, tmp_path, monkeypatch):
    """One cid step with --cd-topk k (topk.npy has 3 columns): the recipe gets each row's first k columns of
    topk.npy (by the batch's cache rows, read here independently) and its cluster term is reference.mlcd_loss
    (mean over rows) of what it was fed."""
    cfg = make_cfg(assets, tmp_path / "run", "cid", steps=1, ckpt_every=1, cluster_dir=cluster_topk,
                   weights=RecipeWeights(cd_topk=k))  # fmt: skip
    seen = spy_recipe(monkeypatch)
    train.run_train(cfg)
    img, _, _, _, _, _, labels = seen["calls"][0]["args"]
    ds = student_dataset(cfg)
    index, _ = training_rows(cfg, ds)
    rows_ds = index[np.random.default_rng([cfg.seed, 0]).permutation(len(index))[:BATCH]]
    cache = read_cache(cfg.teacher_cache)
    rows = [cache["row"][int(ds.ids[i])] for i in rows_ds]
    topk = np.load(os.path.join(cluster_topk, "topk.npy"))
    assert labels.shape == (BATCH, k) and torch.equal(labels, torch.from_numpy(topk[rows, :k]))
    init = seen["init"]
    proj = img.double() @ init["proj_image.weight"].double().T
    w = RecipeWeights()
    expected = w.cd_weight * R.mlcd_loss(proj, init["cluster.centres"].double(), labels, w.cd_scale, 1.0, w.cd_margin)
    assert seen["calls"][0]["terms"]["cluster_loss"] == pytest.approx(expected.mean().item(), rel=1e-5)


@pytest.mark.parametrize(
    "k, which, match",
    [
        (4, "topk", r"--cd-topk 4: .*topk.npy is \(200, 3\), expected \[200, >= 4\]"),
        (2, "plain", r"--cd-topk 2: --cluster-dir .* has no topk.npy; rerun clipcid-fast cluster with --topk 2"),
        (-1, "topk", r"--cd-topk must be an integer >= 0, got -1"),
    ],
)
def test_cd_topk_bad_inputs(k, which, match, assets, cluster_topk, tmp_path):
    cluster = cluster_topk if which == "topk" else assets.cluster
    cfg = make_cfg(assets, tmp_path / "run", "cid", cluster_dir=cluster, weights=RecipeWeights(cd_topk=k))
    raises_one_line(ValueError, match, train.run_train, cfg)
