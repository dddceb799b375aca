"""Semantic-balance benchmark (``masked_max_similarity`` / ``nearest_centroid``): the whole streaming pipeline
(``clipcid_fast.pipeline.balance.run_balance``) on a synthetic clustered dataset, per stage, against its bar.

    cd /work/main && .venv/bin/python benchmarks/bench_balance.py --quick --csv /tmp/bench_balance.csv  # 100k rows
    .venv/bin/python benchmarks/bench_balance.py --rows 1000000 --k 1024 --csv /tmp/bench_balance_1m.csv
    .venv/bin/python benchmarks/bench_balance.py --full          # 10M × 512 fp16 (10.24 GB on disk): the bar
    .venv/bin/python benchmarks/bench_balance.py --rows 300000 --generate-only   # just write the dataset

Dataset (:func:`generate_dataset`, written once and reused): ``n`` rows ``[n, D]`` (D = 512, fp16 by
default) in a memory-mapped ``.npy`` under ``--data-dir`` (default ``/tmp/clipcid_balance_data``), made in
chunks of 65536 rows (never all in RAM) from ``numpy.random.default_rng([seed, …])``:

* ``K_true`` latent centres (unit vectors sharing a common direction, pairwise cosine ≈ ``centre_cos`` = 0.2,
  as CLIP embeddings share a mean direction) with lognormal weights (σ = 1: uneven cluster sizes);
* each row = normalise(centre + s·z), z ~ N(0, I/D), with a per-centre noise s ∈ [0.5, 1.0], i.e. a
  within-cluster pairwise cosine 1/(1 + s²) ∈ [0.5, 0.8] and a cosine to the centre of 0.71–0.89;
* a planted fraction (default 10 %) of near-duplicates: a row marked as one becomes
  normalise(x_src + t·z), t ∈ [0.005, 0.08], with ``x_src`` an earlier *original* row of the same latent
  cluster in the same chunk, so cos(dup, src) ≥ 1/sqrt(1 + t²) ≈ 0.9968 (> 0.99 after fp16 rounding).

Beside ``<stem>.npy`` go ``<stem>.labels.npy`` (int32 latent cluster per row), ``<stem>.dups.npy`` (int64
``[n_dup, 2]``: planted row, its source row) and ``<stem>.json`` (the parameters, written last; a file
with the same parameters is reused, byte for byte). The stem holds a hash of the parameters.

Run (:func:`run_pipeline`): a warm-up of the one-time process costs (the first custom-op call imports
torch._dynamo, ~2 s; matplotlib for the merge's plot; its seconds are reported, not charged to a stage), the
fp32 ``torch.mm`` ceiling (``bench_mm_ceiling.measure_mm_gflops``, 15 repeats), ``run_balance`` into
``<out-dir>/<data stem>_k<k>`` (removed first if it holds an earlier run; k-means on k · 256 sampled rows,
nearest-centroid assignment of every row, "hard" ordering, SemDeDup's rule for every eps from one
``masked_max_similarity`` pass per cluster, merge), the ceiling again (the larger of the two is used: this
VM's GEMM rate drifts by ±20 %). The dataset is made in a child process, so the peak RSS (``ru_maxrss``) is
the pipeline's (it includes the file-backed pages of the memory-mapped embeddings; the per-stage ``peak_mb``
column is the peak *anonymous* RSS sampled during the stage, the memory the pipeline itself allocates).

Per stage (kmeans, assign, order, dedup, merge, and total) one CSV row: op ``balance_pipeline``, provider
``clipcid_fast``, mode = the stage, x = rows; p20 = p50 = p80 = the stage's seconds of this single run (ms);
GFLOP/s for kmeans (faiss: 2·sample·k·D·niter), assign (2·n·k·D) and dedup (Σ_clusters c²·D, the lower
triangle's GEMM work, Σc² from ``offsets.npy``); the note has k, D, dtype, rows/s, the ceiling and the ratio
to it, how many rows of the embeddings the stage read (counted in ``EmbeddingSource.read`` / ``take``), and
the load average. The PNG (``balance_pipeline.png``) goes next to the CSV.

The printed summary checks (does not assert) the issue's bar: 10M × 512 fp16 end to end within 60 minutes on
the 2-core machine, each stage reading the embeddings once, assignment and dedup at ≥ 75 % of fp32 mm. Below
10M rows it extrapolates to 10M at k = 1024 (k-means: same sample size; assignment ∝ n·k; dedup ∝ Σc², which
for the same cluster-size distribution grows as n²/k; order / merge ∝ n), and, since the dedup rate grows with
the cluster size, once more with the dedup stage's work timed on one cluster of c = 10M / 1024 random rows of
the dataset after the run (:func:`probe_dedup`; ``--no-probe`` skips it).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import resource
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from benchmarks._harness import append_rows, apply_common, common_args, device_name, load_note, plot, timed_row

OP = "balance_pipeline"
PROVIDER = "clipcid_fast"
STAGES = ("kmeans", "assign", "order", "dedup", "merge")
DEFAULT_DATA_DIR = "/tmp/clipcid_balance_data"
FULL_ROWS = 10_000_000
QUICK_ROWS = 100_000
DEFAULT_ROWS = 300_000
EPS = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2)  # a SemDeDup-style sweep; every eps comes from the same pass
BAR_SECONDS = 3600.0
BAR_RATIO = 0.75
MB = 1e6


# --------------------------------------------------------------------------------------------------
# Synthetic dataset
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Everything that determines the bytes of the dataset (recorded in the sidecar JSON)."""

    n: int
    d: int = 512
    dtype: str = "float16"
    seed: int = 0
    k_true: int = 0  # 0 = default_k_true(n)
    centre_cos: float = 0.2
    size_sigma: float = 1.0
    noise_lo: float = 0.5
    noise_hi: float = 1.0
    dup_frac: float = 0.1
    dup_noise_lo: float = 0.005
    dup_noise_hi: float = 0.08
    chunk_rows: int = 65536

    def resolved(self) -> DataSpec:
        return dataclasses.replace(self, k_true=self.k_true or default_k_true(self.n))

    def params(self) -> dict:
        return {"version": 1, **dataclasses.asdict(self.resolved())}

    def stem(self) -> str:
        s = self.resolved()
        h = hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()[:10]
        return f"synth_n{s.n}_d{s.d}_{s.dtype}_s{s.seed}_{h}"


def default_k_true(n: int) -> int:
    """Latent clusters: 1000, fewer for small n (at least ~50 rows each)."""
    return int(max(2, min(1000, n // 50)))


def default_k(n: int) -> int:
    """k-means centroids: 1024 from 1M rows (the issue's 10M setting), else about one per 1000 rows."""
    return 1024 if n >= 1_000_000 else int(max(8, min(1024, n // 1000)))


def _paths(data_dir: str | os.PathLike, spec: DataSpec) -> dict:
    base = Path(data_dir) / spec.stem()
    return {
        "data": Path(f"{base}.npy"),
        "labels": Path(f"{base}.labels.npy"),
        "dups": Path(f"{base}.dups.npy"),
        "meta": Path(f"{base}.json"),
    }


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise the rows of ``x`` in place; returns ``x``."""
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def _centres(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres [K, D] float32 unit rows, weights [K] (sum 1), noise level per centre [K])."""
    rng = np.random.default_rng([spec.seed, 0])
    common = _unit_rows(rng.standard_normal((1, spec.d)))
    own = _unit_rows(rng.standard_normal((spec.k_true, spec.d)))
    centres = _unit_rows(math.sqrt(spec.centre_cos) * common + math.sqrt(1 - spec.centre_cos) * own)
    w = rng.lognormal(0.0, spec.size_sigma, spec.k_true)
    noise = rng.uniform(spec.noise_lo, spec.noise_hi, spec.k_true)
    return centres.astype(np.float32), w / w.sum(), noise.astype(np.float32)


def make_chunk(spec: DataSpec, index: int, centres, weights, noise) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of chunk ``index`` (float32, unit), their latent labels, and the planted pairs (chunk-local rows)."""
    lo = index * spec.chunk_rows
    m = min(spec.n, lo + spec.chunk_rows) - lo
    rng = np.random.default_rng([spec.seed, 1, index])
    labels = rng.choice(spec.k_true, size=m, p=weights)
    z = rng.standard_normal((m, spec.d), dtype=np.float32)
    z *= np.float32(1 / math.sqrt(spec.d))  # ‖z‖ ≈ 1
    want_dup = rng.random(m) < spec.dup_frac
    u = rng.random(m)
    t = rng.uniform(spec.dup_noise_lo, spec.dup_noise_hi, m).astype(np.float32)

    x = np.take(centres, labels, axis=0)
    x += noise[labels, None] * z
    # sources: an earlier original (not planted) row of the same latent cluster in this chunk
    order = np.lexsort((np.arange(m), labels))
    lab_s, orig_s = labels[order], ~want_dup[order]
    first = np.r_[0, np.flatnonzero(np.diff(lab_s)) + 1]
    is_first = np.zeros(m, bool)
    is_first[first] = True
    gid = np.cumsum(is_first) - 1
    cum = np.cumsum(orig_s) - orig_s  # originals before each sorted position (global)
    base = cum[first][gid]  # originals before the group
    before = cum - base  # originals earlier in the same group
    is_dup_s = ~orig_s & (before > 0)
    r = np.minimum((u[order] * before).astype(np.int64), np.maximum(before - 1, 0))
    orig_pos = np.flatnonzero(orig_s)
    dst = order[is_dup_s]
    src = order[orig_pos[(base + r)[is_dup_s]]] if len(dst) else np.zeros(0, np.int64)
    _unit_rows(x)  # every row, originals included (the planted rows are overwritten next)
    x[dst] = _unit_rows(x[src] + t[dst, None] * z[dst])
    return x, labels.astype(np.int32), np.stack([dst, src], axis=1).astype(np.int64)


def _tqdm(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a plain text fallback
        return _TextBar(total, desc, enabled)
    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=not enabled)


class _TextBar:
    def __init__(self, total, desc, enabled):
        self.total, self.desc, self.enabled, self.done, self.t0 = total, desc, enabled, 0, time.perf_counter()

    def update(self, k):
        self.done += k
        if self.enabled:
            print(f"{self.desc}: {self.done}/{self.total} ({time.perf_counter() - self.t0:.0f} s)", flush=True)

    def close(self):
        pass


def _read_meta(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def generate_dataset(spec: DataSpec, data_dir: str | os.PathLike = DEFAULT_DATA_DIR, *, progress: bool = True) -> dict:
    """Write (or reuse) the dataset of ``spec`` under ``data_dir``; returns its sidecar dict (+ paths, reused).

    Reuse: the sidecar JSON (written last) holds the same parameters and the files have the recorded sizes.
    Otherwise the files are (re)written under temporary names and moved into place.
    """
    spec = spec.resolved()
    if spec.n < 1 or spec.d < 1 or spec.k_true < 1:
        raise ValueError(f"need n, d, k_true ≥ 1, got {spec}")
    paths = _paths(data_dir, spec)
    meta = _read_meta(paths["meta"])
    if (
        meta is not None
        and meta.get("params") == spec.params()
        and all(paths[k].exists() and paths[k].stat().st_size == meta["bytes"][k] for k in ("data", "labels", "dups"))
    ):
        return {**meta, "paths": {k: str(v) for k, v in paths.items()}, "reused": True}
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    tmp = {k: Path(str(v) + tag) for k, v in paths.items()}
    t0 = time.perf_counter()
    centres, weights, noise = _centres(spec)
    out = np.lib.format.open_memmap(tmp["data"], mode="w+", dtype=np.dtype(spec.dtype), shape=(spec.n, spec.d))
    labels = np.empty(spec.n, np.int32)
    dups = []
    bar = _tqdm(spec.n, f"writing {paths['data'].name}", progress)
    n_chunks = -(-spec.n // spec.chunk_rows)
    for i in range(n_chunks):
        lo = i * spec.chunk_rows
        x, lab, pairs = make_chunk(spec, i, centres, weights, noise)
        out[lo : lo + len(x)] = x
        labels[lo : lo + len(x)] = lab
        dups.append(pairs + lo)
        bar.update(len(x))
    bar.close()
    out.flush()
    del out
    dups = np.concatenate(dups) if dups else np.zeros((0, 2), np.int64)
    for key, arr in (("labels", labels), ("dups", dups)):
        with open(tmp[key], "wb") as f:  # a file object: np.save would append ".npy" to the name
            np.save(f, arr)
    sizes = np.bincount(labels, minlength=spec.k_true)
    meta = {
        "params": spec.params(),
        "file": paths["data"].name,
        "n_planted_duplicates": len(dups),
        "latent_cluster_sizes": {"min": int(sizes.min()), "max": int(sizes.max()), "mean": float(sizes.mean())},
        "bytes": {k: tmp[k].stat().st_size for k in ("data", "labels", "dups")},
        "seconds": time.perf_counter() - t0,
    }
    for k in ("data", "labels", "dups"):
        os.replace(tmp[k], paths[k])
    with open(tmp["meta"], "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp["meta"], paths["meta"])
    return {**meta, "paths": {k: str(v) for k, v in paths.items()}, "reused": False}


def generate_in_child(spec: DataSpec, data_dir, progress: bool = True) -> dict:
    """:func:`generate_dataset` in a spawned process, so its written pages do not count in this one's RSS."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as ex:
        return ex.submit(_generate_entry, dataclasses.asdict(spec), str(data_dir), progress).result()


def _generate_entry(spec: dict, data_dir: str, progress: bool) -> dict:
    return generate_dataset(DataSpec(**spec), data_dir, progress=progress)


# --------------------------------------------------------------------------------------------------
# Instrumentation: rows read per stage, peak anonymous RSS per stage
# --------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


class _StageTracker:
    """Follows the pipeline's hook events to know the current stage; counts the embedding rows read
    (``EmbeddingSource.read`` / ``take``, patched for the run) and samples RssAnon per stage."""

    def __init__(self, k: int, interval: float = 0.1):
        self.k, self.interval = k, interval
        self.stage = "kmeans"
        self.rows_read = dict.fromkeys(STAGES, 0)
        self.calls = dict.fromkeys(STAGES, 0)
        self.peak_anon_kb = dict.fromkeys(STAGES, 0.0)
        self.clusters_done = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._sample_loop, daemon=True)

    def sample(self):
        v = _status_kb("RssAnon")
        with self._lock:
            if v == v and v > self.peak_anon_kb[self.stage]:
                self.peak_anon_kb[self.stage] = v

    def _sample_loop(self):
        while not self._stop.wait(self.interval):
            self.sample()

    def _enter(self, stage):
        self.sample()
        with self._lock:
            self.stage = stage
        self.sample()

    def hook(self, event, **info):
        if event == "kmeans":
            self._enter("assign")
        elif event == "assign":
            self._enter("order")
        elif event == "order":
            self._enter("dedup")
        elif event == "batch_done":
            self.clusters_done += len(info.get("clusters", ()))
            if self.clusters_done >= self.k:
                self._enter("merge")
        elif event == "merge":
            self.sample()

    def count(self, rows: int):
        with self._lock:  # dedup reads from several worker threads
            self.rows_read[self.stage] += rows
            self.calls[self.stage] += 1

    @contextlib.contextmanager
    def active(self):
        from clipcid_fast.pipeline.balance import EmbeddingSource

        read, take = EmbeddingSource.read, EmbeddingSource.take
        tracker = self

        def counted_read(self_, start, stop):
            tracker.count(stop - start)
            return read(self_, start, stop)

        def counted_take(self_, rows):
            tracker.count(len(rows))
            return take(self_, rows)

        EmbeddingSource.read, EmbeddingSource.take = counted_read, counted_take
        self._thread.start()
        try:
            yield self
        finally:
            EmbeddingSource.read, EmbeddingSource.take = read, take
            self._stop.set()
            self._thread.join()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _fresh_dir(path: Path) -> None:
    """Remove a previous balance run at ``path`` (only a directory holding its manifest.json)."""
    if path.exists():
        if not (path / "manifest.json").exists() and any(path.iterdir()):
            raise ValueError(f"{path} exists and is not a balance run directory; pick another --out-dir")
        shutil.rmtree(path)
    path.mkdir(parents=True)


def warm_up(device: str = "cpu") -> float:
    """One-time process costs that would otherwise land in the first stage using them (the first call of a
    torch.library custom op imports torch._dynamo, ~2 s; on a GPU the kernels compile; the merge's plot
    imports matplotlib, when it is installed); seconds."""
    from clipcid_fast.ops.masked_max_sim import masked_max_similarity, nearest_centroid

    t0 = time.perf_counter()
    x = torch.nn.functional.normalize(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    x = x.to(device)
    nearest_centroid(x, x[:8], check_values=False)
    masked_max_similarity(x, check_values=False)
    if plot_available():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot

    return time.perf_counter() - t0


def plot_available() -> bool:
    """matplotlib is installed (a bare GPU machine may lack it: the run then writes no plot)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def probe_dedup(data_path: str, c: int, *, seed: int = 0, repeats: int = 3) -> dict:
    """Seconds of the dedup stage's work for one cluster of ``c`` rows, done as the pipeline does it (gather
    from the memory map, normalise, the built-in ``max_sim_fn``, the pipeline's thread rule), on ``c``
    random rows of the dataset; the median of ``repeats`` calls after a warm-up one."""
    from benchmarks._harness import time_fn
    from clipcid_fast.pipeline import balance

    src = balance.EmbeddingSource(data_path)
    c = min(c, src.n)
    rows = np.sort(np.random.default_rng([seed, 2]).choice(src.n, c, replace=False))
    _, max_sim_fn, _ = balance.resolve_fns()
    flops = float(c) ** 2 * src.d
    threads = 1 if flops < balance.SMALL_CLUSTER_FLOPS else torch.get_num_threads()

    def run():
        x, _ = balance.normalize_rows(src.take(rows))
        with balance.intra_op_threads(threads):
            return max_sim_fn(torch.from_numpy(x))

    t = time_fn(run, warmup=1, repeats=repeats, device="cpu")
    return {"c": c, "seconds": t["p50"] / 1e3, "gflops": flops / (t["p50"] / 1e3) / 1e9, "threads": threads}


def run_pipeline(
    data_path: str,
    out_dir: str | os.PathLike,
    *,
    k: int,
    eps=EPS,
    seed: int = 0,
    niter: int = 20,
    mm_repeats: int = 15,
    device: str = "cpu",
    progress: bool = True,
    balance_kwargs: dict | None = None,
) -> dict:
    """Run ``run_balance`` on ``data_path`` into a fresh ``out_dir``, with the mm ceiling before and after;
    returns the per-stage figures (see the module docstring). ``device`` (e.g. ``"cuda"``): assignment and
    dedup run the fused ops there (``run_balance(device=)``), and the ceiling is that device's."""
    from benchmarks.bench_mm_ceiling import measure_mm_gflops
    from clipcid_fast.pipeline import balance

    out = Path(out_dir)
    _fresh_dir(out)
    dev = torch.device(device)
    warm = warm_up(str(dev))
    mm_before = measure_mm_gflops(dev, torch.float32, repeats=mm_repeats)
    tracker = _StageTracker(k)
    kwargs = {"plot": plot_available(), **({} if dev.type == "cpu" else {"device": str(dev)}), **(balance_kwargs or {})}
    t0 = time.perf_counter()
    with tracker.active():
        summary = balance.run_balance(
            data_path, str(out), k=k, eps=list(eps), seed=seed, niter=niter, progress=progress,
            hook=tracker.hook, **kwargs,
        )  # fmt: skip
    wall = time.perf_counter() - t0
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    mm_after = measure_mm_gflops(dev, torch.float32, repeats=mm_repeats)
    with open(out / "timings.json") as f:
        timings = json.load(f)
    offsets = np.load(out / "offsets.npy")
    sizes = np.diff(offsets).astype(np.float64)
    src = balance.EmbeddingSource(data_path)
    n, d = src.n, src.d
    sum_c2 = float((sizes**2).sum())
    km, asg, ded = timings["kmeans"], timings["assign"], timings["dedup"]
    stage = {
        "kmeans": {"seconds": km["seconds"], "flops": km.get("flops"), "rows": km.get("sample_rows")},
        "assign": {"seconds": asg["seconds_rank0"] + asg["merge_seconds"], "flops": 2.0 * n * k * d, "rows": n},
        "order": {"seconds": timings["order"]["seconds"], "flops": None, "rows": n},
        "dedup": {"seconds": ded["seconds_rank0"], "flops": sum_c2 * d, "rows": ded["rows_rank0"]},
        "merge": {"seconds": timings["merge"]["seconds"], "flops": None, "rows": n},
    }
    ceiling = max(mm_before, mm_after)
    for name, s in stage.items():
        s["rows_per_s"] = s["rows"] / s["seconds"] if s["rows"] and s["seconds"] > 0 else float("nan")
        s["gflops"] = s["flops"] / s["seconds"] / 1e9 if s["flops"] and s["seconds"] > 0 else float("nan")
        s["ratio"] = s["gflops"] / ceiling
        s["rows_read"] = tracker.rows_read[name]
        s["read_calls"] = tracker.calls[name]
        s["peak_anon_mb"] = tracker.peak_anon_kb[name] * 1024 / MB
    return {
        "n": n,
        "d": d,
        "dtype": ",".join(src.dtypes),
        "k": k,
        "eps": list(eps),
        "stages": stage,
        "wall_seconds": wall,
        "warmup_seconds": warm,
        "maxrss_mb": maxrss_mb,
        "peak_anon_mb": max(tracker.peak_anon_kb.values()) * 1024 / MB,
        "mm_before": mm_before,
        "mm_after": mm_after,
        "ceiling": ceiling,
        "sum_c2": sum_c2,
        "cluster_sizes": summary["cluster_sizes"],
        "removed": {r["eps"]: r["removed_fraction"] for r in summary["thresholds"]},
        "removed_rows": {r["eps"]: r["removed_duplicates"] for r in summary["thresholds"]},
        "timings": timings,
        "out_dir": str(out),
        "functions": summary["functions"],
    }


def _single_run(seconds: float) -> dict:
    """A one-run timing in time_fn's form (p20 = p50 = p80, ms)."""
    ms = seconds * 1e3
    return {"p20": ms, "p50": ms, "p80": ms}


def csv_rows(res: dict, device: str = "cpu") -> list[dict]:
    """One row per stage plus ``total`` (see the module docstring)."""
    rows = []
    base = f"k={res['k']} D={res['d']} dtype={res['dtype']}"
    ceil = f"fp32 mm ceiling {res['ceiling']:.1f} GFLOP/s (before {res['mm_before']:.1f}, after {res['mm_after']:.1f})"
    for name in STAGES:
        s = res["stages"][name]
        gf = s["gflops"]
        ratio = f"{s['ratio']:.0%} of mm; " if math.isfinite(gf) else ""
        rows.append(
            timed_row(
                OP,
                PROVIDER,
                name,
                "rows",
                res["n"],
                _single_run(s["seconds"]),
                device=device,
                peak_mb=s["peak_anon_mb"],
                gflops=gf,
                note=(
                    f"{base}; single run; {s['rows_per_s']:.0f} rows/s; {ratio}{ceil}; "
                    f"embedding rows read {s['rows_read']} ({s['rows_read'] / res['n']:.3f} x n); "
                    f"peak_mb = peak anonymous RSS in the stage; {load_note()}"
                ),
            )
        )
    removed = ", ".join(f"eps {e:g}: {f:.3f}" for e, f in res["removed"].items())
    rows.append(
        timed_row(
            OP,
            PROVIDER,
            "total",
            "rows",
            res["n"],
            _single_run(res["wall_seconds"]),
            device=device,
            peak_mb=res["maxrss_mb"],
            note=(
                f"{base}; run_balance wall time; {res['n'] / res['wall_seconds']:.0f} rows/s; "
                f"peak_mb = ru_maxrss (includes file pages of the memory-mapped embeddings; peak anonymous "
                f"{res['peak_anon_mb']:.0f} MB); removed fraction {removed}; {ceil}; {load_note()}"
            ),
        )
    )
    return rows


def extrapolate(res: dict, n_target: int = FULL_ROWS, k_target: int = 1024, mppc: int = 256) -> dict:
    """Seconds per stage at ``n_target`` rows / ``k_target`` centroids from this run (same rates)."""
    n, k, st = res["n"], res["k"], res["stages"]
    sample_now, sample_then = min(n, k * mppc), min(n_target, k_target * mppc)
    sum_c2_then = res["sum_c2"] * (n_target / n) ** 2 * (k / k_target)
    est = {
        "kmeans": st["kmeans"]["seconds"] * (sample_then * k_target) / (sample_now * k),
        "assign": st["assign"]["seconds"] * (n_target * k_target) / (n * k),
        "order": st["order"]["seconds"] * n_target / n,
        "dedup": st["dedup"]["seconds"] * sum_c2_then / res["sum_c2"],
        "merge": st["merge"]["seconds"] * n_target / n,
    }
    est["total"] = sum(est.values())
    est["sum_c2"] = sum_c2_then
    probe = res.get("probe")
    if probe:  # dedup at the per-cluster rate measured at c ≈ n_target / k_target (time ∝ c² from there)
        est["dedup_probe"] = probe["seconds"] * sum_c2_then / float(probe["c"]) ** 2
        est["total_probe"] = est["total"] - est["dedup"] + est["dedup_probe"]
    return est


def report(res: dict) -> list[str]:
    """The printed table and the issue's bar (not asserted)."""
    lines = [
        f"{'stage':8s} {'seconds':>10s} {'rows/s':>12s} {'GFLOP/s':>9s} {'% of mm':>8s} {'rows read':>12s} "
        f"{'peak anon MB':>12s}"
    ]
    for name in STAGES:
        s = res["stages"][name]
        gf = f"{s['gflops']:9.1f}" if math.isfinite(s["gflops"]) else f"{'-':>9s}"
        pct = f"{s['ratio']:8.0%}" if math.isfinite(s["gflops"]) else f"{'-':>8s}"
        lines.append(
            f"{name:8s} {s['seconds']:10.2f} {s['rows_per_s']:12.0f} {gf} {pct} "
            f"{s['rows_read'] / res['n']:10.3f} n {s['peak_anon_mb']:12.0f}"
        )
    lines.append(
        f"{'total':8s} {res['wall_seconds']:10.2f} {res['n'] / res['wall_seconds']:12.0f}  (run_balance wall time; "
        f"+ {res.get('warmup_seconds', 0.0):.1f} s one-time warm-up before it); "
        f"peak RSS (ru_maxrss) {res['maxrss_mb']:.0f} MB, peak anonymous RSS {res['peak_anon_mb']:.0f} MB"
    )
    lines.append(
        f"fp32 mm ceiling {res['ceiling']:.1f} GFLOP/s (before {res['mm_before']:.1f}, after {res['mm_after']:.1f}); "
        f"clusters: {res['cluster_sizes']}; sum c^2 = {res['sum_c2']:.4g}"
    )
    lines.append("removed fraction: " + ", ".join(f"eps {e:g}: {f:.4f}" for e, f in res["removed"].items()))
    st = res["stages"]
    reads_ok = all(st[s]["rows_read"] <= res["n"] for s in STAGES)
    lines.append("bar of issue 6 (checked, not asserted):")
    for s in ("assign", "dedup"):
        ok = st[s]["ratio"] >= BAR_RATIO
        lines.append(f"  {s} at {st[s]['ratio']:.0%} of fp32 mm (bar ≥ {BAR_RATIO:.0%}): {'PASS' if ok else 'FAIL'}")
    reads = ", ".join(f"{s} {st[s]['rows_read'] / res['n']:.3f}" for s in STAGES)
    lines.append(
        f"  embedding rows read per stage, in units of n ({reads}): {'PASS' if reads_ok else 'FAIL'} (≤ 1 each)"
    )
    total = res["wall_seconds"] + res.get("warmup_seconds", 0.0)
    if res["n"] >= FULL_ROWS:
        ok = total <= BAR_SECONDS
        lines.append(
            f"  end to end {total / 60:.1f} min incl. {res.get('warmup_seconds', 0.0):.1f} s of one-time warm-up "
            f"(bar ≤ 60 min): {'PASS' if ok else 'FAIL'}"
        )
    else:
        est = extrapolate(res)
        parts = ", ".join(f"{s} {est[s]:.0f} s" for s in STAGES)
        lines.append(
            f"  10M x {res['d']} at k = 1024, extrapolated from this run (same rates; dedup by sum c^2 = "
            f"{est['sum_c2']:.3g}): {parts}; total {est['total'] / 60:.1f} min (bar ≤ 60 min): "
            f"{'PASS' if est['total'] <= BAR_SECONDS else 'FAIL'} (estimate)"
        )
        if "dedup_probe" in est:
            p = res["probe"]
            lines.append(
                f"  ... with dedup at the rate of one cluster of c = {p['c']} (≈ 10M / 1024) measured after the run "
                f"({p['seconds']:.2f} s, {p['gflops']:.1f} GFLOP/s = {p['gflops'] / res['ceiling']:.0%} of mm, "
                f"{p['threads']} threads): dedup {est['dedup_probe']:.0f} s, total {est['total_probe'] / 60:.1f} min: "
                f"{'PASS' if est['total_probe'] <= BAR_SECONDS else 'FAIL'} (estimate)"
            )
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, parents=[common_args()], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=None, help=f"rows n (default {DEFAULT_ROWS}; --quick {QUICK_ROWS})")
    p.add_argument("--full", action="store_true", help=f"n = {FULL_ROWS} (10.24 GB of fp16 on disk; the issue's bar)")
    p.add_argument("--k", type=int, default=None, help="k-means centroids (default 1024 from 1M rows, else n/1000)")
    p.add_argument("--k-true", type=int, default=0, help="latent clusters of the data (default min(1000, n/50))")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dup-frac", type=float, default=0.1, help="planted near-duplicate fraction (default 0.1)")
    p.add_argument("--eps", type=float, nargs="+", default=list(EPS))
    p.add_argument("--niter", type=int, default=20, help="k-means iterations (default 20)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where the dataset goes (default %(default)s)")
    p.add_argument("--out-dir", default=None, help="run directories go here (default <data-dir>/runs)")
    p.add_argument("--mm-repeats", type=int, default=15, help="repeats of each fp32 mm ceiling measurement")
    p.add_argument("--generate-only", action="store_true", help="write / reuse the dataset and stop")
    p.add_argument("--no-probe", action="store_true", help="skip the c = 10M/1024 dedup probe below 10M rows")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    device = apply_common(args)
    n = args.rows or (FULL_ROWS if args.full else QUICK_ROWS if args.quick else DEFAULT_ROWS)
    k = args.k or default_k(n)
    spec = DataSpec(n=n, d=args.dim, dtype=args.dtype, seed=args.seed, k_true=args.k_true, dup_frac=args.dup_frac)
    t_start = time.perf_counter()
    print(f"device {device} ({device_name(device)}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    meta = generate_in_child(spec, args.data_dir, progress=not args.no_progress)
    how = "reused" if meta["reused"] else f"written in {meta['seconds']:.1f} s"
    print(
        f"data {meta['paths']['data']} ({how}): n={n} D={args.dim} {args.dtype}, K_true={meta['params']['k_true']}, "
        f"{meta['n_planted_duplicates']} planted near-duplicates, latent sizes {meta['latent_cluster_sizes']}",
        flush=True,
    )
    if args.generate_only:
        return
    out_dir = Path(args.out_dir or Path(args.data_dir) / "runs") / f"{Path(meta['paths']['data']).stem}_k{k}"
    print(f"run_balance k={k} eps={args.eps} -> {out_dir}; {load_note()}", flush=True)
    res = run_pipeline(
        meta["paths"]["data"], out_dir, k=k, eps=args.eps, seed=args.seed, niter=args.niter,
        mm_repeats=args.mm_repeats, device=str(device), progress=not args.no_progress,
    )  # fmt: skip
    res["planted_fraction"] = meta["n_planted_duplicates"] / n
    if n < FULL_ROWS and not args.no_probe:
        res["probe"] = probe_dedup(meta["paths"]["data"], round(FULL_ROWS / 1024), seed=args.seed)
    for line in report(res):
        print(line)
    print(f"planted near-duplicate fraction {res['planted_fraction']:.4f}")
    append_rows(args.csv, csv_rows(res, str(device)))
    if not args.no_plot and plot_available():
        png = plot(args.csv, OP, Path(args.csv).parent / f"{OP}.png", device=device_name(device))
        print(f"plot {png}")
    print(f"results in {args.csv}; total {time.perf_counter() - t_start:.1f} s; {load_note()}", flush=True)


if __name__ == "__main__":
    main()
