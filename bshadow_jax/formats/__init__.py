"""Checkpoint formats, read tensor by tensor: safetensors, GGUF, orbax, hub ids and in-memory pytrees.

The lowest layer above the core helpers (errors, fileio, config): nothing here knows about
models or training.

    from bshadow_jax.formats import open_checkpoint
    with open_checkpoint(path) as src:     # decides the format, once, for every command
        w = src.read(src.names()[0])       # float32 numpy

Attributes load lazily, so importing `formats.pytree` does not import orbax.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointSource": "bshadow_jax.formats.sources",
    "DictSource": "bshadow_jax.formats.sources",
    "open_checkpoint": "bshadow_jax.formats.sources",
    "sort_layer_order": "bshadow_jax.formats.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bshadow_jax.formats' has no attribute {name!r}")
