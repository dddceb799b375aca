"""Embed: a frozen model's image and caption features -> float16 ``.npy`` shards (the input of balance, cluster, train).

Output directory ``out_dir``::

    image/00000.npy   float16 [rows, D]  L2-normalised image features
    text/00000.npy    float16 [rows, D]  L2-normalised caption features (row i: the caption of image row i)
    ids/00000.npy     int64 [rows]       sample ids
    labels/00000.npy  int64 [rows]       class labels (-1 where the source has none)
    image_views/00000.npy  float16 [rows, K, D]  with ``--augment SPEC --views K`` only: view v's image features
                      (``augment.py``; view 0 is the un-augmented image, equal to ``image/``)
    id_index/         ids.npy (ascending) + rows.npy: the id -> row index readers memory-map (id_index.py)
    manifest.json     written first: model (name, fingerprint, model_cfg), dataset identity, shard_rows
    embed.json        written last: model (+ logit_scale, exp'd), dataset (the DataConfig + corpus summary),
                      count, dim, dtype, shard_rows, shards, normalized, seconds, images_per_second
    config.yaml       the resolved EmbedConfig

With ``--augment``, the manifest and embed.json also hold ``views`` (the canonical spec, K and the augmentation
seed; a rerun with another one is refused). ``image/`` is then computed exactly as without it (same batches), so
balance and cluster, which read ``image/``, see the features a K = 1 run writes; views 1..K-1 are encoded in
batches of the same rows, one view at a time.

Rows are the dataset's natural order (no shuffle); shard k holds rows ``[k·shard_rows, (k+1)·shard_rows)``, so
``clipcid-fast balance --embeddings out_dir/image --ids out_dir/ids`` reads them in row order (file-name order).

Resume: each shard's four files are written atomically once the shard is complete. A restarted run with the same
model (fingerprint + config), dataset and ``shard_rows`` skips the shards already on disk; a different one is
refused (manifest.json / embed.json), so features of two models never mix. Batches never straddle a shard (a
shard's batches are ``[start, start + batch_size), ...`` from its first row), so a shard's bytes do not depend on
where a run started: a killed and restarted run ends byte-identical to an uninterrupted one.

Under ``torchrun`` (``embed_split``): rank r of W writes the shards with ``k % W == r``; the files are the ones one
process writes, byte for byte, so a run resumes under any world size; rank 0 writes manifest.json first and the id
index and embed.json after every rank is done. A webdataset's rows are its tars' samples in pattern order (tar
headers count them, so each shard reads only its tars, whatever the DataLoader workers). On a GPU the model runs
under bf16 autocast (``precision``; recorded in the manifest: a resume in another precision is refused); on the
CPU it stays fp32.

Text features: captions repeat (class prompts), so each shard's distinct captions are encoded once, in chunks of
``batch_size``, and indexed back. That is a function of the shard alone (resume-safe); on the towers checked (the
stock ViT-S-32 text transformer, a shrunk copy of it, MiniLM-L6 through open_clip's HF encoder) the float16 rows
were byte-identical to encoding every caption in its image batch (``python_tests/test_embed.py`` checks it).
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from . import preempt
from ._io import atomic_json, atomic_npy, clean_tmp
from .augment import ViewsDataset, views_of
from .comm import Comm, local_rank, run_stage
from .config import EmbedConfig, to_dict, write_config
from .data import build_dataset, collate
from .data.wds_source import shard_stats_count, stats_path
from .embed_meta import dataset_identity, model_meta, plain, read_json, refuse_other_run, short
from .embed_split import as_is, map_style_batches, rank_shards, wds_batches
from .id_index import IdIndex, open_index, write_index  # noqa: F401 (IdIndex: the readers' type)
from .models import image_features, model_device_dtype, text_features

if TYPE_CHECKING:
    from .models import LoadedModel

SHARD_DIRS = ("image", "text", "ids", "labels")
VIEWS_DIR = "image_views"  # only in a directory embedded with --augment
# Five-digit names sort in row order; balance concatenates a directory's shards in file-name order.
MAX_SHARDS = 100_000
_SHARD_FILE = re.compile(r"^(\d{5})\.npy$")
FORMAT = 1


def shard_name(k: int) -> str:
    return f"{k:05d}.npy"


# ---------------------------------------------------------------------------------------------------------------
# shards on disk


def shard_dirs(meta: dict) -> tuple[str, ...]:
    """The per-shard folders of a run whose manifest is ``meta``: ``image_views`` too when it has views."""
    return (*SHARD_DIRS, VIEWS_DIR) if "views" in meta else SHARD_DIRS


def _shard_rows_on_disk(out_dir: str, k: int, dirs: tuple[str, ...] = SHARD_DIRS) -> int | None:
    """Rows of shard k if its files (one per folder of ``dirs``) are all there and agree, else None (a killed run's
    half-written shard)."""
    rows = set()
    for sub in dirs:
        path = os.path.join(out_dir, sub, shard_name(k))
        if not os.path.isfile(path):
            return None
        try:
            rows.add(np.load(path, mmap_mode="r").shape[0])
        except (ValueError, OSError):
            return None
    return rows.pop() if len(rows) == 1 else None


def _shards_listed(out_dir: str) -> list[int]:
    names = os.listdir(os.path.join(out_dir, "image"))
    return sorted(int(m.group(1)) for m in map(_SHARD_FILE.match, names) if m)


class _ShardBuffer:
    """The rows of one shard as its batches come; written (four files, each atomic) once complete."""

    def __init__(self, k: int):
        self.k = k
        self.image: list[np.ndarray] = []
        self.tokens: list[torch.Tensor] = []
        self.captions: list[str] = []
        self.ids: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.views: list[np.ndarray] = []
        self.rows = 0

    def add(self, batch: dict, image_rows: torch.Tensor, view_rows: torch.Tensor | None = None) -> None:
        self.image.append(image_rows.to(torch.float16).numpy())
        if view_rows is not None:
            self.views.append(view_rows.to(torch.float16).numpy())
        self.tokens.append(batch["text"])
        self.captions += batch["caption"]
        self.ids.append(batch["id"].numpy())
        self.labels.append(batch["label"].numpy())
        self.rows += len(batch["caption"])

    def write(self, out_dir: str, model: torch.nn.Module, batch_size: int) -> int:
        first, inverse = _distinct_captions(self.captions)
        tokens = torch.cat(self.tokens)[first]
        text = text_features(model, tokens, batch_size).to(torch.float16).numpy()[inverse]
        name = shard_name(self.k)
        # Image and text before ids / labels: a reader (and resume) counts a shard only once all four exist.
        if self.views:
            atomic_npy(os.path.join(out_dir, VIEWS_DIR, name), np.concatenate(self.views))
        atomic_npy(os.path.join(out_dir, "image", name), np.concatenate(self.image))
        atomic_npy(os.path.join(out_dir, "text", name), text)
        atomic_npy(os.path.join(out_dir, "ids", name), np.concatenate(self.ids).astype(np.int64))
        atomic_npy(os.path.join(out_dir, "labels", name), np.concatenate(self.labels).astype(np.int64))
        return self.rows


def _distinct_captions(captions: list[str]) -> tuple[list[int], np.ndarray]:
    """Index of each distinct caption's first occurrence (in order of appearance) and each caption's distinct index."""
    first: dict[str, int] = {}
    positions: list[int] = []
    inverse = np.empty(len(captions), dtype=np.int64)
    for i, caption in enumerate(captions):
        j = first.get(caption)
        if j is None:
            j = first[caption] = len(positions)
            positions.append(i)
        inverse[i] = j
    return positions, inverse


# ---------------------------------------------------------------------------------------------------------------
# a webdataset whose tars cannot be counted (remote): read from the start, one process


def _stream_batches(ds, done: set[int], shard_rows: int, batch_size: int, workers: int):
    """(shard, batch, last) for an iterable set without tar counts: read from the start (no length, no random
    access), rows of finished shards dropped before encoding, batches cut as ``embed_split`` cuts them."""
    loader = DataLoader(ds, batch_size=None, collate_fn=as_is, num_workers=workers)
    items: list[dict] = []
    row, open_k = 0, None
    for item in loader:
        k = row // shard_rows
        if k >= MAX_SHARDS:
            raise ValueError(f"shard_rows {shard_rows} gives more than {MAX_SHARDS} shards: raise it")
        row += 1
        if k in done:
            continue
        open_k = k
        items.append(item)
        if len(items) == batch_size or row % shard_rows == 0:
            last = row % shard_rows == 0
            yield k, collate(items), last
            items, open_k = [], (None if last else k)
    if open_k is not None:
        yield open_k, (collate(items) if items else None), True


# ---------------------------------------------------------------------------------------------------------------
# the stage


def _check_config(cfg: EmbedConfig) -> None:
    for name in ("batch_size", "shard_rows"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not cfg.out_dir:
        raise ValueError("out_dir must name a directory, got an empty string")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    if views_of(cfg.augment, cfg.views, cfg.augment_seed) is not None and cfg.data.dataset == "wds":
        raise ValueError(
            "--augment: embed makes views of the map-style sources (fashion-mnist, csv), not --dataset wds"
        )


def _local_device() -> torch.device:
    """GPU ``LOCAL_RANK`` (made current) when there is one, else the CPU."""
    if torch.cuda.is_available():
        dev = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def run_embed(cfg: EmbedConfig, *, loaded: LoadedModel | None = None) -> dict:
    """Embed ``cfg.data`` with the frozen ``cfg.model`` into ``cfg.out_dir``, resuming what is there; embed.json.

    Under ``torchrun`` every rank writes its share of the shards (``embed_split``) and rank 0 the id index and
    embed.json once all are on disk; every rank returns embed.json's dict.
    ``loaded``: an already loaded model to use (where it is) instead of ``load_model(cfg.models, cfg.model)``.
    """
    _check_config(cfg)
    device = _local_device()
    comm = Comm(backend="nccl" if device.type == "cuda" else "gloo", device=device)
    try:
        return _run(cfg, loaded, device, comm)
    finally:
        comm.close()


def _run(cfg: EmbedConfig, loaded: LoadedModel | None, device: torch.device, comm: Comm) -> dict:
    if loaded is None:
        from .models import load_model

        loaded = load_model(cfg.models, cfg.model, progress=cfg.progress and comm.rank == 0, data_cfg=cfg.data)
        loaded.model.to(device)
    model_device = model_device_dtype(loaded.model)[0]
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and model_device.type == "cuda")
    out_dir = cfg.out_dir
    ds = build_dataset(cfg.data, loaded.preprocess, loaded.tokenizer)
    iterable = isinstance(ds, IterableDataset)
    dataset_meta = to_dict(cfg.data)
    if hasattr(ds, "summary"):
        dataset_meta["summary"] = plain(ds.summary())
    meta = {"format": FORMAT, "model": model_meta(loaded), "dataset": dataset_meta, "shard_rows": cfg.shard_rows}
    views = views_of(cfg.augment, cfg.views, cfg.augment_seed)
    if views is not None:  # absent without --augment: a K = 1 manifest is the one written before views existed
        meta["views"] = views.record()
        ds = ViewsDataset(ds, views)
    dirs = shard_dirs(meta)
    if bf16:  # absent = fp32, as every directory written before bf16 existed
        meta["precision"] = "bf16"
    if iterable:  # rows in tar order whatever the workers (older directories interleaved the workers' tars)
        meta["row_order"] = WDS_ROW_ORDER

    for sub in dirs:
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    manifest_path, summary_path = os.path.join(out_dir, "manifest.json"), os.path.join(out_dir, "embed.json")
    for path in (manifest_path, summary_path):
        stored = read_json(path)
        if stored is not None:
            refuse_other_run(out_dir, stored, meta, os.path.basename(path))
    if comm.rank == 0:  # before the barrier: no rank writes a shard while the leftovers are cleaned
        clean_tmp(out_dir, *(os.path.join(out_dir, sub) for sub in dirs))
        if not os.path.isfile(manifest_path):
            atomic_json(manifest_path, meta)
        write_config(cfg, out_dir)
    comm.barrier()

    finished = read_json(summary_path)
    if finished is not None and _complete(out_dir, finished):
        if comm.rank == 0:
            print(f"embed: {out_dir} is complete ({finished['count']} rows); nothing to do")
        return finished

    rows, workers, pin = cfg.shard_rows, cfg.data.workers, device.type == "cuda"
    counts = _tar_counts(ds, comm) if iterable else None
    if iterable and counts is None:  # remote tars (one process): read from the start, full shards reused
        done = {k for k in _shards_listed(out_dir) if _shard_rows_on_disk(out_dir, k, dirs) == rows}
        total = max(0, int(getattr(ds, "num_samples", 0)) - len(done) * rows) if _countable(ds) else None
        batches = _stream_batches(ds, done, rows, cfg.batch_size, workers)
    else:
        n = sum(counts) if iterable else len(ds)
        n_shards = math.ceil(n / rows)
        if n_shards > MAX_SHARDS:
            raise ValueError(f"shard_rows {rows} gives {n_shards} shards for {n} rows (at most {MAX_SHARDS}): raise it")
        expected = [min(rows, n - k * rows) for k in range(n_shards)]
        pending = [k for k in range(n_shards) if _shard_rows_on_disk(out_dir, k, dirs) != expected[k]]
        mine = rank_shards(pending, comm.rank, comm.world)
        total = sum(expected[k] for k in mine)
        batches = (
            wds_batches(ds, counts, mine, rows, cfg.batch_size, workers, pin)
            if iterable
            else map_style_batches(ds, mine, n, rows, cfg.batch_size, workers, pin)
        )

    error, embedded = None, {"rows": 0, "seconds": 0.0}
    try:
        embedded = _embed_batches(loaded.model, batches, out_dir, cfg, total, bf16, show=comm.rank == 0)
    except preempt.Stopped as e:  # SIGTERM / SIGINT / SIGUSR1: the shards written so far are kept
        preempt.leave("embed", e)
    except Exception as e:  # agreed below, so that no rank waits for a failed one at a barrier
        error = e
    comm.agree(error)
    images, seconds = comm.host_sum(embedded["rows"]), comm.max(embedded["seconds"])

    def finish() -> dict:
        return _write_summary(out_dir, meta, summary_path, images, seconds)

    summary = run_stage(comm, finish, root_only=True)
    return summary if summary is not None else read_json(summary_path)


WDS_ROW_ORDER = "tars in pattern order"


def _tar_counts(ds, comm: Comm) -> list[int] | None:
    """Samples of each tar (header counts: they place every row), None for remote tars in one process."""
    try:
        counts = ds.sample_counts()
    except ValueError as e:
        if comm.world > 1:
            raise ValueError(f"embed under torchrun splits the rows by tar counts, and {e}") from None
        return None
    for url, c in zip(ds.shards, counts):
        if c == 0 and not ds.skip_bad:
            raise ValueError(f"shard {url!r}: empty shard (no samples)")
        # a tar cut on a sample boundary reads as valid: its img2dataset stats name the count it should hold
        expected = shard_stats_count(url)
        if expected is not None and c != expected and not ds.skip_bad:
            raise ValueError(f"shard {url!r}: holds {c} samples, its {os.path.basename(stats_path(url))} says "
                             f"{expected} (successes): cut short or rewritten")  # fmt: skip
    return counts


def _write_summary(out_dir: str, meta: dict, summary_path: str, images: float, seconds: float) -> dict:
    """The end of a run (rank 0, every rank's shards on disk): check them, write the id index, then embed.json."""
    shards, dirs = _shards_listed(out_dir), shard_dirs(meta)
    if shards != list(range(len(shards))) or any(_shard_rows_on_disk(out_dir, k, dirs) is None for k in shards):
        raise ValueError(f"embed: {out_dir!r}: shards are missing after the run ({shards[:5]}…); rerun to redo them")
    first_image = np.load(os.path.join(out_dir, "image", shard_name(0)), mmap_mode="r") if shards else None
    # the id -> row index beside the features, before embed.json: readers open it instead of sorting every id
    all_ids = [np.load(os.path.join(out_dir, "ids", shard_name(k)), mmap_mode="r") for k in shards]
    write_index(out_dir, np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64))
    images = int(images)
    summary = {
        **meta,
        "count": int(sum(_shard_rows_on_disk(out_dir, k, dirs) for k in shards)),
        "dim": int(first_image.shape[1]) if first_image is not None else 0,
        "dtype": "float16",
        "shards": len(shards),
        "normalized": True,
        "seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else None,
    }
    atomic_json(summary_path, summary)
    rate = f"{images / seconds:.1f} images/s" if seconds > 0 else "no new images"
    print(f"embed: {images} images in {seconds:.1f} s ({rate}); {summary['count']} rows in {out_dir}")
    return summary


def _complete(out_dir: str, summary: dict) -> bool:
    """Whether every shard embed.json lists is on disk with the rows it counts."""
    sizes = [_shard_rows_on_disk(out_dir, k, shard_dirs(summary)) for k in range(summary["shards"])]
    return None not in sizes and sum(sizes) == summary["count"] and _shards_listed(out_dir) == list(range(len(sizes)))


def _countable(ds) -> bool:
    try:
        return int(ds.num_samples) >= 0
    except (AttributeError, ValueError):
        return False


def _embed_batches(
    model: torch.nn.Module, batches, out_dir: str, cfg: EmbedConfig, total: int | None, bf16: bool, show: bool = True
):
    """Encode the (shard, batch, last) batches and write each shard after its last batch; the rows done and the
    seconds they took. Several shards may be open at once (DataLoader workers make one shard each). ``show``: this
    rank draws the progress bar (rank 0; its total is its own share)."""
    from .progress import tqdm

    was_training = model.training
    model.eval()
    device = model_device_dtype(model)[0]
    rows, start = 0, time.perf_counter()
    bar = tqdm(total=total, unit="img", desc="embed", disable=not (cfg.progress and show), dynamic_ncols=True)
    signals = preempt.Preemption()

    def check(k: int) -> None:  # after a shard is on disk: the unit a rerun skips
        if signals.signum:
            raise preempt.Stopped(signals.signum, f"shard {k} ({rows} rows written by this run)")

    def autocast():  # bf16 on the GPU; on the CPU (fp32) a no-op, so the CPU bytes are what they were
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    try:
        with signals, torch.inference_mode():
            open_shards: dict[int, _ShardBuffer] = {}
            for k, batch, last in batches:
                current = open_shards.setdefault(k, _ShardBuffer(k))
                if batch is not None:
                    with autocast():
                        features = image_features(model, batch["image"])
                        # views 1..K-1 a view at a time, batches of the image batch's rows (its shapes)
                        views = batch.get("views")
                        per_view = (
                            [image_features(model, views[:, v]) for v in range(views.shape[1])]
                            if views is not None
                            else []
                        )
                    current.add(batch, features, torch.stack([features, *per_view], 1) if per_view else None)
                    bar.update(len(batch["caption"]))
                    bar.set_postfix(shard=k, refresh=False)
                if last:
                    with autocast():
                        rows += open_shards.pop(k).write(out_dir, model, cfg.batch_size)
                    check(k)
    finally:
        bar.close()
        model.train(was_training)
    return {"rows": rows, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------------------------
# reading: what the later stages call


class ShardedRows:
    """Rows ``[n, D]`` (or ``[n]``) of a list of memory-mapped shards, read on indexing, never loaded whole.

    ``rows[i]``, ``rows[a:b]`` (step 1) and ``rows[index_array]`` (any order, repeats allowed) return numpy arrays
    of the stored dtype; ``np.asarray(rows)`` reads everything.
    """

    def __init__(self, shards: list[np.ndarray]):
        self.shards = shards
        self.starts = np.cumsum([0] + [len(a) for a in shards]).astype(np.int64)
        self.shape = (int(self.starts[-1]), *shards[0].shape[1:]) if shards else (0,)
        self.dtype = shards[0].dtype if shards else np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = self[0 : len(self)]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {index} out of range for {n} rows")
            s = int(np.searchsorted(self.starts, i, side="right")) - 1
            return np.asarray(self.shards[s][i - self.starts[s]])
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return self[np.arange(start, stop, step)]
            parts = [
                a[max(start - lo, 0) : min(stop, lo + len(a)) - lo]
                for a, lo in zip(self.shards, self.starts[:-1])
                if lo < stop and lo + len(a) > start
            ]
            return np.concatenate(parts) if parts else np.empty((0, *self.shape[1:]), self.dtype)
        rows = np.asarray(index, dtype=np.int64)
        if rows.ndim != 1:
            raise IndexError(f"index arrays must be 1-D, got shape {rows.shape}")
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"row indices must be in [0, {n}), got {int(rows.min())}..{int(rows.max())}")
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        for s in np.unique(shard):
            at = shard == s
            out[at] = self.shards[s][rows[at] - self.starts[s]]
        return out


def _expected_fields(expect, fields_of) -> dict:
    if expect is None:
        return {}
    if isinstance(expect, dict):
        return expect
    return fields_of(expect)


def _loaded_fields(expect) -> dict:
    if isinstance(expect, str):
        return {"fingerprint": expect}
    return {"fingerprint": expect.fingerprint}


def load_embeddings(path: str, expect_model=None, expect_dataset=None) -> dict:
    """Memory-map a finished embed directory; check it holds what the caller expects.

    ``expect_model``: a LoadedModel, a fingerprint string, or a dict of ``embed.json["model"]`` fields.
    ``expect_dataset``: a DataConfig (its identity fields must all match) or a dict of fields, looked up in
    ``embed.json["dataset"]`` and then in its corpus ``summary`` (e.g. ``{"corpus": "teacher"}``).
    A mismatch is one ValueError line naming the field and both values.

    Returns ``{"image": ShardedRows [n, D] float16, "text": ShardedRows [n, D], "ids": int64 [n],
    "labels": int64 [n], "meta": embed.json, "row_of": IdIndex}`` (``row_of(ids)`` -> rows), and
    ``"image_views": ShardedRows [n, K, D]`` when it was embedded with ``--augment`` (``meta["views"]``).
    """
    summary_path = os.path.join(path, "embed.json")
    meta = read_json(summary_path)
    if meta is None:
        what = "an unfinished embed run (rerun clipcid-fast embed)" if os.path.isdir(path) else "missing"
        raise ValueError(f"embeddings {path!r}: no embed.json ({what})")
    model_fields = _expected_fields(expect_model, _loaded_fields)
    dataset_fields = _expected_fields(expect_dataset, lambda c: dataset_identity(to_dict(c)))
    for key, value in model_fields.items():
        if plain(value) != meta["model"].get(key, "<absent>"):
            raise ValueError(
                f"embeddings {path!r}: model {key} is {short(meta['model'].get(key, '<absent>'))}, "
                f"expected {short(value)} (embedded by another model)"
            )
    stored_dataset = meta["dataset"]
    for key, value in dataset_fields.items():
        have = stored_dataset.get(key, stored_dataset.get("summary", {}).get(key, "<absent>"))
        if plain(value) != have:
            raise ValueError(f"embeddings {path!r}: dataset field {key!r} is {short(have)}, expected {short(value)}")

    dirs = shard_dirs(meta)
    columns: dict[str, list[np.ndarray]] = {sub: [] for sub in dirs}
    for k in range(meta["shards"]):
        for sub in dirs:
            file = os.path.join(path, sub, shard_name(k))
            if not os.path.isfile(file):
                raise ValueError(f"embeddings {path!r}: {sub}/{shard_name(k)} is missing (embed.json lists it)")
            columns[sub].append(np.load(file, mmap_mode="r"))
        sizes = {len(columns[sub][-1]) for sub in dirs}
        if len(sizes) != 1:
            raise ValueError(f"embeddings {path!r}: shard {shard_name(k)} has different row counts {sorted(sizes)}")
    image, text = ShardedRows(columns["image"]), ShardedRows(columns["text"])
    if len(image) != meta["count"]:
        raise ValueError(f"embeddings {path!r}: {len(image)} rows on disk, embed.json counts {meta['count']}")
    ids = np.concatenate(columns["ids"]).astype(np.int64) if meta["shards"] else np.zeros(0, np.int64)
    labels = np.concatenate(columns["labels"]).astype(np.int64) if meta["shards"] else np.zeros(0, np.int64)
    row_of = open_index(path, len(ids), ids)  # the persisted index (id_index.py), or one built from the ids
    out = {"image": image, "text": text, "ids": ids, "labels": labels, "meta": meta, "row_of": row_of}
    if VIEWS_DIR in dirs:
        out["image_views"] = ShardedRows(columns[VIEWS_DIR])
    return out


TRAINING_IDENTITY = ("dataset", "train_data", "corpus", "student_samples", "caption_noise", "data_seed",
                     "csv_img_key", "csv_caption_key")  # fmt: skip
"""The DataConfig fields a trainer compares with the cache's: the ones that name its samples and their captions (a
narrower set than ``dataset_identity``'s, which also holds settings such as ``skip_bad`` and the data folder)."""


def load_teacher_cache(path: str | None, recipe: str, teacher: LoadedModel, data: dict) -> dict:
    """``load_embeddings(path)`` for training with ``teacher`` on the samples of ``data`` (a DataConfig's dict):
    refused (one ValueError line naming ``--teacher-cache``) when another teacher's weights embedded it or when it
    holds another dataset (``TRAINING_IDENTITY``)."""
    if path is None:
        raise ValueError(f"recipe {recipe} needs --teacher-cache (clipcid-fast embed output) or --online-teacher")
    emb = load_embeddings(path)
    meta = emb["meta"]
    if meta["model"]["fingerprint"] != teacher.fingerprint:
        raise ValueError(
            f"--teacher-cache {path!r} was embedded by {meta['model']['name']} "
            f"(weights {meta['model']['fingerprint'][:12]}), not this teacher {teacher.name} "
            f"(weights {teacher.fingerprint[:12]}): re-run clipcid-fast embed"
        )
    want = {k: data.get(k) for k in TRAINING_IDENTITY}
    got = {k: meta["dataset"].get(k) for k in TRAINING_IDENTITY}
    diff = [f"{k}: {got[k]!r} (cache) vs {want[k]!r} (now)" for k in want if want[k] != got[k]]
    if diff:
        raise ValueError(f"--teacher-cache {path!r} holds another dataset: {'; '.join(diff)}")
    return emb
