"""bshadow_jax: benchmark shadows, measured in JAX.

Submodules load lazily so that `import bshadow_jax` and `bshadow --help` stay fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
_SUBMODULES = ("models", "training", "data", "evals", "diagnostics", "studies", "config", "errors", "fileio")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"bshadow_jax.{name}")
    raise AttributeError(f"module 'bshadow_jax' has no attribute {name!r}")
