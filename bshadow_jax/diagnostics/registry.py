"""User metrics: `@register_metric("name", kind="singular_values" | "matrix")`.

The function receives one matrix's singular values (descending, 1-D) or the matrix itself
(2-D float32, [rows, cols] as stored) and returns a scalar. The engine jits it, vmaps it over
each stack of same-shape matrices and shards it with the built-in metrics; it appears as a
CSV column `delta_<name>` in diagnose (computed on the delta) and `<name>` in spectrum.

    from bshadow_jax import diagnostics
    import jax.numpy as jnp

    @diagnostics.register_metric("top1_share")
    def top1_share(sv):
        return sv[0] ** 2 / jnp.maximum(jnp.sum(sv ** 2), 1e-30)
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable, Iterator

from bshadow_jax.diagnostics.spectral import SV_METRICS

KINDS = ("singular_values", "matrix")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable
    kind: str


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, *, kind: str = "singular_values", overwrite: bool = False):
    """Decorator registering `fn(sv) -> scalar` or `fn(matrix) -> scalar` under `name`."""
    if kind not in KINDS:
        raise ValueError(f"register_metric: kind must be one of {KINDS}, got {kind!r}")
    if not _NAME_RE.match(name):
        raise ValueError(f"register_metric: {name!r} is not a valid column name (letters, digits, _)")
    reserved = set(SV_METRICS) | {"base_fro", "delta_fro", "rel_delta", "energy_share", "base_overlap",
                                  "intruder_count", "alpha", "log_norm", "log_spectral_norm", "alpha_weighted"}
    if name in reserved:
        raise ValueError(f"register_metric: {name!r} is a built-in metric name")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].fn is not fn:
            raise ValueError(f"register_metric: {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = Metric(name, fn, kind)
        return fn

    return deco


def unregister_metric(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_metrics(kind: str | None = None) -> tuple[Metric, ...]:
    """Registered metrics in registration order (optionally of one kind)."""
    return tuple(m for m in _REGISTRY.values() if kind is None or m.kind == kind)


def cache_key() -> tuple:
    """A hashable summary of the registry for the caches of jitted functions: a newly registered
    (or replaced) metric means a new function."""
    return tuple((m.name, m.fn, m.kind) for m in registered_metrics())


@contextlib.contextmanager
def temporary_metric(name: str, fn: Callable, *, kind: str = "singular_values") -> Iterator[Callable]:
    """Register `fn` for the duration of a `with` block (tests, notebooks)."""
    register_metric(name, kind=kind, overwrite=True)(fn)
    try:
        yield fn
    finally:
        unregister_metric(name)
