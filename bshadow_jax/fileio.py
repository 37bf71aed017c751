"""Crash-safe output: write under a temporary name, rename into place.

A failed run never leaves a partial output and never destroys an existing good one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from bshadow_jax.errors import UserError


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join user- or file-controlled names under `root`, refusing anything that escapes it."""
    root_path = Path(root).resolve()
    candidate = root_path.joinpath(*parts).resolve()
    if candidate != root_path and root_path not in candidate.parents:
        raise UserError(f"{'/'.join(parts)}: path escapes the output folder {root_path}")
    return candidate


def sanitize_filename(name: str, max_len: int = 120) -> str:
    """A tensor name turned into one harmless path component."""
    cleaned = "".join(c if (c.isalnum() or c in "._-") else "_" for c in name)
    cleaned = cleaned.lstrip(".") or "_"
    return cleaned[:max_len]


def check_output_dir(out: str | os.PathLike) -> Path:
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"{out_path}: output path exists and is not a folder")
    return out_path


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` atomically.

    On any exception the temporary folder is removed and `out` is left untouched.
    """
    out_path = check_output_dir(out).absolute()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out_path.exists():
        backup = out_path.with_name(f".{out_path.name}.old-{os.getpid()}")
        os.replace(out_path, backup)
    os.replace(tmp, out_path)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
