"""Helpers shared by the reliability tests (not a test module)."""
from __future__ import annotations

import contextlib
import json
import os
import signal


class Hang(Exception):
    """A reader or command that ran past its time limit."""


def record(outcome: str, detail: str = "") -> None:
    """Append one fuzz outcome to $BSHADOW_RELIABILITY_STATS (the numbers behind RELIABILITY.md)."""
    path = os.environ.get("BSHADOW_RELIABILITY_STATS")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": test, "outcome": outcome, "detail": detail}) + "\n")


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Raise Hang in the main thread if the body runs longer than `seconds`."""
    def handler(signum, frame):
        raise Hang(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
