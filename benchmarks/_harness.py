"""Shared benchmark harness: timing, fresh-process peak memory, the long-format CSV, plots, CLI flags.

Units: times in milliseconds; memory in MB = 10**6 bytes (not MiB); GFLOP/s = 10**9 FLOP per second.

* :func:`time_fn` — wall-clock quantiles (``time.perf_counter``) of repeated calls, CUDA-synchronised.
* :func:`peak_memory_mb` — extra memory one call needs, measured in a fresh ``spawn``-ed process:
  on CPU the peak resident set (``VmHWM``) minus the resident set after the inputs are built
  (``VmRSS``), with the peak reset through ``/proc/self/clear_refs``; on CUDA
  ``max_memory_allocated − memory_allocated``.
* :func:`append_rows` — append rows to the CSV (schema :data:`COLUMNS`), filling in the machine and
  version columns.
* :func:`plot` — one PNG per op from the latest rows of the CSV.
* :func:`common_args` — argparse parent with the flags every script shares.

A callable handed to :func:`time_fn` or built by a :func:`peak_memory_mb` factory may have a
``setup()`` method: it is run before every call, outside the timed / measured region (the workloads use
it to build the autograd graph before timing ``backward`` alone, and to clear gradients).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime as _dt
import functools
import gc
import importlib
import importlib.metadata
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = REPO_ROOT / "benchmarks" / "results" / "results.csv"
MB = 1e6  # bytes per MB in every *_mb value of this harness

COLUMNS = (
    "op",
    "provider",
    "mode",
    "x_name",
    "x_value",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "peak_mb",
    "gflops",
    "device",
    "threads",
    "torch",
    "triton",
    "git_sha",
    "timestamp",
    "note",
)
"""The CSV columns, in this order (see benchmarks/README.md for their meaning)."""

# --------------------------------------------------------------------------------------------------
# Devices and timing
# --------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / ``"auto"`` → cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted list."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: str | torch.device,
    setup: Callable[[], object] | None = None,
    max_seconds: float | None = None,
    min_repeats: int = 3,
) -> dict:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Returns ``{"p20": ms, "p50": ms, "p80": ms, "times_ms": [...], "repeats": n}`` (quantiles with
    linear interpolation). ``setup`` (default: ``fn.setup`` if it exists) runs before every call,
    untimed. On CUDA the device is synchronised before the clock starts and before it stops. The result
    of each call is dropped before the next one, so a forward's autograd graph does not pile up.

    ``max_seconds`` (optional, needs ``warmup >= 1``): a time budget for the timed calls; when the last
    warm-up call says ``repeats`` calls would take longer, fewer are made, but never fewer than
    ``min_repeats``. The number actually made is returned as ``repeats``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = torch.device(device)
    if setup is None:
        setup = getattr(fn, "setup", None)
    warm_s = None
    for _ in range(warmup):
        if setup is not None:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        warm_s = time.perf_counter() - t0
        del out
    if max_seconds is not None and warm_s is not None and warm_s * repeats > max_seconds:
        repeats = max(min(min_repeats, repeats), int(max_seconds / warm_s))
    gc.collect()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    s = sorted(times)
    return {
        "p20": _quantile(s, 0.2),
        "p50": _quantile(s, 0.5),
        "p80": _quantile(s, 0.8),
        "times_ms": times,
        "repeats": len(times),
    }


# --------------------------------------------------------------------------------------------------
# Peak memory in a fresh process
# --------------------------------------------------------------------------------------------------

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # "VmHWM:   123456 kB" (kB means KiB here)
    raise RuntimeError(f"{field} not found in {_STATUS}")


def _reset_peak_rss() -> str | None:
    """Reset VmHWM to the current RSS; returns None on success, else the reason it failed."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return None
    except OSError as e:
        return f"cannot write 5 to {_CLEAR_REFS} ({e})"


class _RssSampler:
    """Fallback peak-RSS meter: a thread that samples psutil's RSS every ``interval`` seconds."""

    def __init__(self, interval: float = 0.0005):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak, self._proc.memory_info().rss)
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def load_factory(factory: str) -> Callable:
    mod_name, _, fn_name = factory.partition(":")
    if not fn_name:
        raise ValueError(f"factory must be 'module:function', got {factory!r}")
    return getattr(importlib.import_module(mod_name), fn_name)


def _peak_child(factory: str, kwargs: dict, mode: str, device: str, threads: int, method: str) -> dict:
    """Runs in the spawned process: build inputs, run the callable once, report the extra memory."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    fn = load_factory(factory)(**kwargs, mode=mode)
    setup = getattr(fn, "setup", None)
    if setup is not None:
        setup()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del out
        return {"peak_mb": (peak - base) / MB, "baseline_mb": base / MB, "method": "cuda_max_memory_allocated"}
    reason = _reset_peak_rss() if method in ("auto", "clear_refs") else "sampled method requested"
    if reason is None:
        base = _status_kib("VmRSS") * 1024
        out = fn()
        peak = _status_kib("VmHWM") * 1024
        del out
        return {"peak_mb": (peak - base) / MB, "baseline_mb": base / MB, "method": "clear_refs_vmhwm"}
    if method == "clear_refs":
        raise RuntimeError(reason)
    import psutil

    base = psutil.Process().memory_info().rss
    with _RssSampler() as sampler:
        out = fn()
    del out
    return {
        "peak_mb": (sampler.peak - base) / MB,
        "baseline_mb": base / MB,
        "method": "psutil_sampled",
        "why": reason,
    }


def peak_memory(
    factory: str,
    kwargs: Mapping,
    mode: str,
    *,
    device: str | torch.device | None = None,
    threads: int | None = None,
    method: str = "auto",
) -> dict:
    """Like :func:`peak_memory_mb` but returns ``{"peak_mb", "baseline_mb", "method"}``.

    ``method``: ``"auto"`` (clear_refs, else a psutil sampling thread), ``"clear_refs"`` (fail if not
    available) or ``"sampled"`` (force the fallback; for tests). ``device`` defaults to
    ``kwargs["device"]`` or cpu. If the child dies (e.g. killed for memory) ``peak_mb`` is NaN and
    ``error`` says why.
    """
    if method not in ("auto", "clear_refs", "sampled"):
        raise ValueError(f"unknown method {method!r}")
    dev = str(resolve_device(device if device is not None else kwargs.get("device", "cpu")))
    threads = torch.get_num_threads() if threads is None else threads
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        fut = ex.submit(_peak_child, factory, dict(kwargs), mode, dev, threads, method)
        try:
            res = fut.result()
        except concurrent.futures.process.BrokenProcessPool as e:
            return {"peak_mb": float("nan"), "baseline_mb": float("nan"), "method": "failed", "error": repr(e)}
    if res.get("why"):
        warnings.warn(
            f"peak memory: {res['why']}; falling back to sampling RSS with psutil in a thread "
            "(may miss short-lived peaks)",
            RuntimeWarning,
            stacklevel=2,
        )
    return res


def peak_memory_mb(factory: str, kwargs: Mapping, mode: str, **kw) -> float:
    """Extra memory (MB = 10**6 bytes) one call of a workload needs, measured in a fresh process.

    ``factory`` is ``"module:function"`` importable from the repo root (e.g.
    ``"benchmarks.workloads:distill_clip"``). A ``spawn``-ed child imports it, calls
    ``factory(**kwargs, mode=mode)`` to build the inputs and get the callable, runs its ``setup()`` if
    it has one, ``gc.collect()``, then

    * CPU: writes ``5`` to ``/proc/self/clear_refs`` (resets the peak RSS ``VmHWM`` to the current RSS),
      reads ``VmRSS`` as the baseline, runs the callable once and returns ``VmHWM − baseline``.
      If ``clear_refs`` is not writable it warns and samples the RSS with psutil in a thread instead.
    * CUDA: ``max_memory_allocated − memory_allocated`` around the call, after
      ``reset_peak_memory_stats``.

    Keyword arguments are those of :func:`peak_memory` (``device``, ``threads``, ``method``).
    """
    return peak_memory(factory, kwargs, mode, **kw)["peak_mb"]


# --------------------------------------------------------------------------------------------------
# Machine description and the CSV
# --------------------------------------------------------------------------------------------------


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str | torch.device | None = None) -> str:
    """CPU model name from /proc/cpuinfo, or ``torch.cuda.get_device_name`` for a CUDA device."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return _cpu_model()


def triton_version() -> str:
    mod = sys.modules.get("triton")
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:  # without importing triton (slow, and it must not be imported before TRITON_INTERPRET is set)
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_sha() -> str:
    """``git rev-parse --short HEAD`` of the repo, ``-dirty`` if tracked files changed; "" without a commit."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return ""
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return sha.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def load_note() -> str:
    """``"load1=… (2 cpus)"``: the 1-minute load average, to tell a quiet run from a contended one."""
    try:
        return f"load1={os.getloadavg()[0]:.2f} ({os.cpu_count()} cpus)"
    except OSError:
        return ""


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def timed_row(
    op: str,
    provider: str,
    mode: str,
    x_name: str,
    x_value,
    timing: Mapping,
    *,
    device,
    note: str,
    peak_mb: float | None = None,
    gflops: float | None = None,
) -> dict:
    """One CSV row from :func:`time_fn`'s result (p20 / p50 / p80 ms); the columns :func:`append_rows` fills
    in itself (threads, versions, git sha, timestamp) are left out, and ``None`` stays an empty cell."""
    return dict(
        op=op,
        provider=provider,
        mode=mode,
        x_name=x_name,
        x_value=x_value,
        p20_ms=timing["p20"],
        p50_ms=timing["p50"],
        p80_ms=timing["p80"],
        peak_mb=peak_mb,
        gflops=gflops,
        device=str(device),
        note=note,
    )


def append_rows(csv_path: str | os.PathLike, rows: Iterable[Mapping]) -> int:
    """Append ``rows`` (mappings keyed by :data:`COLUMNS`) to a long-format CSV; returns how many.

    Creates the file (and its folder) with the header if missing; refuses a file whose header differs.
    Missing columns are filled in: ``device`` (the row's ``"cpu"``/``"cuda"`` is turned into the CPU
    model / GPU name; default the CPU, or the GPU when one is available), ``threads``
    (``torch.get_num_threads()``), ``torch``, ``triton``, ``git_sha``, ``timestamp`` (ISO 8601, UTC);
    anything else missing is left empty. Unknown keys raise ``KeyError``.
    """
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    defaults = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "git_sha": git_sha(),
    }
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = []
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown CSV columns {sorted(unknown)}; the schema is {COLUMNS}")
        r = {**defaults, "timestamp": now, **{k: v for k, v in row.items() if v is not None}}
        dev = r.get("device")
        if dev is None or str(dev).split(":")[0] in ("cpu", "cuda", "auto"):
            r["device"] = device_name(dev)
        out.append([_fmt(r.get(c)) for c in COLUMNS])
    return append_table(path, COLUMNS, out)


def append_table(path: Path, columns: tuple, cells: list[list[str]]) -> int:
    """Append formatted rows to a long CSV with this exact header (written when the file is new; a file with
    another header is refused, so two schemas never mix in one file). Returns the number of rows written."""
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if tuple(header or ()) != tuple(columns):
            raise ValueError(f"{path} has header {header}, expected {list(columns)}")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(columns)
        w.writerows(cells)
    return len(cells)


def read_rows(csv_path: str | os.PathLike) -> list[dict]:
    """All rows of the CSV as dicts of strings, in file (= chronological) order."""
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def latest_rows(rows: Iterable[Mapping], key: tuple[str, ...]) -> list[dict]:
    """The last row (in file order, i.e. the latest appended) for each distinct ``key`` tuple."""
    last: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r[c] for c in key)
        last.pop(k, None)  # re-insert so the order follows the latest appearance
        last[k] = dict(r)
    return list(last.values())


def _num(s) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def plot(
    csv_path: str | os.PathLike,
    op: str,
    out_png: str | os.PathLike,
    *,
    metric: str = "p50_ms",
    device: str | None = None,
    annotate: bool = True,
) -> Path:
    """One figure for ``op``: ``metric`` vs x (log-log) above, ``peak_mb`` vs x below.

    One line per provider+mode, from the latest row per (provider, mode, x_value) (optionally only rows
    whose ``device`` column equals ``device``). For a time metric the p20–p80 band is shaded;
    ``annotate`` writes each point's value next to it.
    Uses the Agg backend; returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(csv_path) if r["op"] == op and (device is None or r["device"] == device)]
    if not rows:
        raise ValueError(f"no rows for op {op!r} in {csv_path}")
    rows = latest_rows(rows, ("provider", "mode", "x_value"))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if not math.isfinite(_num(r["x_value"])):
            continue
        series.setdefault(f"{r['provider']} {r['mode']}", []).append(r)
    if not series:
        raise ValueError(f"op {op!r} has no numeric x_value to plot")
    x_name = rows[-1]["x_name"]
    fig, (ax_t, ax_m) = plt.subplots(2, 1, figsize=(7.5, 8), sharex=True, constrained_layout=True)
    mode_order = {"fwd": 0, "bwd": 1, "full": 2}

    def _order(item):
        provider, _, mode = item[0].rpartition(" ")
        return (provider, mode_order.get(mode, 9), mode)

    for i_series, (label, rs) in enumerate(sorted(series.items(), key=_order)):
        rs.sort(key=lambda r: _num(r["x_value"]))
        x = [_num(r["x_value"]) for r in rs]
        y = [_num(r[metric]) for r in rs]
        (line,) = ax_t.plot(x, y, marker="o", label=label)
        if metric.endswith("_ms"):
            lo = [_num(r["p20_ms"]) for r in rs]
            hi = [_num(r["p80_ms"]) for r in rs]
            ax_t.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        peaks = [_num(r["peak_mb"]) for r in rs]
        ax_m.plot(x, peaks, marker="o", color=line.get_color(), label=label)
        if annotate:  # values beside the points, staggered per series so coincident lines stay legible
            for ax, ys in ((ax_t, y), (ax_m, peaks)):
                for xi, yi in zip(x, ys):
                    if math.isfinite(yi) and yi > 0:
                        ax.annotate(
                            f"{yi:,.0f}" if yi >= 100 else f"{yi:.3g}",
                            (xi, yi),
                            textcoords="offset points",
                            xytext=(6, 9 * (i_series % 4) - 12),
                            fontsize=7,
                            color=line.get_color(),
                        )
    devices = sorted({r["device"] for r in rows})
    threads = sorted({r["threads"] for r in rows})
    ax_t.set_title(f"{op} — {', '.join(devices)}, {'/'.join(threads)} threads (lower is better)")
    ax_t.set_ylabel(metric.replace("_ms", " (ms)") + (" [band: p20–p80]" if metric.endswith("_ms") else ""))
    ax_m.set_ylabel("peak extra memory (MB = 1e6 B)")
    ax_m.set_xlabel(x_name)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    measured_peak = any(math.isfinite(_num(r["peak_mb"])) and _num(r["peak_mb"]) > 0 for r in rows)
    if not measured_peak:  # --no-memory: nothing to put on a log axis
        ax_m.text(0.5, 0.5, "peak memory not measured", transform=ax_m.transAxes, ha="center", va="center")
    for ax in (ax_t, ax_m) if measured_peak else (ax_t,):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        # label 1-2-5 steps so a panel spanning less than a decade still has numbers on it
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.1)
        ax.legend(fontsize=8)
        ax.margins(x=0.08)
    xs = sorted({_num(r["x_value"]) for rs in series.values() for r in rs})
    ax_m.set_xticks(xs)
    ax_m.set_xticklabels([f"{v:g}" for v in xs], rotation=30)
    ax_m.minorticks_off()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` through a temporary file and a rename (a reader never sees half a PNG), then
    close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def plot_unless_disabled(args: argparse.Namespace, op: str, *, device: str, png_name: str | None = None) -> None:
    """A benchmark's closing figure: ``plot`` of ``op`` beside ``args.csv`` (``<op>.png`` unless ``png_name``),
    unless ``args.no_plot``."""
    if not args.no_plot:
        png = plot(args.csv, op, Path(args.csv).parent / (png_name or f"{op}.png"), device=device)
        print(f"plot: {png}", flush=True)


def common_args() -> argparse.ArgumentParser:
    """Argparse parent with the shared flags: --csv, --repeats, --warmup, --quick, --threads, --device."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common benchmark options")
    g.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="results CSV (default: %(default)s)")
    g.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 5; 3 with --quick)")
    g.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    g.add_argument("--quick", action="store_true", help="tiny sizes and fewer repeats (smoke test)")
    g.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available; default)")
    return p


def apply_common(args: argparse.Namespace) -> torch.device:
    """Apply the shared flags (threads, repeats default) and return the device."""
    torch.set_num_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return resolve_device(args.device)
