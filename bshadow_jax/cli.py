"""`bshadow` command line.

Each package owns its subcommands in a light `cli.py` (no jax import at module level, so
`--help` is instant) exposing `register(subparsers)`; the handlers import the heavy
machinery lazily. This module only wires them and maps exceptions to exit codes:
0 success, 2 bad input or usage (one `error:` line), 1 internal error.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from bshadow_jax.errors import UserError

_COMMAND_MODULES = (
    "bshadow_jax.training.cli",      # train
    "bshadow_jax.models.cli",        # export
    "bshadow_jax.diagnostics.cli",   # diagnose, spectrum
    "bshadow_jax.data.cli",          # data audit
    "bshadow_jax.studies.cli",       # experiment regimes | repetition | cross-family
)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors are exit code 2 too
        self.print_usage(sys.stderr)
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    line = " ".join(str(message).split())
    print(f"error: {line}", file=sys.stderr)
    return 2


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BSHADOW_DEBUG") == "1"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        result = args.handler(args)
        return int(result or 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else _fail(e.code))
    except UserError as e:
        if debug:
            traceback.print_exc()
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal error: a bug, not the user's input
        if debug:
            traceback.print_exc()
        else:
            print(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
