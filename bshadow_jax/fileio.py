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


_NAME_MAX = 255  # bytes per path component on Linux/macOS file systems


def cache_root() -> Path:
    """Where derived data is cached (tokenizers, text splits, compiled kernels): $BSHADOW_CACHE,
    default ~/.cache/bshadow_jax. Everything there can be rebuilt; nothing there is an output."""
    return Path(os.environ.get("BSHADOW_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bshadow_jax"))


def enable_compilation_cache() -> None:
    """XLA's persistent compilation cache under the cache root, for the commands (`train`, `diagnose`,
    `spectrum`): a resumed or repeated run on the same shapes skips recompiling. A cache directory
    someone already configured is kept."""
    import jax  # only the commands that compile call this; fileio itself stays light

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(cache_root() / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join user- or file-controlled names under `root`, refusing anything that escapes it."""
    shown = "/".join(str(p) for p in parts)
    for part in parts:
        # os.path raises ValueError on NUL and the OS refuses over-long components later with
        # an OSError; both would surface as internal errors, so refuse them here by name.
        if "\0" in str(part):
            raise UserError(f"{shown!r}: name contains a NUL byte")
        if any(len(c.encode("utf-8", "surrogateescape")) > _NAME_MAX for c in str(part).split("/")):
            raise UserError(f"{shown[:80]}...: a path component is longer than {_NAME_MAX} bytes")
    try:
        root_path = Path(root).resolve()
        candidate = root_path.joinpath(*parts).resolve()
    except (OSError, RuntimeError) as e:  # symlink loops
        raise UserError(f"{shown}: cannot resolve under {root} ({e})") from None
    if candidate != root_path and root_path not in candidate.parents:
        raise UserError(f"{shown}: path escapes the output folder {root_path}")
    return candidate


def sanitize_filename(name: str, max_len: int = 120) -> str:
    """A tensor name turned into one harmless path component.

    ASCII only: `str.isalnum` accepts 4-byte characters, so a 120-character name could
    exceed the 255-byte component limit, and lookalike characters make confusing files.
    """
    cleaned = "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "_" for c in name)
    cleaned = cleaned.lstrip(".") or "_"
    return cleaned[: max(1, min(max_len, _NAME_MAX))]


def check_output_dir(out: str | os.PathLike) -> Path:
    out_path = Path(out)
    if "\0" in str(out_path):
        raise UserError(f"{str(out_path)!r}: output path contains a NUL byte")
    if out_path.exists() and not out_path.is_dir():
        raise UserError(f"{out_path}: output path exists and is not a folder")
    for parent in out_path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{out_path}: {parent} is a file, not a folder")
    try:
        resolved = out_path.resolve()
        cwd = Path.cwd().resolve()
    except (OSError, RuntimeError) as e:  # symlink loops, a deleted working folder
        raise UserError(f"{out_path}: cannot resolve the output path ({e})") from None
    # Replacing the output folder deletes what was there: never let that be the working
    # folder, one of its parents, the home folder or the file system root.
    protected = {Path(resolved.anchor), Path.home().resolve()}
    if resolved in protected or resolved == cwd or resolved in cwd.parents:
        raise UserError(f"{out}: refusing to replace this folder (it holds the working folder or is home/root); "
                        "choose a new folder for --out")
    return out_path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_prefix(name: str) -> str:
    # mkstemp/mkdtemp add ~8 characters; keep the whole temporary name under NAME_MAX bytes.
    stem = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return f".{stem}.tmp-"


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` atomically.

    On any exception the temporary folder is removed and `out` is left untouched.
    """
    out_path = check_output_dir(out).absolute()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out_path.name), dir=out_path.parent))
    # mkdtemp makes the folder 0700; the published output gets ordinary permissions.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if out_path.exists():
        backup = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out_path.name)[:-5] + ".old-", dir=out_path.parent))
        os.replace(out_path, backup)  # a directory replaces an empty directory atomically
    try:
        os.replace(tmp, out_path)
    except BaseException:
        # Put the previous good output back rather than leave nothing at `out`.
        if backup is not None:
            os.replace(backup, out_path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    try:
        # mkstemp makes the file 0600; the published file gets ordinary permissions.
        os.fchmod(fd, 0o666 & ~_umask())
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
