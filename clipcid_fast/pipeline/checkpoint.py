"""Training checkpoints that resume bit for bit.

A checkpoint holds everything the next step depends on: the student's weights, the recipe module's own
parameters (projections, CLIP-KD/RD scales, class centres: CLIP-KD and CLIP-RD lose these on resume), the
optimizer and scheduler states, every RNG state (torch CPU and CUDA, numpy, python) and the step, which is
also the data position (the sample stream is a function of the seed and the step, ``batches.py``). It is
written to a temporary name and renamed (``_io.atomic_torch``), so a kill mid-write leaves the previous
checkpoint intact. ``config`` is the resolved training config: a resume with a different one is refused.

Files: ``checkpoints/step-00000120.pt`` per checkpoint, each with a ``.sha256`` sidecar written after it (its
SHA-256, computed while the checkpoint streams to disk). The newest ``keep`` (default 2) are kept. A resume takes
the newest whose bytes match its sidecar: a corrupt or unfinished newest one (flipped bytes, a truncated copy, a kill
between the two writes) is passed over with a line naming it, and the previous one is used. A run folder written
before checksums (``latest.pt``) still resumes, with a line saying it could not be verified.

One file in the one-process layout, whatever the world size: the class centres a recipe shards over ranks (and
their AdamW moments) are gathered into the file on rank 0 (``full_state``) and cut back into this rank's block on
load (``load_state``).
"""

from __future__ import annotations

import hashlib
import os
import random
import re

import numpy as np
import torch

from ._io import atomic_bytes, atomic_torch

LEGACY = "latest.pt"  # the one checkpoint of a run folder written before checksums
_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")


def rng_state() -> dict:
    # numpy's legacy global stream: user code (and some libraries) may draw from it
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}  # noqa: NPY002
    if torch.cuda.is_available():
        # the current device's only: under torchrun that is this rank's GPU, and a resume on a host that sees
        # fewer GPUs (set_rng_state_all would refuse it) restores it onto its own
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # written before: every visible GPU's
            i = torch.cuda.current_device()
            cuda = cuda[i] if i < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def path_of(ckpt_dir: str, step: int) -> str:
    return os.path.join(ckpt_dir, f"step-{step:08d}.pt")


def _steps(ckpt_dir: str) -> list[int]:
    """The steps of the checkpoint files in ``ckpt_dir``, newest first (sidecars and temporaries not counted)."""
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    return sorted((int(m.group(1)) for m in map(_STEP_FILE.match, names) if m), reverse=True)


def newest(ckpt_dir: str) -> str | None:
    """The newest checkpoint file in ``ckpt_dir`` (verified or not), else the legacy ``latest.pt``, else None."""
    steps = _steps(ckpt_dir)
    if steps:
        return path_of(ckpt_dir, steps[0])
    legacy = os.path.join(ckpt_dir, LEGACY)
    return legacy if os.path.isfile(legacy) else None


def save(ckpt_dir: str, step: int, keep: int = 2, **payload) -> str:
    """Write step ``step``'s checkpoint and its SHA-256 sidecar, then drop all but the newest ``keep``; returns
    the checkpoint's path. The sidecar is written last: a checkpoint without one never counts as complete."""
    os.makedirs(ckpt_dir, exist_ok=True)
    path = path_of(ckpt_dir, step)
    digest = atomic_torch(path, {**payload, "step": step, "rng": rng_state()})
    atomic_bytes(path + ".sha256", f"{digest}  {os.path.basename(path)}\n".encode())
    for old in _steps(ckpt_dir)[max(1, keep) :]:
        for f in (path_of(ckpt_dir, old), path_of(ckpt_dir, old) + ".sha256"):
            if os.path.exists(f):
                os.remove(f)
    legacy = os.path.join(ckpt_dir, LEGACY)
    if os.path.exists(legacy):  # superseded by a checksummed one
        os.remove(legacy)
    return path


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read(path: str) -> dict:
    # RNG states hold numpy / python objects: this file is our own, written by save()
    return torch.load(path, map_location="cpu", weights_only=False)


def load_newest(ckpt_dir: str, say=print) -> tuple[dict, str] | None:
    """(payload, path) of the newest checkpoint in ``ckpt_dir`` that passes its checksum, else None when there is
    none at all. Each one passed over is named on one line (``say``); when some exist and none can be used, a
    ValueError names each and why."""
    problems = []
    for step in _steps(ckpt_dir):
        path = path_of(ckpt_dir, step)
        sidecar = path + ".sha256"
        if not os.path.isfile(sidecar):
            why = "unfinished (no .sha256 beside it)"
        else:
            with open(sidecar) as f:
                want = f.read().split()[:1]
            got = _sha256(path)
            why = None if want == [got] else f"corrupt (SHA-256 {got[:12]}…, its .sha256 says {''.join(want)[:12]}…)"
        if why is None:
            try:
                payload = _read(path)
            except Exception as e:  # a matching checksum over a file torch cannot read: written by something else
                why = f"unreadable ({type(e).__name__}: {e})"
        if why is not None:
            problems.append(f"{path}: {why}")
            say(f"checkpoint {path} is {why}; trying the previous one")
            continue
        return payload, path
    legacy = os.path.join(ckpt_dir, LEGACY)
    if os.path.isfile(legacy):
        try:
            payload = _read(legacy)
        except Exception as e:
            raise ValueError(f"--resume: cannot read checkpoint {legacy!r} ({type(e).__name__}: {e})") from None
        say(f"checkpoint {legacy} was written before checksums: resuming from it unverified")
        return payload, legacy
    if problems:
        raise ValueError(f"--resume: no usable checkpoint in {ckpt_dir!r}: {'; '.join(problems)}")
    return None


def config_difference(
    saved: dict, current: dict, ignore: tuple[str, ...] = ("resume", "progress"), defaults: dict | None = None
) -> list[str]:
    """Dotted keys whose values differ between two config dicts (``ignore`` = top-level keys that may).

    A key the checkpoint lacks counts as equal when the current value is its default (``defaults``, a config
    dict of the defaults): a field added to the config since the checkpoint was written, left at its default,
    does not change the run."""
    out = []

    def walk(a, b, d, prefix):
        for k in sorted(set(a) | set(b)):
            if not prefix and k in ignore:
                continue
            va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
            dv = d.get(k, "<no default>") if isinstance(d, dict) else "<no default>"
            if isinstance(va, dict) and isinstance(vb, dict):
                walk(va, vb, dv, f"{prefix}{k}.")
            elif va == "<absent>" and vb == dv:
                continue
            elif va != vb:
                out.append(f"{prefix}{k}: {va!r} (checkpoint) vs {vb!r} (now)")

    walk(saved, current, defaults or {}, "")
    return out


# ---------------------------------------------------------------------------------------------------------------
# the recipe's sharded class centres


_CENTRES = "cluster.centres"  # the recipe's state_dict key of its (sharded) class centres


def _centre_index(recipe, optimizer) -> int | None:
    if recipe.cluster is None:
        return None
    params = [q for g in optimizer.param_groups for q in g["params"]]
    return next(i for i, q in enumerate(params) if q is recipe.cluster.centres)


def full_state(comm, recipe, optimizer) -> tuple[dict, dict] | None:
    """(recipe, optimizer) state dicts with the sharded centres and their AdamW moments gathered (rank 0; None on
    the others). Collective: every rank calls it."""
    rsd, osd = recipe.state_dict(), optimizer.state_dict()
    idx = _centre_index(recipe, optimizer)
    if comm.world == 1 or idx is None:
        return rsd, osd
    n = recipe.cluster.num_classes
    full = comm.gather_shards(rsd[_CENTRES], n)
    state = dict(osd["state"].get(idx, {}))  # a new dict: the packed state holds the live tensors
    for k in sorted(state):
        v = state[k]
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rsd[_CENTRES].shape[0]:
            state[k] = comm.gather_shards(v, n)
    if comm.rank != 0:
        return None
    rsd = {**rsd, _CENTRES: full}
    osd = {**osd, "state": {**osd["state"], idx: state}}
    return rsd, osd


def load_state(recipe, optimizer, rsd: dict, osd: dict) -> None:
    """Load a ``full_state`` into this rank's recipe and optimizer (its block of the centres and their moments)."""
    idx = _centre_index(recipe, optimizer)
    if idx is not None and recipe.cluster.world_size > 1:
        a, b = recipe.cluster.start, recipe.cluster.stop
        n = recipe.cluster.num_classes
        rsd = {**rsd, _CENTRES: rsd[_CENTRES][a:b]}
        state = {k: (v[a:b] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v)
                 for k, v in osd["state"].get(idx, {}).items()}  # fmt: skip
        osd = {**osd, "state": {**osd["state"], idx: state}}
    recipe.load_state_dict(rsd)
    optimizer.load_state_dict(osd)
