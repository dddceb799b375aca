"""Image-caption sources of the pipeline: the offline default (Fashion-MNIST), open_clip CSV, webdataset shards.

``build_dataset(cfg, preprocess, tokenizer)`` gives items ``{"image": FloatTensor[3,H,W], "text": LongTensor[L],
"id": int, "caption": str, "label": int}`` (label -1 where the source has none); ``collate`` stacks them.

- ``fashion-mnist`` and ``csv`` are map-style (``len()`` known). With ``shuffle_seed=None`` the order is the
  natural one (ascending id / row order); with a seed, ``ds[i]`` is a fixed seeded permutation of it. ``rank`` and
  ``world_size`` are only checked: every rank sees the whole set, to be split by the caller's sampler
  (``DistributedSampler``).
- ``wds`` is an ``IterableDataset`` that splits shards over ranks and DataLoader workers itself; it has no
  ``len()``, ``ds.num_samples`` counts all shards' samples from their tar headers (lazily, once).

Every source counts what ``skip_bad`` skipped in ``ds.skipped``.
"""

from __future__ import annotations

from ._common import collate
from .csv_source import CsvDataset
from .export import export_command, export_corpus
from .fashion_mnist import CLASS_NAMES, TEMPLATES, FashionMnistCorpus, FashionMnistDataset, fashion_mnist_arrays
from .wds_source import WebDatasetSource

DATASETS = ("fashion-mnist", "csv", "wds")

__all__ = [
    "DATASETS",
    "CsvDataset",
    "FashionMnistCorpus",
    "FashionMnistDataset",
    "WebDatasetSource",
    "build_dataset",
    "class_names",
    "collate",
    "export_command",
    "export_corpus",
    "fashion_mnist_arrays",
    "templates",
]


def build_dataset(cfg, preprocess, tokenizer, *, rank: int = 0, world_size: int = 1, shuffle_seed: int | None = None):
    """The dataset ``cfg.dataset`` names (a ``DataConfig``), serving preprocessed images and token rows.

    ``preprocess``: PIL.Image -> FloatTensor[3,H,W]; ``tokenizer``: list[str] -> LongTensor[n, L].
    """
    from ._common import check_rank

    check_rank(rank, world_size)
    if shuffle_seed is not None and not isinstance(shuffle_seed, int):
        raise ValueError(f"shuffle_seed must be an int or None, got {shuffle_seed!r}")
    if cfg.dataset == "fashion-mnist":
        return FashionMnistDataset(cfg, preprocess, tokenizer, shuffle_seed=shuffle_seed)
    if cfg.dataset == "csv":
        return CsvDataset(cfg, preprocess, tokenizer, shuffle_seed=shuffle_seed)
    if cfg.dataset == "wds":
        return WebDatasetSource(cfg, preprocess, tokenizer, rank=rank, world_size=world_size, shuffle_seed=shuffle_seed)
    raise ValueError(f"dataset must be one of {list(DATASETS)}, got {cfg.dataset!r}")


def _prompts_of(cfg, what: str) -> None:
    if cfg is not None and cfg.dataset != "fashion-mnist":
        raise ValueError(f"{what}: dataset {cfg.dataset!r} has no class names (only fashion-mnist has)")


def class_names(cfg=None) -> list[str]:
    """Fashion-MNIST's class names in label order (zero-shot prompts reuse them); a copy."""
    _prompts_of(cfg, "class_names")
    return list(CLASS_NAMES)


def templates(cfg=None) -> list[str]:
    """The caption templates (``t.format(class_name)``) the Fashion-MNIST captions are drawn from; a copy."""
    _prompts_of(cfg, "templates")
    return list(TEMPLATES)
