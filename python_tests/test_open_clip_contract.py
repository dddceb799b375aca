"""The reference matches open_clip's own losses in value and gradient (float32, atol 1e-6)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clipcid_fast import reference

open_clip_loss = pytest.importorskip("open_clip.loss")


def _feats(b, d, seed, scale_std=1.0):
    g = torch.Generator().manual_seed(seed)
    out = [F.normalize(torch.randn(b, d, generator=g) * scale_std, dim=1) for _ in range(4)]
    return [t.requires_grad_() for t in out]


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, retain_graph=True)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 40), d=st.integers(1, 33), seed=st.integers(0, 2**31 - 1), scale=st.floats(1.0, 100.0))
def test_clip_loss_matches_open_clip(b, d, seed, scale):
    img, txt, _, _ = _feats(b, d, seed)
    ls = torch.tensor(scale, requires_grad=True)
    ours = reference.clip_loss(img, txt, ls)
    theirs = open_clip_loss.ClipLoss()(img, txt, ls)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    for a, b_ in zip(_grads(ours, [img, txt, ls]), _grads(theirs, [img, txt, ls])):
        torch.testing.assert_close(a, b_, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 40),
    d=st.integers(1, 33),
    seed=st.integers(0, 2**31 - 1),
    s_scale=st.floats(1.0, 100.0),
    t_scale=st.floats(1.0, 100.0),
)
def test_distill_clip_loss_matches_open_clip(b, d, seed, s_scale, t_scale):
    img, txt, t_img, t_txt = _feats(b, d, seed)
    ls = torch.tensor(s_scale, requires_grad=True)
    tls = torch.tensor(t_scale, requires_grad=True)
    ours = reference.distill_clip_loss(img, txt, ls, t_img, t_txt, tls)
    theirs = open_clip_loss.DistillClipLoss()(img, txt, ls, t_img, t_txt, tls)
    inputs = [img, txt, ls, t_img, t_txt, tls]
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, atol=1e-6, rtol=0)
        go = _grads(o, inputs)
        gt = _grads(t, inputs)
        for a, b_ in zip(go, gt):
            if b_ is None:
                assert a is None or torch.count_nonzero(a) == 0
            else:
                torch.testing.assert_close(a, b_, atol=1e-6, rtol=0)


def test_distill_clip_loss_output_dict_keys_sum_like_open_clip():
    """open_clip trainers sum every value of the output dict: our pair must sum to the same total."""
    img, txt, t_img, t_txt = _feats(16, 8, 3)
    ls, tls = torch.tensor(14.3), torch.tensor(50.0)
    theirs = open_clip_loss.DistillClipLoss()(img, txt, ls, t_img, t_txt, tls, output_dict=True)
    ours = reference.distill_clip_loss(img, txt, ls, t_img, t_txt, tls)
    assert set(theirs) == {"contrastive_loss", "distill_loss"}
    torch.testing.assert_close(sum(ours), sum(theirs.values()), atol=1e-6, rtol=0)
