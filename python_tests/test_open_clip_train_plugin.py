"""``python -m clipcid_fast.open_clip_train``: open_clip_train's own loop with the clipcid-fast losses.

64 real Fashion-MNIST images are exported as PNGs + open_clip's CSV (``export_corpus``); student and teacher are
the shrunk ViT-S-32 of ``_tiny_open_clip`` (registered by name with ``open_clip.add_model_config``), the teacher
a local .pt of seeded random weights. One subprocess runs open_clip_train five times in a row (importing torch,
open_clip and transformers costs ~10 s a process on 2 cores): the stock ``python -m open_clip_train.main`` with
distillation, then ``python -m clipcid_fast.open_clip_train`` with ``--clipcid-loss distill``, ``kd``, a ``kd``
resume and ``rd``, each through ``runpy`` as ``python -m`` runs it, with open_clip_train's logging reset between
runs. A recorder around the loss open_clip_train's loop is given writes each step's terms at full precision
(the loop logs 5 significant digits) and the loss's scalar parameters as the step sees them.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch
from _tiny_open_clip import one_thread, tiny_config, write_checkpoint  # noqa: F401  (one_thread: autouse fixture)

import clipcid_fast.open_clip_train as plugin
from clipcid_fast.pipeline.config import DataConfig
from clipcid_fast.pipeline.data import export_corpus

N_IMAGES, BATCH = 64, 16  # 4 steps
WHOLE, WHOLE_EPOCHS, NPROC = 16, 3, 2  # the torchrun comparison: 3 epochs of one 16-image step, 1 vs 2 ranks
STEPS = N_IMAGES // BATCH
LN_INV_007 = math.log(1 / 0.07)
PY = sys.executable

DRIVER = textwrap.dedent(
    """
    import json, logging, os, runpy, sys, time, traceback

    import torch

    torch.set_num_threads(1)
    import open_clip
    import open_clip_train.train as T

    spec = json.load(open(sys.argv[1]))
    open_clip.add_model_config(spec["models"])
    rank = os.environ.get("RANK", "0")
    DDP = torch.nn.parallel.DistributedDataParallel
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # open_clip_train wraps its models in DDP with device_ids=[device], which torch refuses for a CPU module
        # (a GPU-only line of its main.py): on CPU, the same wrap without device_ids

        class CpuDDP(DDP):
            def __init__(self, module, device_ids=None, **kwargs):
                if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                    device_ids = None
                super().__init__(module, device_ids=device_ids, **kwargs)

        torch.nn.parallel.DistributedDataParallel = CpuDDP
    current = {}
    stock_train_one_epoch = T.train_one_epoch

    def recording_train_one_epoch(model, data, loss, *args, **kwargs):
        base = getattr(loss, "module", loss)  # the plug-in's loss, inside DDP under torchrun
        inner = getattr(base, "loss", base)
        current["loss"] = base

        def recorded(**model_out):
            out = loss(**model_out)
            row = {"loss_class": type(inner).__name__, "ddp": isinstance(loss, DDP),
                   "terms": {k: float(v.detach()) for k, v in out.items()},
                   "scales": {k: float(p.detach()) for k, p in base.named_parameters() if p.numel() == 1}}
            with open(current["record"], "a") as f:
                f.write(json.dumps(row) + "\\n")
            return out

        return stock_train_one_epoch(model, data, recorded, *args, **kwargs)

    T.train_one_epoch = recording_train_one_epoch
    results = {}
    for run in spec["runs"]:
        current["record"] = run["record"].format(rank=rank)
        current.pop("loss", None)
        for h in list(logging.root.handlers):  # open_clip_train adds its handlers on every run
            logging.root.removeHandler(h)
            h.close()
        sys.argv = [run["module"]] + run["argv"]
        start = time.perf_counter()
        print(f"=== run {run['name']}", file=sys.stderr, flush=True)
        try:
            runpy.run_module(run["module"], run_name="__main__", alter_sys=True)
            results[run["name"]] = {"exit": None}
        except SystemExit as e:
            results[run["name"]] = {"exit": e.code}
        except BaseException:
            results[run["name"]] = {"exit": "exception", "traceback": traceback.format_exc()}
        results[run["name"]]["seconds"] = time.perf_counter() - start
        if "loss" in current:  # this rank's loss parameters after its last step (a checkpoint holds rank 0's)
            torch.save(current["loss"].state_dict(), current["record"] + ".pt")
        print(f"=== end {run['name']}", file=sys.stderr, flush=True)
    for h in list(logging.root.handlers):
        h.close()
    json.dump(results, open(spec["results"].format(rank=rank), "w"))
    """
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("oct")
    cfg = DataConfig(corpus="student", student_samples=300, caption_noise=0.4, data_seed=3)
    manifest = export_corpus(cfg, str(root / "export"), formats=("csv",), limit=N_IMAGES)
    teacher = write_checkpoint(str(root / "models"), seed=1)  # models/tiny-vit-s-32.json, models/weights-1.pt
    narrow = tiny_config()
    narrow["embed_dim"] = 32  # a student narrower than the teacher (64): kd/rd project its features
    os.makedirs(root / "narrow")
    with open(root / "narrow" / "tiny-vit-s-32-e32.json", "w") as f:
        json.dump(narrow, f)
    # the first WHOLE images in a CSV of their own (same folder, so the relative paths hold): one step an epoch
    # that sees all of them, whichever sampler orders them and however many ranks split them
    whole = os.path.join(os.path.dirname(manifest["csv"]), "whole.csv")
    with open(manifest["csv"]) as src, open(whole, "w") as dst:
        dst.writelines(src.readlines()[: 1 + WHOLE])
    return {"root": root, "csv": manifest["csv"], "whole": whole, "teacher": teacher.teacher_weights}


def common_flags(w, name: str, *extra: str, model: str = "tiny-vit-s-32") -> list[str]:
    return [
        "--train-data", w["csv"], "--dataset-type", "csv", "--csv-img-key", "filepath", "--csv-caption-key", "title",
        "--model", model, "--distill-model", "tiny-vit-s-32", "--distill-pretrained", w["teacher"],
        "--device", "cpu", "--precision", "fp32", "--workers", "0", "--batch-size", str(BATCH), "--epochs", "1",
        "--lr", "1e-3", "--warmup", "1", "--wd", "0.1", "--seed", "0", "--log-every-n-steps", "1",
        "--logs", str(w["root"] / "logs"), "--name", name, *extra,
    ]  # fmt: skip


def whole_flags(w, name: str, batch: int) -> list[str]:
    """kd with a narrower student (projections and a scale to train), one step an epoch over all WHOLE images.

    ``--gather-with-grad``: the model's gradient is then the whole batch's on every rank count (without it
    open_clip's convention scales it by 1/world). ``--aug-cfg scale=(1.0,1.0)``: RandomResizedCrop keeps the whole
    (square) image, so the per-rank RNG streams (open_clip_train seeds each rank apart) change no input.
    """
    narrow = ("--clipcid-model-config", str(w["root"] / "narrow"))
    return common_flags(
        w, name, "--clipcid-loss", "kd", *narrow, "--gather-with-grad", "--aug-cfg", "scale=(1.0,1.0)",
        "--train-data", w["whole"], "--batch-size", str(batch), "--epochs", str(WHOLE_EPOCHS),
        model="tiny-vit-s-32-e32",
    )  # fmt: skip


def checkpoint_path(w, name: str, epoch: int = 1) -> str:
    return str(w["root"] / "logs" / name / "checkpoints" / f"epoch_{epoch}.pt")


@pytest.fixture(scope="module")
def runs(workdir):
    w = workdir
    mod = "clipcid_fast.open_clip_train"
    resume = ("--epochs", "2", "--resume", checkpoint_path(w, "kd"))  # epoch 1 of 2 from kd's epoch_1.pt
    narrow = ("--clipcid-model-config", str(w["root"] / "narrow"))  # registered by the plug-in's flag only
    spec_runs = [
        ("stock", "open_clip_train.main", common_flags(w, "stock")),
        ("distill", mod, common_flags(w, "distill", "--clipcid-loss", "distill")),
        ("kd", mod, common_flags(w, "kd", "--clipcid-loss", "kd")),
        ("kd-resume", mod, common_flags(w, "kd-resume", "--clipcid-loss", "kd", *resume)),
        ("rd", mod, common_flags(w, "rd", "--clipcid-loss", "rd", *narrow, model="tiny-vit-s-32-e32")),
        ("bad", mod, stock_flags("--clipcid-loss", "rd")),  # no teacher: the command line's error and exit code
        ("kd-whole", mod, whole_flags(w, "kd-whole", WHOLE)),  # what the torchrun run must reproduce
    ]
    spec = {
        "models": str(w["root"] / "models"),
        "results": str(w["root"] / "results.json"),
        "runs": [{"name": n, "module": m, "argv": a, "record": str(w["root"] / f"{n}.jsonl")} for n, m, a in spec_runs],
    }
    with open(w["root"] / "spec.json", "w") as f:
        json.dump(spec, f)
    with open(w["root"] / "driver.py", "w") as f:
        f.write(DRIVER)
    # CSV paths are relative to the CSV: open_clip_train opens them from the working directory
    cmd = [PY, str(w["root"] / "driver.py"), str(w["root"] / "spec.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=w["root"] / "export", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(spec["results"]) as f:
        results = json.load(f)
    stderr = dict(re.findall(r"=== run (\S+)\n(.*?)=== end \1\n", proc.stderr, flags=re.S))
    out = {"bad": {**results["bad"], "stderr": stderr["bad"]}}
    for run in spec["runs"]:
        res = results[run["name"]]
        print(f"{run['name']}: {res['seconds']:.1f} s")
        if run["name"] == "bad":
            continue
        assert res["exit"] in (None, 0), f"{run['name']}: {res.get('traceback', res)}\n{stderr[run['name']][-3000:]}"
        with open(run["record"]) as f:
            records = [json.loads(line) for line in f]
        with open(w["root"] / "logs" / run["name"] / "out.log") as f:
            log = f.read()
        out[run["name"]] = {"records": records, "log": log}
    return out


@pytest.fixture(scope="module")
def torchrun_kd(workdir, runs):  # after `runs`: the driver file is written there
    """``torchrun --nproc-per-node 2`` of the driver: kd-whole's run split over 2 ranks (8 images each)."""
    w = workdir
    run = {"name": "kd-par", "module": "clipcid_fast.open_clip_train", "argv": whole_flags(w, "kd-par", WHOLE // NPROC)}
    run["record"] = str(w["root"] / "kd-par.rank{rank}.jsonl")
    spec = {
        "models": str(w["root"] / "models"),
        "results": str(w["root"] / "results-par.rank{rank}.json"),
        "runs": [run],
    }
    with open(w["root"] / "spec-par.json", "w") as f:
        json.dump(spec, f)
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}",
           str(w["root"] / "driver.py"), str(w["root"] / "spec-par.json")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=w["root"] / "export", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = []
    for r in range(NPROC):
        with open(spec["results"].format(rank=r)) as f:
            res = json.load(f)["kd-par"]
        assert res["exit"] in (None, 0), f"rank {r}: {res.get('traceback', res)}\n{proc.stderr[-3000:]}"
        record = spec["runs"][0]["record"].format(rank=r)
        with open(record) as f:
            records = [json.loads(line) for line in f]
        ranks.append({"records": records, "loss": torch.load(record + ".pt", weights_only=True)})
    print(f"torchrun kd-par: {res['seconds']:.1f} s")
    return ranks


TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[.*?LR: (\S+) Logit Scale: (\S+) (.*)$")
TERM = re.compile(r"(\w+): (\S+) \((\S+)\)")


def log_steps(log: str) -> list[dict]:
    """Each ``Train Epoch`` line of an open_clip_train log: its LR, logit scale and the current value of each term."""
    steps = []
    for line in log.splitlines():
        m = TRAIN_LINE.search(line)
        if m:
            terms = {name: float(val) for name, val, _ in TERM.findall(m.group(4))}
            steps.append({"epoch": int(m.group(1)), "lr": m.group(2), "logit_scale": m.group(3), "terms": terms})
    return steps


def test_distill_gives_the_stock_runs_per_step_losses(runs):
    stock, fused = runs["stock"]["records"], runs["distill"]["records"]
    assert [r["loss_class"] for r in stock] == ["DistillClipLoss"] * STEPS
    assert [r["loss_class"] for r in fused] == ["FusedDistillClipLoss"] * STEPS
    worst = 0.0
    for step, (a, b) in enumerate(zip(stock, fused)):
        assert a["terms"].keys() == b["terms"].keys() == {"contrastive_loss", "distill_loss"}
        for k in a["terms"]:
            assert b["terms"][k] == pytest.approx(a["terms"][k], rel=1e-5, abs=0), (step, k)
            worst = max(worst, abs(b["terms"][k] - a["terms"][k]) / abs(a["terms"][k]))
    print(f"\nstock vs plug-in, {STEPS} steps: max relative difference of a loss term {worst:.2e}")
    for step, (a, b) in enumerate(zip(stock, fused)):
        print(f"step {step}: " + ", ".join(f"{k} {a['terms'][k]:.7f} / {b['terms'][k]:.7f}" for k in a["terms"]))
    # what open_clip_train itself logged: same steps, LR and logit scale; terms equal to its 5 printed digits
    log_a, log_b = log_steps(runs["stock"]["log"]), log_steps(runs["distill"]["log"])
    assert len(log_a) == len(log_b) == STEPS
    for a, b in zip(log_a, log_b):
        assert (a["lr"], a["logit_scale"]) == (b["lr"], b["logit_scale"])
        assert a["terms"].keys() == b["terms"].keys() == {"Contrastive_loss", "Distill_loss", "Loss"}
        for k in a["terms"]:
            assert b["terms"][k] == pytest.approx(a["terms"][k], rel=2e-4)
    assert "FusedDistillClipLoss" in runs["distill"]["log"] and "clipcid-fast" not in runs["stock"]["log"]


def test_distill_checkpoints_match_and_stay_plain_open_clip(runs, workdir):
    a = torch.load(checkpoint_path(workdir, "stock"), map_location="cpu", weights_only=False)
    b = torch.load(checkpoint_path(workdir, "distill"), map_location="cpu", weights_only=False)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, ref in a["state_dict"].items():
        got = b["state_dict"][k]
        if k.endswith("attn.in_proj_bias"):
            # the key bias adds a constant to each softmax row: its exact gradient is 0, so both runs feed AdamW
            # rounding noise there (up to lr * |noise| / eps per step; ~4e-5 after 4 steps); q and v biases are real
            w = ref.shape[0] // 3
            torch.testing.assert_close(got[w : 2 * w], ref[w : 2 * w], rtol=0, atol=1e-3, msg=k)
            got, ref = torch.cat([got[:w], got[2 * w :]]), torch.cat([ref[:w], ref[2 * w :]])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=5e-5, msg=k)  # measured: at most 1e-5
    assert len(b["optimizer"]["param_groups"]) == len(a["optimizer"]["param_groups"]) == 2
    assert plugin.STATE_KEY not in b["optimizer"]


def load_checkpoint(w, name, epoch=1):
    return torch.load(checkpoint_path(w, name, epoch), map_location="cpu", weights_only=False)


def test_kd_trains_its_scale_in_open_clip_trains_optimizer(runs, workdir):
    records = runs["kd"]["records"]
    assert len(records) == STEPS and {r["loss_class"] for r in records} == {"ClipKDLoss"}
    assert all(r["terms"].keys() == {"task_loss", "crd_loss", "icl_loss", "fd_loss"} for r in records)
    steps = log_steps(runs["kd"]["log"])
    assert len(steps) == STEPS
    assert all(s["terms"].keys() == {"Task_loss", "Crd_loss", "Icl_loss", "Fd_loss", "Loss"} for s in steps)
    scales = [r["scales"]["loss.cross_logit_scale"] for r in records]
    assert scales[0] == pytest.approx(LN_INV_007, rel=1e-6)
    assert len(set(scales)) == STEPS, scales  # every step moved it
    ckpt = load_checkpoint(workdir, "kd")
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 3 and groups[2]["weight_decay"] == 0.0 and len(groups[2]["params"]) == 1
    (idx,) = groups[2]["params"]
    assert int(ckpt["optimizer"]["state"][idx]["step"]) == STEPS
    saved = ckpt["optimizer"][plugin.STATE_KEY]
    assert saved["loss"] == "kd" and set(saved["state_dict"]) == {"loss.cross_logit_scale"}
    final = float(saved["state_dict"]["loss.cross_logit_scale"])
    assert math.isfinite(final) and final not in scales
    # the model's state_dict is still a plain open_clip checkpoint
    open_clip.model.CLIP(**tiny_config()).load_state_dict(ckpt["state_dict"], strict=True)


def test_kd_resume_restores_the_scale_and_its_moments(runs, workdir):
    saved = load_checkpoint(workdir, "kd")["optimizer"][plugin.STATE_KEY]["state_dict"]["loss.cross_logit_scale"]
    records = runs["kd-resume"]["records"]
    assert len(records) == STEPS  # epoch 1 of 2
    assert records[0]["scales"]["loss.cross_logit_scale"] == float(saved)
    assert all(s["epoch"] == 1 for s in log_steps(runs["kd-resume"]["log"]))
    ckpt = load_checkpoint(workdir, "kd-resume", epoch=2)
    (idx,) = ckpt["optimizer"]["param_groups"][2]["params"]
    assert int(ckpt["optimizer"]["state"][idx]["step"]) == 2 * STEPS  # AdamW's state came back with it


def test_rd_projects_a_narrower_student_and_trains_its_scales(runs, workdir):
    records = runs["rd"]["records"]
    assert len(records) == STEPS and {r["loss_class"] for r in records} == {"ClipRDLoss"}
    names = {"task_loss", "hrd_loss", "icl_loss", "fd_loss", "vrd_loss", "xrd_loss"}
    assert all(r["terms"].keys() == names for r in records)
    assert all(s["terms"].keys() == {n.capitalize() for n in names} | {"Loss"} for s in log_steps(runs["rd"]["log"]))
    for name in ("loss.cross_logit_scale", "loss.image_logit_scale", "loss.text_logit_scale"):
        seen = [r["scales"][name] for r in records]
        assert seen[0] == pytest.approx(LN_INV_007, rel=1e-6) and len(set(seen)) == STEPS, (name, seen)
    assert "student 32-d, teacher 64-d" in runs["rd"]["log"]
    ckpt = load_checkpoint(workdir, "rd")
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 4
    assert (groups[2]["weight_decay"], len(groups[2]["params"])) == (0.0, 3)  # the scales
    assert (groups[3]["weight_decay"], len(groups[3]["params"])) == (0.1, 2)  # the projections, with --wd
    sd = ckpt["optimizer"][plugin.STATE_KEY]["state_dict"]
    assert sd["proj_image.weight"].shape == sd["proj_text.weight"].shape == (64, 32)
    narrow = tiny_config()
    narrow["embed_dim"] = 32
    open_clip.model.CLIP(**narrow).load_state_dict(ckpt["state_dict"], strict=True)


def test_torchrun_two_ranks_train_the_loss_as_one_process(runs, torchrun_kd, workdir):
    """kd with projections under torchrun: every step's terms and the loss's parameters (projections and scale,
    in DDP) equal one process's on the same global batch, on both ranks; rank 0's checkpoint equals it too."""
    one = runs["kd-whole"]["records"]
    ranks = torchrun_kd
    assert len(one) == WHOLE_EPOCHS and not one[0]["ddp"]
    for r, rank in enumerate(ranks):
        recs = rank["records"]
        assert len(recs) == WHOLE_EPOCHS and all(x["ddp"] for x in recs), r
        for step, (a, b) in enumerate(zip(one, recs)):
            assert a["terms"].keys() == b["terms"].keys() == {"task_loss", "crd_loss", "icl_loss", "fd_loss"}
            for k in a["terms"]:
                assert b["terms"][k] == pytest.approx(a["terms"][k], rel=2e-5), (r, step, k)
            assert b["scales"]["loss.cross_logit_scale"] == pytest.approx(
                a["scales"]["loss.cross_logit_scale"], rel=1e-6, abs=0
            ), (r, step)
    assert len({x["scales"]["loss.cross_logit_scale"] for x in one}) == WHOLE_EPOCHS  # it trains
    final_one = torch.load(str(workdir["root"] / "kd-whole.jsonl") + ".pt", weights_only=True)
    assert set(final_one) == {"loss.cross_logit_scale", "proj_image.weight", "proj_text.weight"}
    for r, rank in enumerate(ranks):
        for k, ref in final_one.items():
            # both ranks hold the same copy (DDP); without it each stepped its projections on its own rows
            torch.testing.assert_close(rank["loss"][k], ranks[0]["loss"][k], rtol=0, atol=0, msg=(r, k))
            torch.testing.assert_close(rank["loss"][k], ref, rtol=1e-4, atol=2e-6, msg=(r, k))
    with torch.random.fork_rng(devices=[]):  # the plug-in's init of the projections (--seed 0)
        torch.manual_seed(0)
        init = plugin.OpenClipTrainLoss("kd", {"crd_weight": 1, "icl_weight": 1, "fd_weight": 1}, student_dim=32,
                                        teacher_dim=64)  # fmt: skip
    for name in ("proj_image.weight", "proj_text.weight"):  # they trained
        assert (final_one[name] - init.state_dict()[name]).abs().max() > 1e-3, name
    a = load_checkpoint(workdir, "kd-whole", WHOLE_EPOCHS)
    b = load_checkpoint(workdir, "kd-par", WHOLE_EPOCHS)
    assert set(b["state_dict"]) == {"module." + k for k in a["state_dict"]}  # open_clip_train saves DDP's keys
    for k, ref in a["state_dict"].items():
        got = b["state_dict"]["module." + k]
        if k.endswith("attn.in_proj_bias"):  # the key bias: AdamW steps on rounding noise (see the distill test)
            h = ref.shape[0] // 3
            got, ref = torch.cat([got[:h], got[2 * h :]]), torch.cat([ref[:h], ref[2 * h :]])
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=5e-5, msg=k)
    for k, ref in a["optimizer"][plugin.STATE_KEY]["state_dict"].items():
        torch.testing.assert_close(b["optimizer"][plugin.STATE_KEY]["state_dict"][k], ref, rtol=1e-4, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# bad input: one clear error naming the flag and the value, nothing run


def stock_flags(*extra: str) -> list[str]:
    return ["--train-data", "x.csv", "--model", "ViT-S-32", "--device", "cpu", "--logs", "/nonexistent", *extra]


@pytest.mark.parametrize(
    "argv, message",
    [
        (stock_flags("--clipcid-loss", "kd"), r"--clipcid-loss kd distils from a teacher: give both --distill-model "
                                              r"and --distill-pretrained \(got --distill-model None"),
        (stock_flags("--clipcid-loss", "distill", "--distill-model", "ViT-S-32"),
         r"--distill-pretrained None"),
        (stock_flags("--clipcid-loss", "kd", "--distill-model", "ViT-S-32", "--distill-pretrained", "t.pt",
                     "--accum-freq", "2"), r"--accum-freq 2: open_clip_train does not distil with gradient accum"),
        (stock_flags("--clipcid-loss", "rd", "--distill-model", "ViT-S-32", "--distill-pretrained", "t.pt",
                     "--opt", "timm/adamw", "--beta1", "0.9", "--beta2", "0.98"), r"--opt timm/adamw"),
        (stock_flags("--clipcid-loss", "kd", "--clipcid-vrd-weight", "2"),
         r"--clipcid-vrd-weight applies to --clipcid-loss rd, not to --clipcid-loss kd"),
        (stock_flags("--clipcid-loss", "kd", "--clipcid-fd-wieght", "2"), r"unknown clipcid-fast flag --clipcid-fd"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_error(argv, message):
    import open_clip_train.main as ocm

    before = (ocm.parse_args, ocm.create_loss, ocm.optim)
    with pytest.raises(plugin.PluginError, match=message):
        plugin.main(argv)
    assert (ocm.parse_args, ocm.create_loss, ocm.optim) == before  # the patch is undone


@pytest.mark.parametrize(
    "argv, message",
    [
        (stock_flags("--clipcid-loss", "kdd"), r"argument --clipcid-loss: invalid choice: 'kdd'"),
        (stock_flags(), r"the following arguments are required: --clipcid-loss"),
        (stock_flags("--clipcid-loss", "kd", "--clipcid-fd-weight", "-1"), r"argument --clipcid-fd-weight: must be"),
        (stock_flags("--clipcid-loss", "kd", "--clipcid-impl", "gpu"), r"argument --clipcid-impl: invalid choice"),
    ],
)
def test_bad_values_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        plugin.main(argv)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_command_line_prints_one_error_line_and_exits_2(runs):
    """``python -m clipcid_fast.open_clip_train`` (run by the driver through runpy, as ``-m`` does)."""
    assert runs["bad"]["exit"] == 2
    assert runs["bad"]["stderr"].strip().splitlines() == [
        "python -m clipcid_fast.open_clip_train: error: --clipcid-loss rd distils from a teacher: give both "
        "--distill-model and --distill-pretrained (got --distill-model None, --distill-pretrained None)"
    ]


def test_help_lists_ours_then_open_clip_trains(capsys):
    with pytest.raises(SystemExit) as e:
        plugin.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.index("--clipcid-loss") < out.index("--distill-model") and "--clipcid-fd-weight" in out


# ---------------------------------------------------------------------------------------------------------------
# the loss module itself


def features(b=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = [torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1) for _ in range(4)]
    return dict(image_features=f[0], text_features=f[1], logit_scale=torch.tensor(10.0), dist_image_features=f[2],
                dist_text_features=f[3], dist_logit_scale=torch.tensor(20.0))  # fmt: skip


def test_distill_weight_scales_the_distill_term_only():
    from clipcid_fast import FusedDistillClipLoss

    ref = FusedDistillClipLoss()(**features(), output_dict=True)
    out = plugin.OpenClipTrainLoss("distill", {"distill_weight": 0.25})(**features(), output_dict=True)
    assert out["contrastive_loss"] == ref["contrastive_loss"]
    torch.testing.assert_close(out["distill_loss"], 0.25 * ref["distill_loss"])


def test_loss_refuses_outputs_it_does_not_use_and_unprojected_widths():
    weights = {"crd_weight": 1.0, "icl_weight": 1.0, "fd_weight": 2000.0}
    loss = plugin.OpenClipTrainLoss("kd", weights)
    with pytest.raises(ValueError, match=r"does not use: \['dist_logit_bias'\]"):
        loss(**features(), dist_logit_bias=torch.tensor(-10.0), output_dict=True)
    f = features()
    f["dist_image_features"] = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="student features are 8-d and teacher features 4-d"):
        loss(**f, output_dict=True)


def test_optimizer_state_carries_the_loss_and_refuses_another_runs():
    """The hooks on open_clip_train's AdamW, without a run: save, restore, and a resume from a foreign checkpoint."""
    import argparse

    opts, rest = plugin.parse_plugin_args(["--clipcid-loss", "kd", "--clipcid-fd-weight", "100", "--model", "m"])
    assert rest == ["--model", "m"] and opts.weights["fd_weight"] == 100.0
    p = plugin._Plugin(opts)
    p.args = argparse.Namespace(model="unknown-a", distill_model="unknown-b", seed=0, local_loss=False,
                                gather_with_grad=False, rank=0, world_size=1, horovod=False, device="cpu", wd=0.1,
                                resume="old.pt")  # fmt: skip
    model = torch.nn.Linear(3, 2)
    groups = [{"params": [model.bias], "weight_decay": 0.0}, {"params": [model.weight], "weight_decay": 0.1}]
    opt = p.adamw(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    assert len(opt.param_groups) == 3 and opt.param_groups[2]["params"] == [p.loss.loss.cross_logit_scale]
    state = opt.state_dict()
    assert state[plugin.STATE_KEY]["loss"] == "kd"
    with torch.no_grad():
        p.loss.loss.cross_logit_scale.fill_(7.0)
    opt.load_state_dict(state)
    assert float(p.loss.loss.cross_logit_scale.detach()) == pytest.approx(LN_INV_007)
    assert plugin.STATE_KEY in state  # the checkpoint's dict is left as it was
    stock = torch.optim.AdamW(groups, lr=1e-3).state_dict()
    with pytest.raises(plugin.PluginError, match=r"--resume old.pt: the checkpoint has no clipcid-fast loss state"):
        opt.load_state_dict(stock)
    other = {**state, plugin.STATE_KEY: {**state[plugin.STATE_KEY], "loss": "rd"}}
    with pytest.raises(plugin.PluginError, match=r"written with --clipcid-loss rd, not kd"):
        opt.load_state_dict(other)
