"""The GPU check's pieces that can be checked without a GPU: the size table and the time budget, the test stage's
budget, shards, compile counting and prediction, the verdict of the summary, the environment report's floor, and
the balance pipeline's device wrapper (the whole script runs in CI as ``bash scripts/gpu_check.sh --dry-run``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_sizes, gpu_summary, gpu_tests  # noqa: E402


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_plan_fits_the_slot_and_has_the_issue_sizes():
    p = gpu_sizes.GPU
    assert sum(p.stage_s.values()) <= gpu_sizes.TOTAL_S == 480
    assert gpu_sizes.PREDICTED_MAX_S == 420 and "tests_cpu" not in p.stage_s  # CI runs the CPU suite
    assert abs(sum(gpu_sizes.SECTION_SHARE.values()) - 1) < 1e-9
    # the bench limit covers every section's budget and grace, and the plots
    sections = sum(gpu_sizes.section_budget(p, s) + gpu_sizes.SECTION_GRACE_S for s in gpu_sizes.SECTION_SHARE)
    assert sections + gpu_sizes.BENCH_PLOTS_S == pytest.approx(p.stage_s["bench"])
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
    started = {**ROW, "provider": "fused-cuda", "op": "dedup_cluster", "status": "started"}  # never finished
    crashed = [started, {"section": "k2", "status": "section-failed", "why": "exit -6"}]  # its process died
    assert gpu_summary.main([str(_out(tmp_path, OK_STAGES, crashed))]) == 1
    assert gpu_summary.main([str(_out(tmp_path, OK_STAGES, [started]))]) == 0  # cut off by the budget: not measured


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


# --------------------------------------------------------------------------------------------------
# The test stage: budget, shards, compile counting, prediction (benchmarks/gpu_tests.py, gpu_sizes.py)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeCallSpec:
    params: dict


@dataclasses.dataclass
class FakeItem:
    """What the budget and the shard plan read of a pytest item."""

    name: str
    params: dict = dataclasses.field(default_factory=dict)
    marks: tuple = ("cuda_target", "gpu")
    path: str = "python_tests/test_k.py"

    @property
    def originalname(self):
        return self.name.split("[")[0]

    @property
    def nodeid(self):
        return f"{self.path}::{self.name}"

    @property
    def callspec(self):
        return FakeCallSpec(self.params)

    def get_closest_marker(self, name):
        return name if name in self.marks else None


def _case(test, shape, dtype, **more):
    params = {"shape": shape, "dtype": dtype, "target": ("triton", "cuda"), **more}
    return FakeItem(f"{test}[{shape}-{dtype}-{'-'.join(map(str, more.values()))}]", params)


def test_budget_keeps_one_case_per_test_implementation_dtype_and_variant():
    f32, bf16 = torch.float32, torch.bfloat16
    items = [
        _case("test_a", (1, 3), f32, mode="hard"),
        _case("test_a", (7, 77), f32, mode="hard"),  # another shape: dropped
        _case("test_a", (1, 3), bf16, mode="hard"),  # another dtype: kept
        _case("test_a", (1, 3), f32, mode="soft"),  # another kernel variant: kept
        _case("test_a", (1, 3), f32, mode="hard", labels="random"),  # a data pattern: dropped
        _case("test_b", (1, 3), f32, mode="hard"),  # another test: kept
    ]
    keep, drop = gpu_tests.budget(items)
    assert [items.index(i) for i in keep] == [0, 2, 3, 5] and [items.index(i) for i in drop] == [1, 4]
    cuda_impl = _case("test_a", (1, 3), f32, mode="hard")
    cuda_impl.params["target"] = ("cuda", "cuda")  # the CUDA C++ kernel: another implementation, kept
    assert len(gpu_tests.budget([*items, cuda_impl])[0]) == 5


def test_shard_plan_is_deterministic_balanced_and_keeps_groups_whole():
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 3 + ["d"] * 2 + ["e"]
    plan = gpu_tests.shard_plan(groups, 3)
    assert plan == gpu_tests.shard_plan(list(groups), 3) and set(plan) == set(groups)
    load = [sum(groups.count(g) for g in plan if plan[g] == s) for s in range(3)]
    assert sorted(load) == [4, 5, 5]  # largest first onto the least loaded shard
    assert set(gpu_tests.shard_plan(groups, 1).values()) == {0}


def test_gpu_only_cases_are_their_own_groups_except_the_memory_hungry_ones_which_share_one():
    k1 = FakeItem("test_k1_sync[fp32]", marks=("gpu",), path="t/test_h.py")
    k1b = FakeItem("test_k1_sync[bf16]", marks=("gpu",), path="t/test_h.py")
    big1 = FakeItem("test_lse_past_2_31_elements[triton]", marks=("gpu",), path="t/test_h.py")
    big2 = FakeItem("test_k2_keys_past_2_31_elements", marks=("gpu",), path="t/test_h.py")
    kernel = [FakeItem("test_k[1]"), FakeItem("test_k[2]")]
    keys = [gpu_tests.group_key(i) for i in (k1, k1b, big1, big2, *kernel)]
    assert keys[0] != keys[1] and keys[2] == keys[3] and keys[4] == keys[5] != keys[0]
    assert gpu_tests.is_gpu_only(k1) and not gpu_tests.is_gpu_only(kernel[0])


def test_counting_specialises_launches_as_an_h100_would_and_the_kernels_still_compute(triton_device):
    """Under the interpreter: every launch is seen with Triton's own cache key; the launchers choose their sm_90
    path and the kernels still compute right (the interpreter keeps its widened 16-bit dots)."""
    if triton_device.type != "cpu":
        pytest.skip("counting runs under Triton's interpreter only")
    import clipcid_fast
    from clipcid_fast.ops import _triton

    seen = []
    x = torch.randn(5, 70)
    before = _triton.target(x)
    with gpu_tests.as_if_gpu() as gpu, gpu_tests.counted_launches(lambda cfg: seen.append(cfg) or True):
        a = clipcid_fast.row_logsumexp(x, impl="triton")
        b = clipcid_fast.row_logsumexp(torch.randn(9, 70), impl="triton")  # another size: the same compile
        clipcid_fast.row_logsumexp(torch.randn(5, 64), impl="triton")  # another width: another block, stride
    assert gpu is True
    torch.testing.assert_close(a, torch.logsumexp(x, 1)) and b.shape == (9,)
    assert len(seen) == 3 and all(c.key.startswith("sm90:") for c in seen)
    assert seen[0].key == seen[1].key != seen[2].key  # sizes are not specialised on, strides are
    assert _triton.target(x) == before  # restored on exit


def _counted(tmp_path, tests: dict, startup=10.0):
    groups = [t["group"] for t in tests.values()]
    doc = {"arch": 90, "as_if_gpu": True, "startup_s": startup, "groups": groups, "tests": tests, "configs": {}}
    (tmp_path / "compiles.0.json").write_text(json.dumps(doc))
    return gpu_sizes.load_counted(tmp_path)


def _t(group, keys, seconds=1.0, launch_s=0.5, **more):
    return {"group": group, "name": group, "keys": keys, "seconds": seconds, "launch_s": launch_s, **more}


def test_test_stage_prediction_counts_each_shards_distinct_compiles_and_host_time(tmp_path):
    tests = {
        "a[1]": _t("a", ["k1", "k2"]),
        "a[2]": _t("a", ["k2", "k3"], seconds=3.0, launch_s=1.0),  # a key shared in the group: compiled once
        "b[1]": _t("b", ["k1"]),  # another shard: its own compile of k1
        "h[1]": _t("h", [], seconds=0.0, launch_s=0.0, skipped=True, gpu_only=True),  # counted by allowance
    }
    c = _counted(tmp_path, tests)
    p = gpu_sizes.predict_tests(c, cores=16)
    start = gpu_sizes.STARTUP_S + gpu_sizes.CUDA_INIT_S
    shard_a = start + 3 * gpu_sizes.COMPILE_S + (0.5 + 2.0)
    shard_h = start + gpu_sizes.GPU_ONLY_COMPILES_PER_CASE * gpu_sizes.COMPILE_S + gpu_sizes.SKIPPED_CASE_S
    assert p["shards"] == 16 and p["cases"] == 4 and p["compiles"] == 3
    assert p["gpu_only_allowance"] == gpu_sizes.GPU_ONLY_COMPILES_PER_CASE
    assert p["compiles_in_shards"] == 3 + 1 + gpu_sizes.GPU_ONLY_COMPILES_PER_CASE
    assert p["seconds"] == pytest.approx(gpu_sizes.TEST_RUNNER_S + max(shard_a, shard_h))
    one_core = gpu_sizes.predict_tests(c, cores=1)  # everything in one process: each key once
    assert one_core["worst_shard"]["compiles"] == 3 + gpu_sizes.GPU_ONLY_COMPILES_PER_CASE


def test_prediction_sums_the_stages_and_fails_over_seven_minutes(tmp_path, capsys, monkeypatch):
    _counted(tmp_path, {"a[1]": _t("a", ["k1"])})
    assert gpu_sizes.main([str(tmp_path)]) == 0
    pred = json.loads((tmp_path / "prediction.json").read_text())
    assert set(pred["stages"]) == {"env", "build", "tests_gpu", "bench", "summary"}
    assert pred["total_s"] == pytest.approx(sum(v["seconds"] for v in pred["stages"].values()))
    assert pred["stages"]["bench"]["seconds"] == gpu_sizes.GPU.stage_s["bench"]
    assert "within the 420 s budget" in capsys.readouterr().out
    monkeypatch.setattr(gpu_sizes, "COMPILE_S", 400.0)  # one compile over the whole budget
    assert gpu_sizes.main([str(tmp_path)]) == 1
    assert "OVER" in capsys.readouterr().out
    assert gpu_sizes.main([str(tmp_path / "missing")]) == 1


def test_summary_reads_rows_cut_off_by_the_budget_as_not_measured_and_crashes_as_failures(tmp_path, capsys):
    started = {**ROW, "provider": "fused-triton", "status": "started"}
    over = {**ROW, "provider": "fused-triton", "x": "B=65536", "status": "not measured", "why": "budget: ~9 s"}
    timed_out = {"section": "k2", "status": "section-failed", "why": "exit timeout"}
    assert gpu_summary.main([str(_out(tmp_path, OK_STAGES, [started, over, timed_out]))]) == 0
    text = capsys.readouterr().out
    assert "result: PASS" in text and "not measured: distill_clip_D512 fused-triton B=16384" in text
    (tmp_path / "bench_status.jsonl").unlink()
    crashed = {"section": "k2", "status": "section-failed", "why": "exit -11"}
    assert gpu_summary.main([str(_out(tmp_path, OK_STAGES, [started, crashed]))]) == 1
    assert "died in this row" in capsys.readouterr().out


def test_summary_adds_up_the_test_shards(tmp_path, capsys):
    _out(tmp_path, OK_STAGES, [])
    (tmp_path / "junit_gpu.xml").rename(tmp_path / "junit_gpu.0.xml")
    bad = '<testsuite tests="2" failures="1" errors="0" skipped="0"><testcase classname="t" name="c"/>'
    (tmp_path / "junit_gpu.1.xml").write_text(
        bad + '<testcase classname="t" name="d"><failure/></testcase></testsuite>'
    )
    assert gpu_summary.main([str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "tests gpu: 2 passed, 1 failed" in text and "FAILED t::d" in text
