"""Reliability of config parsing and overrides under hostile input.

Hypothesis drives the inputs; the result is either a well-formed value or a ConfigError
(exit code 2 through the CLI), never another exception.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from bshadow_jax import config
from bshadow_jax.errors import ConfigError
from reliability_helpers import record
from testkit import fuzz_settings

_record = record

FAST = fuzz_settings(150, suppress_health_check=[HealthCheck.function_scoped_fixture])


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


