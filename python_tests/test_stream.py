"""pipeline/stream + stream_train: training streamed from webdataset shards (``--dataset wds``).

The corpus is 200 images of the offline student corpus exported to 4 shards of 50 (``export_corpus``); the teacher
is test_train's small random open_clip model and its cache is embedded from the shards. Checked against independent
readings of the shards (tarfile): an epoch of a rank's stream is every shard sample exactly once; a stream resumed
from its saved position at any sample continues exactly as the uninterrupted one (also with --skip-bad skips, each
counted once); a trainer stopped mid-epoch and resumed ends bitwise where the uninterrupted run ends, with two
DataLoader workers; bad shards are one line naming the shard, or counted skips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tarfile

import numpy as np
import pytest
import torch
from test_train import assert_same_tensors, teacher_model_cfg

from clipcid_fast.pipeline import checkpoint, models, train
from clipcid_fast.pipeline.config import DataConfig, EmbedConfig, ModelConfig, TrainConfig
from clipcid_fast.pipeline.data import build_dataset, export_corpus
from clipcid_fast.pipeline.embed import load_embeddings, run_embed
from clipcid_fast.pipeline.stream import CHUNK, RankStream, _Lookup, check_resumable

N, SHARD = 200, 50
BATCH = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = str(tmp_path_factory.mktemp("stream"))
    manifest = export_corpus(DataConfig(student_samples=N), os.path.join(root, "export"), formats=("wds",),
                             shard_size=SHARD)  # fmt: skip
    with open(os.path.join(root, "teacher.json"), "w") as f:
        json.dump(teacher_model_cfg(), f)
    torch.manual_seed(1)
    torch.save(models.build_open_clip(teacher_model_cfg()).state_dict(), os.path.join(root, "teacher.pt"))
    mc = ModelConfig(teacher=os.path.join(root, "teacher.json"), teacher_weights=os.path.join(root, "teacher.pt"))
    data = DataConfig(dataset="wds", train_data=manifest["wds"])
    cache = os.path.join(root, "cache")
    run_embed(EmbedConfig(out_dir=cache, batch_size=64, shard_rows=96, progress=False, data=data, models=mc))
    shards = sorted(  # the tars (export-data also writes img2dataset's <shard>_stats.json beside each)
        os.path.join(os.path.dirname(manifest["wds"]), f)
        for f in os.listdir(os.path.dirname(manifest["wds"]))
        if f.endswith(".tar")
    )
    return {"root": root, "pattern": manifest["wds"], "shards": shards, "models": mc, "data": data, "cache": cache}


@pytest.fixture(scope="module", autouse=True)
def _trainer_on_cpu():
    """The bitwise checks are of the CPU fp32 trainer (test_train's rule): a CUDA machine's GPU is not shown here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield


def shard_ids(path: str) -> list[int]:
    """The sample ids of one shard, read from its json members (not through the package)."""
    with tarfile.open(path) as tar:
        return [json.load(tar.extractfile(m))["id"] for m in tar if m.name.endswith(".json")]


@pytest.fixture(scope="module")
def student():
    return models.load_model(ModelConfig(), "student", seed=0)


def rank_stream(corpus, student, workers: int, state=None, pattern=None, skip_bad=False, seed=0, lookup=None):
    cfg = dataclasses.replace(corpus["data"], train_data=pattern or corpus["pattern"], skip_bad=skip_bad,
                              wds_shuffle_buffer=40)  # fmt: skip
    src = build_dataset(cfg, student.preprocess, student.tokenizer, shuffle_seed=seed)
    return RankStream(src, workers, lookup or _Lookup(), state=state)


def take_ids(stream, n: int) -> list[int]:
    return stream.take(n)["id"].tolist()


def test_embed_persists_the_id_index_the_trainer_opens(corpus):
    ids = np.concatenate([np.load(os.path.join(corpus["cache"], "ids", f)) for f in sorted(os.listdir(
        os.path.join(corpus["cache"], "ids")))])  # fmt: skip
    sorted_ids = np.load(os.path.join(corpus["cache"], "id_index", "ids.npy"))
    rows = np.load(os.path.join(corpus["cache"], "id_index", "rows.npy"))
    np.testing.assert_array_equal(sorted_ids, np.sort(ids))
    np.testing.assert_array_equal(ids[rows], sorted_ids)
    assert isinstance(load_embeddings(corpus["cache"])["row_of"].sorted, np.memmap)


# ---------------------------------------------------------------------------------------------------------------
# the stream


def test_an_epoch_is_every_shard_sample_once_in_a_seeded_order(corpus, student):
    everything = sorted(i for s in corpus["shards"] for i in shard_ids(s))
    assert len(everything) == N and len(set(everything)) == N
    a = rank_stream(corpus, student, workers=2)
    first, second = take_ids(a, N), take_ids(a, N)
    assert sorted(first) == everything and sorted(second) == everything
    assert first != second  # another epoch, another order
    assert a.state()["epoch"] == 1
    a.close()
    b = rank_stream(corpus, student, workers=2)
    assert take_ids(b, N) == first  # a function of the seed: the DataLoader's process timing does not enter
    b.close()
    c = rank_stream(corpus, student, workers=2, seed=1)
    assert take_ids(c, N) != first
    c.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_any_position_draws_what_the_uninterrupted_stream_draws(corpus, student, workers):
    """Cut points inside a chunk of worker 1 and of worker 0, on chunk boundaries before either's turn, in the
    epoch's last (short) chunk, at its last sample, and in the second epoch."""
    total = 2 * N + 30
    want = take_ids(rank_stream(corpus, student, workers), total)
    for cut in (CHUNK + 5, 2 * CHUNK + 5, 2 * CHUNK, 3 * CHUNK, N - 2, N, N + 71):
        head = rank_stream(corpus, student, workers)
        got = take_ids(head, cut)
        state = head.state()
        head.close()
        tail = rank_stream(corpus, student, workers, state=json.loads(json.dumps(state)))  # as the checkpoint keeps it
        got += take_ids(tail, total - cut)
        tail.close()
        assert got == want, f"cut at {cut}"


def cut_shard(src: str, dst: str) -> None:
    """A copy of a shard cut in the middle of its 20th member's data (as a killed download leaves it)."""
    with tarfile.open(src) as tar:
        member = list(tar)[19]
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: member.offset_data + member.size // 2])


@pytest.fixture(scope="module")
def cut_corpus(corpus, tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("cut"))
    for i, s in enumerate(corpus["shards"]):
        if i == 1:
            cut_shard(s, os.path.join(d, os.path.basename(s)))
        else:
            shutil.copy(s, d)
    return os.path.join(d, os.path.basename(corpus["pattern"]))


def test_a_cut_shard_is_one_line_naming_it(corpus, student, cut_corpus):
    s = rank_stream(corpus, student, 2, pattern=cut_corpus)
    with pytest.raises(ValueError, match=r"shard '.*-00001\.tar'.*unreadable tar") as info:
        take_ids(s, N)
    assert "\n" not in str(info.value)
    s.close()


def test_skip_bad_counts_each_skip_once_across_a_resume(corpus, student, cut_corpus):
    whole = rank_stream(corpus, student, 2, pattern=cut_corpus, skip_bad=True)
    want = take_ids(whole, 2 * N)
    want_state = whole.state()
    whole.close()
    # the cut shard gave its first 6 samples (members 0..17 are 6 samples of 3), then counted as one bad shard
    per_epoch = N - SHARD + 6
    assert sorted(want[:per_epoch]) == sorted(want[per_epoch : 2 * per_epoch])
    for cut in (5, 60, per_epoch - 1, per_epoch + 3):
        head = rank_stream(corpus, student, 2, pattern=cut_corpus, skip_bad=True)
        got = take_ids(head, cut)
        tail = rank_stream(corpus, student, 2, pattern=cut_corpus, skip_bad=True, state=head.state())
        head.close()
        got += take_ids(tail, 2 * N - cut)
        assert got == want, f"cut at {cut}"
        assert tail.state()["skipped_shards"] == want_state["skipped_shards"] == 3, f"cut at {cut}"
        tail.close()


@pytest.fixture(scope="module")
def corrupt_corpus(corpus, tmp_path_factory) -> tuple[str, list[int]]:
    """The shards with 3 samples of shard 2 whose PNG bytes are not an image (a valid tar); their ids."""
    import io

    import webdataset as wds

    d = str(tmp_path_factory.mktemp("corrupt"))
    for s in corpus["shards"]:
        shutil.copy(s, d)
    src = corpus["shards"][2]
    bad_ids = []
    buf = io.BytesIO()
    with tarfile.open(src) as tar, wds.TarWriter(buf, encoder=False, mtime=0) as out:
        members = {}
        for m in tar:
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
        for k, sample in enumerate(members.values()):
            if k in (3, 17, 40):
                sample["png"] = b"not a png"
                bad_ids.append(json.loads(sample["json"])["id"])
            out.write(sample)
    with open(os.path.join(d, os.path.basename(src)), "wb") as f:
        f.write(buf.getvalue())
    return os.path.join(d, os.path.basename(corpus["pattern"])), bad_ids


def test_skip_bad_samples_are_counted_once_across_a_resume(corpus, student, corrupt_corpus):
    pattern, bad_ids = corrupt_corpus
    s = rank_stream(corpus, student, 0, pattern=pattern)
    with pytest.raises(ValueError, match=r"shard '.*-00002\.tar': member .*\.png: cannot decode image"):
        take_ids(s, N)
    s.close()
    whole = rank_stream(corpus, student, 2, pattern=pattern, skip_bad=True)
    want = take_ids(whole, 2 * (N - 3))
    want_skipped = whole.state()["skipped_samples"]
    whole.close()
    assert 3 <= want_skipped <= 6  # epoch 1's 3, and those of epoch 2's that its first 197 samples passed
    good = sorted(set(i for s in corpus["shards"] for i in shard_ids(s)) - set(bad_ids))
    assert sorted(want[: N - 3]) == good and sorted(want[N - 3 :]) == good
    for cut in (11, 99, N - 3, N + 20):
        head = rank_stream(corpus, student, 2, pattern=pattern, skip_bad=True)
        got = take_ids(head, cut)
        tail = rank_stream(corpus, student, 2, pattern=pattern, skip_bad=True, state=head.state())
        head.close()
        got += take_ids(tail, 2 * (N - 3) - cut)
        assert got == want, f"cut at {cut}"
        assert tail.state()["skipped_samples"] == want_skipped, f"cut at {cut}"  # each skip counted once
        tail.close()


def test_a_shard_that_vanishes_during_training_is_named(corpus, student, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for s in corpus["shards"]:
        shutil.copy(s, d)
    s = rank_stream(corpus, student, 0, pattern=str(d / os.path.basename(corpus["pattern"])))
    take_ids(s, 10)
    os.remove(d / os.path.basename(corpus["shards"][2]))
    with pytest.raises(ValueError, match=r"shard '.*-00002\.tar'") as info:
        take_ids(s, 2 * N)
    assert "\n" not in str(info.value)


def test_another_split_is_refused_in_one_line():
    saved = {"kind": "wds-stream", "world": 2, "workers": 2, "chunk": CHUNK, "ranks": [{}, {}]}
    check_resumable(saved, 2, 2)
    check_resumable({**saved, "workers": 1, "ranks": [{}, {}]}, 2, 0)  # no worker process = one logical worker
    for world, workers in ((1, 2), (2, 3)):
        with pytest.raises(ValueError, match=r"--resume: .* 2 ranks x 2 workers; this run has") as info:
            check_resumable(saved, world, workers)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# the trainer


def train_cfg(corpus, out_dir, **kw) -> TrainConfig:
    base = dict(out_dir=str(out_dir), recipe="kd", steps=10, batch_size=BATCH, warmup=2, lr=2e-3, eval_every=0,
                ckpt_every=3, progress=False, data=dataclasses.replace(corpus["data"], workers=2),
                models=corpus["models"], teacher_cache=corpus["cache"])  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_streamed_training_stopped_mid_epoch_resumes_bit_for_bit(corpus, tmp_path, monkeypatch, capsys):
    """10 steps of 32 over 200 samples (the epoch ends inside step 7), two DataLoader workers; SIGTERM during step 5
    (not a checkpoint step): the resumed run's student, checkpoint and metrics equal the uninterrupted run's, and
    every batch held the teacher cache's features of its sample ids."""
    cache = load_embeddings(corpus["cache"])
    seen = []
    real_prepare = train.prepare

    def spying(cfg, comm=None, stop_at=None):
        p = real_prepare(cfg, comm)
        calls = iter(range(100))

        def step(batch):
            rows = cache["row_of"](batch["id"].numpy())
            assert torch.equal(batch["dist_image"], torch.from_numpy(cache["image"][rows].astype(np.float32)))
            seen.append(batch["id"].tolist())
            if next(calls) == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return p.step(batch)

        return dataclasses.replace(p, step=step)

    full = train_cfg(corpus, tmp_path / "full")
    monkeypatch.setattr(train, "prepare", spying)
    summary = train.run_train(full)
    assert summary["train_samples"] == N and summary["skipped"] == {"samples": 0, "shards": 0}
    ids = [i for b in seen for i in b]
    assert sorted(ids[:N]) == sorted(i for s in corpus["shards"] for i in shard_ids(s))
    want_ids, seen[:] = ids, []

    cut = train_cfg(corpus, tmp_path / "cut")
    monkeypatch.setattr(train, "prepare", lambda cfg, comm=None: spying(cfg, comm, stop_at=4))
    with pytest.raises(SystemExit) as info:
        train.run_train(cut)
    assert info.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(train, "prepare", spying)
    train.run_train(dataclasses.replace(cut, resume=True))
    assert [i for b in seen for i in b] == want_ids

    a = torch.load(os.path.join(full.out_dir, "student.pt"), weights_only=True)
    b = torch.load(os.path.join(cut.out_dir, "student.pt"), weights_only=True)
    assert_same_tensors(a, b, "student.pt")
    ca, cb = (
        torch.load(checkpoint.newest(os.path.join(c.out_dir, "checkpoints")), weights_only=False) for c in (full, cut)
    )
    for key in ("model", "recipe", "optimizer", "scheduler", "metrics", "data"):
        assert_same_tensors(ca[key], cb[key], f"checkpoint[{key!r}]")
    with (
        open(os.path.join(full.out_dir, "metrics.jsonl"), "rb") as f,
        open(os.path.join(cut.out_dir, "metrics.jsonl"), "rb") as g,
    ):
        assert f.read() == g.read()

    with pytest.raises(ValueError, match=r"--resume: .*data\.workers") as info:  # another split of the shards
        train.run_train(dataclasses.replace(cut, resume=True, steps=12, data=dataclasses.replace(cut.data, workers=1)))
    assert "\n" not in str(info.value)


def test_streamed_cid_trains_on_the_kept_samples_with_their_pseudo_classes(corpus, tmp_path, monkeypatch):
    """cid over shards: the pseudo-classes of a cluster run that kept 2 of every 3 cache rows; the first epoch is the
    kept samples exactly once, and every sample's label is labels.npy's at its id's cache row (read independently)."""
    from clipcid_fast.pipeline.balance import run_cluster

    ids = np.concatenate([np.load(os.path.join(corpus["cache"], "ids", f)) for f in sorted(os.listdir(
        os.path.join(corpus["cache"], "ids")))])  # fmt: skip
    keep = np.arange(len(ids)) % 3 != 0
    cluster = str(tmp_path / "cluster")
    run_cluster(os.path.join(corpus["cache"], "image"), cluster, 4, keep=keep, niter=3)
    labels = np.load(os.path.join(cluster, "labels.npy"))
    label_of = {int(i): int(lab) for i, lab in zip(ids, labels)}
    kept = sorted(int(i) for i in ids[keep])
    seen = []
    real_prepare = train.prepare

    def spying(cfg, comm=None):
        p = real_prepare(cfg, comm)

        def step(batch):
            seen.append((batch["id"].tolist(), batch["cluster_label"].tolist()))
            return p.step(batch)

        return dataclasses.replace(p, step=step)

    monkeypatch.setattr(train, "prepare", spying)
    summary = train.run_train(train_cfg(corpus, tmp_path / "cid", recipe="cid", cluster_dir=cluster, steps=6))
    assert summary["train_samples"] == len(kept)
    got = [i for b, _ in seen for i in b]
    assert sorted(got[: len(kept)]) == kept
    assert [lab for _, b in seen for lab in b] == [label_of[i] for i in got]


def test_a_cut_shard_stops_training_with_its_name_or_is_skipped(corpus, cut_corpus, tmp_path, capsys):
    data = dataclasses.replace(corpus["data"], train_data=cut_corpus, workers=2)
    cache_cfg = dict(teacher_cache=None, recipe="baseline")
    with pytest.raises(ValueError, match=r"shard '.*-00001\.tar'.*unreadable tar") as info:
        train.run_train(train_cfg(corpus, tmp_path / "a", data=data, steps=8, **cache_cfg))
    assert "\n" not in str(info.value)
    summary = train.run_train(train_cfg(corpus, tmp_path / "b", data=dataclasses.replace(data, skip_bad=True),
                                        steps=8, **cache_cfg))  # fmt: skip
    assert summary["skipped"] == {"samples": 0, "shards": 2}  # 8 × 32 = 256 samples: the cut shard read twice
    assert "skipped 0 bad samples and 2 bad shards (--skip-bad)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# torchrun: 2 ranks x 2 workers

RANK_SCRIPT = """
import json, os, signal, sys

import torch

from clipcid_fast.pipeline import train
from clipcid_fast.pipeline.config import TrainConfig, build_config

cfg = build_config(TrainConfig, sys.argv[1])
stop_at = int(sys.argv[2])  # SIGTERM to rank 1 during this step (-1: never)
rank = int(os.environ["RANK"])
real_prepare = train.prepare


def prepare(cfg, comm=None):
    p = real_prepare(cfg, comm)
    calls = iter(range(10**6))

    def step(batch):
        k = next(calls)
        with open(os.path.join(cfg.out_dir, f"ids_rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(batch["id"].tolist()) + "\\n")
        if k == stop_at and rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return p.step(batch)

    import dataclasses

    return dataclasses.replace(p, step=step)


train.prepare = prepare
torch.set_num_threads(1)
train.run_train(cfg)
"""


def torchrun_train(cfg: TrainConfig, stop_at: int = -1):
    import subprocess
    import sys

    from clipcid_fast.pipeline.config import to_yaml

    base = os.path.dirname(cfg.out_dir)
    script, yaml_path = os.path.join(base, "rank_script.py"), cfg.out_dir + ".yaml"
    with open(script, "w") as f:
        f.write(RANK_SCRIPT)
    with open(yaml_path, "w") as f:
        f.write(to_yaml(cfg))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": repo}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", script, yaml_path,
           str(stop_at)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo)


def rank_ids(cfg: TrainConfig, rank: int) -> list[int]:
    with open(os.path.join(cfg.out_dir, f"ids_rank{rank}.jsonl")) as f:
        return [i for line in f for i in json.loads(line)]


@pytest.mark.slow  # three torchrun launches: ~1 min on an idle 2-core machine, minutes on a loaded one
@pytest.mark.distributed
def test_torchrun_two_ranks_stopped_and_resumed_equal_the_uninterrupted_run(corpus, tmp_path):
    """2 ranks x 2 workers, 10 steps of 2 x 16 (each rank's 100-sample epoch ends inside step 7): each rank's first
    epoch is its shards, the two together every sample once; SIGTERM to rank 1 in step 4 stops both after it; the
    same world resumes to the uninterrupted run's student and data position bitwise; one process is refused."""
    full = train_cfg(corpus, tmp_path / "full")
    res = torchrun_train(full)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    firsts = [rank_ids(full, r)[: N // 2] for r in (0, 1)]
    assert sorted(firsts[0] + firsts[1]) == sorted(i for s in corpus["shards"] for i in shard_ids(s))

    cut = train_cfg(corpus, tmp_path / "cut")
    res = torchrun_train(cut, stop_at=4)
    assert res.returncode != 0 and "stopped at step 5 by SIGTERM" in res.stdout, res.stdout[-3000:]
    with pytest.raises(ValueError, match=r"2 ranks x 2 workers; this run has 1 x 2") as info:
        train.run_train(dataclasses.replace(cut, resume=True))
    assert "\n" not in str(info.value)
    res = torchrun_train(dataclasses.replace(cut, resume=True))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    for r in (0, 1):  # steps 0-4 before the stop, 5-9 after the resume: what the uninterrupted run drew
        assert rank_ids(cut, r) == rank_ids(full, r), f"rank {r}"
    a = torch.load(os.path.join(full.out_dir, "student.pt"), weights_only=True)
    b = torch.load(os.path.join(cut.out_dir, "student.pt"), weights_only=True)
    assert_same_tensors(a, b, "student.pt")
    ca, cb = (
        torch.load(checkpoint.newest(os.path.join(c.out_dir, "checkpoints")), weights_only=False) for c in (full, cut)
    )
    for key in ("model", "optimizer", "metrics", "data"):
        assert_same_tensors(ca[key], cb[key], f"checkpoint[{key!r}]")


def test_a_rank_without_a_sample_is_one_line_not_a_hang(corpus, student):
    cfg = dataclasses.replace(corpus["data"], wds_shuffle_buffer=40)
    src = build_dataset(cfg, student.preprocess, student.tokenizer, rank=4, world_size=5, shuffle_seed=0)
    s = RankStream(src, 0, _Lookup())
    with pytest.raises(ValueError, match=r"rank 4 of 5 has no training sample in its 0 of 4 shards") as info:
        s.take(1)
    assert "\n" not in str(info.value)
