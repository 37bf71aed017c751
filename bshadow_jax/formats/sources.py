"""Tensor-by-tensor access to every checkpoint kind bshadow reads: the one place that decides a format.

    with open_checkpoint(path) as src:          # HF folder or hub id, .safetensors, .gguf, run/orbax folder
        for name in src.names():                # HF names, embeddings, layers 0..N-1, final norm, head
            w = src.read(name)                  # float32 numpy, one tensor in memory at a time

Every reader (`models.load_pretrained`, `bshadow export`, `diagnose`, `spectrum`) goes through
`open_checkpoint`. Sources know tensors, not models: `models.checkpoint_config(src)` turns what a
source carries (config.json, GGUF metadata, a run's model section) into a model config.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bshadow_jax.errors import PICKLE_SUFFIXES, UserError, refuse_pickle
from bshadow_jax.formats import hub
from bshadow_jax.formats.gguf import GGUFFile
from bshadow_jax.formats.orbax import ParamsLeaves, resolve_orbax
from bshadow_jax.formats.pytree import flatten, params_view, path_name
from bshadow_jax.formats.safetensors import (
    NUMPY_TO_ST,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    SafetensorsFile,
    index_weight_map,
)


# ------------------------------------------------------------------------------- ordering

_NUM = re.compile(r"(\d+)")


def layer_order_key(name: str) -> tuple:
    """Embeddings first, then blocks in numeric order, then everything else, the head last.

    Within one block the original (file) order is kept by the stable sort.
    """
    nums = tuple(int(n) for n in _NUM.findall(name))
    if "embed" in name or name.startswith("token_embd"):
        group = 0
    elif nums:
        group = 1
    elif name.startswith(("lm_head", "output.")):
        group = 3
    else:
        group = 2
    return (group, nums)


def sort_layer_order(names) -> list[str]:
    return sorted(names, key=layer_order_key)


# ------------------------------------------------------------------------------- sources

class CheckpointSource:
    """Read-only, tensor-by-tensor view of a checkpoint. Use as a context manager."""

    kind: str = ""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> str:
        raise NotImplementedError

    def read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def read_many(self, names: list[str]) -> list[np.ndarray]:
        """`read` of several tensors; kinds with a per-call cost (orbax) read them in one go."""
        return [self.read(name) for name in names]

    def close(self) -> None:
        pass

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def __enter__(self) -> "CheckpointSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, kind={self.kind!r})"

    def _unknown(self, name: str) -> UserError:
        return UserError(f"{self.path}: no tensor named {name}")


class SafetensorsSource(CheckpointSource):
    """A single .safetensors file (kind "safetensors") or an HF folder (kind "hf")."""

    def __init__(self, path, files: list[Path], *, kind: str, config_path: Path | None,
                 weight_map: dict[str, Path] | None = None):
        super().__init__(path)
        self.kind = kind
        self.config_path = config_path  # config.json beside the weights, if any
        self._files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        if weight_map is not None:  # a sharded folder: the index says which names exist and where
            by_path = {f.path: f for f in self._files}
            for name, shard in weight_map.items():
                f = by_path[shard]
                if name not in f.entries:
                    raise UserError(f"{shard}: tensor {name} listed in the index is not in this shard")
                self._where[name] = f
        else:
            for f in self._files:
                for name in f.entries:
                    if name in self._where:
                        raise UserError(f"{f.path}: tensor {name} also stored in {self._where[name].path}")
                    self._where[name] = f
        self._names = sort_layer_order(self._where)

    @classmethod
    def from_folder(cls, folder: Path) -> "SafetensorsSource":
        index = folder / SAFETENSORS_INDEX
        config = folder / "config.json"
        if index.is_file():
            return cls.from_index(index)
        if (folder / SAFETENSORS_FILE).is_file():
            files = [folder / SAFETENSORS_FILE]
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                pickles = _pickles(folder)
                if pickles:
                    refuse_pickle(pickles[0])
                raise UserError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")
        return cls(folder, files, kind="hf", config_path=config if config.is_file() else None)

    @classmethod
    def from_index(cls, index: Path) -> "SafetensorsSource":
        weight_map = index_weight_map(index)
        files = list(dict.fromkeys(weight_map.values()))
        folder = index.parent
        return cls(folder, files, kind="hf", config_path=_maybe(folder / "config.json"), weight_map=weight_map)

    def names(self) -> list[str]:
        return list(self._names)

    def _entry(self, name: str):
        try:
            return self._where[name]
        except KeyError:
            raise self._unknown(name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).entries[name][1]

    def dtype(self, name: str) -> str:
        return self._entry(name).entries[name][0]

    def read(self, name: str) -> np.ndarray:
        return self._entry(name).read(name)


class GGUFSource(CheckpointSource):
    kind = "gguf"

    def __init__(self, path):
        super().__init__(path)
        self.file = GGUFFile(path)  # the metadata gives the model config (models.checkpoint_config)
        self._names = sort_layer_order(self.file.names())

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(name)

    def dtype(self, name: str) -> str:
        return self.file.dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self.file.read(name)

    def close(self) -> None:
        self.file.close()


class OrbaxSource(CheckpointSource):
    """Any orbax checkpoint (a bshadow run or step folder, a pytree folder, a step of items, a
    CheckpointManager folder), read one tensor at a time.

    `model_section` is the bshadow run's `model` config, None for other stacks' checkpoints.
    """

    kind = "orbax"

    def __init__(self, path, item: str | None = None):
        super().__init__(path)
        item_dir, self.model_section, self.item_applied = resolve_orbax(self.path, item)
        self.item_dir = item_dir
        self._leaves = ParamsLeaves(item_dir, item=None)
        self._names = sort_layer_order(self._leaves.names())

    def names(self) -> list[str]:
        return list(self._names)

    def _check(self, name: str) -> str:
        if name not in self._leaves:
            raise self._unknown(name)
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._leaves.shape(self._check(name))

    def dtype(self, name: str) -> str:
        # the safetensors spelling, like the other kinds ("F32", "BF16")
        np_name = str(self._leaves.dtype(self._check(name)))
        return NUMPY_TO_ST.get(np_name, np_name.upper())

    def read(self, name: str) -> np.ndarray:
        return self.read_many([name])[0]

    def read_many(self, names: list[str]) -> list[np.ndarray]:
        # one partial restore for all of them: each restore re-reads the whole tree's metadata
        arrays = self._leaves.read_many([self._check(n) for n in names])
        return [np.asarray(arrays[n], dtype=np.float32) for n in names]

    def close(self) -> None:
        self._leaves.close()


class DictSource(CheckpointSource):
    """An in-memory pytree as a source: nested dicts of arrays, a flat name -> array dict, flax
    params (linen `{"params": ...}`, `FrozenDict`, an nnx `State` or its pure dict, a TrainState).

    Names follow `pytree.params_view`: only a `params` subtree when there is one.
    """

    kind = "memory"

    def __init__(self, params: Any, path: str = "<memory>"):
        super().__init__(path)
        if hasattr(params, "to_pure_dict"):  # an nnx State: its Variables' values
            params = params.to_pure_dict()
        if isinstance(params, Mapping):
            flat = flatten(params)
        else:
            import jax

            leaves = jax.tree_util.tree_flatten_with_path(params)[0] if not hasattr(params, "shape") else []
            if not leaves:
                raise TypeError(f"expected a dict (or pytree) of arrays, got {type(params).__name__}")
            flat = {path_name(kp): leaf for kp, leaf in leaves}
        names = {tuple(n.split(".")): n for n in flat}
        self._flat = {name: flat[names[keys]] for keys, name in params_view(list(names)).items()}

    def names(self) -> list[str]:
        return list(self._flat)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self._flat[name]))

    def dtype(self, name: str) -> str:
        return str(getattr(self._flat[name], "dtype", np.asarray(self._flat[name]).dtype))

    def read(self, name: str) -> np.ndarray:
        x = self._flat[name]
        x = np.asarray(x.astype("float32") if hasattr(x, "astype") and "float" not in str(x.dtype) else x)
        return x.astype(np.float32, copy=False)


def open_checkpoint(path: str | os.PathLike, *, item: str | None = None) -> CheckpointSource:
    """The source for a checkpoint path or hub id; every format decision is made here.

    Args:
      path: an HF folder (config.json + model.safetensors or a shard index), a `.safetensors`
        file or shard index, a `.gguf` file, a bshadow run folder (latest step), any orbax
        checkpoint (a pytree folder, a step folder of items, a CheckpointManager folder: its
        latest finished step), or a Hugging Face Hub id ("org/name", safetensors only, when online).
      item: the item of a multi-item orbax step to read (default `params`, else the only item);
        ignored by every other kind, which has no items (the source's `item_applied` says).

    Returns:
      An open CheckpointSource; use it as a context manager.

    Raises:
      UserError: naming the path, for a missing, empty, pickle-based or unreadable checkpoint.
    """
    name = os.fspath(path)
    refuse_pickle(name)
    return _open(name, item)


def _open(name: str, item: str | None) -> CheckpointSource:
    p = Path(name)
    if not p.exists():
        if hub.looks_like_hub_id(name):
            return SafetensorsSource.from_folder(hub.snapshot(name))
        raise UserError(f"{p}: no such file or folder")
    if p.is_file():
        if p.stat().st_size == 0:
            raise UserError(f"{p}: file is empty")
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return GGUFSource(p)
        if suffix == ".safetensors":
            return SafetensorsSource(p, [p], kind="safetensors", config_path=_maybe(p.parent / "config.json"))
        if suffix == ".json" and p.name.endswith(".index.json"):
            return SafetensorsSource.from_index(p)
        raise UserError(f"{p}: unsupported checkpoint file type {suffix or '(no suffix)'} "
                        "(expected .safetensors, .gguf, or a folder)")
    if not p.is_dir():
        raise UserError(f"{p}: not a file or folder")
    if (p / SAFETENSORS_INDEX).is_file() or (p / SAFETENSORS_FILE).is_file() or any(p.glob("*.safetensors")):
        return SafetensorsSource.from_folder(p)
    if (p / "config.json").is_file():
        pickles = _pickles(p)
        if pickles:
            refuse_pickle(pickles[0])
        raise UserError(f"{p}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} beside config.json")
    return OrbaxSource(p, item=item)


def _pickles(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.name.lower().endswith(PICKLE_SUFFIXES))


def _maybe(p: Path) -> Path | None:
    return p if p.is_file() else None


__all__ = ["CheckpointSource", "DictSource", "GGUFSource", "OrbaxSource", "SafetensorsSource", "layer_order_key",
           "open_checkpoint", "sort_layer_order"]
