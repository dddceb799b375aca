"""Export a Fashion-MNIST corpus as PNG files + an open_clip CSV, as webdataset tar shards, and as class folders.

Layout under ``out_dir`` (``{corpus}`` is teacher / student / test, ``{split}`` train / test):

- ``images/{split}/{id:05d}.png``, one per sample (an image depends only on split and id, so corpora share them);
- ``{corpus}.csv``: tab-separated, columns ``filepath`` (relative to the CSV), ``title``, ``id``, ``label``;
- ``{corpus}-wds/{corpus}-{k:05d}.tar``: members ``{id:05d}.png``, ``.txt`` (caption), ``.json``
  (``id``, ``label``, ``caption_label``);
- ``{corpus}-folders/{class name}/{id:05d}.png``: ImageFolder's layout (``eval --eval-data``; the folder names are
  the class names, so they are the zero-shot prompts' too); PNGs an earlier, larger export left there are removed;
- ``{corpus}.json``: what was written and the corpus' regime (counts of samples and of wrong captions).

Every file is written under a temporary name and renamed into place, so a killed export leaves either the old
file, the new one, or an obviously temporary ``*.tmp-<pid>`` file, never a valid-looking half file; the CSV and
the manifest are written after the images and shards they point to. Shards carry a fixed mtime, so a rerun
writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import re

import pandas as pd
import webdataset as wds

from .._io import atomic_bytes, atomic_json
from .fashion_mnist import CLASS_NAMES, FashionMnistCorpus

FORMATS = ("csv", "wds", "folders")
_PNG_NAME = re.compile(r"\d{5}\.png")


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def export_corpus(cfg, out_dir: str, formats=("csv", "wds"), shard_size: int = 1000, limit: int | None = None) -> dict:
    """Write the corpus ``cfg`` (a ``DataConfig`` with dataset fashion-mnist) to ``out_dir``; returns the manifest.

    ``formats``: any of "csv", "wds", "folders"; ``shard_size``: samples per tar shard; ``limit``: only the first
    ``limit`` samples in ascending id order (all if None). The manifest holds ``csv`` (the CSV path) and ``wds``
    (the brace pattern of the shards), ready to be used as ``train_data``, and ``folders`` (the class-folder
    root, for ``eval_data``), for the formats written.
    """
    if cfg.dataset != "fashion-mnist":
        raise ValueError(f"export_corpus exports the fashion-mnist corpora; dataset is {cfg.dataset!r}")
    formats = tuple(formats)
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"formats must be a non-empty subset of {list(FORMATS)}, got {list(formats)!r}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an int >= 1, got {limit!r}")

    corpus = FashionMnistCorpus(cfg)
    n = len(corpus) if limit is None else min(limit, len(corpus))
    name = corpus.corpus
    os.makedirs(out_dir, exist_ok=True)
    keys = [f"{int(corpus.ids[i]):05d}" for i in range(n)]
    pngs = [_png_bytes(corpus.image(i)) for i in range(n)]
    captions = [corpus.caption(i) for i in range(n)]
    manifest = {
        **corpus.summary(),
        "num_samples": n,
        "num_wrong_captions": int((corpus.caption_labels[:n] != corpus.labels[:n]).sum()),
        "formats": list(formats),
    }

    if "csv" in formats:
        image_dir = os.path.join("images", corpus.split)
        os.makedirs(os.path.join(out_dir, image_dir), exist_ok=True)
        filepaths = [f"{image_dir}/{key}.png" for key in keys]
        for rel, png in zip(filepaths, pngs):
            atomic_bytes(os.path.join(out_dir, rel), png, durable=False)
        table = pd.DataFrame(
            {"filepath": filepaths, "title": captions, "id": corpus.ids[:n], "label": corpus.labels[:n]}
        )
        csv_path = os.path.join(out_dir, f"{name}.csv")
        atomic_bytes(csv_path, table.to_csv(sep="\t", index=False).encode(), durable=True)
        manifest["csv"] = csv_path

    if "wds" in formats:
        shard_dir = os.path.join(out_dir, f"{name}-wds")
        os.makedirs(shard_dir, exist_ok=True)
        num_shards = (n + shard_size - 1) // shard_size
        for k in range(num_shards):
            buf = io.BytesIO()
            with wds.TarWriter(buf, encoder=False, mtime=0) as tar:
                for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
                    meta = {"id": int(corpus.ids[i]), "label": int(corpus.labels[i]),
                            "caption_label": int(corpus.caption_labels[i])}  # fmt: skip
                    tar.write({"__key__": keys[i], "png": pngs[i], "txt": captions[i].encode(),
                               "json": json.dumps(meta).encode()})  # fmt: skip
            count = min(n, (k + 1) * shard_size) - k * shard_size
            # img2dataset's per-shard statistics (the count is what readers check a shard against), then the shard
            atomic_json(os.path.join(shard_dir, f"{name}-{k:05d}_stats.json"), {"count": count, "successes": count})
            atomic_bytes(os.path.join(shard_dir, f"{name}-{k:05d}.tar"), buf.getvalue(), durable=True)
        # Shards past the new count, left by an earlier and larger export, would be read by a glob: remove them.
        for entry in os.listdir(shard_dir):
            match = re.fullmatch(rf"{re.escape(name)}-(\d{{5}})(\.tar|_stats\.json)", entry)
            if match and int(match.group(1)) >= num_shards:
                os.remove(os.path.join(shard_dir, entry))
        manifest["wds"] = os.path.join(shard_dir, f"{name}-{{00000..{num_shards - 1:05d}}}.tar")
        manifest["num_shards"] = num_shards

    if "folders" in formats:
        manifest["folders"] = _write_class_folders(os.path.join(out_dir, f"{name}-folders"), corpus, keys, pngs)

    manifest_path = os.path.join(out_dir, f"{name}.json")
    manifest["manifest"] = manifest_path
    atomic_bytes(manifest_path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(), durable=True)
    return manifest


def _write_class_folders(root: str, corpus, keys: list[str], pngs: list[bytes]) -> str:
    """Sample i's PNG as ``root/{class name of its true label}/{key}.png``; stale PNGs removed (a class-folder
    reader takes every image it finds, so one from an earlier export would join the set)."""
    wanted: dict[str, set[str]] = {c: set() for c in CLASS_NAMES}
    for i, (key, png) in enumerate(zip(keys, pngs)):
        folder = CLASS_NAMES[int(corpus.labels[i])]
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        atomic_bytes(os.path.join(root, folder, f"{key}.png"), png, durable=False)
        wanted[folder].add(f"{key}.png")
    for folder, files in wanted.items():
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            continue
        for entry in os.listdir(path):
            if _PNG_NAME.fullmatch(entry) and entry not in files:
                os.remove(os.path.join(path, entry))
        if not files and not os.listdir(path):  # a class this export lacks: an empty class folder is an error
            os.rmdir(path)
    return root


def export_command(cfg) -> None:
    """``clipcid-fast export-data``: ``export_corpus`` of an ``ExportConfig``, its resolved config beside the files."""
    import time

    from ..config import write_config

    t0 = time.perf_counter()
    formats = tuple(f.strip() for f in cfg.formats.split(",") if f.strip())
    manifest = export_corpus(cfg.data, cfg.out_dir, formats=formats, shard_size=cfg.shard_size, limit=cfg.limit)
    write_config(cfg, cfg.out_dir, "export_config.yaml")
    wrong = manifest.get("num_wrong_captions")
    print(f"exported {manifest.get('num_samples')} samples ({wrong} captions naming another class) to {cfg.out_dir}:")
    for key in ("csv", "wds", "folders"):
        if key in manifest:
            print(f"  {key}: {manifest[key]}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
