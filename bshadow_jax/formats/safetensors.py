"""Safetensors files and shard indexes, validated before anything is read.

A header is checked against the real file size (offsets, dtypes, byte counts), so a corrupt
or hostile file gives a one-line `UserError` instead of a huge allocation. A shard index may
only name safetensors files inside its own folder: pickle shards and escaping paths are refused.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bshadow_jax.errors import UserError, one_line, refuse_pickle
from bshadow_jax.fileio import safe_join

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors' own limit on the JSON header; anything larger is corrupt or hostile
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
NUMPY_TO_ST = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                 "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
# dtypes safe_open(framework="numpy") cannot build; read through ml_dtypes from the raw bytes
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class SafetensorsFile:
    """One safetensors file: validated header, tensors read one at a time."""

    def __init__(self, path: Path):
        self.path = path
        self.entries, self.data_start = read_header(path)

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
            raise UserError(f"{self.path}: not a readable safetensors file ({one_line(e)})") from None
        try:
            arr = np.asarray(handle.get_tensor(name), dtype=np.float32)  # get_tensor copies out of the map
        except Exception as e:
            raise UserError(f"{self.path}: tensor {name} unreadable ({one_line(e)})") from None
        finally:
            ctx.__exit__(None, None, None)
        return arr


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], tuple[int, int]]], int]:
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


def index_weight_map(index: Path) -> dict[str, Path]:
    """Tensor name -> shard path from an index; a missing or escaping shard is an error naming it."""
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
