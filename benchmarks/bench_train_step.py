"""One training step, end to end: this trainer (cached teacher, fused or reference losses) against open_clip_train.

    cd /work/main && .venv/bin/python benchmarks/bench_train_step.py --threads 1   # the recorded run (45 min loaded)
    .venv/bin/python benchmarks/bench_train_step.py --quick --csv /tmp/ts.csv    # smoke: 2-2.5 min on 2 cores
    .venv/bin/python benchmarks/bench_train_step.py --table-only                 # table + goals of the CSV, plot

Providers, each timing one optimiser step on the same global batch (same images, same
tokens, same initial student weights, same AdamW hyper-parameters, gradient clipping and schedule):

* ``fused`` (a): ``clipcid_fast.pipeline.train.prepare(cfg).step(batch)`` with ``impl="auto"`` (the fused
  losses) and the teacher's features read from a ``clipcid-fast embed`` cache (``--teacher-cache``);
* ``reference`` (b): the same step with ``impl="reference"`` (the eager reference losses);
* ``open_clip_train`` (c): open_clip_train's own loop, ``open_clip_train.train.train_one_epoch`` over a
  one-batch loader, with its online teacher (``--distill-model`` / ``--distill-pretrained``, a local .pt) and
  the stock ``open_clip.loss.DistillClipLoss`` (``create_loss``); models from ``create_model_and_transforms``
  (the student's initial weights given as ``--pretrained``, the same file the trainer starts from), the
  optimizer built as ``open_clip_train.main`` builds it (AdamW, no weight decay on gains, biases and the
  logit scale), ``cosine_lr``. Only the ``distill`` recipe exists there.

Model pairs (``--pairs``): ``default`` (the pipeline's default student and teacher, 32-px Fashion-MNIST; the
teacher is the trained, cached default teacher when ``~/.cache/clipcid_fast`` / ``$CLIPCID_CACHE`` holds it,
else the same architecture with random weights: the note says which), ``vit`` (stock open_clip ViT-S-32
student, ViT-B-32 teacher, random weights, 224 px: heavy on a CPU, so small batches and few repeats) and
``tiny`` (the default student with a small random 384-d ViT teacher: ``--quick`` and the tests).

Per row (long format, ``benchmarks/_harness.COLUMNS``; op ``train_step_<pair>``, provider ``<provider>:<recipe>``):

* mode ``step``, x = global batch B: p20 / p50 / p80 of the step time (``time_fn`` per call, the providers of
  a row in turns after ``--warmup`` rounds, so a change of load hits all of them; the batch is built before,
  outside the timed region, by the trainer's own ``prepare(...).batch(0)``), ``peak_mb`` the extra
  memory of one (the first) step in a fresh process (``peak_memory``: VmHWM − RSS after building everything;
  it includes AdamW's state, created in the first step); the note has ``samples_s`` = 1000·B / p50,
  ``loss_ms`` and ``loss_share`` (the loss's forward + backward alone on the same batch's features / p50 of
  the step), ``baseline_mb`` and ``total_mb`` (baseline + peak: the process's peak RSS during the step);
* mode ``loss``: the loss forward + backward alone (the features computed once without gradients, then made
  leaves that require grad; for (a)/(b) the recipe's module, for (c) ``DistillClipLoss``), p20 / p50 / p80;
* mode ``memory``: the fresh-process memory of one step at the sizes of the largest-batch fit, (a) with gradient
  accumulation (``accum_freq`` micro-batches of a fixed size, the note says which) and (c) at
  ``accum_freq = 1`` (open_clip_train refuses accumulation with distillation); ``peak_mb`` = total MB;
* mode ``max_batch``: total_mb(B) = c0 + c1·B + c2·B² solved for 24e9 bytes (x_name ``B_pred``, ``peak_mb`` =
  24000), and one point the machine can afford, run in a fresh process (x_name ``B_verified``, ``peak_mb`` = the
  measured total). The point: the largest doubling of the series' last B whose memory (the series' quadratic,
  c1, c2 ≥ 0) stays under ``--verify-mb`` (8000 MB, and half of what is free) and whose step time (the same
  model on the children's times) under ``--verify-seconds``. The model (``choose_fit``): of the lines through
  the series' largest k ≥ 2 points and the quadratics through its largest k ≥ 3, the one that predicted the
  verified point best, refitted with it (at small B the first step's AdamW state, not the batch, sets the
  peak: a plateau, then the batch's slope); the note has that model, its error at the point and the
  series-only prediction. ``--refit`` recomputes these rows from a CSV's memory and verified rows.

The plot (``--plot``, default ``train_step.png`` beside the CSV): per pair, the distill step's samples/s against
B for (a), (b), (c); every recipe's samples/s and loss share at one B; the memory points, the model and its
24 GB crossing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import copy
import dataclasses
import importlib.metadata
import json
import math
import os
import time

import numpy as np
import torch

from benchmarks._harness import (
    MB,
    append_rows,
    apply_common,
    common_args,
    device_name,
    latest_rows,
    load_note,
    peak_memory,
    read_rows,
    time_fn,
    timed_row,
)
from benchmarks.memory_fit import LIMIT_MB, choose_fit, fit_memory, fit_txt, predict_mb, solve_batch
from benchmarks.train_step_plot import PROVIDER_LETTER, PROVIDERS, RECIPES, SWITCHED, make_plot
from benchmarks.train_step_plot import number as _f
from benchmarks.train_step_plot import parse_note as _parse_note

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
FACTORY = "benchmarks.bench_train_step:step_factory"
SEED = 0
# one set of optimiser hyper-parameters for both loops (the trainer's defaults)
HP = {"lr": 2e-3, "wd": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "grad_clip": 1.0, "warmup": 10, "steps": 1000}


# ---------------------------------------------------------------------------------------------------------------
# model pairs and their files (teacher weights, the student's initial weights, the teacher cache, pseudo-classes)


@dataclasses.dataclass(frozen=True)
class PairSpec:
    name: str
    corpus: int  # images of the student corpus (the cache and the batches; batches larger than it wrap)
    n_classes: int  # cid's pseudo-classes
    label: str


PAIRS = {
    "default": PairSpec("default", 4096, 100, "default student / default teacher (32 px)"),
    "vit": PairSpec("vit", 256, 100, "ViT-S-32 student / ViT-B-32 teacher, random weights (224 px)"),
    "tiny": PairSpec("tiny", 128, 16, "default student / tiny random 384-d ViT teacher (32 px)"),
}


@dataclasses.dataclass
class Assets:
    """Everything a provider needs, as plain strings (it crosses into the memory-measuring child)."""

    pair: str
    root: str
    models: dict  # ModelConfig fields of the trainer
    data: dict  # DataConfig fields
    cache: str  # clipcid-fast embed output of the teacher on the corpus
    cluster: str  # run_cluster output (cid)
    oc_student: str  # open_clip model name of the student (stock, or registered from a JSON here)
    oc_student_pt: str  # its initial weights (what the trainer's student starts from)
    oc_teacher: str
    oc_teacher_pt: str
    oc_configs: list  # JSON configs to register with open_clip.add_model_config
    teacher_note: str


def tiny_teacher_cfg() -> dict:
    from clipcid_fast.pipeline import models

    text = {"hf_tokenizer_name": models.minilm_path(), "vocab_size": 30522, "context_length": 16, "width": 64,
            "heads": 2, "layers": 1, "pool_type": "eos", "eos_id": 102, "pad_id": 0}  # fmt: skip
    vision = {"layers": 1, "width": 64, "head_width": 32, "patch_size": 8, "image_size": 32, "mlp_ratio": 2,
              "pool_type": "avg"}  # fmt: skip
    return {"embed_dim": 384, "vision_cfg": vision, "text_cfg": text}


def _default_teacher_cached(mc, dc) -> bool:
    """Whether the default teacher's trained image tower is in its cache (else it would train for minutes)."""
    from clipcid_fast.pipeline import models

    return os.path.isfile(models.default_teacher_cache(models.default_teacher_cfg(mc.context_length), mc, dc)[0])


def _save_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def _save_weights(path: str, model: torch.nn.Module) -> None:
    if not os.path.isfile(path):
        tmp = path + ".tmp"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)


def build_assets(pair: str, work_dir: str | os.PathLike, *, progress: bool = False) -> Assets:
    """The pair's files under ``work_dir/<pair>`` (reused when present): weights, configs, cache, cluster."""
    from clipcid_fast.pipeline import models
    from clipcid_fast.pipeline.assets import resolved
    from clipcid_fast.pipeline.balance import run_cluster
    from clipcid_fast.pipeline.config import DataConfig, EmbedConfig, ModelConfig
    from clipcid_fast.pipeline.embed import run_embed

    spec = PAIRS[pair]
    root = os.path.abspath(os.path.join(work_dir, pair))
    os.makedirs(root, exist_ok=True)
    p = lambda *names: os.path.join(root, *names)  # noqa: E731
    data = {"student_samples": spec.corpus}
    dc = DataConfig(**data)
    oc_configs = []
    if pair == "vit":
        import open_clip

        t_pt = p("vit-b-32-random.pt")
        if not os.path.isfile(t_pt):
            torch.manual_seed(1)
            _save_weights(t_pt, open_clip.create_model("ViT-B-32"))
        mdict = {"student": "ViT-S-32", "teacher": "ViT-B-32", "teacher_weights": t_pt}
        oc_student, oc_teacher, note = "ViT-S-32", "ViT-B-32", "ViT-B-32 random weights"
    else:
        if pair == "default" and _default_teacher_cached(ModelConfig(), dc):
            mdict, note = {}, "default teacher, trained (cached)"
        else:
            cfg = models.default_teacher_cfg(16) if pair == "default" else tiny_teacher_cfg()
            _save_json(p("teacher.json"), cfg)
            torch.manual_seed(1)
            _save_weights(p("teacher-random.pt"), models.build_open_clip(cfg, which="teacher"))
            mdict = {"teacher": p("teacher.json"), "teacher_weights": p("teacher-random.pt")}
            note = "default teacher architecture, random weights" if pair == "default" else "tiny teacher, random"
        teacher = models.load_model(ModelConfig(**mdict), "teacher", progress=progress, data_cfg=dc)
        oc_teacher = f"bts-{pair}-teacher"
        # plain open_clip reads these two: the text asset as this machine's folder, not by its name
        _save_json(p(f"{oc_teacher}.json"), resolved(teacher.model_cfg, "teacher"))
        _save_weights(p(f"{oc_teacher}.pt"), teacher.model)
        t_pt = p(f"{oc_teacher}.pt")
        oc_student = f"bts-{pair}-student"
        _save_json(p(f"{oc_student}.json"), resolved(models.default_student_cfg(16), "student"))
        oc_configs = [p(f"{oc_teacher}.json"), p(f"{oc_student}.json")]
    mc = ModelConfig(**mdict)
    student = models.load_model(mc, "student", seed=SEED, data_cfg=dc)  # what the trainer starts from
    s_pt = p(f"student-init-seed{SEED}-{student.fingerprint[:12]}.pt")
    _save_weights(s_pt, student.model)
    cache = p("cache")
    run_embed(EmbedConfig(out_dir=cache, batch_size=256, progress=progress, data=dc, models=mc))
    cluster = p(f"cluster-n{spec.n_classes}")
    if not os.path.isfile(os.path.join(cluster, "cluster.json")):
        run_cluster(os.path.join(cache, "image"), cluster, spec.n_classes, niter=10, seed=SEED)
    return Assets(pair, root, mdict, data, cache, cluster, oc_student, s_pt, oc_teacher, t_pt, oc_configs, note)


# ---------------------------------------------------------------------------------------------------------------
# (a), (b): the trainer's step


def train_config(assets: Assets, recipe: str, impl: str, batch: int, accum: int = 1, **switches):
    from clipcid_fast.pipeline.config import DataConfig, ModelConfig, TrainConfig
    from clipcid_fast.recipes import RECIPES as TABLE

    return TrainConfig(
        out_dir=os.path.join(assets.root, "unused-out"),
        recipe=recipe,
        teacher_cache=assets.cache if TABLE[recipe].teacher else None,
        cluster_dir=assets.cluster if TABLE[recipe].labels else None,
        steps=HP["steps"],
        batch_size=batch,
        accum_freq=accum,
        lr=HP["lr"],
        wd=HP["wd"],
        beta1=HP["beta1"],
        beta2=HP["beta2"],
        eps=HP["eps"],
        warmup=HP["warmup"],
        grad_clip=HP["grad_clip"],
        eval_every=0,
        ckpt_every=HP["steps"],
        impl=impl,
        dedup_captions=False,  # real captions are distinct; the 60 Fashion-MNIST captions would flatter (a)/(b)
        progress=False,
        seed=SEED,
        data=DataConfig(**assets.data),
        models=ModelConfig(**assets.models),
        **switches,
    )


class TrainerStep:
    """``prepare(cfg).step(batch)``: one full optimiser step of this trainer on a prebuilt batch."""

    def __init__(self, cfg, report: str | None = None, keep_teacher: bool = True) -> None:
        from clipcid_fast.pipeline.train import prepare

        self.cfg = cfg
        self.p = prepare(cfg)
        if not keep_teacher:  # timing only: the cached-teacher step never uses it (its memory run keeps it)
            self.p.teacher = None
        self.batch = self.p.batch(0)
        self.report = report
        self.last: dict = {}

    def __call__(self):
        t0 = time.perf_counter()
        out = self.p.step(self.batch)  # {term: 0-d tensor, grad_norm, logit_scale}
        if self.report is not None:  # reading the terms back is a host sync: only in the memory child
            terms = {k: float(v) for k, v in out.items() if k not in ("grad_norm", "logit_scale")}
            self.values = {**terms, "loss": sum(terms.values())}
            _report(self.report, time.perf_counter() - t0, self.values)
        else:
            self.last = out

    def loss_values(self) -> dict:
        """The terms of the last step (``loss`` = their sum) as floats."""
        terms = {k: float(v) for k, v in self.last.items() if k not in ("grad_norm", "logit_scale")}
        return {**terms, "loss": sum(terms.values())}

    def loss_only(self):
        """A callable with ``setup``: the recipe's forward + backward alone on this batch's features."""
        p, b = self.p, self.batch
        dev = p.device
        with torch.no_grad():
            img = p.model.encode_image(b["image"].to(dev)).float()
            txt = p.model.encode_text(b["text"].to(dev)).float()
        t_img = b["dist_image"].to(dev) if "dist_image" in b else None
        t_txt = b["dist_text"].to(dev) if "dist_text" in b else None
        labels = b["cluster_label"].to(dev) if "cluster_label" in b else None
        leaves = [img.clone().requires_grad_(True), txt.clone().requires_grad_(True)]

        class LossOnly:
            def setup(self):
                for x in leaves:
                    x.grad = None

            def __call__(self):
                terms = p.step.loss_terms(leaves[0], leaves[1], p.model.logit_scale.exp(), t_img, t_txt, labels)
                sum(terms.values()).backward()

        return LossOnly()


def _report(path: str | None, seconds: float, values: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"seconds": seconds, "values": values}, f)


# ---------------------------------------------------------------------------------------------------------------
# (c): open_clip_train's loop with its online teacher and stock DistillClipLoss


class _OneBatch:
    """The loader ``train_one_epoch`` iterates: one (images, texts) batch per epoch."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        self.images, self.texts = images, texts
        self.num_batches = 1
        self.num_samples = images.shape[0]

    def __iter__(self):
        yield self.images, self.texts


def pipeline_batch(assets: Assets, batch: int) -> dict:
    """The trainer's step-0 batch (images after the student's preprocess, tokens), built by the pipeline's
    ``SampleStream`` / ``BatchBuilder`` without a teacher: (c) trains on exactly what (a) does."""
    from clipcid_fast.pipeline import data, models
    from clipcid_fast.pipeline.batches import BatchBuilder, SampleStream
    from clipcid_fast.pipeline.config import DataConfig, ModelConfig

    dc = DataConfig(**assets.data)
    student = models.load_model(ModelConfig(**assets.models), "student", seed=SEED, data_cfg=dc)
    ds = data.build_dataset(dc, student.preprocess, student.tokenizer)
    builder = BatchBuilder(ds, np.arange(len(ds)), None, None)
    return builder(SampleStream(len(ds), batch, SEED).rows(0))


def open_clip_train_args(assets: Assets, batch: int, device: torch.device):
    from open_clip_train.params import parse_args

    precision = "amp_bf16" if device.type == "cuda" else "fp32"  # the trainer's precision="auto"
    argv = ["--model", assets.oc_student, "--pretrained", assets.oc_student_pt,
            "--distill-model", assets.oc_teacher, "--distill-pretrained", assets.oc_teacher_pt,
            "--batch-size", str(batch), "--precision", precision, "--epochs", "1", "--seed", str(SEED),
            "--lr", str(HP["lr"]), "--wd", str(HP["wd"]), "--beta1", str(HP["beta1"]), "--beta2", str(HP["beta2"]),
            "--eps", str(HP["eps"]), "--warmup", str(HP["warmup"]), "--grad-clip-norm", str(HP["grad_clip"]),
            "--dataset-type", "synthetic", "--log-every-n-steps", "1000000"]  # fmt: skip
    args = parse_args(argv)
    # what open_clip_train.main sets up before it trains (one process, no DDP)
    args.device = str(device)
    args.distill = True
    args.wandb = args.tensorboard = False
    args.distributed, args.world_size, args.rank, args.local_rank = False, 1, 0, 0
    return args


class OpenClipTrainStep:
    """One step of ``open_clip_train.train.train_one_epoch`` (online teacher, stock ``DistillClipLoss``)."""

    def __init__(self, assets: Assets, batch: int, device: str | torch.device = "cpu", *, images=None, texts=None,
                 report: str | None = None) -> None:  # fmt: skip
        import open_clip
        from open_clip_train.data import DataInfo
        from open_clip_train.scheduler import cosine_lr

        dev = torch.device(device)
        for path in assets.oc_configs:
            open_clip.add_model_config(path)
        if images is None:
            b = pipeline_batch(assets, batch)
            images, texts = b["image"], b["text"]
        self.args = args = open_clip_train_args(assets, batch, dev)
        self.model, _, _ = open_clip.create_model_and_transforms(
            args.model, args.pretrained, precision=args.precision, device=dev, output_dict=True
        )
        self.dist_model, _, _ = open_clip.create_model_and_transforms(
            args.distill_model, args.distill_pretrained, precision=args.precision, device=dev, output_dict=True
        )
        # open_clip_train.main's AdamW: no weight decay on 1-D parameters, gains, biases and the logit scale
        named = [(n, q) for n, q in self.model.named_parameters() if q.requires_grad]
        no_wd = lambda n, q: q.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        self.optimizer = torch.optim.AdamW(
            [{"params": [q for n, q in named if no_wd(n, q)], "weight_decay": 0.0},
             {"params": [q for n, q in named if not no_wd(n, q)], "weight_decay": args.wd}],
            lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
        )  # fmt: skip
        self.scheduler = cosine_lr(self.optimizer, args.lr, args.warmup, HP["steps"])
        self.loss = open_clip.create_loss(args)
        self.last: dict = {}
        self.loss.register_forward_hook(self._record)
        self.data = {"train": DataInfo(dataloader=_OneBatch(images.to(dev), texts.to(dev)))}
        self.epoch = 0
        self.report = report
        self.device = dev

    def _record(self, module, inputs, output):
        self.last = {k: v.detach() for k, v in output.items()}  # a copy: the loop adds "loss" to that dict later

    def loss_values(self) -> dict:
        """The loss terms of the last step (``loss`` = their sum, as the loop logs it) as floats."""
        terms = {k: float(v) for k, v in self.last.items()}
        return {**terms, "loss": sum(terms.values())}

    def __call__(self):
        from open_clip_train.train import train_one_epoch

        t0 = time.perf_counter()
        train_one_epoch(self.model, self.data, self.loss, self.epoch, self.optimizer, None, self.scheduler,
                        self.dist_model, self.args)  # fmt: skip
        self.epoch += 1  # one batch per "epoch": the schedule advances one step per call
        if self.report is not None:
            _report(self.report, time.perf_counter() - t0, self.loss_values())

    def loss_only(self):
        """``DistillClipLoss`` forward + backward alone on this batch's student (leaf) and teacher features."""
        loader = self.data["train"].dataloader
        with torch.no_grad():
            out = self.model(loader.images, loader.texts)
            dist = self.dist_model(loader.images, loader.texts)
        leaves = {k: out[k].clone().requires_grad_(True) for k in ("image_features", "text_features")}
        inputs = {f"dist_{k}": v for k, v in dist.items() if k != "logit_bias"}
        loss, model = self.loss, self.model

        class LossOnly:
            def setup(self):
                for x in leaves.values():
                    x.grad = None

            def __call__(self):
                losses = loss(**leaves, logit_scale=model.logit_scale.exp(), **inputs, output_dict=True)
                sum(losses.values()).backward()

        return LossOnly()


# ---------------------------------------------------------------------------------------------------------------
# the factory of the fresh-process memory runs


def make_step(provider: str, assets: Assets, recipe: str, batch: int, *, accum: int = 1, device="cpu",
              report: str | None = None, keep_teacher: bool = True):  # fmt: skip
    if provider == "open_clip_train":
        if recipe != "distill" or accum != 1:
            raise ValueError("open_clip_train: only the distill recipe, at accum_freq 1 (its main() asserts it)")
        return OpenClipTrainStep(assets, batch, device, report=report)
    impl = "reference" if provider == "reference" else "auto"
    switches = {"grad_checkpointing": provider == "fused+gc", "torchcompile": provider == "fused+compile"}
    return TrainerStep(train_config(assets, recipe, impl, batch, accum, **switches), report=report,
                       keep_teacher=keep_teacher)  # fmt: skip


def step_factory(*, provider: str, assets: dict, recipe: str, batch: int, accum: int = 1, device: str = "cpu",
                 report: str | None = None, mode: str = "step"):  # fmt: skip
    """``peak_memory``'s factory (runs in the spawned child): everything built, the step not yet run.

    The heap's free memory is given back to the OS before the measurement (``malloc_trim``): loading weights
    and building the data free hundreds of MB that glibc keeps, and a step that reuses them raises no peak, so
    small batches would look cheaper than they are (the ViT pair's (c) grew 11, 27, 51 MB per sample at
    B = 8 → 16 → 32 → 64 without it)."""
    step = make_step(provider, Assets(**assets), recipe, batch, accum=accum, device=device, report=report)
    release_free_heap()
    return step


def release_free_heap() -> None:
    """``gc.collect()`` and glibc's ``malloc_trim(0)`` (a no-op elsewhere): the resident set is then live memory."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_memory(provider: str, assets: Assets, recipe: str, batch: int, *, accum: int = 1, device, threads: int):
    """One step in a fresh process: {peak_mb (extra), baseline_mb, total_mb, seconds, values, method, error}."""
    report = os.path.join(assets.root, f"report-{os.getpid()}-{time.time_ns()}.json")
    kwargs = dict(provider=provider, assets=dataclasses.asdict(assets), recipe=recipe, batch=batch, accum=accum,
                  device=str(device), report=report)  # fmt: skip
    res = peak_memory(FACTORY, kwargs, "step", device=device, threads=threads)
    res["total_mb"] = res["peak_mb"] + res["baseline_mb"]
    try:
        with open(report) as f:
            res.update(json.load(f))
        os.remove(report)
    except OSError:
        res.setdefault("seconds", float("nan"))
    return res


# ---------------------------------------------------------------------------------------------------------------
# the largest batch: the memory model is benchmarks/memory_fit.py's


def mem_available_mb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------------------------------------------------------
# plans: which sizes per pair


@dataclasses.dataclass
class Plan:
    batches: list  # B of the step rows (every provider)
    recipe_batches: list  # B of the rows of the other recipes ((a), (b))
    repeats: int
    fit_a: list  # B of (a)'s memory series (accum with micro-batch micro_a)
    micro_a: int
    fit_c: list  # B of (c)'s memory series
    memory_rows: bool = True  # fresh-process memory for every step row (else only for distill)


def plans(quick: bool) -> dict:
    if quick:
        return {"tiny": Plan([16, 32], [32], 2, [32, 64], 16, [], memory_rows=False)}
    return {
        "default": Plan([256, 1024, 2048], [1024], 3, [2048, 4096, 8192], 512, [4096]),
        "vit": Plan([8, 16, 32], [8], 2, [16, 32, 64], 8, [64], memory_rows=False),
    }


# ---------------------------------------------------------------------------------------------------------------
# the run


def _versions() -> str:
    out = []
    for pkg in ("open_clip_torch", "clipcid_fast"):
        try:
            out.append(f"{pkg}={importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return " ".join(out)


def _note(**kw) -> str:
    parts = []
    for k, v in kw.items():
        if v is None:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "; ".join(parts)


def _mem_fields(mem: dict | None) -> dict:
    if not mem:
        return {}
    out = {"baseline_mb": round(mem["baseline_mb"], 1), "total_mb": round(mem["total_mb"], 1),
           "mem_method": mem.get("method")}  # fmt: skip
    if mem.get("error"):
        out["mem_error"] = mem["error"][:120]
    return out


def time_interleaved(fns: dict, *, warmup: int, repeats: int, device) -> dict:
    """``time_fn`` per call, round robin over ``fns`` (``warmup`` untimed rounds first), so that a change of the
    machine's load hits every provider of a row alike; {name: {"p20", "p50", "p80", "times_ms", "repeats"}}."""
    times: dict = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t = time_fn(fn, warmup=0, repeats=1, device=device)["times_ms"][0]
            if r >= warmup:
                times[name].append(t)
    out = {}
    for name, ts in times.items():
        q = np.quantile(np.asarray(ts), [0.2, 0.5, 0.8])  # linear interpolation, as time_fn
        out[name] = {"p20": float(q[0]), "p50": float(q[1]), "p80": float(q[2]), "times_ms": ts, "repeats": len(ts)}
    return out


def run_step_rows(pair: str, assets: Assets, plan: Plan, args, device, providers, recipes, log, memo: dict):
    """The step and loss rows; every fresh-process memory result goes into ``memo[(provider, recipe, B, accum)]``.

    At each (recipe, B) every provider's step is built first, then timed call by call in turns (and the losses
    alone the same way), then each one's memory is measured in its own fresh process."""
    rows = []
    op = f"train_step_{pair}"
    for recipe in recipes:
        for batch in plan.batches if recipe == "distill" else plan.recipe_batches:
            provs = [p for p in providers if p != "open_clip_train" or recipe == "distill"]
            t0 = time.perf_counter()
            steps = {prov: make_step(prov, assets, recipe, batch, device=device, keep_teacher=False) for prov in provs}
            timing = time_interleaved(steps, warmup=args.warmup, repeats=plan.repeats, device=device)
            loss_fns = {prov: step.loss_only() for prov, step in steps.items()}
            loss_t = time_interleaved(loss_fns, warmup=1, repeats=max(3, plan.repeats), device=device)
            del steps, loss_fns
            load = load_note()
            for provider in provs:
                mem = None
                if not args.no_memory and (plan.memory_rows or recipe == "distill"):
                    mem = measure_memory(provider, assets, recipe, batch, device=device, threads=args.threads)
                    memo[provider, recipe, batch, 1] = mem
                tm, lt = timing[provider], loss_t[provider]
                share = lt["p50"] / tm["p50"]
                sps = 1000.0 * batch / tm["p50"]
                common = dict(pair=pair, models=PAIRS[pair].label, teacher=_teacher_kind(provider, recipe),
                              teacher_weights=assets.teacher_note, accum=1)  # fmt: skip
                note = _note(provider=PROVIDER_LETTER[provider], samples_s=sps, loss_ms=lt["p50"], loss_share=share,
                             **_mem_fields(mem), **common, repeats=tm["repeats"], warmup=args.warmup,
                             timing="interleaved with the row's other providers", versions=_versions(),
                             load=load)  # fmt: skip
                rows.append(timed_row(op, f"{provider}:{recipe}", "step", "B", batch, tm, device=device,
                                      note=note, peak_mb=mem["peak_mb"] if mem else None))  # fmt: skip
                rows.append(timed_row(op, f"{provider}:{recipe}", "loss", "B", batch, lt, device=device,
                                      note=_note(provider=PROVIDER_LETTER[provider], share_of_step=share, **common,
                                                 load=load)))  # fmt: skip
                log(
                    f"{op} {provider}:{recipe} B={batch}: {tm['p50']:.0f} ms ({sps:.0f} samples/s), loss "
                    f"{lt['p50']:.0f} ms ({100 * share:.0f} %), peak "
                    f"{mem['peak_mb'] if mem else float('nan'):.0f} MB  [{time.perf_counter() - t0:.0f} s]"
                )
    return rows


def _teacher_kind(provider: str, recipe: str) -> str:
    if recipe == "baseline":
        return "none"
    return "online" if provider == "open_clip_train" else "cached"


def run_max_batch(pair: str, assets: Assets, plan: Plan, args, device, providers, log, memo: dict) -> list[dict]:
    """(a) with accumulation (micro-batch plan.micro_a) and (c) at accum 1: memory series, fit, verify.

    (c)'s series also uses the step rows' memory runs (the same configuration), from ``memo``."""
    rows = []
    op = f"train_step_{pair}"
    series = []
    if "fused" in providers:
        series.append(("fused", sorted(plan.fit_a), plan.micro_a))
    if "open_clip_train" in providers:
        have = {b for (prov, rec, b, acc) in memo if prov == "open_clip_train" and rec == "distill" and acc == 1}
        series.append(("open_clip_train", sorted(set(plan.fit_c) | have), None))
    for provider, batches, micro in series:
        totals, seconds = [], []
        for batch in batches:
            accum = max(1, batch // micro) if micro else 1
            key = (provider, "distill", batch, accum)
            mem = memo.get(key)
            if mem is None:
                mem = memo[key] = measure_memory(provider, assets, "distill", batch, accum=accum, device=device,
                                                 threads=args.threads)  # fmt: skip
            totals.append(mem["total_mb"])
            seconds.append(mem.get("seconds", float("nan")))
            note = _note(provider=PROVIDER_LETTER[provider], accum=accum, micro_batch=batch // accum,
                         seconds=mem.get("seconds"), extra_mb=round(mem["peak_mb"], 1), **_mem_fields(mem),
                         what="peak_mb = total (baseline + extra) of one step in a fresh process",
                         load=load_note())  # fmt: skip
            rows.append(dict(op=op, provider=f"{provider}:distill", mode="memory", x_name="B", x_value=batch,
                             peak_mb=mem["total_mb"], device=str(device), note=note))  # fmt: skip
            log(
                f"{op} memory {provider} B={batch} accum={accum}: total {mem['total_mb']:.0f} MB "
                f"(extra {mem['peak_mb']:.0f}), {mem.get('seconds', float('nan')):.1f} s"
            )
        c = fit_memory(batches, totals)  # the conservative model that picks the point to verify
        log(f"{op} max batch {provider}: series fit {fit_txt(c)} -> B = {solve_batch(c):,.0f} at 24 GB")
        # verify the largest affordable batch: memory under --verify-mb (and half of what is free), time under
        # --verify-seconds (the children's step times, extrapolated with the same quadratic model)
        avail = mem_available_mb()
        budget = min(args.verify_mb, 0.5 * avail) if math.isfinite(avail) else args.verify_mb
        ts = fit_memory(batches, seconds)
        b_v = _verify_point(batches, c, ts, budget, args.verify_seconds, solve_batch(c), micro or 1)
        verified = None
        if b_v is not None and not (args.no_verify or args.quick):
            accum = max(1, b_v // micro) if micro else 1
            mem = measure_memory(provider, assets, "distill", b_v, accum=accum, device=device, threads=args.threads)
            verified = {"batch": b_v, "total_mb": mem["total_mb"], "accum": accum, "seconds": mem.get("seconds"),
                        "mem": mem, "chosen_by": fit_txt(c)}  # fmt: skip
            log(f"{op} max batch {provider}: verified B={b_v}: {mem['total_mb']:.0f} MB measured, "
                f"{predict_mb(c, b_v):.0f} predicted by the series' quadratic")  # fmt: skip
        else:
            log(f"{op} max batch {provider}: no point verified")
        new_rows = max_batch_rows(op, provider, batches, totals, micro, verified, device)
        rows += new_rows
        log(f"{op} max batch {provider}: {new_rows[-1]['note']}")
    return rows


def max_batch_rows(op, provider, batches, totals, micro, verified: dict | None, device, load=None) -> list[dict]:
    """The ``max_batch`` rows: ``B_verified`` (measured total, the chosen series model's prediction there) and
    ``B_pred`` (that model refitted with the verified point, solved for 24e9 bytes)."""
    fit = choose_fit(batches, totals, (verified["batch"], verified["total_mb"]) if verified else None)
    rows = []
    letter = PROVIDER_LETTER[provider]
    load = load or load_note()
    if verified:
        b_v, pred = verified["batch"], predict_mb(fit["series_c"], verified["batch"])
        extra = _mem_fields(verified["mem"]) if verified.get("mem") else {}
        rows.append(dict(op=op, provider=f"{provider}:distill", mode="max_batch", x_name="B_verified", x_value=b_v,
                         peak_mb=verified["total_mb"], device=str(device),
                         note=_note(provider=letter, kind="verified", predicted_mb=pred,
                                    error_pct=fit["error_pct"], model=fit["model"],
                                    series_fit=fit_txt(fit["series_c"]),
                                    series_points=",".join(map(str, fit["series_points"])), accum=verified["accum"],
                                    micro_batch=b_v // verified["accum"], seconds=verified.get("seconds"),
                                    chosen_by=verified.get("chosen_by"), **extra, load=load)))  # fmt: skip
    b_pred, b_series = solve_batch(fit["c"]), solve_batch(fit["series_c"])
    micro_txt = {"micro_batch": micro, "accum": "B/micro"} if micro else {"accum": 1}
    as_int = lambda b: int(b) if math.isfinite(b) else "inf"  # noqa: E731
    rows.append(dict(op=op, provider=f"{provider}:distill", mode="max_batch", x_name="B_pred", x_value=as_int(b_pred),
                     peak_mb=LIMIT_MB, device=str(device),
                     note=_note(provider=letter, kind="predicted", model=fit["model"], fit=fit_txt(fit["c"]),
                                fit_points=",".join(map(str, fit["points"])), series_fit=fit_txt(fit["series_c"]),
                                series_pred=as_int(b_series), limit="24e9 bytes", **micro_txt,
                                load=load)))  # fmt: skip
    return rows


def refit(csv_path, ops: list[str] | None = None) -> list[dict]:
    """``max_batch`` rows recomputed from the CSV's latest ``memory`` and ``B_verified`` rows (no measurement)."""
    rows = latest_rows([r for r in read_rows(csv_path) if r["op"].startswith("train_step_")],
                       ("op", "provider", "mode", "x_name", "x_value"))  # fmt: skip
    out = []
    for op in sorted({r["op"] for r in rows if not ops or r["op"] in ops}):
        for prov in ("fused:distill", "open_clip_train:distill"):
            mem = sorted([r for r in rows if r["op"] == op and r["provider"] == prov and r["mode"] == "memory"],
                         key=lambda r: _f(r["x_value"]))  # fmt: skip
            if not mem:
                continue
            ver = [r for r in rows if r["op"] == op and r["provider"] == prov and r["x_name"] == "B_verified"]
            verified = None
            if ver:
                n = _parse_note(ver[-1]["note"])
                verified = {"batch": int(ver[-1]["x_value"]), "total_mb": _f(ver[-1]["peak_mb"]),
                            "accum": int(n.get("accum", 1)), "seconds": _f(n.get("seconds")),
                            "chosen_by": n.get("chosen_by") or n.get("series_fit") or n.get("fit")}  # fmt: skip
            micro = _parse_note(mem[0]["note"]).get("micro_batch") if prov.startswith("fused") else None
            out += max_batch_rows(op, prov.split(":")[0], [int(r["x_value"]) for r in mem],
                                  [_f(r["peak_mb"]) for r in mem], int(micro) if micro else None, verified,
                                  mem[-1]["device"], load="refit from the memory rows (no measurement)")  # fmt: skip
    return out


def _verify_point(batches, c, ts, budget_mb, budget_s, b_max, step) -> int | None:
    """The largest doubling of the series' last B whose predicted memory and time fit the budgets (and that
    stays below the predicted largest batch), else 1.5× the last B if that fits, else None."""
    fits = lambda b: predict_mb(c, b) <= budget_mb and predict_mb(ts, b) <= budget_s  # noqa: E731
    b = batches[-1]
    while fits(2 * b) and 2 * b <= b_max:
        b *= 2
    if b > batches[-1]:
        return b
    cand = round(batches[-1] * 1.5 / step) * step
    return cand if fits(cand) else None


# ---------------------------------------------------------------------------------------------------------------
# the plot and the table


def _row_order(r: dict) -> tuple:
    base, recipe = r["provider"].split(":")
    order = {p: i for i, p in enumerate(PROVIDERS)}
    return (r["op"], RECIPES.index(recipe) if recipe in RECIPES else 9, _f(r["x_value"]), order.get(base, 9))


def summary_table(csv_path: str | os.PathLike, ops: list[str] | None = None) -> str:
    """Markdown: per op, provider and B the samples/s, peak MB and loss share; then the largest batches."""
    rows = [r for r in read_rows(csv_path) if r["op"].startswith("train_step_") and (not ops or r["op"] in ops)]
    rows = latest_rows(rows, ("op", "provider", "mode", "x_name", "x_value"))
    lines = ["| models | provider | recipe | B | step p50 ms | samples/s | peak MB (one step) | loss share |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    steps = [r for r in rows if r["mode"] == "step"]
    steps.sort(key=_row_order)
    for r in steps:
        n = _parse_note(r["note"])
        base, recipe = r["provider"].split(":")
        peak = _f(r["peak_mb"])
        peak_txt = f"{peak:,.0f}" if math.isfinite(peak) else "–"
        lines.append(
            f"| {r['op'].removeprefix('train_step_')} | ({PROVIDER_LETTER.get(base, '?')}) {base} | {recipe} "
            f"| {r['x_value']} | {_f(r['p50_ms']):,.0f} | {_f(n.get('samples_s')):,.1f} | {peak_txt} "
            f"| {100 * _f(n.get('loss_share')):.0f} % |"
        )
    lines += ["", "| models | provider | largest B in 24 GB (predicted) | fit on every point (total MB) | verified B "
              "| measured MB | series' prediction there | series alone: largest B |",
              "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for op in sorted({r["op"] for r in rows}):
        for prov in sorted({r["provider"] for r in rows if r["op"] == op and r["mode"] == "max_batch"}):
            pred = [r for r in rows if r["op"] == op and r["provider"] == prov and r["x_name"] == "B_pred"]
            ver = [r for r in rows if r["op"] == op and r["provider"] == prov and r["x_name"] == "B_verified"]
            if not pred:
                continue
            pn = _parse_note(pred[-1]["note"])
            base = prov.split(":")[0]
            how = f"accum, micro-batch {pn.get('micro_batch')}" if pn.get("micro_batch") else "accum 1"
            vb = ver[-1]["x_value"] if ver else "–"
            vm = f"{_f(ver[-1]['peak_mb']):,.0f}" if ver else "–"
            vp = f"{_f(_parse_note(ver[-1]['note']).get('predicted_mb')):,.0f}" if ver else "–"
            sp = f"{_f(pn.get('series_pred')):,.0f}" if pn.get("series_pred") else "–"
            lines.append(f"| {op.removeprefix('train_step_')} | ({PROVIDER_LETTER.get(base, '?')}) {base} ({how}) | "
                         f"{_f(pred[-1]['x_value']):,.0f} | {pn.get('fit')} | {vb} | {vm} | {vp} | {sp} |")  # fmt: skip
    return "\n".join(lines)


def goals(csv_path: str | os.PathLike) -> list[str]:
    """The issue's goals, computed: (a) ≥ 2× (c)'s samples/s at equal B; (a)'s largest batch ≥ 8× (c)'s."""
    rows = latest_rows([r for r in read_rows(csv_path) if r["op"].startswith("train_step_")],
                       ("op", "provider", "mode", "x_name", "x_value"))  # fmt: skip
    out = []
    for op in sorted({r["op"] for r in rows}):
        a = {
            r["x_value"]: r for r in rows if r["op"] == op and r["provider"] == "fused:distill" and r["mode"] == "step"
        }
        c = {r["x_value"]: r for r in rows if r["op"] == op and r["provider"] == "open_clip_train:distill"
             and r["mode"] == "step"}  # fmt: skip
        for b in sorted(set(a) & set(c), key=float):
            ratio = _f(c[b]["p50_ms"]) / _f(a[b]["p50_ms"])
            out.append(f"{op} B={b}: (a)/(c) samples/s = {ratio:.2f}x -> {'MET' if ratio >= 2 else 'NOT met'} (≥ 2x)")
        pa = [r for r in rows if r["op"] == op and r["provider"] == "fused:distill" and r["x_name"] == "B_pred"]
        pc = [
            r for r in rows if r["op"] == op and r["provider"] == "open_clip_train:distill" and r["x_name"] == "B_pred"
        ]
        if pa and pc:
            ratio = _f(pa[-1]["x_value"]) / _f(pc[-1]["x_value"])
            out.append(f"{op}: largest batch (a)/(c) = {ratio:.1f}x -> {'MET' if ratio >= 8 else 'NOT met'} (≥ 8x)")
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[common_args()])  # fmt: skip
    p.set_defaults(csv=RESULTS / "train_step.csv")
    p.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=None,
                   help="model pairs (default: default vit; --quick: tiny)")  # fmt: skip
    p.add_argument(
        "--providers",
        nargs="+",
        choices=PROVIDERS + SWITCHED,
        default=list(PROVIDERS),
        help="fused+gc / fused+compile: (a) with --grad-checkpointing / --torchcompile (not by default)",
    )
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=None, help="(a)/(b) recipes (default: all)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="override the step rows' batch sizes")
    p.add_argument("--work-dir", default=str(REPO_ROOT / "runs" / "bench_train_step"),
                   help="weights, teacher caches, pseudo-classes (reused by a rerun)")  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="PNG (default: train_step.png beside --csv)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs of the step rows")
    p.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch series")
    p.add_argument("--no-verify", action="store_true", help="fit the largest batch but do not run a point")
    p.add_argument("--verify-mb", type=float, default=8000.0, help="memory budget of the verified point (MB)")
    p.add_argument("--verify-seconds", type=float, default=150.0, help="predicted step-time budget of that point")
    p.add_argument("--table-only", action="store_true", help="print the table and goals of --csv, draw the plot")
    refit_help = "recompute the max_batch rows of --csv from its memory and verified rows; then --table-only"
    p.add_argument("--refit", action="store_true", help=refit_help)
    args = p.parse_args(argv)
    if args.pairs is None:
        args.pairs = ["tiny"] if args.quick else ["default", "vit"]
    if args.plot is None:
        args.plot = Path(args.csv).with_suffix(".png")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    repeats_given = args.repeats
    device = apply_common(args)
    if args.refit:
        append_rows(args.csv, refit(args.csv))
    if args.table_only or args.refit:
        make_plot(args.csv, args.plot)
        print(summary_table(args.csv) + "\n\n" + "\n".join(goals(args.csv)))
        return 0
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}  ({load_note()})", flush=True)

    all_plans = plans(args.quick)
    for pair in args.pairs:
        plan = copy.deepcopy(all_plans.get(pair) or plans(True)["tiny"])
        if args.batches:
            plan.batches = plan.recipe_batches = list(args.batches)
        if repeats_given is not None:
            plan.repeats = repeats_given
        log(f"{pair}: assets")
        with contextlib.redirect_stdout(sys.stderr):
            assets = build_assets(pair, args.work_dir)
        log(f"{pair}: {assets.teacher_note}")
        recipes = args.recipes or (["distill", "cid"] if args.quick else list(RECIPES))
        memo: dict = {}
        rows = run_step_rows(pair, assets, plan, args, device, args.providers, recipes, log, memo)
        append_rows(args.csv, rows)
        if not args.no_max_batch:
            rows = run_max_batch(pair, assets, plan, args, device, args.providers, log, memo)
            append_rows(args.csv, rows)
    make_plot(args.csv, args.plot)
    ops = [f"train_step_{p}" for p in args.pairs]
    print("\n" + summary_table(args.csv, ops) + "\n\n" + "\n".join(goals(args.csv)))
    print(f"\nrows in {args.csv}; plot {args.plot}; {time.perf_counter() - t_start:.0f} s on {device_name(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
