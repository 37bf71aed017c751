"""Reliability of the command line's exit codes: usage errors and bad input are exit 2 with one
`error:` line, internal errors exit 1, and --out never replaces an input.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from bshadow_jax import cli
from reliability_helpers import assert_cli_user_error, record
from testkit import fuzz_settings

_record = record


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
