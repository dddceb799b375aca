"""Class-sharded cluster discrimination over 2 and 3 gloo processes equals one process holding every
class: same loss on every rank, the same embedding gradients for each rank's rows, and each rank's
centre gradients equal to its block of the one-process gradient — including N % world != 0; for the single-label
margin softmax and for MLCD's multi-label loss (``multi_label=True``, labels [B, K])."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

B_LOCAL, DIM, N = 4, 9, 11


def _data(world, multi=False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B_LOCAL * world, DIM, generator=g)
    w = torch.randn(N, DIM, generator=g)
    if multi:  # 3 distinct centres per row, padding, a row without any label
        labels = torch.stack([torch.randperm(N, generator=g)[:3] for _ in range(B_LOCAL * world)])
        labels[0, 1] = -1
        labels[1] = -1
        return x, w, labels
    labels = torch.randint(0, N, (B_LOCAL * world,), generator=g)
    labels[1] = -1  # a row without a label
    labels[2] = labels[3]  # duplicate labels
    return x, w, labels


def _worker(rank, world, init_file, out_dir, multi):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from clipcid_fast.losses import ClusterDiscriminationLoss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, w, labels = _data(world, multi)
    mod = ClusterDiscriminationLoss(
        N, DIM, margin=(1.0, 0.4, 0.1), scale=16.0, rank=rank, world_size=world, multi_label=multi
    )
    with torch.no_grad():
        mod.centres.copy_(w[mod.start : mod.stop])
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    xl = x[mine].clone().requires_grad_()
    loss = mod(xl, labels[mine])
    (1.7 * loss).backward()  # grad_output != 1
    torch.save(
        {"loss": loss.detach(), "gx": xl.grad, "gw": mod.centres.grad, "range": (mod.start, mod.stop)},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()
    dist.destroy_process_group()


# MLCD on 3 ranks only (N % 3 != 0): each spawn costs ~30 s here
@pytest.mark.parametrize("world, multi", [(2, False), (3, False), (3, True)], ids=["2-single", "3-single", "3-mlcd"])
def test_sharded_equals_one_process(tmp_path, world, multi):
    from clipcid_fast.losses import ClusterDiscriminationLoss

    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), multi), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    x, w, labels = _data(world, multi)
    one = ClusterDiscriminationLoss(N, DIM, margin=(1.0, 0.4, 0.1), scale=16.0, multi_label=multi)
    with torch.no_grad():
        one.centres.copy_(w)
    xg = x.clone().requires_grad_()
    loss = one(xg, labels)
    (1.7 * loss).backward()

    sizes = [r["range"][1] - r["range"][0] for r in res]
    assert sum(sizes) == N and max(sizes) - min(sizes) <= 1
    for r, out in enumerate(res):
        torch.testing.assert_close(out["loss"], loss.detach(), atol=2e-6, rtol=2e-6)
        torch.testing.assert_close(out["gx"], xg.grad[r * B_LOCAL : (r + 1) * B_LOCAL], atol=2e-6, rtol=2e-5)
        a, b = out["range"]
        torch.testing.assert_close(out["gw"], one.centres.grad[a:b], atol=2e-6, rtol=2e-5)


def test_shard_range_and_module_errors():
    from clipcid_fast.distributed import shard_range
    from clipcid_fast.losses import ClusterDiscriminationLoss

    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="num_classes"):
        shard_range(2, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 3, 3)
    mod = ClusterDiscriminationLoss(5, 4)
    with pytest.raises(ValueError, match="labels"):
        mod(torch.randn(3, 4), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="embeddings"):
        mod(torch.randn(3, 5), torch.zeros(3, dtype=torch.int64))
