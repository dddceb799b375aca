"""Progress bars that suit where they are shown.

On a terminal: tqdm as usual. Anywhere else (``make demo > log``, a SLURM or Kubernetes log, CI), tqdm's redraws
would pile up as thousands of carriage-return frames in one line; there the bar prints a plain line at most every
``LOG_INTERVAL`` seconds (and its last state when it closes), so a log stays readable."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm as _tqdm

LOG_INTERVAL = 30.0  # seconds between the lines of a bar written to a log


class _Lines:
    """A stream for tqdm that turns each redraw (``\\r`` + frame) into one line."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        frame = s.replace("\r", "").rstrip()
        if frame:
            self.stream.write(frame + "\n")

    def flush(self) -> None:
        self.stream.flush()


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm``, or in a log (stderr not a terminal) one plain line per ``LOG_INTERVAL`` seconds."""
    stream = kwargs.get("file") or sys.stderr
    if not kwargs.get("disable") and not getattr(stream, "isatty", lambda: False)():
        kwargs.update(file=_Lines(stream), mininterval=max(kwargs.get("mininterval", 0.1), LOG_INTERVAL),
                      dynamic_ncols=False, ncols=100, position=None)  # fmt: skip
    return _tqdm(*args, **kwargs)
