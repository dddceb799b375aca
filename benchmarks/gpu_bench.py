"""The GPU check's kernel benchmarks: every section of ``gpu_sizes`` within its share of the time budget.

    python benchmarks/gpu_bench.py --plan gpu --out OUT_DIR          # what scripts/gpu_check.sh runs
    python benchmarks/gpu_bench.py --plan dry-run --out /tmp/dry     # CI on CPU: tiny sizes, Triton interpreted
    python benchmarks/gpu_bench.py --plan gpu --out OUT --section k2 # one section

Sections (each in its own process, killed at its budget; rows reach the CSV as they are measured):

* ``mm``: bf16 and fp32 ``torch.mm`` at the plan's shape: the rates every other row is a share of;
* ``k2``: open_clip ``DistillClipLoss`` fwd + bwd, op ``distill_clip_D<D>``, x = B: the fused Triton op,
  open_clip itself, the row-chunked exact PyTorch form and ``torch.compile`` of the reference;
* ``k1``: the cluster-discrimination margin softmax fwd + bwd (ArcFace s = 32, m2 = 0.3, mean), op
  ``cluster_discrimination``, x = N (B and D from the plan): fused Triton, row-chunked, PartialFC-style, eager;
* ``k3``: one cluster's masked max similarity, op ``dedup_cluster``, x = c: fused Triton, the CUDA C++ kernel,
  the fair dense and the SemDeDup-style dense forms;
* ``balance``: the streaming balance pipeline (``bench_balance.run_pipeline``) on the plan's rows, assignment
  and dedup on the device; op ``balance_pipeline``, one row per stage.

Per row: p20 / p50 / p80 of the timed calls (``time_fn``: ``torch.cuda.synchronize`` around each call), the
peak extra device memory of the warm-up call (``max_memory_allocated`` − ``memory_allocated``; not measured on
the CPU), TFLOP/s of the model FLOPs of ``gpu_providers`` and the row's share of the measured bf16 and fp32 mm
rates (in the note). A provider whose estimated peak exceeds the plan's share of free memory, or whose time
(predicted from its previous size, or from its warm-up call) does not fit what is left of the section, is
left out with the reason (``not measured`` when the budget is why, ``skipped`` for memory or a missing package);
every outcome goes to ``OUT/bench_status.jsonl`` for ``gpu_summary.py``. A row still compiling or running when its
section's process is stopped at the budget reads ``not measured`` there too: never a failure; an exception, or
a section process that dies, is.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import json
import math
import subprocess
import time

import torch

from benchmarks import gpu_providers as gp
from benchmarks import gpu_sizes
from benchmarks._harness import append_rows, device_name, load_note, plot, time_fn, timed_row
from benchmarks.gpu_summary import NOT_MEASURED

SECTIONS = ("mm", "k2", "k1", "k3", "balance")


class Section:
    """Budget, CSV and status bookkeeping of one section."""

    def __init__(self, name: str, plan: gpu_sizes.Plan, out: Path, device: torch.device, deadline: float):
        self.name, self.plan, self.out, self.device = name, plan, out, device
        self.deadline = deadline  # time.time() by which the section stops starting work
        self.csv = out / "results.csv"
        self.mm = _read_mm(out)
        self.last: dict[str, tuple[float, float]] = {}  # provider -> (work, seconds per call) of its last row

    def left(self) -> float:
        return self.deadline - time.time()

    def status(self, quiet: bool = False, **rec) -> None:
        rec = {"section": self.name, **rec}
        with open(self.out / "bench_status.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        if quiet:
            return
        label = f"{rec.get('op', self.name)} {rec.get('provider', '')} {rec.get('x', '')}".strip()
        print(f"[{self.name}] {label}: {rec['status']}" + (f" ({rec['why']})" if rec.get("why") else ""), flush=True)

    def mm_note(self, tflops: float) -> str:
        parts = [f"{tflops / r:.1%} of {d} mm {r:.1f} TFLOP/s" for d, r in self.mm.items() if r]
        return "; ".join(parts) if parts else "mm rate not measured"

    def pct(self, tflops, dtype: str):
        r = self.mm.get(dtype)
        return tflops / r if tflops is not None and r else None

    def predicted(self, key: str, work: float) -> float | None:
        """Seconds a call of ``key`` should take at ``work`` (time ∝ the model FLOPs), from its last row."""
        if key not in self.last:
            return None
        w0, t0 = self.last[key]
        return t0 * work / w0

    def free_bytes(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.mem_get_info(self.device)[0])
        return float("inf")  # the dry run's sizes are tiny

    def run_row(self, op, provider, x_name, x, make, work, peak_est, note) -> None:
        """Build, time and record one row, or record why not (``work``: the row's model FLOPs, for the budget)."""
        key = provider
        rec = dict(op=op, provider=provider, x=f"{x_name}={x}")
        why = gp.optional_missing(provider, self.device)
        if why:
            return self.status(**rec, status="skipped", why=why)
        if peak_est > self.plan.memory_fraction * self.free_bytes():
            need, free = peak_est / 1e9, self.free_bytes() / 1e9
            return self.status(**rec, status="skipped", why=f"memory: needs ~{need:.0f} GB, {free:.0f} GB free")
        if self.left() < 1.0:
            return self.status(**rec, status=NOT_MEASURED, why="budget: the section's time is spent")
        pred = self.predicted(key, work)
        if pred is not None and pred * (1 + self.plan.repeats) > self.left():
            return self.status(
                **rec, status=NOT_MEASURED, why=f"budget: ~{pred:.1f} s a call, {self.left():.0f} s left"
            )
        t0 = time.monotonic()
        self.status(**rec, status="started", quiet=True)  # a section killed mid-row leaves this as the last word
        try:
            wl = make()
            for _ in range(max(1, self.plan.warmup)):  # the first includes compilation; the last sets the pace
                warm, peak = _warm_call(wl, self.device)
            reps = max(1, min(self.plan.repeats, int(max(self.left(), 0) / max(warm, 1e-6))))
            t = time_fn(wl, warmup=0, repeats=reps, device=self.device)
            flops = wl.flops
        except Exception as e:  # an error of this provider (out of memory, a kernel that does not compile) is a row
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            self.status(**rec, status="error", why=msg)
            return _release()
        del wl
        _release()
        self.last[key] = (work, t["p50"] / 1e3)
        tflops = flops / (t["p50"] * 1e-3) / 1e12
        full_note = (
            f"{note}; {reps} timed calls after {max(1, self.plan.warmup)} warm-up (last {warm:.2f} s; the first "
            f"includes compilation); "
            f"{self.mm_note(tflops)}; peak: {'cuda max_memory_allocated' if peak is not None else 'not measured'}; "
            f"gpu_check plan {self.plan.name}; {load_note()}"
        )
        row = timed_row(
            op, provider, "full" if op != "dedup_cluster" else "fwd", x_name, x, t, device=self.device,
            note=full_note, peak_mb=peak, gflops=tflops * 1e3,
        )  # fmt: skip
        append_rows(self.csv, [row])
        self.status(
            **rec, status="ok", p50_ms=t["p50"], p20_ms=t["p20"], p80_ms=t["p80"], peak_mb=peak, tflops=tflops,
            pct_fp32=self.pct(tflops, "float32"), pct_bf16=self.pct(tflops, "bfloat16"),
            seconds=time.monotonic() - t0,
        )  # fmt: skip


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _warm_call(wl, device: torch.device) -> tuple[float, float | None]:
    """One untimed-for-the-row call: its seconds (synchronised) and its peak extra device memory in MB (tensor
    memory above what was allocated before it; the allocator's cache is not counted; None on the CPU), so the
    memory figure costs no extra call of a slow row."""
    wl.setup()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    out = wl()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) - base) / 1e6 if cuda else None
    del out
    return seconds, peak


def _read_mm(out: Path) -> dict:
    p = out / "mm.json"
    return json.loads(p.read_text()) if p.exists() else {}


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def run_mm(sec: Section) -> None:
    from benchmarks.bench_mm_ceiling import measure_mm

    m, k, n = sec.plan.mm_shape
    rates = {}
    for dname in ("bfloat16", "float32"):
        rec = dict(op="mm_ceiling", provider="torch.mm", x=f"dtype={dname}")
        try:
            t = measure_mm(sec.device, getattr(torch, dname), shape=(m, k, n), warmup=2, repeats=5)
        except Exception as e:
            sec.status(**rec, status="error", why=f"{type(e).__name__}: {e}")
            continue
        rates[dname] = t["gflops"] / 1e3
        note = f"A [{m},{k}] x B [{k},{n}] row-major; 5 repeats; gpu_check plan {sec.plan.name}; {load_note()}"
        append_rows(sec.csv, [timed_row("mm_ceiling", "torch.mm", "nn", "dtype", dname, t, device=sec.device,
                                        note=note, gflops=t["gflops"])])  # fmt: skip
        sec.status(**rec, status="ok", p50_ms=t["p50"], tflops=rates[dname])
    (sec.out / "mm.json").write_text(json.dumps(rates))


def run_k2(sec: Section) -> None:
    p = sec.plan
    for D in p.k2_dims:
        for B in p.k2_sizes:
            for prov in p.k2_providers:
                sec.run_row(
                    f"distill_clip_D{D}", prov, "B", B,
                    lambda prov=prov, B=B, D=D: gp.k2_workload(prov, B, D, "full", sec.device, p.compile_backend),
                    12.0 * B * B * D, gp.k2_peak_bytes(prov, B, D),
                    f"DistillClipLoss contrastive + distill, fwd+bwd, D={D}, fp32, student scale 1/0.07, teacher 100; "
                    f"model FLOPs 12·B²·D",
                )  # fmt: skip


def run_k1(sec: Section) -> None:
    p = sec.plan
    for N in p.k1_sizes:
        for prov in p.k1_providers:
            sec.run_row(
                "cluster_discrimination", prov, "N", N,
                lambda prov=prov, N=N: gp.k1_workload(prov, N, p.k1_batch, p.k1_dim, "full", sec.device),
                6.0 * p.k1_batch * N * p.k1_dim, gp.k1_peak_bytes(prov, N, p.k1_batch, p.k1_dim),
                f"ArcFace s=32 m2=0.3, mean, fwd+bwd to embeddings and centres, B={p.k1_batch} D={p.k1_dim} fp32; "
                f"model FLOPs 6·B·N·D",
            )  # fmt: skip


def run_k3(sec: Section) -> None:
    p = sec.plan
    for c in p.k3_sizes:
        for prov in p.k3_providers:
            sec.run_row(
                "dedup_cluster", prov, "c", c,
                lambda prov=prov, c=c: gp.k3_workload(prov, c, p.k3_dim, sec.device),
                float(c) * c * p.k3_dim, gp.k3_peak_bytes(prov, c, p.k3_dim),
                f"one cluster, masked max cosine over earlier rows, D={p.k3_dim} fp32; FLOPs c²·D",
            )  # fmt: skip


def run_balance(sec: Section) -> None:
    from benchmarks import bench_balance as bb
    from benchmarks.gpu_balance import kmeans_centroids

    p = sec.plan
    rec = dict(op="balance_pipeline", provider="clipcid_fast", x=f"rows={p.balance_rows}")
    data_dir = sec.out.parent / ".gpu_check_cache" / "balance_data"
    spec = bb.DataSpec(n=p.balance_rows, d=512, dtype="float16")
    t0 = time.monotonic()
    meta = bb.generate_in_child(spec, data_dir, progress=False)
    print(f"[balance] data {'reused' if meta['reused'] else 'written'} in {time.monotonic() - t0:.1f} s", flush=True)
    extra, note = {}, ""
    cent = kmeans_centroids(meta["paths"]["data"], p.balance_k, p.balance_niter, sec.device)
    if cent is not None:  # faiss is not installed: centroids from a spherical k-means in torch on the device
        extra["centroids"], note = cent["centroids"], f"; k-means in torch on {sec.device} ({cent['seconds']:.1f} s)"
    out_dir = sec.out / "balance_run"
    try:
        res = bb.run_pipeline(
            meta["paths"]["data"], out_dir, k=p.balance_k, niter=p.balance_niter, mm_repeats=3,
            device=str(sec.device), progress=False, balance_kwargs=extra,
        )  # fmt: skip
    except Exception as e:
        return sec.status(**rec, status="error", why=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    rows = bb.csv_rows(res, str(sec.device))
    for r in rows:
        r["note"] += note + f"; gpu_check plan {p.name}"
    append_rows(sec.csv, rows)
    for r in rows:
        gf = r.get("gflops")
        tf = gf / 1e3 if isinstance(gf, float) and math.isfinite(gf) else None
        sec.status(
            op="balance_pipeline", provider=f"stage {r['mode']}", x=f"rows={p.balance_rows}", status="ok",
            p50_ms=r["p50_ms"], tflops=tf, peak_mb=r.get("peak_mb"), pct_fp32=sec.pct(tf, "float32"),
            pct_bf16=sec.pct(tf, "bfloat16"),
        )  # fmt: skip


RUNNERS = {"mm": run_mm, "k2": run_k2, "k1": run_k1, "k3": run_k3, "balance": run_balance}


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def run_all(args, plan: gpu_sizes.Plan) -> int:
    """Each section in a child process (a crashed CUDA context stays in it), with its budget counted from its
    start (torch's import included) and a hard timeout a little after; then the plots."""
    for name in SECTIONS:
        budget = gpu_sizes.section_budget(plan, name)
        deadline = time.time() + budget
        cmd = [sys.executable, __file__, "--plan", plan.name, "--out", str(args.out), "--section", name]
        t0 = time.monotonic()
        try:  # the child stops starting rows at its deadline; the timeout catches a hung kernel
            rc = subprocess.run(
                [*cmd, "--deadline", str(deadline)], timeout=budget + gpu_sizes.SECTION_GRACE_S
            ).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            with open(args.out / "bench_status.jsonl", "a") as f:
                f.write(json.dumps({"section": name, "status": "section-failed", "why": f"exit {rc}"}) + "\n")
        print(f"[{name}] section done in {time.monotonic() - t0:.1f} s (budget {budget:.0f} s, exit {rc})", flush=True)
    plots(args.out)
    return 0


def plots(out: Path) -> None:
    import importlib.util

    csv = out / "results.csv"
    if not csv.exists():
        return
    if importlib.util.find_spec("matplotlib") is None:
        print("plots: skipped (matplotlib is not installed)", flush=True)
        return
    from benchmarks._harness import read_rows

    for op in sorted({r["op"] for r in read_rows(csv)} - {"mm_ceiling"}):
        try:
            print(f"plot: {plot(csv, op, out / f'{op}.png')}", flush=True)
        except ValueError as e:
            print(f"plot {op}: skipped ({e})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="gpu", choices=sorted(gpu_sizes.PLANS))
    ap.add_argument("--out", type=Path, required=True, help="results.csv, bench_status.jsonl, mm.json, plots")
    ap.add_argument("--section", choices=(*SECTIONS, "all"), default="all")
    ap.add_argument("--deadline", type=float, default=None, help="time.time() to stop at (default: its budget)")
    args = ap.parse_args(argv)
    plan = gpu_sizes.plan(args.plan)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(plan.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: the gpu plan needs a CUDA device (use --plan dry-run on CPU)")
    if args.section == "all":
        return run_all(args, plan)
    torch.manual_seed(0)
    print(f"[{args.section}] {device} ({device_name(device)}), torch {torch.__version__}", flush=True)
    deadline = args.deadline or time.time() + gpu_sizes.section_budget(plan, args.section)
    sec = Section(args.section, plan, args.out, device, deadline)
    RUNNERS[args.section](sec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
