"""Which matrices a diagnosis analyses, in which same-shape stacks, and the chunked stream that reads them.

Sources come from `formats` (`open_checkpoint` for files and hub ids, `DictSource` for in-memory
pytrees), seen through `formats.layout.LayoutSource` (flax kernels as [out, in], DenseGeneral
flattened, `--layer-axis` stacks): tensor by tensor, never a whole checkpoint. A plan pairs base and tuned names (after
`--rename`), filters them (`--include`/`--exclude`), says why each left-out tensor was skipped, and
cuts the matrices into chunks under the memory budget; `iter_chunks` reads the next chunk while
the current one is computed.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from bshadow_jax.diagnostics import mesh as meshlib
from bshadow_jax.diagnostics.names import apply_rename, compile_filter, leaf_module, parse_name, parse_rename
from bshadow_jax.errors import UserError
from bshadow_jax.formats.layout import LayoutSource
from bshadow_jax.formats.sources import DictSource, open_checkpoint


@contextlib.contextmanager
def open_source(path_or_params: Any, *, item: str | None = None, layer_axis=(), layout: str | None = None,
                name: str = "<memory>") -> Iterator[Any]:
    """A checkpoint path (through formats.open_checkpoint), an open source, or an in-memory pytree,
    seen through the layout rules (formats.layout: kernels, DenseGeneral, `layer_axis`, `layout`)."""
    if isinstance(path_or_params, LayoutSource) and not layer_axis and layout is None:
        yield path_or_params
    elif isinstance(path_or_params, (str, bytes)) or hasattr(path_or_params, "__fspath__"):
        with open_checkpoint(path_or_params, item=item) as src:
            yield LayoutSource(src, layer_axis, layout)
    elif hasattr(path_or_params, "names") and hasattr(path_or_params, "read"):
        yield LayoutSource(path_or_params, layer_axis, layout)
    else:
        yield LayoutSource(DictSource(path_or_params, name), layer_axis, layout)


# ------------------------------------------------------------------------------------------
# Planning: which matrices, in which stacks
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Item:
    name: str  # row name (base name; "...[e]" for a slice of a 3-D tensor)
    base_name: str | None
    tuned_name: str | None
    index: int | None  # slice of a 3-D tensor
    shape: tuple  # (rows, cols) of the analysed matrix
    layer: int | None = None  # the slice is this layer of a layer-stacked tensor (--layer-axis)


def _stacked(src, name: str) -> bool:
    return bool(getattr(src, "layer_stacked", lambda n: False)(name))


def _stored(src, name: str) -> tuple:
    return tuple(getattr(src, "stored_shape", src.shape)(name))


def _matrix_check(name: str, shape: tuple, layer_stacked: bool = False) -> str | None:
    if layer_stacked:  # one tensor per layer: each must be a matrix
        per = len(shape) - 1
        if per < 2:
            return f"{per}-D tensor per layer (not a matrix)"
        if per > 2:
            return f"{per}-D tensor per layer (only matrices are analysed in a layer-stacked tensor)"
        return "empty matrix" if min(shape[-2:]) == 0 else None
    if len(shape) < 2:
        return f"{len(shape)}-D tensor (not a matrix)"
    if len(shape) > 3:
        return f"{len(shape)}-D tensor (only matrices and stacks of matrices are analysed)"
    if min(shape[-2:]) == 0:
        return "empty matrix"
    return None


def _keep(name: str, include, exclude) -> bool:
    if include is not None and not include.search(name):
        return False
    if exclude is not None and exclude.search(name):
        return False
    return True


def _filters(include, exclude):
    """--include/--exclude as compiled filters (regex strings are compiled; compiled ones pass through)."""
    def one(f, flag):
        return compile_filter(f, flag) if isinstance(f, (str, type(None))) else f

    return one(include, "--include"), one(exclude, "--exclude")


def plan_pairs(base_src, tuned_src, *, rename=(), include=None, exclude=None) -> tuple[list[Item], list[dict]]:
    """Pair tensors by exact name (after --rename on tuned names); items in base order + skipped."""
    rules = parse_rename(rename)
    inc, exc = _filters(include, exclude)
    tuned_map: dict[str, str] = {}
    for tn in tuned_src.names():
        tuned_map.setdefault(apply_rename(tn, rules), tn)
    items: list[Item] = []
    skipped: list[dict] = []
    seen = set()
    for bn in base_src.names():
        seen.add(bn)
        if not _keep(bn, inc, exc):
            continue
        bshape = tuple(base_src.shape(bn))
        why = _matrix_check(bn, bshape, _stacked(base_src, bn))
        if why:
            skipped.append({"name": bn, "reason": why})
            continue
        tn = tuned_map.get(bn)
        if tn is None:
            skipped.append({"name": bn, "reason": "missing in tuned"})
            continue
        tshape = tuple(tuned_src.shape(tn))
        if tshape != bshape or _stacked(tuned_src, tn) != _stacked(base_src, bn):
            bs, ts = _stored(base_src, bn), _stored(tuned_src, tn)
            skipped.append({"name": bn, "reason": f"shape mismatch: base {list(bs)} vs tuned {list(ts)}"})
            continue
        items.extend(_matrix_items(bn, tn, bshape, _stacked(base_src, bn)))
    for name, tn in tuned_map.items():
        if name not in seen and _keep(name, inc, exc):
            skipped.append({"name": name if name == tn else f"{name} (tuned {tn})", "reason": "missing in base"})
    return items, skipped


def _matrix_items(name: str, tuned_name: str | None, shape: tuple, layer_stacked: bool = False) -> list[Item]:
    """One item per matrix: a stacked 3-D tensor (MoE experts, or layers) gives one per slice."""
    if layer_stacked:
        return [Item(f"{name}[{i}]", name, tuned_name, i, shape[1:], layer=i) for i in range(shape[0])]
    if len(shape) == 3:
        return [Item(f"{name}[{e}]", name, tuned_name, e, shape[1:]) for e in range(shape[0])]
    return [Item(name, name, tuned_name, None, shape)]


def plan_single(src, *, include=None, exclude=None) -> tuple[list[Item], list[dict]]:
    inc, exc = _filters(include, exclude)
    items, skipped = [], []
    for n in src.names():
        if not _keep(n, inc, exc):
            continue
        shape = tuple(src.shape(n))
        why = _matrix_check(n, shape, _stacked(src, n))
        if why:
            skipped.append({"name": n, "reason": why})
        else:
            items.extend(_matrix_items(n, None, shape, _stacked(src, n)))
    return items, skipped


def chunk_items(items: Sequence[Item], *, budget_mb: float, n_devices: int = 1, per_matrix_copies: int = 3
                ) -> list[list[Item]]:
    """Group by shape (first-seen order), then cut each group into chunks within the budget."""
    groups: dict[tuple, list[Item]] = {}
    for it in items:
        groups.setdefault(tuple(it.shape), []).append(it)
    chunks = []
    budget = max(1.0, float(budget_mb)) * 2**20
    for shape, group in groups.items():
        per = shape[0] * shape[1] * 4 * per_matrix_copies
        size = max(1, int(budget // per))
        # balanced chunks: the tail is padded up to the common size, so one compile per shape
        n_chunks = -(-len(group) // size)
        size = -(-len(group) // n_chunks)
        for i in range(0, len(group), size):
            chunks.append(group[i:i + size])
    return chunks


def chunk_pad_size(chunk_len: int, first_len: int, n_devices: int) -> int:
    """Stack size a chunk is padded to: its group's first chunk size, rounded up to the mesh."""
    size = max(chunk_len, first_len)
    return -(-size // n_devices) * n_devices


def _read_matrix(src, name: str, index: int | None, cache: dict) -> np.ndarray:
    if index is None:
        x = src.read(name)
    else:
        if name not in cache:
            cache.clear()  # at most one 3-D tensor resident per side
            cache[name] = src.read(name)
        x = cache[name][index]
    return np.asarray(x, dtype=np.float32)


# 2-D tensors are read this many bytes at a time: few calls for kinds with a per-call cost
# (orbax), and a bounded transient copy beside the chunk's stack
READ_BATCH_BYTES = 64 * 2**20


def _read_batches(chunk: Sequence[Item]) -> list[list[int]]:
    """Positions in the chunk, grouped for read_many: one 3-D slice alone, 2-D tensors by bytes."""
    batches: list[list[int]] = []
    size = 0
    for i, it in enumerate(chunk):
        nbytes = 4 * it.shape[0] * it.shape[1]
        joinable = it.index is None and batches and chunk[batches[-1][0]].index is None
        if joinable and size + nbytes <= READ_BATCH_BYTES:
            batches[-1].append(i)
            size += nbytes
        else:
            batches.append([i])
            size = nbytes
    return batches


def _read_names(src, names: list[str], indices: list[int | None], cache: dict) -> list[np.ndarray]:
    read_many = getattr(src, "read_many", None)  # sources that only have read() (in-memory ones) still work
    if len(names) == 1 or read_many is None:
        return [_read_matrix(src, name, index, cache) for name, index in zip(names, indices)]
    return [np.asarray(x, dtype=np.float32) for x in read_many(names)]


def load_chunk(chunk: Sequence[Item], *sources) -> tuple[list[np.ndarray], np.ndarray]:
    """Stacked float32 arrays (one per source) and a finite mask; non-finite slices are zeroed."""
    stacks = []
    finite = np.ones(len(chunk), bool)
    for si, src in enumerate(sources):
        cache: dict = {}
        m, n = chunk[0].shape
        out = np.empty((len(chunk), m, n), np.float32)
        for positions in _read_batches(chunk):
            names = [chunk[i].base_name if si == 0 else chunk[i].tuned_name for i in positions]
            try:
                xs = _read_names(src, names, [chunk[i].index for i in positions], cache)
            except UserError:
                raise
            except Exception as e:  # a reader failing on one tensor names it
                raise UserError(f"{getattr(src, 'path', '?')}: tensor {names[0]}: cannot read "
                                f"({type(e).__name__}: {e})") from e
            for i, name, x in zip(positions, names, xs):
                if x.shape != (m, n):
                    raise UserError(f"{getattr(src, 'path', '?')}: tensor {name}: read shape {x.shape} != {(m, n)}")
                out[i] = x
                if not np.isfinite(out[i]).all():
                    finite[i] = False
            del xs
        stacks.append(out)
    for s in stacks:
        s[~finite] = 0.0
    return stacks, finite


def _chunk_bytes(chunk: Sequence[Item], n_sources: int) -> int:
    m, n = chunk[0].shape
    return 4 * m * n * len(chunk) * n_sources


def iter_chunks(chunks: Sequence[Sequence[Item]], *sources, prefetch_limit_bytes: float | None = None
                ) -> Iterator[tuple[Sequence[Item], list, np.ndarray]]:
    """Yield loaded chunks, reading the next one in a background thread while the caller computes.

    With prefetch_limit_bytes, the next chunk is read ahead only when it and the current one
    together fit in it: two embedding-sized chunks resident at once would double the peak.
    """
    if not chunks:
        return

    def fits(i: int) -> bool:
        return prefetch_limit_bytes is None or (
            _chunk_bytes(chunks[i], len(sources)) + _chunk_bytes(chunks[i + 1], len(sources)) <= prefetch_limit_bytes)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as ex:
        fut = ex.submit(load_chunk, chunks[0], *sources)
        for i, chunk in enumerate(chunks):
            stacks, finite = fut.result()
            fut = None
            if i + 1 < len(chunks) and fits(i):
                fut = ex.submit(load_chunk, chunks[i + 1], *sources)
            yield chunk, stacks, finite
            del stacks
            if fut is None and i + 1 < len(chunks):
                fut = ex.submit(load_chunk, chunks[i + 1], *sources)


def row_labels(item: Item) -> dict:
    """name/component/layer/module/expert/rows/cols of one analysed matrix."""
    name = item.base_name or item.name
    p = parse_name(name)
    layer, module = p["layer"], p["module"]
    if item.layer is not None:  # a slice of a layer-stacked tensor: the slice index is the layer
        layer, expert = item.layer, p["expert"]
        if module == name:  # no block rule matched (decoder.layers.mlp.wi_0.kernel): the leaf's module
            module = leaf_module(name)
    else:
        expert = item.index if item.index is not None else p["expert"]
    return {
        "name": item.name,
        "component": p["component"],
        "layer": layer,
        "module": module,
        "expert": expert,
        "rows": int(item.shape[0]),
        "cols": int(item.shape[1]),
    }


def plan_chunks(items, mesh, budget_mb, *, copies: int):
    """(mesh, device count, chunks under the memory budget, first chunk length per shape).

    Every later chunk of a shape is padded to its first chunk's length: one compile per shape.
    """
    mesh = meshlib.default_mesh(mesh)
    nd = meshlib.mesh_size(mesh)
    chunks = chunk_items(items, budget_mb=budget_mb, n_devices=nd, per_matrix_copies=copies)
    first_len: dict[tuple, int] = {}
    for c in chunks:
        first_len.setdefault(tuple(c[0].shape), len(c))
    return mesh, nd, chunks, first_len


def progress_bar(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
    return tqdm(total=total, disable=disable, unit="matrix", desc=desc, file=sys.stderr)


def check_item(item: str | None, *sources) -> None:
    """An --item that no source had a multi-item step to pick from is a mistake, not a no-op."""
    if item is not None and not any(getattr(s, "item_applied", False) for s in sources):
        paths = " and ".join(str(getattr(s, "path", "?")) for s in sources)
        raise UserError(f"{paths}: --item {item}: no multi-item orbax step to pick it from")


# stored dtypes the readers dequantize (GGUF block formats): worth a sentence in the report
_FLOAT_STORAGE = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "float64", "float32", "float16", "bfloat16"}


def describe_source(src) -> dict:
    """What a report says about a checkpoint: its path, kind, and the stored dtypes of its tensors
    (count per dtype), with `dequantized` listing the quantized ones the reader turned into float32."""
    dtypes: dict[str, int] = {}
    for n in src.names():
        try:
            d = str(src.dtype(n))
        except Exception:  # noqa: BLE001 - a description must not fail a diagnosis
            d = "?"
        dtypes[d] = dtypes.get(d, 0) + 1
    quant = sorted(d for d in dtypes if d not in _FLOAT_STORAGE and d != "?" and not d.startswith(("I", "U", "int", "uint")))
    return {"path": str(getattr(src, "path", "<memory>")), "kind": getattr(src, "kind", "?"),
            "dtypes": dict(sorted(dtypes.items())), "dequantized": quant}
