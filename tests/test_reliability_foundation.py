"""Reliability of the foundation: config parsing, overrides, atomic outputs, path safety, CLI exit codes.

Hypothesis drives hostile inputs; the property is always the same: the result is either a
well-formed value or a UserError/ConfigError (exit code 2 through the CLI), never another
exception, never a file outside the output folder, never a destroyed good output.
"""
from __future__ import annotations

import dataclasses
import json
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from bshadow_jax import cli, config, fileio
from bshadow_jax.errors import ConfigError, UserError
from reliability_helpers import assert_cli_user_error, record
from testkit import fuzz_settings

_record = record

FAST = fuzz_settings(150, suppress_health_check=[HealthCheck.function_scoped_fixture])
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class _Inner:
    lr: float = 1e-3
    name: Literal["adamw", "sgd"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class _Cfg:
    steps: int = 10
    seed: int = 0
    flag: bool = False
    tag: str = "x"
    window: int | None = None
    sizes: list[int] = dataclasses.field(default_factory=list)
    extra: dict[str, float] = dataclasses.field(default_factory=dict)
    optim: _Inner = dataclasses.field(default_factory=_Inner)


_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["steps", "seed", "flag", "tag", "window", "sizes", "extra", "optim", "bogus", 1, None])
_docs = st.dictionaries(_keys, _values | st.dictionaries(st.sampled_from(["lr", "name", "betas", "zz"]), _values), max_size=6)


def _check_types(cfg: _Cfg) -> None:
    assert isinstance(cfg.steps, int) and not isinstance(cfg.steps, bool)
    assert isinstance(cfg.flag, bool)
    assert isinstance(cfg.tag, str)
    assert cfg.window is None or (isinstance(cfg.window, int) and not isinstance(cfg.window, bool))
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in cfg.sizes)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in cfg.extra.items())
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr > 0
    assert cfg.optim.name in ("adamw", "sgd")
    assert isinstance(cfg.optim.betas, tuple) and len(cfg.optim.betas) == 2


@FAST
@given(doc=_docs)
def test_from_dict_fuzz_types_or_config_error(doc):
    try:
        cfg = config.from_dict(_Cfg, doc)
    except ConfigError:
        _record("config_error")
        return
    _check_types(cfg)
    _record("ok")


@FAST
@given(text=st.text(max_size=300) | st.sampled_from([
    "[" * 3000 + "]" * 3000, "a: &x [*x]", "!!python/object/apply:os.system ['true']", "\x00", "---\n---\n",
    "a: !!binary aGk=", "? [a]\n: 1", "a: 1\na: 2", "\ufeffsteps: 3", "- 1\n- 2",
]))
def test_read_yaml_fuzz(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        data = config.read_yaml(p)
    except ConfigError as e:
        assert str(p) in str(e)
        _record("config_error")
        return
    assert isinstance(data, dict)
    _record("ok")


def test_read_yaml_never_executes_tags(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "c.yaml"
    p.write_text(f"a: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        config.read_yaml(p)
    assert not marker.exists()


def test_read_yaml_bad_bytes_and_folders(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(ConfigError):
        config.read_yaml(tmp_path / "bin.yaml")
    with pytest.raises(ConfigError):
        config.read_yaml(tmp_path)  # a folder
    with pytest.raises(ConfigError):
        config.read_yaml(tmp_path / "missing.yaml")


_override_text = st.text(alphabet=st.sampled_from(list("ab.=[]{}:!&*'\" \\x0-9\x00\n")), max_size=30)


@FAST
@given(base=_docs, overrides=st.lists(_override_text, max_size=4))
def test_overrides_fuzz(base, overrides):
    try:
        data = config.apply_overrides({"optim": {"lr": 0.1}, **{k: v for k, v in base.items() if isinstance(k, str)}}, overrides)
    except ConfigError:
        return
    try:
        config.from_dict(_Cfg, data)
    except ConfigError:
        pass


@FAST
@given(n=st.integers(min_value=1, max_value=10**12), lr=st.floats(min_value=1e-9, max_value=10, allow_nan=False))
def test_override_roundtrip(n, lr):
    data = config.apply_overrides({}, [f"steps={n}", f"optim.lr={lr!r}", "optim.name=sgd"])
    cfg = config.from_dict(_Cfg, data)
    assert cfg.steps == n and cfg.optim.lr == lr and cfg.optim.name == "sgd"


def test_override_does_not_mutate_input_and_refuses_non_sections():
    base = {"optim": {"lr": 0.1}, "steps": 3}
    out = config.apply_overrides(base, ["optim.lr=0.5"])
    assert base["optim"]["lr"] == 0.1 and out["optim"]["lr"] == 0.5
    with pytest.raises(ConfigError):
        config.apply_overrides(base, ["steps.inner=1"])
    for bad in ["noequals", "=1", "a..b=1", ".a=1"]:
        with pytest.raises(ConfigError):
            config.apply_overrides(base, [bad])


@pytest.mark.parametrize("doc", [{1: 2, "steps": 3}, {None: 1}, {1.5: 1}])
def test_from_dict_non_string_keys(doc):
    with pytest.raises(ConfigError):
        config.from_dict(_Cfg, doc)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2.5, "2.5", "1e999", "ten", True, [1], {"a": 1}, b"1"])
def test_int_field_rejects_non_integers(value):
    with pytest.raises(ConfigError):
        config.from_dict(_Cfg, {"steps": value})


@pytest.mark.parametrize("text,want", [("3e-4", 3e-4), ("1E5", 1e5), ("-2", -2.0), (".5", 0.5)])
def test_yaml11_exponent_strings_are_numbers(tmp_path, text, want):
    """PyYAML reads `3e-4` as a string (YAML 1.1); numeric fields must still accept it."""
    p = tmp_path / "c.yaml"
    p.write_text(f"optim:\n  lr: {text}\n")
    if want <= 0:
        with pytest.raises(ConfigError):
            config.load_config(_Cfg, p)
        return
    assert config.load_config(_Cfg, p).optim.lr == want
    assert config.load_config(_Cfg, p, ["steps=1e3"]).steps == 1000
    assert config.load_config(_Cfg, p, [f"optim.lr={text}", "steps=1e3"]).optim.lr == want


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


# ----------------------------------------------------------------------------- CLI exit codes

def _run_cli(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


_tokens = st.sampled_from([
    "diagnose", "spectrum", "export", "train", "experiment", "regimes", "data", "audit", "--out", "--topk", "-1",
    "abc", "--include", "(", "--rename", "x", "/nonexistent/ckpt.safetensors", "--frobnicate", "a=b", "..",
])


@fuzz_settings(60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(_tokens, max_size=6))
def test_cli_argv_fuzz(capsys, argv):
    """Random argument lists: usage errors and missing inputs are exit 2 with one error line."""
    if "--help" in argv:
        return
    rc, err = _run_cli(capsys, argv)
    _record(f"exit {rc}")
    assert rc in (0, 2), err
    if rc == 2:
        assert "Traceback" not in err and err.count("error:") == 1, err


@pytest.mark.parametrize("argv", [
    [],
    ["nosuchcommand"],
    ["diagnose", "a"],
    ["diagnose", "a", "b"],
    ["diagnose", "a", "b", "--out", "o", "--topk", "x"],
    ["export"],
    ["train"],
])
def test_cli_usage_errors(capsys, argv):
    assert_cli_user_error(*_run_cli(capsys, argv))


def test_cli_out_must_not_replace_input(capsys, tmp_path):
    ckpt = tmp_path / "base"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    for argv in (["spectrum", str(ckpt), "--out", str(ckpt)], ["diagnose", str(ckpt / "config.json"), str(ckpt), "--out", str(tmp_path)],
                 ["export", str(ckpt), "--out", str(ckpt)]):
        rc, err = _run_cli(capsys, argv)
        assert_cli_user_error(rc, err)
        assert "would replace the input" in err
    assert (ckpt / "config.json").read_text() == "{}"


def test_cli_maps_user_file_system_errors(capsys, monkeypatch):
    def handler(_args):
        raise FileNotFoundError(2, "No such file or directory", "/no/such/file")

    def handler_full(_args):
        raise OSError(28, "No space left on device", "/out/checkpoints")

    def handler_bug(_args):
        raise ValueError("bug")

    for h, want in ((handler, 2), (handler_full, 2), (handler_bug, 1)):
        monkeypatch.setattr(cli, "_check_out_not_input", lambda args, h=h: setattr(args, "handler", h))
        rc, err = _run_cli(capsys, ["export", "x", "--out", "y"])
        assert rc == want, err
        assert "Traceback" not in err
    assert rc == 1 and "internal error" in err


def test_cli_subprocess_one_error_line(tmp_path):
    """The installed entry point itself: exit 2, one `error:` line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "bshadow_jax", "diagnose", "a", "b", "--out", str(tmp_path / "o"), "--topk", "x"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] and "Traceback" not in r.stderr
