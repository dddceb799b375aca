"""The pluggable per-chunk / per-cluster functions: the fused ops when they import, else the reference."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import numpy as np
import torch

from ... import reference


def resolve_fns(assign_fn=None, max_sim_fn=None) -> tuple[Callable, Callable, dict]:
    """The fused op's ``nearest_centroid`` / ``masked_max_similarity`` when
    ``clipcid_fast.ops.masked_max_sim`` imports and has them, else the reference ones; given ones win."""
    fused = None
    if assign_fn is None or max_sim_fn is None:
        try:
            from ...ops import masked_max_sim as fused
        except Exception:  # absent or broken: the reference is the documented fallback
            fused = None

    def pick(given, attr):
        if given is not None:
            return given
        if fused is not None and callable(getattr(fused, attr, None)):
            fn = getattr(fused, attr)
            try:  # rows reaching it are already checked and normalised: skip its value check (a host sync)
                if "check_values" in inspect.signature(fn).parameters:
                    return functools.wraps(fn)(functools.partial(fn, check_values=False))
            except (TypeError, ValueError):
                pass
            return fn
        return getattr(reference, attr)

    assign_fn, max_sim_fn = pick(assign_fn, "nearest_centroid"), pick(max_sim_fn, "masked_max_similarity")
    name = lambda fn: f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"  # noqa: E731
    return assign_fn, max_sim_fn, {"assign_fn": name(assign_fn), "max_sim_fn": name(max_sim_fn)}


def to_numpy(t) -> np.ndarray:
    """What a given function returned (a tensor on any device, or an array) as a numpy array."""
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
