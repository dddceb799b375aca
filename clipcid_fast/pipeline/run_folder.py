"""A training run's folder: one run at a time (a lock), and what a resume compares besides the config.

The lock is an advisory ``flock`` on ``out_dir/.lock``, held by rank 0 for the run's life: the kernel drops it when
the process ends, however it ends (SIGKILL included), so a stale lock never blocks a resume. It refuses a second
run started in the same folder while the first is alive, naming the holder.

Resume identity: a run folder that was moved or copied resumes (``out_dir`` is where the run lives, not what it
computes). Input paths that moved (``--teacher-cache``, ``--balance-dir``, ``--cluster-dir``, weight files) are
accepted when what they hold is the same: each checkpoint records a fingerprint of every input path, and a resume
whose path differs compares fingerprints instead of strings."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time

# config keys that never change what a run computes
NEUTRAL = ("out_dir", "resume", "progress", "keep_checkpoints", "report_to")
# config keys naming inputs: compared by content when the path differs
INPUT_PATHS = (
    "teacher_cache",
    "balance_dir",
    "cluster_dir",
    "keep",
    "models.teacher_weights",
    "models.student_weights",
)
# input paths whose content must also match at the same path: a --keep mask is a small file a study rewrites (a
# resume on other rows would mix two training sets); the folders above are compared by path, as they always were
CONTENT_CHECKED = ("keep",)
# files up to 1 MiB are hashed whole; larger ones (feature shards, per-row arrays: written whole by a rename or not
# at all) by size, first and last 64 KiB, so fingerprinting a 10M-row cache reads ~150 MB, not all of it
_WHOLE, _EDGE = 1 << 20, 64 << 10


class RunLock(contextlib.AbstractContextManager):
    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, ".lock")
        self.f = None

    def __enter__(self) -> RunLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")  # held open for the run's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(
                f"--out-dir {os.path.dirname(self.path)!r} is in use by a running run ({holder}): wait for it, "
                "stop it, or use another --out-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.f = f
        return self

    def __exit__(self, *exc) -> None:
        if self.f is not None:
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()
            self.f = None


def _file_digest(path: str, h) -> None:
    size = os.path.getsize(path)
    h.update(f"{size}\0".encode())
    with open(path, "rb") as f:
        if size <= _WHOLE:
            h.update(f.read())
        else:
            h.update(f.read(_EDGE))
            f.seek(-_EDGE, os.SEEK_END)
            h.update(f.read())


def fingerprint(path: str) -> str | None:
    """SHA-256 of what ``path`` holds (a file, or a folder's files by relative name; lock, temporary and plot files
    skipped), None when it does not exist."""
    if not os.path.exists(path):
        return None
    h = hashlib.sha256()
    if os.path.isfile(path):
        _file_digest(path, h)
        return h.hexdigest()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name == ".lock" or ".tmp-" in name or name.endswith(".png"):
                continue
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode() + b"\0")
            _file_digest(full, h)
    return h.hexdigest()


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _pop(cfg: dict, dotted: str) -> None:
    *head, last = dotted.split(".")
    for part in head:
        cfg = cfg.get(part, {})
    cfg.pop(last, None)


def input_fingerprints(cfg: dict) -> dict:
    """{config key: fingerprint} of every input path the config sets."""
    out = {}
    for key in INPUT_PATHS:
        path = _get(cfg, key)
        if path:
            out[key] = fingerprint(path)
    return out


def comparable(cfg: dict, *, moved: tuple[str, ...] = ()) -> dict:
    """``cfg`` (a config dict) without the keys that may differ on resume: the neutral ones and the input paths in
    ``moved`` (those whose content was found equal)."""
    import copy

    out = copy.deepcopy(cfg)
    for key in (*NEUTRAL, *moved):
        _pop(out, key)
    return out


def moved_inputs(saved_cfg: dict, saved_prints: dict | None, cfg: dict) -> tuple[list[str], list[str]]:
    """(input keys whose path changed but whose content is the same, one line each saying so) between a
    checkpoint's config and fingerprints and the current config."""
    same, lines = [], []
    for key in INPUT_PATHS:
        old, new = _get(saved_cfg, key), _get(cfg, key)
        if old == new or not old or not new or not saved_prints or key not in saved_prints:
            continue
        if saved_prints[key] is not None and fingerprint(new) == saved_prints[key]:
            same.append(key)
            lines.append(f"--{key.split('.')[-1].replace('_', '-')} moved: {old} -> {new} (same content)")
    return same, lines


def changed_inputs(saved_prints: dict | None, cfg: dict) -> list[str]:
    """One line per ``CONTENT_CHECKED`` input whose content differs from the checkpoint's fingerprint of it (the
    path itself is compared with the config, and a moved path by ``moved_inputs``)."""
    lines = []
    for key in CONTENT_CHECKED:
        path = _get(cfg, key)
        if not path or not saved_prints or key not in saved_prints:
            continue
        if fingerprint(path) != saved_prints[key]:
            flag = "--" + key.split(".")[-1].replace("_", "-")
            lines.append(f"{flag} {path!r} holds another content than when the run started")
    return lines
