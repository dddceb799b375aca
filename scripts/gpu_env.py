"""Environment report of the GPU check: what this machine has, what it lacks, and the CUDA arch to build for.

    python scripts/gpu_env.py --out OUT_DIR [--dry-run]

Prints the GPU(s), driver, torch (and its CUDA), triton, nvcc, Python and the build tools, and which optional
packages are present; writes ``OUT_DIR/env.json``. Exit 2 when something the check cannot do without is
missing (torch older than 2.6, no triton / pytest / hypothesis / cmake / ninja / pybind11, or no GPU outside a
dry run), with the way to bring it (benchmarks/README.md "Bringing packages as wheels"). Imports nothing of
clipcid_fast (it runs before the build).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REQUIRED = ("torch", "triton", "pytest", "hypothesis", "cmake", "ninja", "pybind11", "numpy")
OPTIONAL = ("open_clip_torch", "faiss-cpu", "faiss-gpu", "matplotlib", "psutil", "tqdm")
TORCH_FLOOR = (2, 6)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def nvcc_path() -> str | None:
    for cand in (shutil.which("nvcc"), os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return os.path.join(home, "bin", "nvcc") if home and os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def gather(dry_run: bool) -> dict:
    import torch

    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "packages": {d: _version(d) for d in (*REQUIRED, *OPTIONAL)},
        "gpus": [],
        "arch": None,
        "driver": None,
        "nvcc": None,
        "nvcc_path": nvcc_path(),
        "cpus": os.cpu_count(),
        "dry_run": dry_run,
    }
    if env["nvcc_path"]:
        m = re.search(r"release (\d+\.\d+)", _run([env["nvcc_path"], "--version"]))
        env["nvcc"] = m.group(1) if m else "unknown"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": p.total_memory / 1e9}
            env["gpus"].append(gpu)
        env["arch"] = env["gpus"][0]["capability"]
        smi = shutil.which("nvidia-smi")
        lines = _run([smi, "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines() if smi else []
        env["driver"] = lines[0] if lines else None
    return env


def problems(env: dict) -> list[str]:
    out = []
    t = tuple(int(x) for x in re.findall(r"\d+", env["torch"])[:2])
    if t < TORCH_FLOOR:
        out.append(f"torch {env['torch']} is older than {'.'.join(map(str, TORCH_FLOOR))} (the package's floor)")
    for dist in REQUIRED:
        if env["packages"].get(dist) is None:
            out.append(f"{dist} is not installed")
    if not env["dry_run"] and not env["gpus"]:
        out.append("no CUDA device is visible to torch (torch.cuda.is_available() is False); use --dry-run on CPU")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    env = gather(args.dry_run)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "env.json").write_text(json.dumps(env, indent=1))
    gpus = ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gb']:.0f} GB)" for g in env["gpus"])
    print(f"GPU:     {gpus or ('none (dry run)' if args.dry_run else 'none')}")
    print(f"driver:  {env['driver'] or ('-' if args.dry_run else 'unknown (no nvidia-smi)')}")
    print(f"torch:   {env['torch']} (CUDA {env['torch_cuda']})")
    print(f"triton:  {env['triton'] or 'not installed'}")
    print(f"nvcc:    {env['nvcc'] or 'not found: the CUDA C++ kernels will not be built'} {env['nvcc_path'] or ''}")
    if env["nvcc"] and env["torch_cuda"] and env["nvcc"].split(".")[0] != env["torch_cuda"].split(".")[0]:
        print(f"warning: nvcc {env['nvcc']} and torch's CUDA {env['torch_cuda']} differ in major version")
    print(f"python:  {env['python']} ({env['executable']}), {env['cpus']} CPUs")
    have = [f"{d} {v}" for d, v in env["packages"].items() if v]
    print(f"present: {', '.join(have)}")
    absent = [d for d in OPTIONAL if env["packages"].get(d) is None]
    if absent:
        print(f"absent (optional: their tests and benchmark rows skip with the reason): {', '.join(absent)}")
    bad = problems(env)
    for b in bad:
        print(f"error: {b}")
    if bad:
        print("bring missing packages as wheels: see benchmarks/README.md, 'GPU check' -> 'Bringing packages'")
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
