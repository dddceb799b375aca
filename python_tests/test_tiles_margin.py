"""tiles.h's margin psi(c) and its derivative (used by every margin kernel) against the reference."""

import math

import pytest
import torch

from clipcid_fast import _backend, reference

pytestmark = pytest.mark.skipif(not _backend.has_c(), reason="C++ extension not built")

MARGINS = [
    (1.0, 0.5, 0.0),
    (1.0, 0.0, 0.35),
    (1.0, 0.3, 0.2),
    (2.0, 0.0, 0.0),
    (1.35, 0.25, 0.1),
    (1.0, 0.0, 0.0),
]


@pytest.mark.parametrize("m1,m2,m3", MARGINS)
def test_margin_psi_matches_reference_value_and_derivative(m1, m2, m3):
    # a grid over the whole range, with the ends, the clamp band and both sides of the fallback point
    theta_star = (math.pi - m2) / m1
    special = [
        -1.0,
        -1 + 1e-7,
        -1 + 2e-6,
        1 - 2e-6,
        1 - 1e-7,
        1.0,
        1.0000001,
        -1.0000001,
        math.cos(min(theta_star, math.pi)) + 1e-4,
        math.cos(min(theta_star, math.pi)) - 1e-4,
    ]
    c = torch.cat([torch.linspace(-1, 1, 2001, dtype=torch.float64), torch.tensor(special, dtype=torch.float64)])
    c32 = c.float()
    psi, dpsi = torch.ops.clipcid_fast_C.margin_psi(c32, m1, m2, m3)
    gold_in = c.clone().requires_grad_()
    gold = reference.combined_margin(gold_in, m1, m2, m3)
    (gold_d,) = torch.autograd.grad(gold.sum(), gold_in)
    same_in = c32.clone().requires_grad_()
    same = reference.combined_margin(same_in, m1, m2, m3)
    (same_d,) = torch.autograd.grad(same.sum(), same_in)
    # fp32 acos/cos near the clamp band loses digits both in torch and in the kernel; budget vs fp64
    from _budget import assert_within_budget

    # the fallback switch point may fall on either side in fp32 vs fp64: compare away from it
    away = (torch.acos(c.clamp(-1, 1)) * m1 + m2 - math.pi).abs() > 1e-4
    assert_within_budget(psi[away], same.detach()[away], gold.detach()[away], c=4.0, slack=2e-6, name="psi")
    assert_within_budget(dpsi[away], same_d[away], gold_d[away], c=4.0, slack=5e-3, name="dpsi")
