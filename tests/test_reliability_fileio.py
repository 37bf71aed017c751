"""Reliability of path safety and atomic outputs: never a file outside the output folder, never a
destroyed good output, whatever fails (an exception, a full disk, SIGKILL mid-write).
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from bshadow_jax import fileio
from bshadow_jax.errors import UserError
from reliability_helpers import record
from testkit import fuzz_settings

_record = record

FAST = fuzz_settings(150, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ----------------------------------------------------------------------------- paths

_names = st.text(max_size=300) | st.sampled_from(
    ["..", "../x", "../../etc/passwd", "/abs", "/etc/passwd", "a/../../b", "a/./b", "", ".", "x\x00y", "~",
     "a" * 256, "\u00e9" * 200, "\U0001d7d8" * 120, "a/" * 200]
)


@FAST
@given(parts=st.lists(_names, min_size=1, max_size=3))
def test_safe_join_stays_inside(tmp_path, parts):
    root = tmp_path.resolve()
    try:
        p = fileio.safe_join(root, *parts)
    except UserError:
        _record("user_error")
        return
    _record("ok")
    assert p == root or root in p.parents
    assert "\x00" not in str(p)


@FAST
@given(name=_names)
def test_sanitize_filename_is_one_harmless_component(tmp_path, name):
    s = fileio.sanitize_filename(name)
    assert s and s.isascii() and "/" not in s and "\x00" not in s and not s.startswith(".")
    assert len(s.encode()) <= 255
    p = fileio.safe_join(tmp_path, s)
    assert p.parent == tmp_path.resolve()
    p.write_text("ok")  # the OS accepts it
    assert p.read_text() == "ok"


def test_safe_join_symlink_escape(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    (root / "link").symlink_to("/etc")
    with pytest.raises(UserError):
        fileio.safe_join(root, "link", "passwd")
    (root / "loop").symlink_to(root / "loop")
    try:
        p = fileio.safe_join(root, "loop", "x")
    except UserError:
        pass
    else:
        assert root.resolve() in p.parents


# ----------------------------------------------------------------------------- atomic outputs

def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _good_output(out: Path) -> str:
    with fileio.atomic_output_dir(out) as tmp:
        (tmp / "metrics.csv").write_text("a,b\n1,2\n")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "fig.png").write_bytes(b"\x89PNG")
    return _tree_digest(out)


@FAST
@given(n_files=st.integers(0, 5), fail_at=st.integers(0, 5), exc=st.sampled_from([UserError, RuntimeError, KeyboardInterrupt, MemoryError]))
def test_failing_writer_keeps_good_output(tmp_path_factory, n_files, fail_at, exc):
    parent = tmp_path_factory.mktemp("atomic")
    out = parent / "out"
    before = _good_output(out)
    with pytest.raises(exc):
        with fileio.atomic_output_dir(out) as tmp:
            for i in range(n_files):
                if i == fail_at:
                    raise exc("writer failed")
                (tmp / f"f{i}.txt").write_text("partial")
            raise exc("writer failed at the end")
    assert _tree_digest(out) == before
    assert sorted(p.name for p in parent.iterdir()) == ["out"]  # no temp folder left behind


def test_failing_writer_leaves_nothing_when_no_previous_output(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError):
        with fileio.atomic_output_dir(out) as tmp:
            (tmp / "half.csv").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list((tmp_path / "new").iterdir()) == []


def test_successful_writer_replaces_output(tmp_path):
    out = tmp_path / "out"
    _good_output(out)
    with fileio.atomic_output_dir(out) as tmp:
        (tmp / "only.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["only.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_rename_failure_restores_previous_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    before = _good_output(out)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the rename of the new output into place
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        with fileio.atomic_output_dir(out) as tmp:
            (tmp / "new.txt").write_text("x")
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert _tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_path_that_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("precious")
    with pytest.raises(UserError, match="not a folder"):
        with fileio.atomic_output_dir(f):
            pass
    with pytest.raises(UserError):
        with fileio.atomic_output_dir(f / "below"):
            pass
    assert f.read_text() == "precious"


def test_output_never_replaces_working_folder_or_home(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    (work / "precious.gguf").write_bytes(b"x")
    monkeypatch.chdir(work / "inner")
    for target in (".", "..", str(work), "/", str(Path.home())):
        with pytest.raises(UserError, match="refusing"):
            with fileio.atomic_output_dir(target):
                pass
    assert (work / "precious.gguf").exists()


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    """Temporary names come from mkstemp/mkdtemp (0600/0700); published outputs must not keep that."""
    old = os.umask(0o022)
    try:
        fileio.atomic_write_text(tmp_path / "a.json", "{}")
        with fileio.atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_atomic_write_failure_keeps_old_file(tmp_path):
    p = tmp_path / "summary.json"
    fileio.atomic_write_json(p, {"good": 1})
    with pytest.raises(TypeError):
        fileio.atomic_write_json(p, {"bad": object()})
    assert yaml.safe_load(p.read_text()) == {"good": 1}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["summary.json"]
    long = tmp_path / ("n" * 255)
    fileio.atomic_write_text(long, "ok")  # the temporary name must fit NAME_MAX too
    assert long.read_text() == "ok"


_FSIZE_SCRIPT = textwrap.dedent("""
    import resource, sys
    # set in the child itself: a preexec_fn would make subprocess fork a multithreaded JAX process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    from bshadow_jax import fileio
    try:
        fileio.atomic_write_bytes(sys.argv[1], b"x" * (4 << 20))
    except OSError as e:
        print("errno", e.errno)
        sys.exit(3)
""")


def test_disk_full_keeps_old_file(tmp_path):
    """RLIMIT_FSIZE makes writes past 1 MiB fail with EFBIG: a real write failure that works as root."""
    p = tmp_path / "model.safetensors"
    p.write_bytes(b"good" * 10)

    r = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(p)], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert "errno 27" in r.stdout  # EFBIG
    assert p.read_bytes() == b"good" * 10
    assert sorted(x.name for x in tmp_path.iterdir()) == ["model.safetensors"]


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from bshadow_jax import fileio
    with fileio.atomic_output_dir(sys.argv[1]) as tmp:
        for i in range(1000):
            (tmp / f"part{i}.csv").write_text("x" * 1000)
            if i == 3:
                print("writing", flush=True)
            time.sleep(0.01)
""")


def test_sigkill_mid_write_keeps_good_output(tmp_path):
    out = tmp_path / "out"
    before = _good_output(out)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _tree_digest(out) == before
    # Only hidden temporary folders may remain after SIGKILL; the visible output is intact.
    assert all(p.name == "out" or p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())


