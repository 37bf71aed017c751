"""Parameter pytrees as flat name -> leaf mappings: the one naming rule every reader and writer uses.

A leaf's name is its key path joined with "." (`model.layers.0.mlp.up_proj.weight`), the
Hugging Face spelling that the model's param tree mirrors. Sequence positions become their
index (`layers.3`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping


def key_name(key: Any) -> str:
    """One key of a jax key path (DictKey, SequenceKey, GetAttrKey, or a plain key) as text."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(key_path) -> str:
    """A jax key path as a dotted tensor name."""
    return ".".join(key_name(k) for k in key_path)


def flatten(tree: Any, *, is_leaf: Callable[[Any], bool] | None = None, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and lists/tuples of them) -> {dotted name: leaf}, in insertion order.

    Args:
      tree: a mapping of mappings whose leaves are arrays (or anything `is_leaf` accepts).
      is_leaf: called on every mapping or sequence before descending; True stops there
        (`param_shapes` trees use it to keep shape tuples whole).
      prefix: a name to put before every key.

    Returns:
      A flat dict. A non-mapping `tree` with an empty prefix is the single leaf named "".
    """
    out: dict[str, Any] = {}

    def walk(node: Any, name: str) -> None:
        if is_leaf is not None and is_leaf(node):
            out[name] = node
        elif isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(node, (list, tuple)) and name:
            for i, v in enumerate(node):
                walk(v, f"{name}.{i}")
        else:
            out[name] = node

    walk(tree, prefix)
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of `flatten` for mapping trees; numeric keys stay strings ("0", "1", ...)."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


PARAMS_KEY = "params"
NNX_VALUE_KEY = "value"


def params_view(paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """{key path: tensor name} of the leaves a foreign tree's weights are, in the given order.

    - When some leaf sits under a top-level `params` key (a flax TrainState, linen variables
      `{"params": ...}`, MaxText's `items`), only that subtree is kept, and the key is dropped;
      again while the kept subtree has a `params` key of its own (`params.params.decoder...`).
      Optimizer moments and step counters beside it are never named.
    - When every kept leaf ends in `value` (an nnx State written as it is), that key is dropped.

    Trees without either (bshadow's own, Hugging Face names) keep their dotted names.
    """
    depth, kept = 0, list(paths)
    while True:
        inner = [p for p in kept if len(p) > depth + 1 and p[depth] == PARAMS_KEY]
        if not inner:
            break
        kept, depth = inner, depth + 1
    strip = 1 if kept and all(len(p) > depth + 1 and p[-1] == NNX_VALUE_KEY for p in kept) else 0
    return {p: ".".join(p[depth:len(p) - strip]) for p in kept}
