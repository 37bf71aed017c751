"""Tensor-by-tensor access to any checkpoint bshadow reads, for diagnostics.

    with open_checkpoint(path) as src:          # HF folder, .safetensors, .gguf, run/orbax folder
        for name in src.names():                # HF names, embeddings, layers 0..N-1, final norm, head
            w = src.read(name)                  # float32 numpy, one tensor in memory at a time

Safetensors headers are validated against the real file size before anything is read, so
a corrupt or hostile header gives a one-line UserError instead of a huge allocation.
GGUF tensors come back under HF names, dequantized and with q/k rows un-permuted.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from bshadow_jax.errors import UserError, refuse_pickle

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors' own limit on the JSON header; anything larger is corrupt or hostile
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_NUMPY_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                 "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
# dtypes safe_open(framework="numpy") cannot build; read through ml_dtypes from the raw bytes
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


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


# ------------------------------------------------------------------------------- safetensors

class _SafetensorsFile:
    """One safetensors file: validated header, tensors read one at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.entries, self.data_start = _read_safetensors_header(path)

    def read(self, name: str) -> np.ndarray:
        dtype, shape, (begin, end) = self.entries[name]
        if dtype in _ML_DTYPES:
            import ml_dtypes

            raw = np.fromfile(self.path, dtype=np.uint8, count=end - begin, offset=self.data_start + begin)
            arr = raw.view(getattr(ml_dtypes, _ML_DTYPES[dtype])).reshape(shape)
            return np.asarray(arr, dtype=np.float32)
        from safetensors import safe_open

        # opened per tensor: the mapping of the whole file ends with the read, so the pages a
        # streaming pass touched do not pile up in the resident set (2x the checkpoint otherwise)
        try:
            ctx = safe_open(str(self.path), framework="numpy")
            handle = ctx.__enter__()
        except Exception as e:
            raise UserError(f"{self.path}: not a readable safetensors file ({_one_line(e)})") from None
        try:
            arr = np.asarray(handle.get_tensor(name), dtype=np.float32)  # get_tensor copies out of the map
        except Exception as e:
            raise UserError(f"{self.path}: tensor {name} unreadable ({_one_line(e)})") from None
        finally:
            ctx.__exit__(None, None, None)
        return arr


def _read_safetensors_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], tuple[int, int]]], int]:
    """{name: (dtype, shape, (begin, end))} and the data start, checked against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if size == 0:
                raise UserError(f"{path}: empty file, not a safetensors model")
            if len(head) < 8:
                raise UserError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > _MAX_HEADER_BYTES:
                raise UserError(f"{path}: corrupt safetensors header: claims {n} header bytes, file has {size}")
            raw = fh.read(n)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
        if dtype not in _ST_ITEMSIZE:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise UserError(f"{path}: tensor {name} has a corrupt shape or offsets")
        if end > data_size:
            raise UserError(
                f"{path}: tensor {name} claims bytes {begin}..{end} but the file holds {data_size} data bytes "
                "(truncated or corrupt)"
            )
        if end - begin != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise UserError(f"{path}: tensor {name}: {end - begin} bytes do not match {dtype} shape {list(shape)}")
        entries[name] = (dtype, shape, (begin, end))
    return entries, data_start


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

    def config(self):
        return None

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
        self._config_path = config_path
        self._files = [_SafetensorsFile(f) for f in files]
        self._where: dict[str, _SafetensorsFile] = {}
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
                pickles = sorted(p for p in folder.iterdir() if p.name.lower().endswith((".bin", ".pt", ".pth", ".ckpt")))
                if pickles:
                    refuse_pickle(pickles[0])
                raise UserError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")
        return cls(folder, files, kind="hf", config_path=config if config.is_file() else None)

    @classmethod
    def from_index(cls, index: Path) -> "SafetensorsSource":
        weight_map = _index_weight_map(index)
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

    def config(self):
        if self._config_path is None:
            return None
        try:
            raw = json.loads(self._config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{self._config_path}: not valid JSON") from None
        from bshadow_jax.models.llama import MODEL_TYPES

        # Diagnostics read any architecture's tensors; only llama-family ones have a LlamaConfig.
        if not isinstance(raw, dict) or raw.get("model_type") not in MODEL_TYPES:
            return None
        from bshadow_jax.models.hf import config_from_hf

        try:
            return config_from_hf(raw)
        except UserError as e:
            raise UserError(f"{self._config_path}: {str(e).removeprefix('config.json: ')}") from None


def _index_weight_map(index: Path) -> dict[str, Path]:
    """Tensor name -> shard path from an index; a missing or escaping shard is an error naming it."""
    from bshadow_jax.fileio import safe_join

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{index}: not a valid safetensors index (needs a weight_map of name -> file)") from None
    shards: dict[str, Path] = {}
    for shard in dict.fromkeys(weight_map.values()):
        try:
            p = safe_join(index.parent, shard)
        except UserError:
            raise UserError(f"{index}: shard {shard!r} lies outside the checkpoint folder") from None
        refuse_pickle(p)
        if not p.is_file():
            raise UserError(f"{p}: shard listed in {index.name} is missing")
        shards[shard] = p
    return {name: shards[shard] for name, shard in weight_map.items()}


class GGUFSource(CheckpointSource):
    kind = "gguf"

    def __init__(self, path):
        super().__init__(path)
        from bshadow_jax.models.gguf import GGUFFile

        self._file = GGUFFile(path)
        self._names = sort_layer_order(self._file.names())

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file.shape(name)

    def dtype(self, name: str) -> str:
        return self._file.dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self._file.read(name)

    def config(self):
        from bshadow_jax.models.gguf import SUPPORTED_ARCHS

        if self._file.arch not in SUPPORTED_ARCHS:
            return None
        return self._file.config()

    def close(self) -> None:
        self._file.close()


class OrbaxSource(CheckpointSource):
    """A bshadow run folder (latest step) or an orbax step folder, read one tensor at a time."""

    kind = "orbax"

    def __init__(self, path):
        super().__init__(path)
        try:
            from bshadow_jax.training.checkpoint import ParamsLeaves, load_run_config
        except ImportError:
            raise UserError(f"{self.path}: run folders cannot be read in this install") from None
        train_cfg, step_dir = load_run_config(self.path)
        self._leaves = ParamsLeaves(step_dir)
        self._names = sort_layer_order(self._leaves.names())
        embed = "model.embed_tokens.weight"
        if embed not in self._names:
            raise UserError(f"{self._leaves.item}: no {embed} in the params checkpoint")
        self._cfg = train_cfg.llama_config(self._leaves.shape(embed)[0])

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
        return _NUMPY_TO_ST.get(np_name, np_name.upper())

    def read(self, name: str) -> np.ndarray:
        return self.read_many([name])[0]

    def read_many(self, names: list[str]) -> list[np.ndarray]:
        # one partial restore for all of them: each restore re-reads the whole tree's metadata
        arrays = self._leaves.read_many([self._check(n) for n in names])
        return [np.asarray(arrays[n], dtype=np.float32) for n in names]

    def config(self):
        return self._cfg

    def close(self) -> None:
        self._leaves.close()


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
    """A CheckpointSource for an HF folder, a .safetensors or .gguf file, or a run/orbax folder."""
    name = os.fspath(path)
    refuse_pickle(name)
    p = Path(name)
    if not p.exists():
        raise UserError(f"{p}: no such file or folder")
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return GGUFSource(p)
        if suffix == ".safetensors":
            config = p.parent / "config.json"
            return SafetensorsSource(p, [p], kind="safetensors", config_path=config if config.is_file() else None)
        if suffix == ".json" and p.name.endswith(".index.json"):
            return SafetensorsSource.from_index(p)
        raise UserError(f"{p}: unsupported checkpoint file type {suffix or '(no suffix)'} "
                        "(expected .safetensors, .gguf, or a folder)")
    if not p.is_dir():
        raise UserError(f"{p}: not a file or folder")
    if (p / SAFETENSORS_INDEX).is_file() or (p / SAFETENSORS_FILE).is_file() or (p / "config.json").is_file():
        return SafetensorsSource.from_folder(p)
    if any(p.glob("*.safetensors")):
        return SafetensorsSource.from_folder(p)
    return OrbaxSource(p)


def _maybe(p: Path) -> Path | None:
    return p if p.is_file() else None


def _one_line(e: BaseException) -> str:
    return (" ".join(str(e).split()) or type(e).__name__)[:200]


__all__ = ["CheckpointSource", "open_checkpoint", "layer_order_key", "sort_layer_order"]
