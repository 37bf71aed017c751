"""Helpers shared by the reliability tests (not a test module)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

from bshadow_jax.errors import UserError


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


def user_error_or_ok(fn, *args, seconds: int = 60) -> str:
    """Run fn(*args) under no_hang(seconds); return "ok" or "user_error" (a UserError with a message).
    Any other exception fails the test. Each outcome is record()ed."""
    name = getattr(fn, "__name__", "?")
    try:
        with no_hang(seconds):
            fn(*args)
    except UserError as e:
        assert str(e).strip(), "empty UserError message"
        record("user_error", name)
        return "user_error"
    except BaseException as e:
        record(f"FAIL {type(e).__name__}", name)
        raise
    record("ok", name)
    return "ok"


def assert_cli_user_error(rc: int, err: str, out: Path | None = None, context=None) -> str:
    """A CLI run refused its input the way the CLI promises: exit code 2, exactly one `error:` line on
    stderr and no traceback; with `out`, nothing was written at --out. Returns the `error:` line."""
    context = err if context is None else (context, err)
    assert rc == 2, context
    errs = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "Traceback" not in err, context
    if out is not None:
        assert not Path(out).exists(), context
    return errs[0]
