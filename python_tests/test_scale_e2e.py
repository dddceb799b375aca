"""Your data at scale, end to end: the offline student corpus (384 rows) exported to 16 webdataset shards, then
``torchrun --nproc-per-node 2`` (gloo on CPU) for embed -> balance -> cluster -> train cid and rd (streamed, 2
DataLoader workers per rank), the whole job SIGKILLed mid-epoch and resumed, then eval on a class-folder export.

Checked: the embed cache written by 2 ranks is byte-identical to one process's; a run SIGKILLed mid-epoch
(every process of the job: the launcher, both ranks, their DataLoader workers) and resumed with the same world
size and worker count ends with the uninterrupted run's student, optimizer and data position bit for bit, for cid
and rd; a two-launcher ``--nnodes 2 --nproc-per-node 1`` run (c10d rendezvous on localhost) trains the
``--nnodes 1 --nproc-per-node 2`` student bit for bit; the resumed student's zero-shot on the class folders is
the uninterrupted one's. The teacher is test_train's small random open_clip model: these are equalities of runs,
not accuracies (the README's "Your data at scale" gives the zero-shot of a real run).

Launches are batched (several stages in one torchrun job, each through ``clipcid_fast.cli.main`` as the command
line runs it) to keep the CI time to a few minutes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_train import assert_same_tensors, teacher_model_cfg

from clipcid_fast.pipeline import checkpoint, models
from clipcid_fast.pipeline.config import (
    BalanceConfig,
    ClusterConfig,
    DataConfig,
    EmbedConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    to_yaml,
)
from clipcid_fast.pipeline.data import export_corpus

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

N, TAR_ROWS = 384, 24  # 16 tars
STEPS, BATCH, CKPT_EVERY, KILL_AT = 8, 32, 3, 5  # a rank's epoch is ~170 kept samples / 16 a step: ~10 steps
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One torchrun job runs several stages in a row, each as the CLI runs it; KILL="out_dir:step" SIGKILLs the whole job
# (the launcher's process group) when rank 1 starts that step of the training writing to out_dir.
JOB_SCRIPT = """
import os, signal, sys

import torch
import torch.distributed

from clipcid_fast import cli
from clipcid_fast.pipeline import train

torch.set_num_threads(1)
# one process group for the job's stages: a group destroyed and made again in one process would find the first
# one's addresses in torchrun's store (each stage alone, as the command line runs it, makes its own)
torch.distributed.init_process_group("gloo")
kill_dir, _, kill_step = os.environ.get("KILL", "::").rpartition(":")
real_prepare = train.prepare


def killing_prepare(cfg, comm=None):
    p = real_prepare(cfg, comm)
    if cfg.out_dir != kill_dir:
        return p
    rank = int(os.environ["RANK"])
    with open(f"{cfg.out_dir}.pid{rank}", "w") as f:
        f.write(str(os.getpid()))
    if rank != 1:
        return p
    import dataclasses

    calls = iter(range(10**6))

    def step(batch):
        if next(calls) == int(kill_step):
            # the whole job, as a lost machine would end it: rank 0 and its workers (torchrun gives each rank its
            # own process group), the launcher, then this rank and its workers; nobody gets to write anything
            with open(f"{cfg.out_dir}.pid0") as f:
                os.killpg(os.getpgid(int(f.read())), signal.SIGKILL)
            os.kill(os.getppid(), signal.SIGKILL)
            os.killpg(os.getpgid(0), signal.SIGKILL)
        return p.step(batch)

    return dataclasses.replace(p, step=step)


train.prepare = killing_prepare
for stage, path in zip(sys.argv[1::2], sys.argv[2::2]):
    cli.main([stage, "--config", path])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_yaml(cfg, path: str) -> str:
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
    return path


def launch(root: str, stages: list[tuple[str, object]], *, kill: str = "", nodes: int = 1):
    """Run the stages in one torchrun job of 2 processes (``nodes`` launchers); the launchers' CompletedProcesses."""
    script = os.path.join(root, "job.py")
    with open(script, "w") as f:
        f.write(JOB_SCRIPT)
    args = []
    for i, (stage, cfg) in enumerate(stages):
        args += [stage, write_yaml(cfg, os.path.join(root, f"{stage}-{i}-{os.getpid()}.yaml"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": REPO, "KILL": kill}
    run = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        cmds = [[*run, "--standalone", "--nproc-per-node=2", script, *args]]
    else:  # two launchers on this host meeting at a c10d rendezvous, as two machines would
        endpoint = f"127.0.0.1:{free_port()}"
        cmds = [[*run, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                 "--rdzv-id=e2e", f"--rdzv-conf=is_host={str(n == 0).lower()}", script, *args]
                for n in range(2)]  # fmt: skip
    procs = [subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in cmds]  # fmt: skip
    return [(p.wait(timeout=600), p.stdout.read()) for p in procs]


def ok(results) -> None:
    for code, out in results:
        assert code == 0, out[-6000:]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("scale"))
    export = export_corpus(DataConfig(student_samples=N), os.path.join(root, "export"), formats=("wds",),
                           shard_size=TAR_ROWS)  # fmt: skip
    folders = export_corpus(DataConfig(corpus="test"), os.path.join(root, "export"), formats=("folders",),
                            limit=300)["folders"]  # fmt: skip
    with open(os.path.join(root, "teacher.json"), "w") as f:
        json.dump(teacher_model_cfg(), f)
    torch.manual_seed(1)
    torch.save(models.build_open_clip(teacher_model_cfg()).state_dict(), os.path.join(root, "teacher.pt"))
    mc = ModelConfig(teacher=os.path.join(root, "teacher.json"), teacher_weights=os.path.join(root, "teacher.pt"))
    data = DataConfig(student_samples=N, dataset="wds", train_data=export["wds"], workers=2)
    d = {k: os.path.join(root, k) for k in ("cache", "balance", "cluster")}
    emb = EmbedConfig(out_dir=d["cache"], batch_size=64, shard_rows=64, progress=False, data=data, models=mc)
    bal = BalanceConfig(embeddings=os.path.join(d["cache"], "image"), out_dir=d["balance"],
                        ids=os.path.join(d["cache"], "ids"), k=4, niter=5, eps=[0.05])  # fmt: skip
    clu = ClusterConfig(embeddings=os.path.join(d["cache"], "image"), out_dir=d["cluster"], n_classes=8, niter=5,
                        keep=os.path.join(d["balance"], "keep_eps0.05.npy"))  # fmt: skip
    base = dict(steps=STEPS, batch_size=BATCH, warmup=2, lr=2e-3, eval_every=0, ckpt_every=CKPT_EVERY,
                progress=False, data=data, models=mc, teacher_cache=d["cache"])  # fmt: skip
    cid = dict(base, recipe="cid", cluster_dir=d["cluster"], balance_dir=d["balance"], balance_eps=0.05)
    rd = dict(base, recipe="rd")
    runs = {f"{r}_{v}": TrainConfig(out_dir=os.path.join(root, f"{r}_{v}"), **kw)
            for r, kw in (("cid", cid), ("rd", rd)) for v in ("full", "cut")}  # fmt: skip
    runs["rd_nodes"] = dataclasses.replace(runs["rd_full"], out_dir=os.path.join(root, "rd_nodes"))

    ok(launch(root, [("embed", emb), ("balance", bal), ("cluster", clu), ("train", runs["cid_full"]),
                     ("train", runs["rd_full"])]))  # fmt: skip
    killed = {"cid": launch(root, [("train", runs["cid_cut"])], kill=f"{runs['cid_cut'].out_dir}:{KILL_AT}")}
    unfinished = {"cid": not os.path.exists(os.path.join(runs["cid_cut"].out_dir, "student.pt"))}
    resume = {r: dataclasses.replace(runs[f"{r}_cut"], resume=True) for r in ("cid", "rd")}
    killed["rd"] = launch(root, [("train", resume["cid"]), ("train", runs["rd_cut"])],
                          kill=f"{runs['rd_cut'].out_dir}:{KILL_AT}")  # fmt: skip
    unfinished["rd"] = not os.path.exists(os.path.join(runs["rd_cut"].out_dir, "student.pt"))
    ok(launch(root, [("train", resume["rd"])]))
    nodes = launch(root, [("train", runs["rd_nodes"])], nodes=2)
    return {
        "root": root,
        "runs": runs,
        "killed": killed,
        "unfinished": unfinished,
        "nodes": nodes,
        "embed": emb,
        "folders": folders,
        "mc": mc,
    }


def test_two_ranks_embed_the_bytes_of_one_process(job):
    from clipcid_fast.pipeline.embed import SHARD_DIRS, run_embed

    one = dataclasses.replace(job["embed"], out_dir=os.path.join(job["root"], "cache_one"))
    run_embed(one)
    for sub in (*SHARD_DIRS, "id_index"):
        names = sorted(os.listdir(os.path.join(one.out_dir, sub)))
        assert names == sorted(os.listdir(os.path.join(job["embed"].out_dir, sub)))
        for name in names:
            with (
                open(os.path.join(one.out_dir, sub, name), "rb") as a,
                open(os.path.join(job["embed"].out_dir, sub, name), "rb") as b,
            ):
                assert a.read() == b.read(), f"{sub}/{name}"


def assert_same_run(a: TrainConfig, b: TrainConfig) -> None:
    sa = torch.load(os.path.join(a.out_dir, "student.pt"), weights_only=True)
    sb = torch.load(os.path.join(b.out_dir, "student.pt"), weights_only=True)
    assert_same_tensors(sa, sb, "student.pt")
    ca, cb = (torch.load(checkpoint.newest(os.path.join(c.out_dir, "checkpoints")), weights_only=False) for c in (a, b))
    for key in ("model", "optimizer", "metrics", "data"):
        assert_same_tensors(ca[key], cb[key], f"checkpoint[{key!r}]")


@pytest.mark.parametrize("recipe", ["cid", "rd"])
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(job, recipe):
    ((code, out),) = job["killed"][recipe][-1:]
    assert code == -signal.SIGKILL, out[-3000:]  # the job died, launcher included
    assert job["unfinished"][recipe]  # killed before its end: no student.pt
    assert_same_run(job["runs"][f"{recipe}_full"], job["runs"][f"{recipe}_cut"])


def test_two_launchers_of_one_process_equal_one_launcher_of_two(job):
    ok(job["nodes"])
    assert_same_run(job["runs"]["rd_full"], job["runs"]["rd_nodes"])


def test_resumed_student_zero_shot_on_class_folders_equals_the_uninterrupted(job):
    from clipcid_fast.pipeline.evaluate import run_eval

    got = {}
    for v in ("full", "cut"):
        run = job["runs"][f"cid_{v}"]
        cfg = EvalConfig(model=os.path.join(run.out_dir, "student.pt"), out=os.path.join(run.out_dir, "eval.json"),
                         tasks="zeroshot", eval_data=job["folders"], models=job["mc"])  # fmt: skip
        got[v] = run_eval(cfg)
    assert got["full"]["zeroshot"] == got["cut"]["zeroshot"]
    top1 = got["full"]["zeroshot"]["top1"]
    assert 0.0 <= top1 <= 1.0 and np.isfinite(top1)
