"""What an embed run is: the model and dataset identity recorded in ``manifest.json`` / ``embed.json``, the check
that refuses another run's directory, and the JSON helpers the writer and the reader (``embed.py``) share."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .models import LoadedModel


def plain(obj):
    """JSON's view of ``obj`` (tuples become lists), so stored and fresh values compare equal."""
    return json.loads(json.dumps(obj))


def model_meta(loaded: LoadedModel) -> dict:
    """``embed.json['model']``: name, fingerprint, config, exp'd logit scale and sizes of the embedding model."""
    scale = getattr(loaded.model, "logit_scale", None)
    return {
        "name": loaded.name,
        "fingerprint": loaded.fingerprint,
        "model_cfg": plain(loaded.model_cfg),
        "logit_scale": None if scale is None else float(torch.as_tensor(scale).detach().float().exp()),
        "info": plain(loaded.info),
    }


def dataset_identity(data: dict) -> dict:
    """The DataConfig fields that decide which rows, in which order, with which captions. ``workers`` changes only
    the speed of a map-style source; a webdataset's DataLoader workers interleaved its shards in directories written
    before ``row_order`` (tar order) was recorded, so there it counts (``run_identity`` drops it for the newer ones)."""
    out = {k: v for k, v in data.items() if k != "summary"}
    if out.get("dataset") != "wds":
        out.pop("workers", None)
    return out


def run_identity(meta: dict) -> dict:
    """What two runs in one directory must share (a rerun resumes; another run is refused). The model config is
    compared with its known text assets named (``assets.portable``): a manifest written before configs named them
    holds the same asset by a path of the machine that wrote it."""
    from .assets import portable

    dataset = dataset_identity(meta["dataset"])
    if "row_order" in meta:  # a webdataset embedded in tar order: the DataLoader workers no longer change the rows
        dataset.pop("workers", None)
    return {
        "fingerprint": meta["model"]["fingerprint"],
        "model_cfg": portable(meta["model"]["model_cfg"]),
        "dataset": dataset,
        "shard_rows": meta["shard_rows"],
        "precision": meta.get("precision", "fp32"),
        "row_order": meta.get("row_order", "<as read>"),
        "views": meta.get("views", "<none>"),
    }


def first_difference(stored: dict, current: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """The first key (dotted path, sorted order) whose value differs between two nested dicts, with both values."""
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def short(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line errors."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def refuse_other_run(out_dir: str, stored: dict, current: dict, source: str) -> None:
    found = first_difference(run_identity(stored), run_identity(current))
    if found:
        key, a, b = found
        field = f"model {key}" if key == "fingerprint" or key.startswith("model_cfg") else key
        raise ValueError(
            f"embed: {out_dir!r} holds another run's features ({source}: {field} = {short(a)}, this run's = "
            f"{short(b)}); features of two runs never mix: use another out_dir or delete that one"
        )


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
