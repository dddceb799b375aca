"""The run folder (issue 20, item 2): checksummed checkpoints, the newest ``keep_checkpoints`` kept, a corrupt,
truncated or unfinished newest one passed over for the previous one (the resumed run still ends bit for bit where
the uninterrupted one ends), one run at a time (a lock), a moved run folder or input that resumes, and the thread
count of a resume checked.

The runs are ``test_train``'s (its tiny teacher, cache and cluster outputs, its module fixtures imported here): a
baseline or cid run of ``KILL_STEPS`` steps with a checkpoint every ``KILL_CKPT_EVERY``, stopped by SIGTERM during a
chosen step through the trainer's own preemption path."""

# ruff: noqa: F811 (test_train's module fixtures are imported by name and taken as arguments)
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from test_train import (  # noqa: F401 (module fixtures: assets, _trainer_on_cpu)
    KILL_CKPT_EVERY,
    KILL_STEPS,
    _trainer_on_cpu,
    assert_same_tensors,
    assets,
    kill_cfg,
    raises_one_line,
)

from clipcid_fast.pipeline import checkpoint, run_folder, train


def ckpt_dir(cfg) -> str:
    return os.path.join(cfg.out_dir, "checkpoints")


def run_until(cfg, stop_after: int, monkeypatch) -> None:
    """Run ``cfg`` and stop it by SIGTERM delivered during step ``stop_after`` (1-based): it checkpoints that step
    and exits 143."""
    real_prepare = train.prepare

    def prepare(c, comm=None):
        p = real_prepare(c, comm)
        calls = iter(range(1, 10**6))

        def step(batch):
            if next(calls) == stop_after:
                os.kill(os.getpid(), signal.SIGTERM)
            return p.step(batch)

        return dataclasses.replace(p, step=step)

    monkeypatch.setattr(train, "prepare", prepare)
    with pytest.raises(SystemExit) as info:
        train.run_train(cfg)
    monkeypatch.setattr(train, "prepare", real_prepare)
    assert info.value.code == 128 + signal.SIGTERM


def students_equal(a, b) -> None:
    sa = torch.load(os.path.join(a.out_dir, "student.pt"), weights_only=True)
    sb = torch.load(os.path.join(b.out_dir, "student.pt"), weights_only=True)
    assert_same_tensors(sa, sb, "student.pt")


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    """The uninterrupted baseline run every resumed one is compared with."""
    cfg = kill_cfg(assets, tmp_path_factory.mktemp("full"), "baseline")
    train.run_train(cfg)
    return cfg


@pytest.fixture(scope="module")
def stopped_run(assets, tmp_path_factory):
    """A baseline run stopped after step 6 (checkpoints 4 and 6 on disk); each test resumes its own copy (a copy is a
    moved run folder: that it resumes at all is checked here too)."""
    cfg = kill_cfg(assets, tmp_path_factory.mktemp("stopped") / "run", "baseline")
    with pytest.MonkeyPatch.context() as mp:
        run_until(cfg, 6, mp)
    return cfg


def copy_of(run, where) -> object:
    cfg = dataclasses.replace(run, out_dir=str(where), resume=True)
    shutil.copytree(run.out_dir, cfg.out_dir)
    return cfg


def test_each_checkpoint_has_its_checksum_and_only_the_newest_are_kept(tmp_path, full_run, stopped_run):
    steps = sorted(int(f[5:13]) for f in os.listdir(ckpt_dir(full_run)) if f.endswith(".pt"))
    assert steps == [KILL_STEPS - KILL_CKPT_EVERY, KILL_STEPS]  # keep_checkpoints = 2
    for s in steps:
        path = checkpoint.path_of(ckpt_dir(full_run), s)
        with open(path + ".sha256") as f:
            assert f.read().split()[0] == hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert torch.load(path, weights_only=False)["step"] == s
    cfg = dataclasses.replace(copy_of(stopped_run, tmp_path / "keep3"), keep_checkpoints=3)
    train.run_train(cfg)  # keep_checkpoints changes no result: the resume accepts it
    assert sorted(f for f in os.listdir(ckpt_dir(cfg)) if f.endswith(".pt")) == [
        "step-00000004.pt", "step-00000006.pt", "step-00000008.pt"]  # fmt: skip


@pytest.mark.parametrize("damage", ["flipped-bytes", "truncated", "no-checksum"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(damage, tmp_path, full_run, stopped_run, capsys):
    """Stopped after step 6 (checkpoints 4 and 6 on disk), the newest damaged: the resume names it, continues from
    step 4, and ends bitwise where the uninterrupted run ends."""
    cfg = copy_of(stopped_run, tmp_path / "run")
    newest = checkpoint.path_of(ckpt_dir(cfg), 6)
    assert checkpoint.newest(ckpt_dir(cfg)) == newest
    if damage == "flipped-bytes":
        with open(newest, "r+b") as f:
            f.seek(os.path.getsize(newest) // 2)
            chunk = bytearray(f.read(8))
            f.seek(-8, os.SEEK_CUR)
            f.write(bytes(b ^ 0xFF for b in chunk))
        why = "is corrupt (SHA-256"
    elif damage == "truncated":
        with open(newest, "r+b") as f:
            f.truncate(os.path.getsize(newest) // 3)
        why = "is corrupt (SHA-256"
    else:
        os.remove(newest + ".sha256")
        why = "is unfinished (no .sha256 beside it)"
    capsys.readouterr()
    train.run_train(cfg)
    out = capsys.readouterr().out
    assert f"checkpoint {newest} {why}" in out and "trying the previous one" in out
    assert f"resumed {cfg.out_dir} at step 4" in out
    students_equal(full_run, cfg)


def test_no_usable_checkpoint_is_one_line_naming_each(tmp_path, stopped_run):
    cfg = copy_of(stopped_run, tmp_path / "run")
    for s in (4, 6):
        with open(checkpoint.path_of(ckpt_dir(cfg), s), "r+b") as f:
            f.truncate(100)
    want = r"--resume: no usable checkpoint in .*step-00000006.pt: corrupt .*step-00000004.pt: corrupt"
    msg = raises_one_line(ValueError, want, train.run_train, cfg)
    assert "student.pt" not in os.listdir(cfg.out_dir), msg


def test_a_second_run_in_a_locked_folder_is_refused(assets, tmp_path, stopped_run):
    """A fresh run and a resume, each while another process holds the folder: refused, nothing written."""
    from test_train import all_bytes

    fresh = kill_cfg(assets, tmp_path / "fresh", "baseline")
    resumed = copy_of(stopped_run, tmp_path / "resumed")
    before = all_bytes(resumed.out_dir)
    for cfg in (fresh, resumed):
        with run_folder.RunLock(cfg.out_dir):  # the first run, alive
            raises_one_line(ValueError, r"--out-dir .* is in use by a running run \(pid \d+ on .*\): wait for it",
                            train.run_train, cfg)  # fmt: skip
    assert checkpoint.newest(ckpt_dir(fresh)) is None and not os.path.exists(
        os.path.join(fresh.out_dir, "metrics.jsonl")
    )
    assert {k: v for k, v in all_bytes(resumed.out_dir).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}  # fmt: skip
    with run_folder.RunLock(fresh.out_dir):  # released when its holder ended
        pass


def test_a_moved_run_folder_resumes_bit_for_bit(tmp_path, full_run, stopped_run):
    moved = copy_of(stopped_run, tmp_path / "elsewhere" / "run")
    train.run_train(moved)
    students_equal(full_run, moved)


def test_a_moved_input_resumes_when_its_content_is_the_same(assets, tmp_path, monkeypatch, capsys):
    """cid's cluster dir copied elsewhere: the resume says so and goes on; another cluster dir at the new path (other
    pseudo-classes) is refused naming the key."""
    cfg = kill_cfg(assets, tmp_path / "run", "cid")
    run_until(cfg, 3, monkeypatch)
    same = str(tmp_path / "cluster_copy")
    shutil.copytree(assets.cluster, same)
    other = str(tmp_path / "cluster_other")
    shutil.copytree(assets.cluster, other)
    labels = np.load(os.path.join(other, "labels.npy"))
    np.save(os.path.join(other, "labels.npy"), np.roll(labels, 1))
    raises_one_line(ValueError, r"another config: cluster_dir: '.*cluster' \(checkpoint\) vs '.*cluster_other' \(now\)",
                    train.run_train, dataclasses.replace(cfg, resume=True, cluster_dir=other))  # fmt: skip
    capsys.readouterr()
    train.run_train(dataclasses.replace(cfg, resume=True, cluster_dir=same))
    assert f"--cluster-dir moved: {assets.cluster} -> {same} (same content)" in capsys.readouterr().out


def test_a_resume_with_another_thread_count_is_named(tmp_path, stopped_run, capsys):
    cfg = copy_of(stopped_run, tmp_path / "run")
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    torch.set_num_threads(other)
    try:
        capsys.readouterr()
        train.run_train(cfg)
    finally:
        torch.set_num_threads(threads)
    assert (f"was written by a run with {threads} CPU threads, this one has {other}: it continues, but not bit for bit"
            in capsys.readouterr().out)  # fmt: skip
