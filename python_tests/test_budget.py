"""The budget helper itself must catch errors and pass PyTorch-level ones."""

import pytest
import torch
from _budget import assert_within_budget


def test_budget_passes_torch_level_error_and_catches_larger_one():
    gold = torch.randn(50, 7, dtype=torch.float64)
    same = gold.float()  # rounding error of float32 storage
    assert_within_budget(same.clone(), same, gold, c=1.0, slack=0.0)
    bad = same.clone()
    bad[13, 4] += 1e-3
    with pytest.raises(AssertionError, match=r"\[13, 4\]"):
        assert_within_budget(bad, same, gold, c=2.0, slack=1e-6)


def test_budget_catches_shape_and_nan():
    gold = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="shape"):
        assert_within_budget(torch.zeros(4), torch.zeros(3), gold)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_within_budget(torch.tensor([0.0, float("nan"), 0.0]), torch.zeros(3), gold)
