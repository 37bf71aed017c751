"""User-facing errors.

Anything the user can fix (a bad path, a malformed file, an unknown config key) is a
`UserError`: the CLI prints it as one `error:` line and exits with code 2. Everything
else is a bug and exits with code 1.
"""
from __future__ import annotations

import os

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class UserError(Exception):
    """Bad input or usage. The message must name the file, tensor or key at fault."""


class ConfigError(UserError):
    """A config file or override that does not validate."""


def refuse_pickle(path: str | os.PathLike) -> None:
    """Refuse pickle-based weight files: loading them can execute arbitrary code."""
    name = os.fspath(path)
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise UserError(
            f"{name}: pickle-based weights are refused (loading them can run code); "
            "convert to safetensors first"
        )


def one_line(e: BaseException) -> str:
    """An exception as one short line, for messages about untrusted files."""
    return (" ".join(str(e).split()) or type(e).__name__)[:200]
