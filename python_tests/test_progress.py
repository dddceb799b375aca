"""Progress bars in a log (stderr not a terminal): plain lines, at most one per LOG_INTERVAL, never a run of
carriage-return frames; on a terminal, tqdm's own redraws."""

from __future__ import annotations

import io

from clipcid_fast.pipeline import progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_few_plain_lines(monkeypatch):
    clock = iter(range(0, 10**6, 3))  # every update 3 s after the last: 1000 updates = 3000 s
    import tqdm.std

    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))  # the clock each bar reads
    log = io.StringIO()
    bar = progress.tqdm(total=1000, desc="train", file=log)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("train: 100%") and "1000/1000" in lines[-1]
    # 3000 s of updates at one line per 30 s at most, plus the first and the last
    assert 2 <= len(lines) <= 3000 / progress.LOG_INTERVAL + 2, len(lines)


def test_a_terminal_gets_tqdm_redraws():
    tty = Tty()
    bar = progress.tqdm(total=5, desc="x", file=tty, mininterval=0)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert tty.getvalue().count("\r") >= 5
