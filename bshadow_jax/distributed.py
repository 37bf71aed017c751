"""Multi-process (multi-host) runs: the `--coordinator/--num-processes/--process-id` flags and joining the job.

    bshadow train CONFIG --out DIR --coordinator HOST:PORT --num-processes N --process-id I

Every process runs the same command on the same --out (a shared file system); process 0 hosts the
coordinator at HOST:PORT and writes the shared files. On CPU the cross-process collectives are
gloo over TCP, so N processes on one machine (HOST 127.0.0.1) work too. Without the flags, a job
that JAX can describe by itself (a TPU pod, Slurm, Open MPI; JAX_COORDINATOR_ADDRESS set, or
BSHADOW_DISTRIBUTED=1) is joined by `jax.distributed.initialize()`'s own detection; otherwise the
run is single-process.

A process that dies (SIGKILL, OOM, a lost host) never leaves the others waiting on a collective:
a watchdog thread in every process sees its counter in the coordinator's key-value store stand
still for BSHADOW_HEARTBEAT_TIMEOUT_S seconds (default 30), prints one `error:` line and exits
with code 2. A process that fails with an error of its own (a full disk on process 0, say)
publishes it before it exits, and the others stop within about a second with that message.
When process 0 itself dies, the coordinator goes with it and jaxlib ends the others at once,
with its own fatal message (exit code 134; see docs/cli.md, "Multi-process").

Light at import: jax is imported inside the functions, after the arguments are checked.
"""
from __future__ import annotations

import argparse
import atexit
import os
import re
import sys
import threading
import time

from bshadow_jax.errors import UserError

HEARTBEAT_ENV = "BSHADOW_HEARTBEAT_TIMEOUT_S"
INIT_TIMEOUT_ENV = "BSHADOW_INIT_TIMEOUT_S"
DEFAULT_HEARTBEAT_S = 30
DEFAULT_INIT_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 120          # how long a finishing process waits at the shutdown barrier for the others
EXIT_CODE = 2                     # a survivor's exit code: an `error:` line, like every other failure one can rerun
_FAILED_KEY = "bshadow/failed"    # the first process that fails with an error of its own sets this
_POLL_S = 0.5
_DONE_BARRIER_MS = 24 * 3600 * 1000  # the end-of-command barrier: a dead peer is caught by heartbeats, not this

_lock = threading.Lock()
_stopping = threading.Event()     # set once this process reports a failure or a clean end (the poller stops)
_client = None                    # the DistributedRuntimeClient, once joined
_process = (0, 1)                 # (process id, number of processes), once joined


# ----------------------------------------------------------------------------------------- arguments

def add_args(parser: argparse.ArgumentParser) -> None:
    """Add --coordinator, --num-processes and --process-id to a subcommand's parser."""
    g = parser.add_argument_group(
        "multi-process",
        "run one command in N processes (hosts) on the same --out; process 0 writes the shared files. "
        "Leave these out on one host, and on TPU pods and clusters that JAX detects by itself.")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0, where the coordinator listens (127.0.0.1:PORT for processes on "
                        "one machine); the same on every process")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes of the job")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 <= I < N (0 writes the files)")


def parse_address(value: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be [v6]) -> (host, port); UserError when malformed."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", value or "")
    if not m or not 0 < int(m.group(2)) < 65536:
        raise UserError(f"--coordinator {value!r}: expected HOST:PORT with a port in 1..65535, e.g. 10.0.0.1:1234")
    return m.group(1), int(m.group(2))


def check_args(args: argparse.Namespace) -> tuple[str, int, int] | None:
    """(coordinator, N, I) from the flags, None when none is given; UserError on bad or partial input."""
    given = {"--coordinator": getattr(args, "coordinator", None), "--num-processes": getattr(args, "num_processes", None),
             "--process-id": getattr(args, "process_id", None)}
    if all(v is None for v in given.values()):
        return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise UserError(f"multi-process run: {', '.join(missing)} missing; give all of --coordinator, "
                        "--num-processes and --process-id, or none")
    parse_address(args.coordinator)
    n, i = args.num_processes, args.process_id
    if n < 1:
        raise UserError(f"--num-processes {n}: must be at least 1")
    if not 0 <= i < n:
        raise UserError(f"--process-id {i}: must be in 0..{n - 1} for --num-processes {n}")
    return args.coordinator, n, i


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{name}={raw!r}: must be a whole number of seconds, at least 1")
    return value


# ----------------------------------------------------------------------------------------- joining

def _auto_detected() -> bool:
    """A job that JAX describes by itself, without flags (the same rule as training.mesh)."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or os.environ.get("BSHADOW_DISTRIBUTED") == "1"


def initialize(args: argparse.Namespace) -> None:
    """Join the multi-process job the flags (or the environment) describe; a no-op for a single process.

    Call it first in a command's handler, before anything touches jax devices.
    """
    spec = check_args(args)
    heartbeat = _env_seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)
    init_timeout = _env_seconds(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S)
    if spec is None and not _auto_detected():
        return
    import jax
    from jax._src import distributed as jdist

    if jdist.global_state.client is not None:  # joined already (a second command in one process)
        return
    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default of jax 0.10; explicit here
    # JAX's own heartbeat timeout is longer than the watchdog's: the watchdog stops a survivor with a clear
    # `error:` line first; JAX's (an abort with a C++ stack trace) is the backstop.
    kw = dict(initialization_timeout=init_timeout, heartbeat_timeout_seconds=2 * heartbeat + 10,
              shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    if spec is not None:
        coordinator, n, i = spec
        kw.update(coordinator_address=coordinator, num_processes=n, process_id=i)
        where = f"--coordinator {coordinator} (process {i} of {n})"
    else:
        where = "the job JAX detected from the environment"
    try:
        jax.distributed.initialize(**kw)
    except RuntimeError as e:
        if "backend" in str(e).lower():  # something touched jax devices first: a bug, not the user's input
            raise
        raise UserError(f"multi-process run: cannot join {where}: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError (DEADLINE_EXCEEDED, address in use, ...)
        raise UserError(f"multi-process run: cannot join {where} within {init_timeout} s "
                        f"({INIT_TIMEOUT_ENV}): {_first_line(e)}") from e
    _joined(jdist.global_state.client, jax.process_index(), jax.process_count(), heartbeat)


# jax.distributed.initialize does not take jaxlib's missed_heartbeat_callback: in jaxlib 0.10.2 a Python
# callback given to the client is not called (the process hangs instead, or dies of a std::bad_cast), so dead
# peers are found by this module's own watchdog (_watch), well before JAX's longer heartbeat timeout.


def _joined(client, index: int, count: int, heartbeat_s: int) -> None:
    global _client, _process
    _client, _process = client, (index, count)
    if count > 1:
        threading.Thread(target=_watch, args=(heartbeat_s,), name="bshadow-watchdog", daemon=True).start()
        atexit.register(_stopping.set)  # runs before jax's own atexit shutdown (atexit is last-in, first-out)


def is_multiprocess() -> bool:
    return _process[1] > 1


def process_slot() -> tuple[int, int]:
    """(this process's index, number of processes) of the joined job; (0, 1) when single-process."""
    return _process


def is_main() -> bool:
    """True on process 0 (and in a single-process run): the process that writes shared files."""
    return _process[0] == 0


# ----------------------------------------------------------------------------------------- failures

def _first_line(e: BaseException | str) -> str:
    text = str(e).strip().splitlines()
    return (" ".join(text[0].split()) if text else type(e).__name__)[:500]


def _die(message: str) -> None:
    """One `error:` line, then exit now: the main thread may be blocked in a collective that never returns."""
    with _lock:
        if _stopping.is_set():
            return
        _stopping.set()
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001
            pass
        line = " ".join(message.split())
        os.write(2, f"error: {line}\n".encode("utf-8", "replace"))
        os._exit(EXIT_CODE)


def _watch(heartbeat_s: int) -> None:
    """The watchdog thread: every _POLL_S seconds, this process bumps its own counter in the coordinator's
    key-value store and reads the others'. A peer whose counter stood still for heartbeat_s seconds is dead
    (SIGKILL, OOM, a lost host); a peer that failed on its own error left its message under _FAILED_KEY. Either
    way this process prints one `error:` line and exits with EXIT_CODE, even while its main thread is blocked
    in a collective that will never complete."""
    me, n = _process
    beat = 0
    seen: dict[int, tuple[str, float]] = {}
    unreachable_since = None
    rerun = "rerun the same command on every process to resume from the last checkpoint"
    while not _stopping.wait(_POLL_S):
        client = _client
        if client is None:
            return
        now = time.monotonic()
        try:
            beat += 1
            client.key_value_set(f"bshadow/alive/{me}", str(beat), allow_overwrite=True)
            alive = dict(client.key_value_dir_get("bshadow/alive/"))
            try:
                failed = client.key_value_try_get(_FAILED_KEY)
            except Exception as e:  # noqa: BLE001 - NOT_FOUND: nobody failed
                if "not found" not in str(e).lower():
                    raise
                failed = None
        except Exception as e:  # noqa: BLE001 - the coordinator (process 0) does not answer
            if _stopping.is_set():
                return
            unreachable_since = unreachable_since or now
            if now - unreachable_since >= min(heartbeat_s, 5):
                _die(f"multi-process run: process {me} of {n} lost the coordinator (process 0): {_first_line(e)}; "
                     f"{rerun}")
            continue
        unreachable_since = None
        if failed:
            _die(failed)
        for p in range(n):
            if p == me:
                continue
            value = alive.get(f"bshadow/alive/{p}")
            last = seen.get(p)
            if last is None or last[0] != value:
                seen[p] = (value, now)
            elif now - last[1] > heartbeat_s:
                _die(f"multi-process run: process {p} of {n} stopped responding (no sign of life for {heartbeat_s} s: "
                     f"killed, crashed or unreachable); process {me} stops too; {rerun}")


def report_failure(e: BaseException) -> None:
    """This process failed with an error of its own: tell the others (their watchdogs stop them with the
    message), and exit as soon as the CLI has printed its `error:` line, without JAX's shutdown barrier (which
    would wait for peers that wait for this process in a collective) or a teardown that ends in jaxlib's abort."""
    if not is_multiprocess() or _stopping.is_set() or (isinstance(e, SystemExit) and not e.code):
        return
    me, n = _process
    text = " ".join(str(e).split())[:1500] or type(e).__name__
    if isinstance(e, KeyboardInterrupt):
        text = "interrupted"
    _stopping.set()
    try:
        _client.key_value_set(_FAILED_KEY, f"multi-process run: process {me} of {n} failed: {text}")
    except Exception:  # noqa: BLE001 - another process was first, or the coordinator is gone
        pass
    if me == 0:
        time.sleep(3 * _POLL_S)  # the key lives in this process's coordinator: let the others read it first
    # The CLI prints the `error:` line (or `internal error:`), and the interpreter then runs atexit, last-in
    # first-out: this handler runs before jax's own shutdown and leaves with the CLI's exit code.
    atexit.register(_exit_now, _exit_code(e))


def _exit_code(e: BaseException) -> int:
    """The exit code bshadow_jax.cli gives `e` (docs/exit-codes.md): 2 bad input (UserError, a file-system
    error), 130 interrupted, 1 internal. (cli's finer errno rules are not repeated: an OSError it would call
    internal, or a library error wrapping a user errno, may exit here with the other of 1 and 2.)"""
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else 2
    if isinstance(e, KeyboardInterrupt):
        return 130
    return 2 if isinstance(e, (UserError, OSError)) else 1


def _exit_now(code=None) -> None:
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def end(ok: bool = True) -> None:
    """Every process reaches the end of the command before any leaves (process 0 may still be writing
    outputs after the others finished their part): the shutdown barrier's timeout never cuts a good run."""
    if not is_multiprocess() or _stopping.is_set() or _client is None:
        return
    _client.wait_at_barrier("bshadow/end", _DONE_BARRIER_MS)
    _stopping.set()


def run(args: argparse.Namespace, fn):
    """Join the job the flags describe, run fn(), and end together; a failure is reported to the others.

    Every command handler that takes the flags goes through here."""
    initialize(args)
    try:
        result = fn()
    except BaseException as e:
        report_failure(e)
        raise
    end()
    return result


# ----------------------------------------------------------------------------------------- gathering

_gather_calls: dict[str, int] = {}


def gather_bytes(tag: str, payload: bytes | None) -> list[bytes] | None:
    """Process 0 receives every process's payload (in process order); the others get None.

    Through the coordinator's key-value store: no device collective, so payloads may differ in size. Every
    process calls it in the same order; the k-th call with a tag uses its own keys (a study diagnoses many
    pairs), so a tag may be reused."""
    me, n = _process
    if n == 1:
        return [payload or b""]
    _gather_calls[tag] = _gather_calls.get(tag, 0) + 1
    key = f"bshadow/gather/{tag}/{_gather_calls[tag]}"
    _client.key_value_set_bytes(f"{key}/{me}", payload or b"")
    if me != 0:
        return None
    return [_client.blocking_key_value_get_bytes(f"{key}/{p}", _DONE_BARRIER_MS) for p in range(n)]
