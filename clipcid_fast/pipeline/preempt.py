"""Preemption: SIGTERM (what SLURM and Kubernetes send before they kill a job), SIGINT (Ctrl-C) and SIGUSR1
(SLURM's ``--signal=USR1@…`` warning) end a training run at a step boundary, with a checkpoint.

The handler only records the signal; the loop asks :meth:`Preemption.requested` after each step, writes a
checkpoint and exits with :func:`exit_code` (128 + the signal number, the shell's convention: 143 for SIGTERM,
130 for SIGINT, 138 for SIGUSR1). Under ``torchrun`` the ranks agree (one small all-reduce on the host group per
step), so every rank stops after the same step. A second Ctrl-C stops at once (KeyboardInterrupt), for a user who
will not wait for the step to finish."""

from __future__ import annotations

import signal
import threading

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preemption:
    """Context manager: while open, the signals of ``SIGNALS`` are recorded instead of ending the process. Outside
    the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _record(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        self.signum = self.signum or signum

    def requested(self, comm) -> int:
        """The signal number that asked this run (any rank of it) to stop, else 0; the same on every rank."""
        return int(comm.max(self.signum)) if comm.world > 1 else self.signum


class Stopped(Exception):
    """Raised by a stage at a natural boundary (a written shard, a written batch) after a stop signal: ``where`` says
    what was finished last. The stage's entry point turns it into :func:`leave`."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(f"stopped after {where} by {name(signum)}")
        self.signum, self.where = signum, where


def leave(stage: str, stopped: Stopped, say: bool = True):
    """One line (``say``: on rank 0) and exit with 128 + the signal number; a rerun of the same command resumes."""
    if say:
        print(f"{stage}: {stopped}; rerun the same command to resume", flush=True)
    raise SystemExit(exit_code(stopped.signum))


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def name(signum: int) -> str:
    return signal.Signals(signum).name
