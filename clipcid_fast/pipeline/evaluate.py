"""Evaluate any open_clip-compatible model: zero-shot classification, image↔text retrieval, linear probe.

``run_eval(cfg)`` loads ``cfg.model`` (teacher, student or a ``clipcid-fast train`` checkpoint), evaluates it
and writes ``cfg.out`` (JSON, atomic); ``evaluate(loaded, cfg, tasks)`` is the same without loading or
writing (what a training loop calls). Protocols (CLIP_benchmark's, formulas in ``metrics.py``):

* ``zeroshot``: class names × templates (``data.class_names`` / ``data.templates``), each class's prompt
  embeddings averaged into its classifier; top-1, top-5 and mean per-class recall on the held-out split
  ``cfg.data`` (default: Fashion-MNIST's test split, clean captions).
* ``retrieval``: image↔text R@1/5/10 between the held-out images and their captions. Captions repeat (class ×
  template), so a caption string is one text, encoded once, and its positives are every image it captions.
* ``linear_probe``: logistic regression on frozen image features of ``probe_train_samples`` images of the
  train split with their true labels (the seeded subset the student corpus draws, captions unused), tested
  on the held-out images.

A user's labelled set (``cfg.eval_data``: class folders or a labelled CSV, with ``cfg.classnames`` /
``cfg.templates``; ``data/labelled_set.py``) replaces the held-out split: zero-shot on it, and the probe trains
on ``cfg.probe_data`` (its train split, same classes; at most ``probe_train_samples`` images, a seeded subset).
It has no captions, so no retrieval.

``eval_samples`` = N evaluates a seeded subset of N held-out images (of a webdataset stream: its first N).
Sources without class names (csv, wds) have no zero-shot or probe: the JSON says so under ``skipped``.
Memory: one pass over the held-out images, batch by batch (zero-shot accumulates; retrieval and the probe
keep the [n, D] features), retrieval similarities ``cfg.block`` rows at a time. The JSON holds no timing
outside its ``seconds`` key, so the same model and config give the same JSON but for it.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from . import metrics
from ._io import atomic_json
from .config import DataConfig, EvalConfig, to_dict
from .data import build_dataset, class_names, collate, templates
from .data.labelled_set import LabelledSet, collate_labelled
from .embed_meta import model_meta
from .models import image_features, text_features

if TYPE_CHECKING:
    from .models import LoadedModel

TASKS = ("zeroshot", "retrieval", "linear_probe")
TRAIN_SPLIT_SIZE = 60000  # Fashion-MNIST's train split: where the probe's training images come from
_SUBSET_STREAM = 0xE7A1  # seeds the eval_samples subset; no data stream starts with this word
_PROBE_STREAM = 0xE7A2  # seeds the probe_train_samples subset of a user's probe_data


def parse_tasks(tasks) -> tuple[str, ...]:
    """``"zeroshot,retrieval"`` or a sequence of names -> a tuple in TASKS order; unknown names are a ValueError."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in names if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"tasks: {unknown[0] if unknown else 'none'!r} is not a task; choose from {', '.join(TASKS)}")
    return tuple(t for t in TASKS if t in names)


def _check_config(cfg: EvalConfig) -> None:
    for name in ("batch_size", "block"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    samples = cfg.eval_samples
    if not isinstance(samples, int) or samples < 0:
        raise ValueError(f"eval_samples must be an int >= 0 (0 = the whole held-out split), got {samples!r}")
    if cfg.probe_c <= 0:
        raise ValueError(f"probe_c must be > 0, got {cfg.probe_c!r}")
    if not cfg.eval_data:
        for name in ("probe_data", "classnames", "templates"):
            if getattr(cfg, name):
                raise ValueError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} applies to a labelled set: "
                                 "give --eval-data too")  # fmt: skip


def _check_probe(cfg: EvalConfig) -> None:
    n = cfg.probe_train_samples
    if cfg.probe_data:  # a user's train split: any size, a seeded subset of n when larger
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"probe_train_samples must be an int >= 2, got {n!r}")
        return
    if not isinstance(n, int) or not 2 <= n <= TRAIN_SPLIT_SIZE:
        raise ValueError(f"probe_train_samples must be an int in [2, {TRAIN_SPLIT_SIZE}], got {n!r}")


def _skip_reasons(cfg: EvalConfig, tasks: tuple[str, ...]) -> dict[str, str]:
    """Why a requested task cannot run on this source (only Fashion-MNIST has class names and a train split)."""
    if cfg.eval_data:
        reasons = {"retrieval": f"eval_data {cfg.eval_data!r} is a labelled set, without captions"}
        if not cfg.probe_data:
            reasons["linear_probe"] = "no --probe-data (the labelled train split the probe trains on)"
        return {t: reasons[t] for t in tasks if t in reasons}
    if cfg.data.dataset == "fashion-mnist":
        return {}
    reasons = {
        "zeroshot": f"dataset {cfg.data.dataset!r} has no class names (zero-shot needs class names × templates)",
        "linear_probe": f"dataset {cfg.data.dataset!r} has no labelled train split (the probe trains on one)",
    }
    return {t: reasons[t] for t in tasks if t in reasons}


def _labelled(cfg: EvalConfig, loaded: LoadedModel, flag: str, like: LabelledSet | None = None) -> LabelledSet:
    d = cfg.data
    return LabelledSet(getattr(cfg, flag), loaded.preprocess, flag=f"--{flag.replace('_', '-')}",
                       classnames=None if like else cfg.classnames, templates=None if like else cfg.templates,
                       csv_separator=d.csv_separator, csv_img_key=d.csv_img_key, like=like)  # fmt: skip


def _heldout(cfg: EvalConfig, loaded: LoadedModel):
    if cfg.eval_data:
        ds = _labelled(cfg, loaded, "eval_data")
    else:
        ds = build_dataset(cfg.data, loaded.preprocess, loaded.tokenizer)
    summary = ds.summary() if hasattr(ds, "summary") else None
    samples = cfg.eval_samples
    if samples and isinstance(ds, IterableDataset):
        return _FirstRows(ds, samples), summary  # no random access: the first N of the stream
    if samples and samples < len(ds):
        # a seeded subset, read in natural order, so eval_samples = N is the same N images on every call
        pick = np.random.default_rng([_SUBSET_STREAM, cfg.data.data_seed]).permutation(len(ds))[:samples]
        ds = Subset(ds, np.sort(pick).tolist())
    return ds, summary


def _prompts(cfg: EvalConfig, ds) -> list[list[str]]:
    """Per class, its prompt under every template: the labelled set's, else the default source's."""
    labelled = ds.dataset if isinstance(ds, Subset) else ds
    return labelled.prompts() if isinstance(labelled, LabelledSet) else _default_prompts(cfg.data)


def _default_prompts(data: DataConfig) -> list[list[str]]:
    temps = templates(data)
    return [[t.format(c) for t in temps] for c in class_names(data)]


class _FirstRows(IterableDataset):
    """The first ``n`` items of an iterable source (read without DataLoader workers, so "first" is well defined)."""

    def __init__(self, ds: IterableDataset, n: int):
        self.ds, self.n = ds, n

    def __iter__(self):
        return itertools.islice(iter(self.ds), self.n)


def _batches(ds, cfg: EvalConfig):
    workers = 0 if isinstance(ds, _FirstRows) else cfg.data.workers
    labelled = isinstance(ds.dataset if isinstance(ds, Subset) else ds, LabelledSet)
    return DataLoader(ds, batch_size=cfg.batch_size, collate_fn=collate_labelled if labelled else collate,
                      num_workers=workers)  # fmt: skip


def _progress(iterable, cfg: EvalConfig, desc: str, total: int | None):
    from .progress import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="batch", disable=not cfg.progress, dynamic_ncols=True)


def _n_batches(ds, batch_size: int) -> int | None:
    return None if isinstance(ds, IterableDataset) else -(-len(ds) // batch_size)


def _zeroshot_classifier(model, loaded: LoadedModel, cfg: EvalConfig, prompts: list[list[str]]) -> torch.Tensor:
    tokens = loaded.tokenizer([p for per_class in prompts for p in per_class])
    feats = text_features(model, tokens, cfg.batch_size).reshape(len(prompts), len(prompts[0]), -1)
    return metrics.class_classifier(feats)


def _heldout_pass(model, ds, cfg: EvalConfig, classifier, keep_features: bool) -> dict:
    """One pass over the held-out images: zero-shot scores accumulated, features / captions / labels kept if asked."""
    acc = metrics.ZeroShotAccumulator(classifier) if classifier is not None else None
    feats, captions, labels = [], [], []
    for batch in _progress(_batches(ds, cfg), cfg, "eval: held-out images", _n_batches(ds, cfg.batch_size)):
        f = image_features(model, batch["image"])
        if acc is not None:
            acc.update(f, batch["label"])
        if keep_features:
            feats.append(f)
            captions += batch.get("caption", [])  # a labelled set has none (and no retrieval)
            labels.append(batch["label"])
    out = {"zeroshot": acc.result() if acc is not None else None}
    if keep_features:
        if not feats:
            raise ValueError(f"eval: the held-out set {cfg.data.dataset!r} yielded no images")
        out.update(features=torch.cat(feats), captions=captions, labels=torch.cat(labels))
    return out


def _retrieval(model, loaded: LoadedModel, held: dict, cfg: EvalConfig) -> dict:
    # One text per distinct caption string (sorted: a stable numbering); image i's positive is its caption's.
    texts = sorted(set(held["captions"]))
    number = {c: j for j, c in enumerate(texts)}
    image_group = torch.tensor([number[c] for c in held["captions"]], dtype=torch.int64)
    text_feats = text_features(model, loaded.tokenizer(texts), cfg.batch_size)
    result = metrics.retrieval_recall(
        held["features"], text_feats, image_group, torch.arange(len(texts)), ks=(1, 5, 10), block=cfg.block
    )
    return {**result, "n_distinct_captions": len(texts)}


def probe_train_config(cfg: EvalConfig) -> DataConfig:
    """The probe's training images: the seeded train subset the student corpus draws, clean captions (unused)."""
    return DataConfig(
        **{**to_dict(cfg.data), "corpus": "student", "student_samples": cfg.probe_train_samples, "caption_noise": 0.0}
    )


def _probe_train_set(cfg: EvalConfig, loaded: LoadedModel, heldout):
    if not cfg.probe_data:
        return build_dataset(probe_train_config(cfg), loaded.preprocess, loaded.tokenizer)
    like = heldout.dataset if isinstance(heldout, Subset) else heldout
    ds = _labelled(cfg, loaded, "probe_data", like=like)
    n = cfg.probe_train_samples
    if n < len(ds):
        pick = np.random.default_rng([_PROBE_STREAM, cfg.data.data_seed]).permutation(len(ds))[:n]
        ds = Subset(ds, np.sort(pick).tolist())
    return ds


def _linear_probe(model, loaded: LoadedModel, held: dict, cfg: EvalConfig, heldout) -> tuple[dict, dict]:
    ds = _probe_train_set(cfg, loaded, heldout)
    feats, labels = [], []
    for batch in _progress(_batches(ds, cfg), cfg, "eval: probe train images", _n_batches(ds, cfg.batch_size)):
        feats.append(image_features(model, batch["image"]))
        labels.append(batch["label"])
    result = metrics.linear_probe(
        torch.cat(feats).numpy(), torch.cat(labels).numpy(), held["features"].numpy(), held["labels"].numpy(),
        c=cfg.probe_c, seed=cfg.data.data_seed,
    )  # fmt: skip
    summary = (ds.dataset if isinstance(ds, Subset) else ds).summary()
    return result, {**summary, "num_samples": len(ds)}


def evaluate(loaded: LoadedModel, cfg: EvalConfig, tasks=None) -> dict:
    """Metrics of ``loaded`` on ``cfg.data`` (no files written). ``tasks``: names or a comma string (default
    ``cfg.tasks``). Returns ``{task: metrics, "skipped": {task: reason}, "tasks", "data", "seconds"}`` (+
    ``"probe_data"`` when the probe ran). The model is put in eval mode and handed back in its own mode."""
    _check_config(cfg)
    tasks = parse_tasks(cfg.tasks if tasks is None else tasks)
    skipped = _skip_reasons(cfg, tasks)
    run = [t for t in tasks if t not in skipped]
    if "linear_probe" in run:
        _check_probe(cfg)
    model = loaded.model
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            out = _run_tasks(loaded, cfg, run)
    finally:
        model.train(was_training)
    out["seconds"]["total"] = time.perf_counter() - start
    return {"tasks": list(tasks), "skipped": skipped, **out}


def _run_tasks(loaded: LoadedModel, cfg: EvalConfig, run: list[str]) -> dict:
    model, seconds = loaded.model, {}
    ds, summary = _heldout(cfg, loaded)
    data = {"eval_data": cfg.eval_data} if cfg.eval_data else to_dict(cfg.data)
    out: dict = {"data": {**data, "summary": summary}, "seconds": seconds}
    t0 = time.perf_counter()
    classifier = _zeroshot_classifier(model, loaded, cfg, _prompts(cfg, ds)) if "zeroshot" in run else None
    seconds["zeroshot_prompts"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    keep = "retrieval" in run or "linear_probe" in run
    held = _heldout_pass(model, ds, cfg, classifier, keep_features=keep)
    seconds["heldout_images"] = time.perf_counter() - t0
    if "zeroshot" in run:
        out["zeroshot"] = held["zeroshot"]
    if "retrieval" in run:
        t0 = time.perf_counter()
        out["retrieval"] = _retrieval(model, loaded, held, cfg)
        seconds["retrieval"] = time.perf_counter() - t0
    if "linear_probe" in run:
        t0 = time.perf_counter()
        out["linear_probe"], out["probe_data"] = _linear_probe(model, loaded, held, cfg, ds)
        seconds["linear_probe"] = time.perf_counter() - t0
    return out


def run_eval(cfg: EvalConfig, *, loaded: LoadedModel | None = None) -> dict:
    """Load ``cfg.model``, evaluate it, write ``cfg.out`` (atomic JSON) and print a table; the JSON's dict.

    ``loaded``: an already loaded model to use instead of ``load_model(cfg.models, cfg.model)``.
    """
    _check_config(cfg)
    if not cfg.out:
        raise ValueError("out must name the JSON file to write, got an empty string")
    t0 = time.perf_counter()
    if loaded is None:
        from .models import load_model

        loaded = load_model(cfg.models, cfg.model, progress=cfg.progress, data_cfg=cfg.data)
    load_seconds = time.perf_counter() - t0
    result = evaluate(loaded, cfg)
    meta = model_meta(loaded)
    report = {
        "model": {"which": cfg.model, **{k: meta[k] for k in ("name", "fingerprint", "info", "logit_scale")}},
        **result,
        "config": to_dict(cfg),
        "seconds": {"load_model": load_seconds, **result["seconds"]},
    }
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    atomic_json(cfg.out, report)
    print(format_table(report))
    return report


def periodic_probe(cfg, student: LoadedModel) -> ZeroShotProbe | None:
    """The trainer's ``ZeroShotProbe`` of a ``TrainConfig``: on ``cfg.zeroshot_data`` (a labelled set) when given,
    else on the held-out split of ``cfg.data``; None, with a note, for a source without class names."""
    labelled = {k: getattr(cfg, k) for k in ("zeroshot_data", "classnames", "templates")}
    if not cfg.zeroshot_data:
        given = [k for k in ("classnames", "templates") if labelled[k]]
        if given:
            raise ValueError(f"--{given[0]} {labelled[given[0]]!r} applies to a labelled set: give --zeroshot-data too")
        if cfg.data.dataset != "fashion-mnist":
            print(f"periodic zero-shot off: dataset {cfg.data.dataset!r} has no class names "
                  "(--zeroshot-data PATH: class folders or a labelled CSV)")  # fmt: skip
            return None
    return ZeroShotProbe(cfg.data, student, cfg.seed, cfg.eval_samples, **labelled)


class ZeroShotProbe:
    """The trainer's periodic check: zero-shot top-1 and mean per-class recall (``metrics``, as ``zeroshot``) of a
    model on a fixed seeded subset of ``samples`` images of the held-out split of ``data`` (a DataConfig), or of
    the labelled set ``zeroshot_data`` (``data/labelled_set.py``; ``classnames``, ``templates``: its files), held
    in memory on the host (samples × 3 × H × W fp32), so each call costs one forward of the subset and the
    prompts."""

    def __init__(self, data: DataConfig, student: LoadedModel, seed: int, samples: int, *,
                 zeroshot_data: str | None = None, classnames: str | None = None,
                 templates: str | None = None) -> None:  # fmt: skip
        if zeroshot_data:
            csv = {"csv_separator": data.csv_separator, "csv_img_key": data.csv_img_key}
            ds = LabelledSet(zeroshot_data, student.preprocess, flag="--zeroshot-data", classnames=classnames,
                             templates=templates, **csv)  # fmt: skip
            prompts = ds.prompts()
        else:
            test_cfg = DataConfig(**{**to_dict(data), "corpus": "test"})
            ds = build_dataset(test_cfg, student.preprocess, student.tokenizer)
            prompts = _default_prompts(test_cfg)
        pick = np.random.default_rng([seed, 7]).permutation(len(ds))[: min(samples, len(ds))]
        items = [ds[int(i)] for i in np.sort(pick)]
        self.images = torch.stack([it["image"] for it in items])
        self.labels = torch.tensor([it["label"] for it in items], dtype=torch.int64)
        self.prompts = [student.tokenizer(per_class) for per_class in prompts]

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict:
        from .models import normalized_features

        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device  # the held-out inputs stay on the host; features come back to it
        prompts = torch.stack([normalized_features(model, texts=p.to(dev)).float().cpu() for p in self.prompts])
        acc = metrics.ZeroShotAccumulator(metrics.class_classifier(prompts))
        for s in range(0, len(self.labels), 500):
            feats = normalized_features(model, images=self.images[s : s + 500].to(dev)).float().cpu()
            acc.update(feats, self.labels[s : s + 500])
        model.train(was_training)
        r = acc.result()
        return {"eval_zeroshot_top1": r["top1"], "eval_mean_per_class_recall": r["mean_per_class_recall"]}


def format_table(report: dict) -> str:
    """A few lines: the model, the data, then one row per metric, then the skipped tasks with their reasons."""
    model, data = report["model"], report["data"]
    regime = data.get("summary") or {"dataset": data.get("dataset")}
    head = ", ".join(f"{k}={v}" for k, v in regime.items() if k in ("dataset", "corpus", "num_samples"))
    lines = [f"eval: {model['which']} ({model['name']}, weights {model['fingerprint'][:12]}) on {head}"]
    for task in TASKS:
        for key, value in (report.get(task) or {}).items():
            if isinstance(value, float):
                lines.append(f"  {task:<13} {key:<24} {value:.4f}")
    for task, reason in report["skipped"].items():
        lines.append(f"  {task:<13} skipped: {reason}")
    lines.append(f"  ({report['seconds']['total']:.1f} s; written to {report['config']['out']})")
    return "\n".join(lines)
