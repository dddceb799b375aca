"""Several processes (gloo on CPU): the fused distillation loss keeps open_clip's distributed contract
and, with per-rank rows, equals one process holding the whole batch."""

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.distributed
pytest.importorskip("open_clip", reason="the workers compare with open_clip's DistillClipLoss")

B_LOCAL, DIM, WORLD = 5, 12, 2
CONFIGS = list(itertools.product([False, True], [False, True]))  # (local_loss, gather_with_grad)


def _global_batch():
    g = torch.Generator().manual_seed(7)
    feats = [F.normalize(torch.randn(B_LOCAL * WORLD, DIM, generator=g), dim=1) for _ in range(4)]
    return feats, torch.tensor(13.0), torch.tensor(45.0)


def _global_losses():
    from clipcid_fast.losses import ClipKDLoss, ClipRDLoss

    return {"kd": ClipKDLoss, "rd": ClipRDLoss}


def _weighted(terms: dict) -> torch.Tensor:
    # distinct weights per term: a grad_output != 1 on every term
    return sum((0.5 + 0.3 * k) * v for k, v in enumerate(terms.values()))


def _worker(rank, world, init_file, out_dir):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import open_clip

    from clipcid_fast.losses import FusedDistillClipLoss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    (img, txt, t_img, t_txt), ls, tls = _global_batch()
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    results = {}
    for local_loss, with_grad in CONFIGS:
        kw = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
        for name, cls in [("fused", FusedDistillClipLoss), ("open_clip", open_clip.loss.DistillClipLoss)]:
            i, t = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
            scale = ls.clone().requires_grad_()
            c, d = cls(**kw)(i, t, scale, t_img[sl], t_txt[sl], tls)
            gi, gt, gs = torch.autograd.grad(0.6 * c + 1.7 * d, [i, t, scale])
            results[(local_loss, with_grad, name)] = [c.detach(), d.detach(), gi, gt, gs]
        for name, cls in _global_losses().items():
            i, t = img[sl].clone().requires_grad_(), txt[sl].clone().requires_grad_()
            scale = ls.clone().requires_grad_()
            loss = cls(**kw)
            total = _weighted(loss(i, t, scale, t_img[sl], t_txt[sl], tls, output_dict=True))
            grads = torch.autograd.grad(total, [i, t, scale, *loss.parameters()], allow_unused=True)
            results[(local_loss, with_grad, name)] = [total.detach(), *grads]
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("local_loss,with_grad", CONFIGS)
def test_fused_matches_open_clip_on_every_rank(rank_results, local_loss, with_grad):
    for rank, res in enumerate(rank_results):
        ours, theirs = res[(local_loss, with_grad, "fused")], res[(local_loss, with_grad, "open_clip")]
        for name, a, b in zip(["contrastive", "distill", "d_image", "d_text", "d_scale"], ours, theirs):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")


def test_local_rows_equal_one_process_on_the_whole_batch(rank_results):
    """local_loss + gather_with_grad: the mean of the rank losses is the one-process loss, and each
    rank's gradient (summed over ranks by the gather's backward) is world_size × its one-process slice."""
    from clipcid_fast.losses import FusedDistillClipLoss

    (img, txt, t_img, t_txt), ls, tls = _global_batch()
    i, t, scale = img.clone().requires_grad_(), txt.clone().requires_grad_(), ls.clone().requires_grad_()
    c, d = FusedDistillClipLoss()(i, t, scale, t_img, t_txt, tls)
    gi, gt, gs = torch.autograd.grad(0.6 * c + 1.7 * d, [i, t, scale])
    per_rank = [res[(True, True, "fused")] for res in rank_results]
    torch.testing.assert_close(sum(r[0] for r in per_rank) / WORLD, c, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(sum(r[1] for r in per_rank) / WORLD, d, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in per_rank]) / WORLD, gi, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r[3] for r in per_rank]) / WORLD, gt, atol=2e-6, rtol=1e-5)
    # the scale is replicated: its per-rank gradients sum (as DDP would average them) to the one-process one
    torch.testing.assert_close(sum(r[4] for r in per_rank) / WORLD, gs, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["kd", "rd"])
@pytest.mark.parametrize("local_loss,with_grad", CONFIGS)
def test_global_losses_give_every_rank_its_rows_gradient(rank_results, name, local_loss, with_grad):
    """CLIP-KD / RD are over the global batch whatever local_loss says: every rank's value is the one-process value
    and its rows' gradient is their one-process slice, times world_size with gather_with_grad (the gather's
    backward sums the ranks' copies), once without; the replicated scales get the whole gradient on every rank.
    (With local_loss and no gather_with_grad the gathered own rows used to be constants: no gradient at all.)"""
    (img, txt, t_img, t_txt), ls, tls = _global_batch()
    i, t, scale = img.clone().requires_grad_(), txt.clone().requires_grad_(), ls.clone().requires_grad_()
    loss = _global_losses()[name]()
    total = _weighted(loss(i, t, scale, t_img, t_txt, tls, output_dict=True))
    gi, gt, gs, *gp = torch.autograd.grad(total, [i, t, scale, *loss.parameters()])
    factor = WORLD if with_grad else 1
    for rank, res in enumerate(rank_results):
        value, ri, rt, rs, *rp = res[(local_loss, with_grad, name)]
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        assert ri is not None and rt is not None, f"rank {rank}: the student's features got no gradient"
        torch.testing.assert_close(value, total, atol=2e-6, rtol=1e-6)
        torch.testing.assert_close(ri, factor * gi[sl], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(rt, factor * gt[sl], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(rs, gs, atol=2e-6, rtol=1e-5)
        assert len(rp) == len(gp) > 0
        for a, b in zip(rp, gp):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def _comm_worker(rank, world, init_file, out_dir):
    from clipcid_fast.pipeline.comm import Comm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    comm = Comm()
    g = torch.Generator().manual_seed(100 + rank)  # every rank draws different values
    a, b = torch.randn(3, 4, generator=g), torch.randn(5, generator=g)
    mine = [a.clone(), b.clone()]
    comm.broadcast_(mine)
    means = [a.clone(), b.clone()]
    comm.mean_(means)
    total = 7  # uneven: rank 0 owns 4 rows, rank 1 owns 3
    lo, hi = (0, 4) if rank == 0 else (4, 7)
    full = torch.arange(total * 2, dtype=torch.float32).view(total, 2)
    gathered = comm.gather_shards(full[lo:hi].clone(), total)
    torch.save({"own": [a, b], "broadcast": mine, "mean": means, "gathered": gathered},
               os.path.join(out_dir, f"comm{rank}.pt"))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def test_comm_broadcast_mean_and_uneven_gather(tmp_path):
    """The trainer's device collectives: broadcast_ (the recipe's replicated parameters start as rank 0's), mean_
    (their gradients), gather_shards (uneven class blocks, to rank 0's host, one block at a time)."""
    mp.spawn(_comm_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"comm{r}.pt") for r in range(WORLD)]
    assert not torch.equal(res[0]["own"][0], res[1]["own"][0])
    for r in range(WORLD):
        for got, want in zip(res[r]["broadcast"], res[0]["own"]):
            assert torch.equal(got, want)
        for i, got in enumerate(res[r]["mean"]):
            torch.testing.assert_close(got, (res[0]["own"][i] + res[1]["own"][i]) / 2, atol=1e-7, rtol=1e-6)
    assert res[1]["gathered"] is None
    assert res[0]["gathered"].device.type == "cpu"
    assert torch.equal(res[0]["gathered"], torch.arange(14, dtype=torch.float32).view(7, 2))
