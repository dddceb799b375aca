"""The pluggable per-chunk / per-cluster functions: the fused ops when they import, else the reference."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import numpy as np
import torch

from ... import reference


def resolve_fns(assign_fn=None, max_sim_fn=None, device=None) -> tuple[Callable, Callable, dict]:
    """The fused op's ``nearest_centroid`` / ``masked_max_similarity`` when
    ``clipcid_fast.ops.masked_max_sim`` imports and has them, else the reference ones; given ones win.

    ``device`` (e.g. ``"cuda"``): the built-in functions get their tensors moved there first (the fused op then
    picks that device's backend, Triton on a GPU); the pipeline takes the results back with :func:`to_numpy`.
    Given functions are called as they are."""
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

    dev = None if device is None or torch.device(device).type == "cpu" else torch.device(device)
    given = assign_fn is not None, max_sim_fn is not None
    assign_fn, max_sim_fn = pick(assign_fn, "nearest_centroid"), pick(max_sim_fn, "masked_max_similarity")
    name = lambda fn: f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"  # noqa: E731
    names = {"assign_fn": name(assign_fn), "max_sim_fn": name(max_sim_fn)}
    if dev is not None:
        assign_fn = assign_fn if given[0] else on_device(assign_fn, dev)
        max_sim_fn = max_sim_fn if given[1] else on_device(max_sim_fn, dev)
        names = {k: v if g else f"{v} on {dev}" for (k, v), g in zip(names.items(), given)}
    return assign_fn, max_sim_fn, names


def on_device(fn: Callable, device: torch.device) -> Callable:
    """``fn`` with its tensor arguments moved to ``device`` (non-blocking from the caller's CPU tensors)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return fn(*(a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args), **kwargs)

    return run


def to_numpy(t) -> np.ndarray:
    """What a given function returned (a tensor on any device, or an array) as a numpy array."""
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
