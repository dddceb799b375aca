"""Typed configuration of the pipeline stages: dataclasses, filled from defaults ← a YAML file ← flags.

Every stage's configuration is a dataclass here (nested dataclasses for the shared parts: data, models).
OmegaConf does the typed merge and the YAML round trip; the flags are generated from the fields, one
``--field-name`` per leaf (nested leaves are flattened: ``--csv-img-key`` sets ``data.csv_img_key``),
so a YAML file and the command line spell the same settings. The resolved configuration is written beside
every output (``write_config``), and a later stage that reads those outputs compares the parts that must
match.

Precedence: the dataclass defaults, then ``--config FILE.yaml`` (a mapping with the same nesting), then the
flags given on the command line. Unknown keys in the YAML and wrong types (``--batch-size abc``) are a
``ValueError`` naming the key and the value.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..recipes import RECIPES as _RECIPE_TABLE
from ..recipes import WEIGHTS

C = TypeVar("C")


def _help(text: str) -> dict:
    return {"help": text}


# a required path given as a positional argument (OmegaConf's "???" marks a mandatory value)
MISSING_PATH = "???"

# One dedup threshold default for balance, train and the demo (docs/cid_defaults.md): at 0.002 SemDeDup removes
# about 10 % of the offline corpus, the setting every cid number of the recipe study was measured on.
BALANCE_EPS = 0.002
# the thresholds ``balance`` measures by default (one pass; the removed fraction of each is printed)
BALANCE_EPS_GRID = (0.0005, 0.001, BALANCE_EPS, 0.003, 0.005, 0.01)


@dataclasses.dataclass
class DataConfig:
    """Where image-caption pairs come from (shared by embed, eval, train)."""

    dataset: str = dataclasses.field(
        default="fashion-mnist",
        metadata=_help("fashion-mnist (the offline default), csv (open_clip CSV) or wds (webdataset shards)"),
    )
    train_data: Optional[str] = dataclasses.field(  # noqa: UP045 (OmegaConf reads typing.Optional)
        default=None, metadata=_help("csv: the CSV file; wds: shard pattern, brace-expanded (a/{000..009}.tar)")
    )
    csv_separator: str = dataclasses.field(
        default="\t", metadata=_help("CSV separator (open_clip_train's default: tab)")
    )
    csv_img_key: str = dataclasses.field(default="filepath", metadata=_help("CSV column of image paths"))
    csv_caption_key: str = dataclasses.field(default="title", metadata=_help("CSV column of captions"))
    corpus: str = dataclasses.field(
        default="student",
        metadata=_help(
            "fashion-mnist: teacher (the clean 60k train split), student (a subset with noisy captions) "
            "or test (the held-out 10k test split, clean captions)"
        ),
    )
    student_samples: int = dataclasses.field(
        default=10000, metadata=_help("fashion-mnist: images in the student's corpus (a seeded subset of train)")
    )
    caption_noise: float = dataclasses.field(
        default=0.4,
        metadata=_help("fashion-mnist: fraction of the student corpus' captions naming another, random class"),
    )
    data_seed: int = dataclasses.field(default=0, metadata=_help("seed of the subset, the noise and the templates"))
    fashion_mnist_dir: str = dataclasses.field(
        default="/usr/share/datasets/fashion-mnist", metadata=_help("Debian package dataset-fashion-mnist")
    )
    skip_bad: bool = dataclasses.field(
        default=False, metadata=_help("skip (and count) unreadable samples instead of stopping at the first")
    )
    workers: int = dataclasses.field(default=0, metadata=_help("DataLoader worker processes"))
    wds_shuffle_buffer: int = dataclasses.field(
        default=1000, metadata=_help("wds: samples in the seeded shuffle buffer (used when a shuffle seed is given)")
    )


@dataclasses.dataclass
class ModelConfig:
    """Which teacher and student: the offline defaults, or any open_clip config name / JSON + local weights."""

    teacher: str = dataclasses.field(
        default="default", metadata=_help("default (offline LiT teacher), an open_clip config name, or a JSON file")
    )
    teacher_weights: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("local checkpoint of the teacher (state_dict or open_clip_train checkpoint)")
    )
    student: str = dataclasses.field(
        default="default", metadata=_help("default (small offline student), an open_clip config name, or a JSON")
    )
    student_weights: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("local checkpoint of the student")
    )
    cache_dir: str = dataclasses.field(
        default=os.environ.get("CLIPCID_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "clipcid_fast")),
        metadata=_help("where the default teacher's trained image tower is cached (env CLIPCID_CACHE)"),
    )
    context_length: int = dataclasses.field(
        default=16, metadata=_help("token context of the default towers (the longest default caption is 13 tokens)")
    )
    teacher_epochs: int = dataclasses.field(default=3, metadata=_help("default teacher: epochs over its corpus"))
    teacher_samples: int = dataclasses.field(
        default=0, metadata=_help("default teacher: train on a seeded subset of N of its 60k images (0 = all)")
    )
    teacher_batch_size: int = dataclasses.field(default=256, metadata=_help("default teacher: batch size"))
    teacher_lr: float = dataclasses.field(default=2e-3, metadata=_help("default teacher: AdamW learning rate"))
    teacher_seed: int = dataclasses.field(default=0, metadata=_help("default teacher: training seed"))


VIEWS_HELP = "views per image with --augment (view 0 un-augmented); 1 = no views"
AUGMENT_HELP = "augmented views, e.g. scale=0.5:1,ratio=0.75:1.333,hflip=0.5 (keys scale, ratio, hflip; '' = off)"
AUGMENT_SEED_HELP = "seed of the views' crops and flips (with --augment)"


@dataclasses.dataclass
class EmbedConfig:
    out_dir: str = dataclasses.field(default="runs/embed", metadata=_help("output directory (rerun to resume)"))
    model: str = dataclasses.field(default="teacher", metadata=_help("which model embeds: teacher or student"))
    batch_size: int = dataclasses.field(default=512, metadata=_help("images per forward"))
    shard_rows: int = dataclasses.field(default=8192, metadata=_help("rows per .npy shard (the unit of resume)"))
    progress: bool = dataclasses.field(default=True, metadata=_help("progress bar"))
    precision: str = dataclasses.field(
        default="auto", metadata=_help("auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")
    )
    views: int = dataclasses.field(default=1, metadata=_help(VIEWS_HELP))
    augment: str = dataclasses.field(default="", metadata=_help(AUGMENT_HELP))
    augment_seed: int = dataclasses.field(default=0, metadata=_help(AUGMENT_SEED_HELP))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    models: ModelConfig = dataclasses.field(default_factory=ModelConfig)


@dataclasses.dataclass
class EvalConfig:
    out: str = dataclasses.field(default="runs/eval.json", metadata=_help("JSON report"))
    model: str = dataclasses.field(
        default="teacher", metadata=_help("teacher, student, or a checkpoint written by clipcid-fast train")
    )
    tasks: str = dataclasses.field(
        default="zeroshot,retrieval,linear_probe", metadata=_help("comma-separated: zeroshot, retrieval, linear_probe")
    )
    batch_size: int = dataclasses.field(default=512, metadata=_help("images per forward"))
    eval_samples: int = dataclasses.field(
        default=0, metadata=_help("held-out images evaluated: a seeded subset of N (0 = the whole split)")
    )
    probe_train_samples: int = dataclasses.field(
        default=10000, metadata=_help("linear probe: training images (a seeded subset of the train split)")
    )
    probe_c: float = dataclasses.field(default=1.0, metadata=_help("linear probe: inverse L2 strength (sklearn C)"))
    block: int = dataclasses.field(default=4096, metadata=_help("rows per similarity block in retrieval"))
    # a user's labelled set instead of the held-out split (pipeline/data/labelled_set.py)
    eval_data: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None,
        metadata=_help(
            "labelled set to evaluate: class folders (root/<class>/<images>) or a CSV "
            "(--csv-img-key column + a label column)"
        ),
    )
    probe_data: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("linear probe's train split for --eval-data (same layout and classes)")
    )
    classnames: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("one class name a line, in class order (default: the folder names)")
    )
    templates: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("one prompt template a line, with {c} (default: the project's 6)")
    )
    progress: bool = dataclasses.field(default=True, metadata=_help("progress bar"))
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(corpus="test"))
    models: ModelConfig = dataclasses.field(default_factory=ModelConfig)


@dataclasses.dataclass
class ExportConfig:
    out_dir: str = dataclasses.field(default="runs/export", metadata=_help("output directory"))
    formats: str = dataclasses.field(
        default="csv,wds", metadata=_help("comma-separated: csv (PNG + CSV), wds, folders (PNG class folders)")
    )
    shard_size: int = dataclasses.field(default=1000, metadata=_help("samples per webdataset shard"))
    limit: Optional[int] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("only the first N samples (ascending id)")
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)


def _positional(text: str) -> dict:
    return {"help": text, "positional": True}


@dataclasses.dataclass
class ExportModelConfig:
    """``clipcid-fast export`` (``pipeline/export_model.py``): a model as an open_clip ``local-dir:`` folder."""

    model: str = dataclasses.field(
        default=MISSING_PATH,
        metadata=_positional(
            "teacher, student (with --teacher / --student-weights ...) or a clipcid-fast train checkpoint"
        ),
    )
    out: str = dataclasses.field(default=MISSING_PATH, metadata=_help("the folder to write (required)"))
    force: bool = dataclasses.field(default=False, metadata=_help("replace a non-empty --out folder"))
    progress: bool = dataclasses.field(
        default=True, metadata=_help("progress bar (a default teacher's first training)")
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    models: ModelConfig = dataclasses.field(default_factory=ModelConfig)


@dataclasses.dataclass
class BalanceConfig:
    """``clipcid-fast balance`` (arguments of ``pipeline.balance.run_balance``)."""

    embeddings: str = dataclasses.field(
        default=MISSING_PATH, metadata=_positional(".npy [n, D] (fp16/fp32) or a directory of .npy shards")
    )
    out_dir: str = dataclasses.field(
        default=MISSING_PATH, metadata=_positional("output directory (rerun the same command in it to resume)")
    )
    ids: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help(".npy of n int64 ids, or a directory of shards (default: row numbers)")
    )
    k: int = dataclasses.field(default=1024, metadata=_help("k-means clusters"))
    niter: int = dataclasses.field(default=20, metadata=_help("k-means iterations"))
    seed: int = dataclasses.field(default=0, metadata=_help("k-means / ordering seed"))
    max_points_per_centroid: int = dataclasses.field(default=256, metadata=_help("k-means sample = k × this"))
    method: str = dataclasses.field(default="semdedup", metadata=_help("semdedup or unionfind"))
    eps: list[float] = dataclasses.field(
        default_factory=lambda: list(BALANCE_EPS_GRID), metadata=_help("semdedup eps list, e.g. 0.002,0.005")
    )
    delta: list[float] = dataclasses.field(
        default_factory=lambda: [0.2, 0.3, 0.4, 0.5], metadata=_help("unionfind distance thresholds")
    )
    keep: str = dataclasses.field(default="hard", metadata=_help("SemDeDup order in a cluster: hard, easy, random"))
    batch_clusters: int = dataclasses.field(default=64, metadata=_help("clusters per checkpointed batch"))
    chunk_rows: int = dataclasses.field(default=65536, metadata=_help("rows read per chunk"))
    tile: int = dataclasses.field(default=1024, metadata=_help("unionfind tile rows"))
    invalid: str = dataclasses.field(default="error", metadata=_help("NaN/inf/zero rows: error or remove"))
    centroids: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("use these [k, D] centroids (.npy) instead of k-means")
    )
    ops: str = dataclasses.field(
        default="auto", metadata=_help("per-chunk/per-cluster functions: auto (the fused op) or reference")
    )
    plot: bool = dataclasses.field(default=True, metadata=_help("write the removed-fraction plot"))
    progress: bool = dataclasses.field(default=True, metadata=_help("progress bars"))


@dataclasses.dataclass
class ClusterConfig:
    """``clipcid-fast cluster`` (arguments of ``pipeline.balance.run_cluster``)."""

    embeddings: str = dataclasses.field(
        default=MISSING_PATH, metadata=_positional(".npy [n, D] or a directory of .npy shards")
    )
    out_dir: str = dataclasses.field(default=MISSING_PATH, metadata=_positional("output directory"))
    n_classes: int = dataclasses.field(default=0, metadata=_help("pseudo-classes N (required)"))
    keep: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("bool mask [n] (.npy), e.g. balance's keep_eps0.05.npy; default all rows")
    )
    topk: int = dataclasses.field(default=0, metadata=_help("also write the k nearest centres per row"))
    niter: int = dataclasses.field(default=20, metadata=_help("k-means iterations"))
    seed: int = dataclasses.field(default=0, metadata=_help("k-means seed"))
    max_points_per_centroid: int = dataclasses.field(default=256, metadata=_help("k-means sample = N × this"))
    chunk_rows: int = dataclasses.field(default=65536, metadata=_help("rows read per chunk"))
    invalid: str = dataclasses.field(default="error", metadata=_help("NaN/inf/zero rows: error or remove"))


RECIPES = tuple(_RECIPE_TABLE)


@dataclasses.dataclass
class RecipeWeights:
    """Loss weights and temperatures; defaults defined once in ``recipes.WEIGHTS`` (published; cid's measured)."""

    # CLIP-KD (winycg/CLIP-KD ViT_T_16_kd.sh) and CLIP-RD (Rosieyang01/CLIP-RD ViT_T_16_RD.sh)
    crd_weight: float = dataclasses.field(
        default=WEIGHTS["crd_weight"], metadata=_help("kd: CRD weight (rd: HRD weight)")
    )
    icl_weight: float = dataclasses.field(default=WEIGHTS["icl_weight"], metadata=_help("kd, rd: ICL weight"))
    fd_weight: float = dataclasses.field(
        default=WEIGHTS["fd_weight"], metadata=_help("kd, rd: feature-distillation weight")
    )
    vrd_weight: float = dataclasses.field(
        default=WEIGHTS["vrd_weight"], metadata=_help("rd: VRD weight (its KL and both CE terms)")
    )
    xrd_weight: float = dataclasses.field(default=WEIGHTS["xrd_weight"], metadata=_help("rd: XRD weight"))
    # open_clip DistillClipLoss sums its two terms with weight 1
    distill_weight: float = dataclasses.field(
        default=WEIGHTS["distill_weight"], metadata=_help("distill: weight of the distill term")
    )
    # CLIP-CID (no public values: unicom's ArcFace weights and scale; margin and centre lr measured,
    # docs/cid_defaults.md)
    cd_weight: float = dataclasses.field(
        default=WEIGHTS["cd_weight"], metadata=_help("cid: cluster-discrimination weight")
    )
    id_weight: float = dataclasses.field(
        default=WEIGHTS["id_weight"], metadata=_help("cid: instance-discrimination weight")
    )
    id_scale_init: float = dataclasses.field(
        default=WEIGHTS["id_scale_init"],
        metadata=_help("cid: initial raw logit scale of the instance term (CLIP-KD's ICL init)"),
    )
    id_student_text: bool = dataclasses.field(
        default=WEIGHTS["id_student_text"],
        metadata=_help("cid: the instance term pairs student text <-> teacher image too (CLIP-KD's ICL form)"),
    )
    cd_margin: float = dataclasses.field(
        default=WEIGHTS["cd_margin"], metadata=_help("cid: ArcFace additive angular margin m2")
    )
    cd_scale: float = dataclasses.field(default=WEIGHTS["cd_scale"], metadata=_help("cid: margin-softmax scale s"))
    centre_lr_mult: float = dataclasses.field(
        default=WEIGHTS["centre_lr_mult"],
        metadata=_help(
            "cid: learning-rate multiplier of the class centres (0: fixed at the teacher's centroids; "
            "unicom's lr_pfc_weight is 3)"
        ),
    )
    cd_topk: int = dataclasses.field(
        default=WEIGHTS["cd_topk"],
        metadata=_help(
            "cid: k > 0 makes the cluster term MLCD's multi-label loss on each row's k nearest centres "
            "(topk.npy of clipcid-fast cluster --topk K >= k); 0 = single-label"
        ),
    )


@dataclasses.dataclass
class TrainConfig:
    out_dir: str = dataclasses.field(default="runs/train", metadata=_help("checkpoints, metrics, config"))
    recipe: str = dataclasses.field(default="baseline", metadata=_help("cid, rd, kd, distill or baseline"))
    teacher_cache: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("clipcid-fast embed output of the teacher on the training corpus")
    )
    online_teacher: bool = dataclasses.field(
        default=False, metadata=_help("run the frozen teacher every step instead of reading its cache")
    )
    balance_dir: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("cid: clipcid-fast balance output (its keep mask selects the training rows)")
    )
    balance_eps: float = dataclasses.field(
        default=BALANCE_EPS, metadata=_help("cid: which of balance's masks to use (its eps, or union-find's delta)")
    )
    cluster_dir: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("cid: clipcid-fast cluster output (centroids.npy, labels.npy)")
    )
    keep: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None,
        metadata=_help(
            "train on these rows only: a bool [n] mask (.npy) over --teacher-cache's rows, e.g. a balance "
            "keep_eps*.npy or a random subset; any recipe that reads the cache (cid: instead of --balance-dir)"
        ),
    )
    steps: int = dataclasses.field(default=300, metadata=_help("optimisation steps"))
    batch_size: int = dataclasses.field(default=256, metadata=_help("global batch size"))
    accum_freq: int = dataclasses.field(
        default=1,
        metadata=_help("micro-batches per step: exact gradient of the global batch, activations of one micro-batch"),
    )
    local_loss: bool = dataclasses.field(
        default=False, metadata=_help("distill under torchrun: each rank computes its rows only (open_clip's flag)")
    )
    gather_with_grad: bool = dataclasses.field(
        default=True,
        metadata=_help("all-gather features with autograd (exact data-parallel gradients; open_clip's default is off)"),
    )
    lr: float = dataclasses.field(default=2e-3, metadata=_help("peak AdamW learning rate"))
    wd: float = dataclasses.field(default=0.1, metadata=_help("AdamW weight decay (not on gains, biases, scales)"))
    beta1: float = dataclasses.field(default=0.9, metadata=_help("AdamW beta1"))
    beta2: float = dataclasses.field(default=0.98, metadata=_help("AdamW beta2 (open_clip's ViT default)"))
    eps: float = dataclasses.field(default=1e-6, metadata=_help("AdamW eps"))
    warmup: int = dataclasses.field(default=30, metadata=_help("linear warm-up steps, then cosine to 0"))
    grad_clip: float = dataclasses.field(default=1.0, metadata=_help("gradient-norm clip (0 = off)"))
    precision: str = dataclasses.field(
        default="auto", metadata=_help("auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")
    )
    seed: int = dataclasses.field(default=0, metadata=_help("student init, data order"))
    eval_every: int = dataclasses.field(default=100, metadata=_help("zero-shot eval on the held-out split (0 = off)"))
    eval_samples: int = dataclasses.field(default=2000, metadata=_help("held-out images of the periodic eval"))
    zeroshot_data: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("periodic zero-shot on this labelled set (class folders or a labelled CSV)")
    )
    classnames: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("--zeroshot-data: one class name a line (default: the folder names)")
    )
    templates: Optional[str] = dataclasses.field(  # noqa: UP045
        default=None, metadata=_help("--zeroshot-data: one prompt template a line, with {c}")
    )
    ckpt_every: int = dataclasses.field(default=50, metadata=_help("checkpoint every N steps (and at the end)"))
    keep_checkpoints: int = dataclasses.field(
        default=2, metadata=_help("checkpoints kept: the newest N (a corrupt newest one falls back to the previous)")
    )
    resume: bool = dataclasses.field(default=False, metadata=_help("continue from out_dir's newest good checkpoint"))
    report_to: str = dataclasses.field(
        default="", metadata=_help("also log to: tensorboard, wandb (comma-separated; metrics.jsonl is always written)")
    )
    grad_checkpointing: bool = dataclasses.field(
        default=False, metadata=_help("student: recompute activations in the backward (less memory, more time)")
    )
    torchcompile: bool = dataclasses.field(default=False, metadata=_help("student: torch.compile its forward"))
    impl: str = dataclasses.field(default="auto", metadata=_help("loss backend: auto or reference"))
    dedup_captions: bool = dataclasses.field(
        default=True, metadata=_help("encode each distinct caption of a batch once (exact; a no-op on unique captions)")
    )
    progress: bool = dataclasses.field(default=True, metadata=_help("progress bar"))
    views: int = dataclasses.field(default=1, metadata=_help(VIEWS_HELP + "; with a teacher cache, the cache's"))
    augment: str = dataclasses.field(
        default="", metadata=_help("train on augmented views (each sample and epoch: one of --views); " + AUGMENT_HELP)
    )
    augment_seed: int = dataclasses.field(default=0, metadata=_help(AUGMENT_SEED_HELP))
    weights: RecipeWeights = dataclasses.field(default_factory=RecipeWeights)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    models: ModelConfig = dataclasses.field(default_factory=ModelConfig)


@dataclasses.dataclass
class DemoConfig:
    """``clipcid-fast demo`` (``pipeline/demo.py``): embed → balance → cluster → train every recipe → eval → report.

    ``quick`` lays ``demo.QUICK`` (reduced sizes, a teacher of 2 epochs on 10k images) under the YAML and the
    flags, so a flag given with ``--quick`` still wins.
    """

    out_dir: str = dataclasses.field(default="runs/demo", metadata=_help("every stage's outputs and the report"))
    quick: bool = dataclasses.field(
        default=False, metadata=_help("reduced sizes for CI (pipeline/demo.py QUICK; about 2-3 min on 2 cores)")
    )
    recipes: str = dataclasses.field(
        default="cid,rd,kd,distill,baseline", metadata=_help("comma-separated recipes to train and evaluate")
    )
    steps: int = dataclasses.field(default=300, metadata=_help("training steps of every recipe"))
    batch_size: int = dataclasses.field(default=256, metadata=_help("training batch size of every recipe"))
    seed: int = dataclasses.field(default=0, metadata=_help("training seed (student init, data order)"))
    train_eval_every: int = dataclasses.field(
        default=100, metadata=_help("zero-shot on train_eval_samples held-out images every N steps (0 = off)")
    )
    train_eval_samples: int = dataclasses.field(default=2000, metadata=_help("held-out images of that check"))
    balance_k: int = dataclasses.field(default=64, metadata=_help("balance: k-means clusters of the semdedup pass"))
    balance_eps: float = dataclasses.field(
        default=BALANCE_EPS, metadata=_help("balance: the eps whose keep mask cid trains on (added to the grid)")
    )
    balance_eps_grid: list[float] = dataclasses.field(
        default_factory=lambda: list(BALANCE_EPS_GRID),
        metadata=_help("balance: every eps measured (removed fraction printed per eps)"),
    )
    balance_keep: str = dataclasses.field(
        default="hard",
        metadata=_help("balance: which member of a near-duplicate group stays: hard (farthest from the centroid, "
                       "SemDeDup's rule), easy (nearest: the central one, CLIP-CID's reading) or random"),
    )  # fmt: skip
    n_classes: int = dataclasses.field(default=100, metadata=_help("cluster: pseudo-classes of the kept rows"))
    eval_samples: int = dataclasses.field(default=0, metadata=_help("eval: held-out images (0 = the whole split)"))
    probe_train_samples: int = dataclasses.field(default=10000, metadata=_help("eval: linear-probe training images"))
    progress: bool = dataclasses.field(default=True, metadata=_help("progress bars"))
    weights: RecipeWeights = dataclasses.field(default_factory=RecipeWeights)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    models: ModelConfig = dataclasses.field(default_factory=ModelConfig)


# ---------------------------------------------------------------------------------------------------------------
# flags <-> dataclass


def _leaves(cls, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, (*prefix, f.name))
        else:
            out.append(((*prefix, f.name), f, tp))
    return out


def _scalar_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def add_config_flags(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = ()) -> None:
    """One ``--leaf-name`` flag per leaf of ``cls`` (and of its nested dataclasses); none has a default, so
    the parsed namespace holds only what was given, which ``config_from_args`` lays over the YAML."""
    parser.add_argument("--config", metavar="FILE.yaml", help="settings in YAML (flags given here override it)")
    seen: dict[str, tuple[str, ...]] = {}
    for path, f, tp in _leaves(cls):
        name = path[-1]
        if name in skip:
            continue
        if name in seen:
            raise TypeError(f"config leaf {name!r} appears twice ({seen[name]} and {path}): flags would collide")
        seen[name] = path
        flag = "--" + name.replace("_", "-")
        kind = _scalar_type(tp)
        if f.metadata.get("positional"):
            parser.add_argument(name, nargs="?", default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if default is not None and default not in ("", MISSING_PATH):
            help_text += f" (default {default!r})"
        if typing.get_origin(kind) is list:
            parser.add_argument(flag, dest=name, type=_comma_list, default=argparse.SUPPRESS, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)  # fmt: skip
        else:
            parser.add_argument(flag, dest=name, type=str, default=argparse.SUPPRESS, help=help_text)


def _comma_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def flag_overrides(cls, args: argparse.Namespace) -> dict:
    """The flags given on the command line as a nested dict (what ``config_from_args`` lays over the YAML)."""
    given = vars(args)
    tree: dict = {}
    for path, _f, _tp in _leaves(cls):
        if path[-1] in given:
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = given[path[-1]]
    return tree


def _read_yaml(path: str):
    """The mapping in a ``--config`` file: a YAML syntax error or a top level that is not a mapping is one line naming
    the file (and the line of the error)."""
    import yaml

    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"--config {path!r}: not valid YAML{where}: {problem}") from None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, ListConfig) else f"{type(loaded).__name__}"
        raise ValueError(f"--config {path!r}: the top level must be a mapping of config keys, got {kind}")
    return loaded


def build_config(cls: type[C], yaml_path: str | None = None, overrides: dict | None = None) -> C:
    """defaults ← YAML ← overrides (a nested dict of strings or values), type-checked by OmegaConf."""
    try:
        cfg = OmegaConf.structured(cls)
        if yaml_path:
            if not os.path.isfile(yaml_path):
                raise ValueError(f"--config: no such file {yaml_path!r}")
            cfg = OmegaConf.merge(cfg, _read_yaml(yaml_path))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(overrides))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ValueError(f"config key {key!r}: {msg}") from None


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    return build_config(cls, getattr(args, "config", None), flag_overrides(cls, args))


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def write_config(cfg, out_dir: str, name: str = "config.yaml") -> str:
    """The resolved configuration beside a stage's outputs (atomic)."""
    from ._io import atomic_bytes

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    atomic_bytes(path, to_yaml(cfg).encode())
    return path
