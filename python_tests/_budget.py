"""Error budgets for kernel tests: a kernel may be as wrong as PyTorch is in the same dtype, times c,
plus a slack — both measured against a float64 gold (the reference run in float64).

    |kernel − gold| ≤ c · |torch_same_dtype − gold| + slack + rtol · |gold|      (element-wise)

``rtol`` absorbs the one-or-two-ulp rounding a different (equally valid) summation order gives where
PyTorch happens to round exactly; use a couple of ulps of the dtype (``ULP32``, ``ULP_BF16``).

On failure the message names the worst element, its index and the three values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

ULP32 = 2.0**-23
ULP_BF16 = 2.0**-7


def assert_within_budget(
    kernel: Tensor,
    torch_same_dtype: Tensor,
    gold: Tensor,
    *,
    c: float = 2.0,
    slack: float = 1e-6,
    rtol: float = 0.0,
    name: str = "output",
) -> None:
    if kernel.shape != gold.shape or torch_same_dtype.shape != gold.shape:
        raise AssertionError(
            f"{name}: shape mismatch kernel {tuple(kernel.shape)}, torch {tuple(torch_same_dtype.shape)}, "
            f"gold {tuple(gold.shape)}"
        )
    gold = gold.double().cpu()
    k = kernel.detach().double().cpu()
    t = torch_same_dtype.detach().double().cpu()
    if not torch.isfinite(k).all() and not torch.equal(torch.isfinite(k), torch.isfinite(gold)):
        bad = (torch.isfinite(k) != torch.isfinite(gold)).nonzero()[0].tolist()
        raise AssertionError(f"{name}: non-finite mismatch at {bad}: kernel {k[tuple(bad)]}, gold {gold[tuple(bad)]}")
    finite = torch.isfinite(gold)
    err_k = torch.where(finite, (k - gold).abs(), 0.0)
    err_t = torch.where(finite, (t - gold).abs(), 0.0)
    excess = err_k - (c * err_t + slack + rtol * gold.abs().nan_to_num(posinf=0.0, neginf=0.0))
    if excess.numel() and excess.max() > 0:
        idx = tuple(torch.unravel_index(excess.argmax(), excess.shape))
        idx_l = [int(i) for i in idx]
        raise AssertionError(
            f"{name}: error budget exceeded at {idx_l}: |kernel−gold| = {err_k[idx]:.3e} > "
            f"{c}·|torch−gold| ({err_t[idx]:.3e}) + {slack:.1e} + {rtol:.1e}·|gold|; "
            f"kernel {k[idx]:.9g}, torch {t[idx]:.9g}, "
            f"gold {gold[idx]:.9g}; {int((excess > 0).sum())} of {excess.numel()} elements over budget"
        )


def assert_all_within_budget(
    kernel: Sequence[Tensor | None],
    torch_same_dtype: Sequence[Tensor | None],
    gold: Sequence[Tensor | None],
    names: Sequence[str],
    **kw,
) -> None:
    """The same budget for several outputs (e.g. a loss and its gradients); None entries must agree."""
    for k, t, g, n in zip(kernel, torch_same_dtype, gold, names, strict=True):
        if g is None:
            assert k is None, f"{n}: expected no gradient, the kernel returned one"
            continue
        assert k is not None, f"{n}: the kernel returned no gradient"
        assert_within_budget(k, t, g, name=n, **kw)
