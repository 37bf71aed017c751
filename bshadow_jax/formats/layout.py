"""How a stored tensor becomes the matrices diagnostics analyse: flax kernels, DenseGeneral, scanned layers.

    src = LayoutSource(open_checkpoint(path), layer_axis=["^decoder\\.layers\\.=1"])
    src.shape(name)          # the analysed shape: [out, in], or [layers, out, in] for a stacked leaf
    src.layer_stacked(name)  # True: axis 0 is the layer axis, one matrix per layer

Rules (docs/cli.md#foreign-pytrees):
  - A flax `kernel` leaf is stored [in, out]; it is analysed as its transpose [out, in], so that
    left singular vectors live in the output space as for Hugging Face [out, in] weights.
  - A kernel with more than 2 dims is first flattened to inputs x outputs: the first
    `DENSE_GENERAL_RULES` pattern that matches the name says how many leading axes are inputs;
    no match: the first axis is the input (flax DenseGeneral with one input axis).
  - `--layer-axis REGEX=AXIS`: a leaf whose name matches REGEX holds one tensor per index along
    AXIS (of the stored shape), and that index is the layer; the rules above then apply to each slice.
  - `LAYOUTS` are named sets of layer-axis rules (`--layout maxtext`).
Every other tensor (Hugging Face weights, embeddings, 3-D expert stacks) is passed through as stored.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

import numpy as np

from bshadow_jax.errors import UserError
from bshadow_jax.formats.sources import CheckpointSource

KERNEL_LEAF = "kernel"

# (pattern on the tensor name, number of leading input axes; negative: all but that many trailing axes)
DENSE_GENERAL_RULES: list[tuple[str, int]] = [
    # attention in-projections [emb, heads, head_dim] -> [emb, heads*head_dim] (MaxText, nanodo)
    (r"(?:^|\.)(?:query|key|value|qkv|qkv_proj|wq|wk|wv|wqkv)\.kernel$", 1),
    # attention out-projections [heads, head_dim, emb] -> [heads*head_dim, emb]
    # (MaxText `self_attention.out`, nanodo `attn_out_proj`)
    (r"(?:^|\.)(?:out|attn_out_proj|out_proj|o_proj|wo)\.kernel$", -1),
]

# MaxText (`scan_layers: True`, `param_scan_axis: 1` in src/MaxText/configs/base.yml): every
# leaf under decoder.layers has the layer axis at index 1 ([emb, layers, heads, head_dim] for a
# query kernel, [emb, layers] for a norm scale).
LAYOUTS: dict[str, list[tuple[str, int]]] = {
    "maxtext": [(r"^decoder\.layers\.", 1)],
}


@dataclasses.dataclass(frozen=True)
class LayerAxisRule:
    pattern: str
    axis: int
    flag: str  # how the user gave it, for error messages

    @property
    def regex(self) -> re.Pattern:
        return re.compile(self.pattern)


def parse_layer_axis(rules: Iterable[Any] = (), layout: str | None = None) -> list[LayerAxisRule]:
    """--layer-axis rules ("REGEX=AXIS" strings or (regex, axis) pairs), then those of --layout.

    Raises:
      UserError: a rule without "=", an axis that is not an integer, a bad regex, an unknown layout.
    """
    out = []
    for r in rules or ():
        if isinstance(r, (tuple, list)):
            pat, axis = r
            flag = f"--layer-axis {pat}={axis}"
        else:
            flag = f"--layer-axis {r}"
            if "=" not in r:
                raise UserError(f"{flag}: expected REGEX=AXIS")
            pat, axis = r.rsplit("=", 1)
        try:
            axis = int(axis)
        except (TypeError, ValueError):
            raise UserError(f"{flag}: AXIS must be an integer") from None
        try:
            re.compile(pat)
        except re.error as e:
            raise UserError(f"{flag}: invalid regular expression ({e})") from None
        out.append(LayerAxisRule(pat, axis, flag))
    if layout is not None:
        if layout not in LAYOUTS:
            raise UserError(f"--layout {layout}: unknown layout (known: {', '.join(sorted(LAYOUTS))})")
        out.extend(LayerAxisRule(p, a, f"--layout {layout}") for p, a in LAYOUTS[layout])
    return out


def _inputs(name: str, ndim: int) -> int:
    for pat, n in DENSE_GENERAL_RULES:
        if re.search(pat, name):
            return n if n > 0 else ndim + n
    return 1


@dataclasses.dataclass(frozen=True)
class View:
    stored: tuple[int, ...]
    axis: int | None  # layer axis of the stored shape
    split: int | None  # kernels: leading input axes of a slice (None: not a kernel)
    shape: tuple[int, ...]  # analysed shape

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.axis is not None:
            x = np.moveaxis(x, self.axis, 0)
        if self.split is None:
            return x
        lead = x.shape[:1] if self.axis is not None else ()
        t = x.shape[len(lead):]
        x = x.reshape(*lead, math.prod(t[:self.split]), math.prod(t[self.split:]))
        return np.swapaxes(x, -1, -2)


def view_of(name: str, stored: tuple[int, ...], axis: int | None) -> View:
    """The analysed view of one stored tensor (`axis`: its layer axis, already checked in range)."""
    if axis is not None:
        lead, t = (stored[axis],), stored[:axis] + stored[axis + 1:]
    else:
        lead, t = (), tuple(stored)
    is_kernel = name.rsplit(".", 1)[-1] == KERNEL_LEAF and len(t) >= 2
    if not is_kernel:
        return View(tuple(stored), axis, None, lead + t)
    split = min(max(_inputs(name, len(t)), 1), len(t) - 1)
    return View(tuple(stored), axis, split, lead + (math.prod(t[split:]), math.prod(t[:split])))


class LayoutSource(CheckpointSource):
    """A source seen through the layout rules: same names, analysed shapes, transformed reads."""

    def __init__(self, inner, layer_axis: Iterable[Any] = (), layout: str | None = None):
        self.inner = inner
        self.path = getattr(inner, "path", "<memory>")
        self.kind = getattr(inner, "kind", "")
        rules = parse_layer_axis(layer_axis, layout)
        used = [False] * len(rules)
        self._views: dict[str, View] = {}
        for name in inner.names():
            stored = tuple(int(d) for d in inner.shape(name))
            axis = None
            for i, rule in enumerate(rules):
                if rule.regex.search(name):
                    used[i] = True
                    if not -len(stored) <= rule.axis < len(stored):
                        raise UserError(f"{self.path}: {rule.flag}: axis {rule.axis} is out of range for tensor "
                                        f"{name} of shape {list(stored)}")
                    axis = rule.axis % len(stored)
                    break
            self._views[name] = view_of(name, stored, axis)
        for rule, u in zip(rules, used):
            if not u:
                raise UserError(f"{self.path}: {rule.flag}: the pattern {rule.pattern!r} matches no tensor")

    def __getattr__(self, attr):  # config_path, model_section, file, ... of the inner source
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def names(self) -> list[str]:
        return list(self._views)

    def _view(self, name: str) -> View:
        try:
            return self._views[name]
        except KeyError:
            raise self._unknown(name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._view(name).shape

    def stored_shape(self, name: str) -> tuple[int, ...]:
        return self._view(name).stored

    def layer_stacked(self, name: str) -> bool:
        return self._view(name).axis is not None

    def dtype(self, name: str) -> str:
        return self.inner.dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self._view(name).apply(np.asarray(self.inner.read(name)))

    def read_many(self, names: list[str]) -> list[np.ndarray]:
        xs = self.inner.read_many(names) if hasattr(self.inner, "read_many") else [self.inner.read(n) for n in names]
        return [self._view(n).apply(np.asarray(x)) for n, x in zip(names, xs)]

    def close(self) -> None:
        self.inner.close()


__all__ = ["DENSE_GENERAL_RULES", "LAYOUTS", "LayerAxisRule", "LayoutSource", "View", "parse_layer_axis", "view_of"]
