"""bshadow_jax.allocator: glibc malloc settings applied at start, and the opt-out."""
import os
import subprocess
import sys

import pytest

_PROBE = ("import json; from bshadow_jax.allocator import tune_glibc_malloc; "
          "a = tune_glibc_malloc(); b = tune_glibc_malloc(); print(json.dumps([a, b]))")


def _probe(**env):
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings apply on Linux only")
def test_settings_apply_once_on_glibc_and_can_be_turned_off():
    import ctypes

    try:
        ctypes.CDLL(None).gnu_get_libc_version
    except AttributeError:
        pytest.fail("this Linux has no glibc; the test machine is expected to")
    assert _probe(BSHADOW_MALLOC="") == "[true, true]"
    assert _probe(BSHADOW_MALLOC="default") == "[false, false]"


def test_the_cli_applies_them_before_anything_else():
    import inspect

    from bshadow_jax import cli

    body = [ln.strip() for ln in inspect.getsource(cli.main).splitlines()[1:] if ln.strip()]
    assert body[0].startswith("tune_glibc_malloc()"), body[:2]
