"""`bshadow` command line.

Each package owns its subcommands in a light `cli.py` (no jax import at module level, so
`--help` is instant) exposing `register(subparsers)`; the handlers import the heavy
machinery lazily. This module only wires them and maps exceptions to exit codes:
0 success, 2 bad input or usage (one `error:` line), 1 internal error.
"""
from __future__ import annotations

import argparse
import errno
import io
import os
import re
import sys
import traceback
from pathlib import Path

from bshadow_jax.allocator import tune_glibc_malloc
from bshadow_jax.errors import UserError

_COMMAND_MODULES = (
    "bshadow_jax.training.cli",      # train
    "bshadow_jax.models.cli",        # export
    "bshadow_jax.diagnostics.cli",   # diagnose, spectrum
    "bshadow_jax.data.cli",          # data audit
    "bshadow_jax.evals.cli",         # eval
    "bshadow_jax.studies.cli",       # experiment regimes | repetition | cross-family
)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors are exit code 2 too
        self.print_usage(sys.stderr)
        raise SystemExit(_fail(f"{self.prog}: {message}"))


# File-system errors the user causes or must fix (a missing or unreadable path, a full disk,
# a file-size limit): reported as bad input (exit 2), not as an internal error.
_USER_ERRNOS = {
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOSPC,
    errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP,
}
_MAX_MESSAGE = 2000


def _fail(message: str) -> int:
    line = " ".join(str(message).split())
    if len(line) > _MAX_MESSAGE:  # a hostile file can put megabytes into a name or value
        line = line[:_MAX_MESSAGE] + "..."
    print(f"error: {line}", file=sys.stderr)
    return 2


def _os_error_message(e: OSError) -> str:
    where = e.filename if e.filename is not None else "file system"
    return f"{where}: {e.strerror or e}"


def _check_out_not_input(args: argparse.Namespace) -> None:
    """--out is replaced as a whole on success: it must not be, or hold, an input checkpoint."""
    out = getattr(args, "out", None)
    if not out or getattr(args, "command", None) not in ("diagnose", "spectrum", "export"):
        return
    out_path = Path(out).absolute()
    for name in ("base", "tuned", "ckpt"):
        value = getattr(args, name, None)
        for one in value if isinstance(value, list) else [value]:  # diagnose takes several TUNED
            if not one:
                continue
            inp = Path(one).absolute()
            if inp == out_path or out_path in inp.parents:
                raise UserError(f"--out {out}: would replace the input {one}; choose another output folder")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _ArgumentParser(
        prog="bshadow",
        description=(
            "Benchmark shadows: train models under controlled data interventions and read "
            "the footprint that fine-tuning leaves in the weights."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for every error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    sub.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, except that key=value overrides may also follow options.

    argparse fills a trailing `nargs="*"` positional together with the one before it, so in
    `bshadow train CONFIG --out DIR train.steps=5` the override would be "unrecognized".
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    tune_glibc_malloc()  # before jax starts its threads (bshadow_jax.allocator says why)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BSHADOW_DEBUG") == "1"
    # No command reads stdin. Libraries that would ask on it (transformers asks "run the custom code
    # of this folder? [y/N]" for an auto_map in config/tokenizer files) must fail closed instead.
    saved_stdin, sys.stdin = sys.stdin, io.StringIO("")
    saved_hook, saved_unraisable = sys.excepthook, sys.unraisablehook
    if not debug:
        # Library callbacks on background threads (tensorstore after a failed async save) print
        # tracebacks through sys.excepthook and sys.unraisablehook; every error of the command
        # itself is caught below and reported as one line, so those are noise unless --debug.
        sys.unraisablehook = lambda unraisable: None
        sys.excepthook = lambda *exc_info: None
    rc = 1
    try:
        rc = _main(argv, debug)
        return rc
    finally:
        sys.stdin = saved_stdin
        # after a failure the hooks stay quiet: the noise comes while the process winds down
        if rc == 0 or debug:
            sys.excepthook, sys.unraisablehook = saved_hook, saved_unraisable


def _main(argv: list[str], debug: bool) -> int:
    try:
        parser = build_parser()
        args = _parse(parser, argv)
        _check_out_not_input(args)
        result = args.handler(args)
        return int(result or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else _fail(e.code))
    except UserError as e:
        if debug:
            traceback.print_exc()
        else:
            _quiet_background_errors()
        return _fail(str(e))
    except OSError as e:
        if e.errno not in _USER_ERRNOS:
            return _internal(e, debug)
        if debug:
            traceback.print_exc()
        return _fail(_os_error_message(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal error: a bug, not the user's input
        code = _wrapped_errno(e)
        if code in _USER_ERRNOS:  # e.g. orbax/tensorstore: "... File too large [os_error_code='27']"
            if debug:
                traceback.print_exc()
            return _fail(f"{e} ({os.strerror(code)})")
        return _internal(e, debug)


def _wrapped_errno(e: BaseException) -> int | None:
    """The errno of a file-system failure that a library re-raised as another exception type."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        m = re.search(r"os_error_code='?(\d+)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _quiet_background_errors() -> None:
    """After a reported failure, silence the tracebacks that library threads print while the
    process winds down (orbax/tensorstore callbacks on a closed event loop after a failed save):
    the user gets the one `error:` line. `--debug` keeps them."""
    import logging
    import threading
    import warnings

    sys.excepthook = lambda *exc_info: None
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    warnings.simplefilter("ignore")  # "coroutine ... was never awaited" from the aborted writers
    # asyncio logs "Future exception was never retrieved" for the failed writer tasks at exit
    for name in ("asyncio", "absl", "concurrent.futures", "orbax", "jax"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _internal(e: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    else:
        text = " ".join(str(e).split())[:_MAX_MESSAGE]
        print(f"internal error: {type(e).__name__}: {text} (rerun with --debug for the traceback)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
