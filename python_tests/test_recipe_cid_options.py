"""cid's instance-term option ``id_student_text`` through the recipe table (``recipes.Recipe``), against the
float64 reference (``reference.instance_discrimination_loss``), and what it reads from the student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipcid_fast import reference
from clipcid_fast.recipes import WEIGHTS, Recipe

B, D, N = 12, 16, 5


@pytest.fixture
def centroids(tmp_path):
    c = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    path = tmp_path / "centroids.npy"
    np.save(path, c / np.linalg.norm(c, axis=1, keepdims=True))
    return str(path)


def _inputs(dim):
    g = torch.Generator().manual_seed(1)
    s_img = torch.randn(B, dim, generator=g, dtype=torch.float64, requires_grad=True)
    s_txt = torch.randn(B, dim, generator=g, dtype=torch.float64, requires_grad=True)
    t_img = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    t_txt = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, N, (B,), generator=g)
    return s_img, s_txt, t_img, t_txt, labels


@pytest.mark.parametrize("student_text", [False, True])
def test_instance_term_matches_reference(centroids, student_text):
    rec = Recipe("cid", {"id_student_text": student_text}, D, D, centroids=centroids, impl="reference").double()
    s_img, s_txt, t_img, t_txt, labels = _inputs(D)
    out = rec(s_img, s_txt, torch.tensor(3.0, dtype=torch.float64), t_img, t_txt, None, labels=labels)
    kappa = rec.instance.scale.detach()
    pair = (F.normalize(s_txt, dim=-1), t_img) if student_text else (None, None)
    want = reference.instance_discrimination_loss(F.normalize(s_img, dim=-1), t_txt, kappa, *pair)
    torch.testing.assert_close(out["instance_loss"], WEIGHTS["id_weight"] * want)
    (g_txt,) = torch.autograd.grad(out["instance_loss"], s_txt, allow_unused=True)
    # the student's text tower gets a teacher signal from the instance term only with the option
    assert (g_txt is not None and g_txt.abs().sum() > 0) == student_text


@pytest.mark.parametrize("student_text", [False, True])
def test_text_projection_only_when_read(centroids, student_text):
    rec = Recipe("cid", {"id_student_text": student_text}, 8, D, centroids=centroids, impl="reference").double()
    assert rec.proj_image is not None and (rec.proj_text is not None) == student_text
    s_img, s_txt, t_img, t_txt, labels = _inputs(8)
    out = rec(s_img, s_txt, torch.tensor(3.0, dtype=torch.float64), t_img, t_txt, None, labels=labels)
    if student_text:
        pi, pt = rec.proj_image(s_img), rec.proj_text(s_txt)
        want = reference.instance_discrimination_loss(
            F.normalize(pi, dim=-1), t_txt, rec.instance.scale.detach(), F.normalize(pt, dim=-1), t_img
        )
        torch.testing.assert_close(out["instance_loss"], WEIGHTS["id_weight"] * want)
