"""The GPU check's one summary table, and its verdict (the exit status of scripts/gpu_check.sh).

    python benchmarks/gpu_summary.py OUT_DIR

Reads what the stages left in OUT_DIR: ``env.json`` (scripts/gpu_env.py), ``stages.jsonl`` (one line per stage
of the shell script: status, seconds, exit code), ``junit_*.xml`` (pytest; a stage's shards
``junit_<stage>.<i>.xml`` are added up), ``bench_status.jsonl`` (gpu_bench.py: every benchmark row measured, not
measured, skipped or failed) and, from a dry run, ``prediction.json`` (benchmarks/gpu_sizes.py). Prints the
stages, the prediction, the test counts with the failed tests, the benchmark rows (p50 and p20–p80, peak memory,
TFLOP/s, share of the measured fp32 / bf16 ``torch.mm``, time against the fused provider of the same row) and
what was left out and why.

Exit 1 when anything failed: the environment or the build, a test (failed, error, or its stage timed out), the
dry run's prediction (over 7 minutes), or a benchmark row of a fused kernel of this package (an error, or its
section's process died in it: it does not run). Rows ``not measured`` (left out or cut off by their time budget),
skipped for memory or a missing package, and errors of the baselines (open_clip, eager forms), are reported, not
failures.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OURS = ("fused-triton", "fused-cuda", "clipcid_fast")
NOT_MEASURED = "not measured"  # a row its time budget left out or cut off: reported with the reason, never a failure


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tests(out: Path) -> list[dict]:
    """One entry per test stage: ``junit_<stage>.xml``, or its shards ``junit_<stage>.<i>.xml`` added up."""
    res: dict[str, dict] = {}
    for xml in sorted(out.glob("junit_*.xml")):
        name = xml.stem.removeprefix("junit_").split(".")[0]
        t = res.setdefault(name, {"name": name, "tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []})
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:  # a run killed mid-write
            t["error"] = f"{xml.name} unreadable ({e})"
            continue
        suites = [root] if root.tag == "testsuite" else list(root)
        for k in ("tests", "failures", "errors", "skipped"):
            t[k] += sum(int(s.get(k, 0)) for s in suites)
        t["failed"] += [
            f"{c.get('classname')}::{c.get('name')}"
            for s in suites
            for c in s.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None
        ]
    return list(res.values())


def in_flight(bench: list[dict]) -> list[dict]:
    """Rows that started and never finished. Their section was stopped at its time limit (``not measured``: a row
    still compiling or running when its budget ran out says nothing about the kernel) or its process died (an
    ``error``: a crash, e.g. an illegal memory access, is a real failure)."""
    key = lambda r: (r["section"], r.get("op"), r.get("provider"), r.get("x"))  # noqa: E731
    started = {key(r): r for r in bench if r.get("status") == "started"}
    for r in bench:
        if r.get("status") != "started":
            started.pop(key(r), None)
    exits = {r["section"]: r.get("why", "") for r in bench if r.get("status") == "section-failed"}
    out = []
    for r in started.values():
        why = exits.get(r["section"], "")
        if why and "timeout" not in why:
            out.append({**r, "status": "error", "why": f"its section's process died in this row ({why})"})
        else:
            out.append({**r, "status": NOT_MEASURED, "why": "cut off by its section's time budget while in flight"})
    return out


def _fmt(v, spec: str, missing: str = "–") -> str:
    return missing if v is None else format(v, spec)


def bench_table(rows: list[dict]) -> list[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    fused = {(r["op"], r["x"]): r["p50_ms"] for r in ok if r.get("provider") == "fused-triton"}
    lines = [
        f"{'op':24s} {'provider':20s} {'x':14s} {'p50 ms':>10s} {'p20–p80 ms':>19s} {'peak MB':>9s} "
        f"{'TFLOP/s':>8s} {'% fp32mm':>8s} {'% bf16mm':>8s} {'vs fused':>8s}"
    ]
    for r in ok:
        band = f"{_fmt(r.get('p20_ms'), '.1f')}–{_fmt(r.get('p80_ms'), '.1f')}" if r.get("p20_ms") else "–"
        base = fused.get((r["op"], r["x"]))
        ratio = f"{r['p50_ms'] / base:.2f}x" if base and r.get("provider") != "fused-triton" else ""
        pct = {k: _fmt(r[k] * 100 if r.get(k) is not None else None, ".0f") for k in ("pct_fp32", "pct_bf16")}
        lines.append(
            f"{r['op']:24s} {r.get('provider', ''):20s} {r.get('x', ''):14s} {_fmt(r.get('p50_ms'), '.1f'):>10s} "
            f"{band:>19s} {_fmt(r.get('peak_mb'), ',.0f'):>9s} {_fmt(r.get('tflops'), '.3g'):>8s} "
            f"{pct['pct_fp32']:>8s} {pct['pct_bf16']:>8s} {ratio:>8s}"
        )
    return lines


def verdict(stages: list[dict], suites: list[dict], bench: list[dict]) -> list[str]:
    """The reasons the check failed (empty: it passed)."""
    bad = []
    for s in stages:
        if s["status"] not in ("ok", "skipped") and not s["stage"].startswith("bench"):
            bad.append(f"stage {s['stage']}: {s['status']} (exit {s.get('rc')})")
    for t in suites:
        if t.get("error") or t.get("failures") or t.get("errors"):
            bad.append(f"tests {t['name']}: {t.get('failures', 0)} failed, {t.get('errors', 0)} errors")
    for r in bench:  # a fused kernel that errors or crashes does not work; one out of time was not measured
        if r.get("status") == "error" and r.get("provider") in OURS:
            bad.append(f"bench {r['op']} {r['provider']} {r['x']}: {r['status']}: {r.get('why')}")
    return bad


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    stages, suites, bench = _jsonl(out / "stages.jsonl"), tests(out), _jsonl(out / "bench_status.jsonl")
    bench = [r for r in bench if r.get("status") != "started"] + in_flight(bench)
    gpu = ", ".join(g["name"] for g in env.get("gpus", [])) or ("none (dry run)" if env.get("dry_run") else "none")
    print("=" * 100)
    print(
        f"clipcid_fast GPU check — GPU {gpu}; driver {env.get('driver') or '-'}; torch {env.get('torch')} "
        f"(CUDA {env.get('torch_cuda')}); triton {env.get('triton')}; nvcc {env.get('nvcc') or 'none'}"
    )
    print(f"{'stage':12s} {'status':10s} {'seconds':>8s}  detail")
    for s in stages:
        print(f"{s['stage']:12s} {s['status']:10s} {s.get('seconds', 0):8.1f}  {s.get('detail', '')}")
    pred = out / "prediction.json"
    if pred.exists():  # the dry run's prediction for the GPU machine (benchmarks/gpu_sizes.py)
        p = json.loads(pred.read_text())
        per = ", ".join(f"{k} {v['seconds']:.0f}" for k, v in p["stages"].items())
        print(f"predicted on the GPU machine (s): {per}; total {p['total_s']:.0f} (at most {p['max_s']})")
    for t in suites:
        if t.get("error"):
            print(f"tests {t['name']}: {t['error']}")
            continue
        passed = t["tests"] - t["failures"] - t["errors"] - t["skipped"]
        print(
            f"tests {t['name']}: {passed} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
        )
        for name in t["failed"][:25]:
            print(f"  FAILED {name}")
    if bench:
        print("benchmarks (fwd+bwd unless the op is dedup_cluster; model FLOPs; % of the mm rates measured here):")
        for line in bench_table(bench):
            print("  " + line)
        for r in bench:
            if r.get("status") != "ok":
                what = f"{r.get('op', r['section'])} {r.get('provider', '')} {r.get('x', '')}"
                print(f"  {r['status']}: {what} — {r.get('why')}")
    bad = verdict(stages, suites, bench)
    print(f"result: {'FAIL' if bad else 'PASS'}" + "".join(f"\n  - {b}" for b in bad))
    print("=" * 100)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
