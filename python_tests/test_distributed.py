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
