"""The GPU check's pieces that can be checked without a GPU: the size table, the verdict of the summary, the
environment report's floor, and the balance pipeline's device wrapper (the whole script runs in CI as
``bash scripts/gpu_check.sh --dry-run``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_sizes, gpu_summary  # noqa: E402


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_plan_fits_the_slot_and_has_the_issue_sizes():
    p = gpu_sizes.GPU
    assert sum(p.stage_s.values()) <= gpu_sizes.TOTAL_S == 480
    assert abs(sum(gpu_sizes.SECTION_SHARE.values()) - 1) < 1e-9
    assert p.k2_sizes == (16384, 32768, 65536) and p.k2_dims == (512, 768)
    assert p.k1_sizes == (1_000_000, 4_000_000) and p.k1_batch == 4096
    assert p.k3_sizes == (16384, 65536) and p.balance_rows == 1_000_000
    assert set(p.k2_providers) == {"fused-triton", "open_clip", "chunked-torch", "compiled-reference"}
    d = gpu_sizes.DRY_RUN
    assert d.device == "cpu" and max(d.k2_sizes) <= 256 and max(d.k1_sizes) <= 1024


def _out(tmp_path, stages, bench, failures=0):
    (tmp_path / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))
    (tmp_path / "bench_status.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bench))
    case = '<testcase classname="t" name="a"/>' + ('<testcase classname="t" name="b"><failure/></testcase>' * failures)
    xml = f'<testsuites><testsuite tests="{1 + failures}" failures="{failures}" errors="0" skipped="0">{case}'
    (tmp_path / "junit_gpu.xml").write_text(xml + "</testsuite></testsuites>")
    return tmp_path


OK_STAGES = [{"stage": "env", "status": "ok", "seconds": 1.0, "rc": 0}, {"stage": "bench", "status": "ok", "rc": 0}]
ROW = {"section": "k2", "op": "distill_clip_D512", "x": "B=16384", "status": "ok", "p50_ms": 10.0, "tflops": 1.0}


def test_summary_passes_a_clean_run_and_reports_baseline_problems_without_failing(tmp_path, capsys):
    bench = [
        {**ROW, "provider": "fused-triton"},
        {**ROW, "provider": "open_clip", "p50_ms": 30.0},
        {**ROW, "provider": "chunked-torch", "status": "error", "why": "OutOfMemoryError"},
        {**ROW, "provider": "compiled-reference", "status": "skipped", "why": "memory: needs ~189 GB"},
    ]
    assert gpu_summary.main([str(_out(tmp_path, OK_STAGES, bench))]) == 0
    text = capsys.readouterr().out
    assert "result: PASS" in text and "3.00x" in text and "needs ~189 GB" in text


def test_summary_fails_on_a_failed_test_a_failed_stage_or_a_broken_fused_kernel(tmp_path):
    assert gpu_summary.main([str(_out(tmp_path, OK_STAGES, [], failures=1))]) == 1
    bad_build = [*OK_STAGES, {"stage": "build", "status": "failed", "rc": 1}]
    assert gpu_summary.main([str(_out(tmp_path, bad_build, []))]) == 1
    error = [{**ROW, "provider": "fused-triton", "status": "error", "why": "out of resource: shared memory"}]
    assert gpu_summary.main([str(_out(tmp_path, OK_STAGES, error))]) == 1
    hung = [{**ROW, "provider": "fused-cuda", "op": "dedup_cluster", "status": "started"}]  # never finished
    assert gpu_summary.main([str(_out(tmp_path, OK_STAGES, hung))]) == 1


def test_env_report_names_what_is_missing():
    env_mod = _load_script("gpu_env")
    env = env_mod.gather(dry_run=True)
    assert env_mod.problems(env) == []
    old = {**env, "torch": "2.5.1+cu124", "packages": {**env["packages"], "pytest": None}}
    msgs = env_mod.problems(old)
    assert any("older than 2.6" in m for m in msgs) and any("pytest" in m for m in msgs)
    assert any("no CUDA device" in m for m in env_mod.problems({**env, "dry_run": False, "gpus": []}))


def test_balance_functions_move_their_tensors_to_the_device():
    from clipcid_fast.pipeline.balance import functions

    seen = []

    def fn(x, c):
        seen.append((x.device, c.device))
        return x.sum(1), torch.zeros(len(x), dtype=torch.int64)

    wrapped = functions.on_device(fn, torch.device("cpu"))
    s, _ = wrapped(torch.ones(3, 2), torch.ones(1, 2))
    assert seen == [(torch.device("cpu"), torch.device("cpu"))] and s.tolist() == [2.0, 2.0, 2.0]
    *_, names = functions.resolve_fns(device="cpu")  # the CPU: nothing wrapped
    assert "on " not in names["assign_fn"]
    a2, _, names2 = functions.resolve_fns(assign_fn=fn, device="cuda")  # a given function is left alone
    assert a2 is fn and names2["max_sim_fn"].endswith("on cuda")
