"""Checkpoint formats, read tensor by tensor: safetensors, GGUF, orbax, hub ids and in-memory pytrees.

The lowest layer above the core helpers (errors, fileio, config): nothing here knows about
models or training.

    from bshadow_jax.formats import open_checkpoint
    with open_checkpoint(path) as src:     # decides the format, once, for every command
        w = src.read(src.names()[0])       # float32 numpy

Attributes load lazily, so importing `formats.pytree` does not import orbax.
"""
from __future__ import annotations

from bshadow_jax.lazy import lazy_exports

_EXPORTS = {
    "CheckpointSource": "bshadow_jax.formats.sources",
    "DictSource": "bshadow_jax.formats.sources",
    "open_checkpoint": "bshadow_jax.formats.sources",
    "sort_layer_order": "bshadow_jax.formats.sources",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
