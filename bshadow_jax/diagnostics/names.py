"""Tensor-name parsing (docs/cli.md#name-parsing) and the --rename / --include / --exclude helpers.

Name parsing is two small tables that users can extend:
  COMPONENT_RULES: (regex, component); the first that `re.search`es the name wins, else
                   "language_model".
  NAME_RULES:      NameRule(regex, module=..., layer=...); the first that matches fills
                   layer/module/expert from the named groups (?P<layer>), (?P<module>),
                   (?P<expert>) or from the fixed fields. No match: module = full name, no layer.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from bshadow_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class NameRule:
    pattern: str
    module: str | None = None  # fixed module (else the (?P<module>) group)
    component: str | None = None  # fixed component overriding COMPONENT_RULES

    @property
    def regex(self) -> re.Pattern:
        return _compile(self.pattern)


_CACHE: dict[str, re.Pattern] = {}


def _compile(p: str) -> re.Pattern:
    if p not in _CACHE:
        _CACHE[p] = re.compile(p)
    return _CACHE[p]


# Projector first: Qwen-VL's `visual.merger.*` is the projector, not the vision tower.
COMPONENT_RULES: list[tuple[str, str]] = [
    (r"(?:^|\.)(?:multi_modal_projector|mm_projector|merger)(?:\.|$)", "projector"),
    (r"(?:^|\.)(?:vision_tower|vision_model|visual)(?:\.|$)", "vision"),
]

# a block: `layers.3.` (HF, nnx lists), `layers_3.` (flax linen lists, MaxText unscanned), also
# `layer`, `blocks` and `h` with either separator
_BLOCK = r"(?:^|\.)(?:layers|h|blocks|layer)[._](?P<layer>\d+)\."
# the parameter's own name, not a module: HF `weight`/`bias`, flax `kernel`/`bias`/`embedding`
_PARAM_LEAVES = ("weight", "bias", "kernel", "embedding")
_LEAF_ALT = "|".join(_PARAM_LEAVES)
_LEAF = rf"(?P<module>(?!(?:{_LEAF_ALT})$)[^.]+)(?:\.(?:{_LEAF_ALT}))?$"
NAME_RULES: list[NameRule] = [
    NameRule(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|token_embedder|embed)(?:\.|$)",
             module="embed"),
    NameRule(r"(?:^|\.)lm_head(?:\.|$)", module="lm_head"),
    # a parameter straight in a block list (nnx `blocks.1.kernel`): the list is the module
    NameRule(rf"(?:^|\.)(?P<module>layers|h|blocks|layer)[._](?P<layer>\d+)\.(?:{_LEAF_ALT})$"),
    # MoE: model.layers.{i}.mlp.experts.{e}.gate_proj.weight
    NameRule(_BLOCK + r"(?:.*\.)?experts\.(?P<expert>\d+)\.(?:.*\.)?" + _LEAF),
    # llama/qwen2/mistral/gemma `self_attn.q_proj`, GPT-2 `attn.c_attn`, stacked `mlp.experts.gate_up_proj`
    NameRule(_BLOCK + r"(?:.*\.)?" + _LEAF),
]


def register_name_rule(rule: NameRule | str, *, module: str | None = None, component: str | None = None,
                       first: bool = True) -> NameRule:
    """Add a name rule.

    Args:
        rule: a NameRule, or its regex pattern.
        module, component: the fixed fields of a rule given as a pattern.
        first: insert ahead of the built-ins (so it wins), else append.

    Returns:
        The registered NameRule (its pattern compiled: a bad one fails here).
    """
    if isinstance(rule, str):
        rule = NameRule(rule, module=module, component=component)
    rule.regex  # compile now: a bad pattern fails at registration
    if first:
        NAME_RULES.insert(0, rule)
    else:
        NAME_RULES.append(rule)
    return rule


def leaf_module(name: str) -> str:
    """The last dotted part of a name that is not a parameter leaf (`weight`, `bias`, `kernel`, `embedding`)."""
    parts = name.split(".")
    while len(parts) > 1 and parts[-1] in _PARAM_LEAVES:
        parts.pop()
    return parts[-1]


def parse_name(name: str) -> dict:
    """{component, layer (int|None), module, expert (int|None)} of a tensor name."""
    component = "language_model"
    for pat, comp in COMPONENT_RULES:
        if _compile(pat).search(name):
            component = comp
            break
    for rule in NAME_RULES:
        m = rule.regex.search(name)
        if not m:
            continue
        g = m.groupdict()
        layer = int(g["layer"]) if g.get("layer") is not None else None
        expert = int(g["expert"]) if g.get("expert") is not None else None
        module = rule.module or g.get("module") or name
        return {"component": rule.component or component, "layer": layer, "module": module, "expert": expert}
    return {"component": component, "layer": None, "module": name, "expert": None}


# ------------------------------------------------------------------------------------------
# pairing and filtering
# ------------------------------------------------------------------------------------------

def parse_rename(rules: Iterable[str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """--rename rules as (OLD prefix, NEW prefix) pairs.

    Args:
        rules: "OLD=NEW" strings or (old, new) pairs; None or empty for none.

    Returns:
        The (old, new) pairs in order.

    Raises:
        UserError: a string without "=" or an empty OLD prefix.
    """
    out = []
    for r in rules or ():
        if isinstance(r, (tuple, list)):
            old, new = r
        else:
            if "=" not in r:
                raise UserError(f"--rename {r}: expected OLD=NEW")
            old, new = r.split("=", 1)
        if not old:
            raise UserError(f"--rename {r}: OLD prefix is empty")
        out.append((old, new))
    return out


def apply_rename(name: str, rules: Sequence[tuple[str, str]]) -> str:
    """`name` with the first matching OLD prefix replaced by its NEW one (unchanged if none matches)."""
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def compile_filter(pattern: str | None, flag: str) -> re.Pattern | None:
    """The compiled --include/--exclude regex (None for None); `flag` names it in the error.

    Raises:
        UserError: an invalid regular expression.
    """
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"{flag} {pattern!r}: invalid regular expression ({e})") from None
