"""``embed`` in 2 processes (gloo on CPU, as under torchrun) writes the bytes one process writes, and a run begun
under one world size resumes under another (output shard k is rank k % W's, rows fixed by k alone)."""

from __future__ import annotations

import dataclasses
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tiny_open_clip import one_thread, write_checkpoint  # noqa: F401 (one_thread: an autouse fixture)

from clipcid_fast.pipeline import embed
from clipcid_fast.pipeline.config import DataConfig, EmbedConfig
from clipcid_fast.pipeline.data import export_corpus
from clipcid_fast.pipeline.embed_split import tar_reads

pytestmark = pytest.mark.distributed

SAMPLES, SHARD_ROWS, BATCH, WORLD = 300, 64, 32, 2  # shards of 64 x 4 + 44: ranks 0 and 1 get 3 and 2
TAR_SAMPLES = 50  # tars of 50 samples: output shards straddle tars, so a shard starts inside a tar


def _rank(rank: int, world: int, init_file: str, cfg: EmbedConfig) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        embed.run_embed(cfg)
    finally:
        dist.destroy_process_group()


def run_ranks(cfg: EmbedConfig, tmp) -> dict:
    init = os.path.join(str(tmp), f"init-{os.path.basename(cfg.out_dir)}")
    mp.spawn(_rank, args=(WORLD, init, cfg), nprocs=WORLD, join=True)
    return embed.read_json(os.path.join(cfg.out_dir, "embed.json"))


def config(out_dir, models_cfg, **data) -> EmbedConfig:
    data = {"corpus": "student", "student_samples": SAMPLES, **data}
    return EmbedConfig(out_dir=str(out_dir), batch_size=BATCH, shard_rows=SHARD_ROWS, progress=False,
                       data=DataConfig(**data), models=models_cfg)  # fmt: skip


def all_bytes(out_dir) -> dict[str, bytes]:
    """Every shard file and the id index, by relative path."""
    out = {}
    for sub in (*embed.SHARD_DIRS, "id_index"):
        for name in sorted(os.listdir(os.path.join(out_dir, sub))):
            with open(os.path.join(out_dir, sub, name), "rb") as f:
                out[f"{sub}/{name}"] = f.read()
    return out


def without_timing(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("seconds", "images_per_second")}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("embed_dist")


@pytest.fixture(scope="module")
def models_cfg(root):
    return write_checkpoint(str(root / "model"), seed=0)


@pytest.fixture(scope="module")
def one_process(root, models_cfg):
    out = root / "one"
    return str(out), embed.run_embed(config(out, models_cfg))


def test_two_ranks_write_the_bytes_and_summary_of_one_process(root, models_cfg, one_process):
    meta = run_ranks(config(root / "two", models_cfg), root)
    assert sorted(all_bytes(root / "two")) == sorted(all_bytes(one_process[0]))
    assert all_bytes(root / "two") == all_bytes(one_process[0])
    assert without_timing(meta) == without_timing(one_process[1])
    assert meta["count"] == SAMPLES and meta["shards"] == 5


@pytest.mark.slow  # a 2-process spawn: ~40 s on a loaded 2-core machine
def test_two_ranks_with_two_workers_on_webdataset_tars_match_one_process(root, models_cfg, one_process):
    """Tars of 50 rows, shards of 64: shards start inside a tar (its first rows read, not decoded)."""
    export = export_corpus(DataConfig(corpus="student", student_samples=SAMPLES), str(root / "export"),
                           formats=("wds",), shard_size=TAR_SAMPLES)  # fmt: skip
    meta = run_ranks(config(root / "wds", models_cfg, dataset="wds", train_data=export["wds"], workers=2), root)
    assert all_bytes(root / "wds") == all_bytes(one_process[0])
    assert meta["row_order"] == embed.WDS_ROW_ORDER and meta["count"] == SAMPLES
    # the workers no longer change a webdataset's rows: one process without workers takes the directory as its own
    one = config(root / "wds", models_cfg, dataset="wds", train_data=export["wds"], workers=0)
    assert embed.run_embed(one) == meta


@pytest.mark.slow  # a 2-process spawn: ~40 s on a loaded 2-core machine
def test_a_run_begun_in_one_process_resumes_under_two_ranks(root, models_cfg, one_process):
    """Shards 0, 3 and the summary gone (a run stopped midway): two ranks redo them, the rest is reused."""
    out = root / "resumed"
    shutil.copytree(one_process[0], out)
    for k in (0, 3):
        for sub in embed.SHARD_DIRS:
            os.remove(out / sub / embed.shard_name(k))
    os.remove(out / "embed.json")
    shutil.rmtree(out / "id_index")
    kept = os.stat(out / "image" / embed.shard_name(1)).st_mtime_ns
    meta = run_ranks(dataclasses.replace(config(out, models_cfg), out_dir=str(out)), root)
    assert os.stat(out / "image" / embed.shard_name(1)).st_mtime_ns == kept
    assert all_bytes(out) == all_bytes(one_process[0])
    assert without_timing(meta) == without_timing(one_process[1])


def test_tar_reads_cover_a_row_range_across_tars():
    counts = [50, 50, 0, 50]
    assert tar_reads(counts, 0, 64) == [(0, 0, 50), (1, 0, 14)]
    assert tar_reads(counts, 64, 128) == [(1, 14, 36), (3, 0, 28)]
    assert tar_reads(counts, 128, 150) == [(3, 28, 22)]
    # every row once, in order, whatever the cut
    rows = [(t, s + i) for lo in range(0, 150, 64) for t, s, n in tar_reads(counts, lo, min(150, lo + 64))
            for i in range(n)]  # fmt: skip
    assert rows == [(t, i) for t, c in enumerate(counts) for i in range(c)]
