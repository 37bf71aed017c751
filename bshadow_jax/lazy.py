"""Lazy package attributes (PEP 562): a package names what it exports and where it lives, and the
defining module is imported on first use. This keeps `bshadow --help` and `import bshadow_jax.x`
free of jax, orbax and transformers until something is actually used."""
from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable, list[str]]:
    """(__getattr__, __dir__, __all__) for a package whose `exports` map name -> defining module."""
    names = sorted(exports)

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return names

    return __getattr__, __dir__, names
