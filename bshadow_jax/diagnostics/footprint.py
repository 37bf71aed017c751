"""Name parsing (DESIGN.md "Name parsing") and footprint aggregation.

Name parsing is two small tables that users can extend:
  COMPONENT_RULES: (regex, component); the first that `re.search`es the name wins, else
                   "language_model".
  NAME_RULES:      NameRule(regex, module=..., layer=...); the first that matches fills
                   layer/module/expert from the named groups (?P<layer>), (?P<module>),
                   (?P<expert>) or from the fixed fields. No match: module = full name, no layer.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Sequence

import numpy as np


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

_BLOCK = r"(?:^|\.)(?:layers|h|blocks|layer)\.(?P<layer>\d+)\."
_LEAF = r"(?P<module>(?!(?:weight|bias)$)[^.]+)(?:\.(?:weight|bias))?$"
NAME_RULES: list[NameRule] = [
    NameRule(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings)(?:\.|$)", module="embed"),
    NameRule(r"(?:^|\.)lm_head(?:\.|$)", module="lm_head"),
    # MoE: model.layers.{i}.mlp.experts.{e}.gate_proj.weight
    NameRule(_BLOCK + r"(?:.*\.)?experts\.(?P<expert>\d+)\.(?:.*\.)?" + _LEAF),
    # llama/qwen2/mistral/gemma `self_attn.q_proj`, GPT-2 `attn.c_attn`, stacked `mlp.experts.gate_up_proj`
    NameRule(_BLOCK + r"(?:.*\.)?" + _LEAF),
]


def register_name_rule(rule: NameRule | str, *, module: str | None = None, component: str | None = None,
                       first: bool = True) -> NameRule:
    """Add a rule (ahead of the built-ins by default, so it wins)."""
    if isinstance(rule, str):
        rule = NameRule(rule, module=module, component=component)
    rule.regex  # compile now: a bad pattern fails at registration
    if first:
        NAME_RULES.insert(0, rule)
    else:
        NAME_RULES.append(rule)
    return rule


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
# Pairing helpers
# ------------------------------------------------------------------------------------------

def parse_rename(rules: Iterable[str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    from bshadow_jax.errors import UserError

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
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def compile_filter(pattern: str | None, flag: str):
    from bshadow_jax.errors import UserError

    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"{flag} {pattern!r}: invalid regular expression ({e})") from None


# ------------------------------------------------------------------------------------------
# Footprint aggregation
# ------------------------------------------------------------------------------------------

def footprint_stats(shares: Sequence[float]) -> dict:
    """entropy, gini and matrices_for_90pct of energy shares (summing to 1, or all 0)."""
    s = np.asarray(shares, dtype=np.float64)
    n = s.size
    total = s.sum()
    if n == 0 or not total > 0:
        return {"entropy": 0.0, "gini": 0.0, "matrices_for_90pct": 0.0, "matrices": int(n)}
    s = s / total
    pos = s > 0
    h = -float(np.sum(s[pos] * np.log(s[pos])))
    entropy = h / math.log(n) if n > 1 else 0.0
    asc = np.sort(s)
    i = np.arange(1, n + 1)
    gini = float(np.sum((2 * i - n - 1) * asc) / (n * asc.sum()))
    cum = np.cumsum(np.sort(s)[::-1])
    r = int(np.searchsorted(cum, 0.9 * cum[-1] * (1 - 1e-12), side="left")) + 1
    return {"entropy": entropy, "gini": gini, "matrices_for_90pct": min(r, n) / n, "matrices": int(n)}


def group_means(rows: Sequence[dict], key: str, metric_cols: Sequence[str]) -> dict:
    """{group: {"matrices", "energy_share" (sum), <metric> (mean) ...}} for one grouping column."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        k = r.get(key)
        groups.setdefault("none" if k is None or k == "" else str(k), []).append(r)

    def order(k):
        return (0, int(k), "") if k.isdigit() else (1, 0, k)

    out = {}
    for k in sorted(groups, key=order):
        rs = groups[k]
        g = {"matrices": len(rs)}
        if any("energy_share" in r for r in rs):
            g["energy_share"] = float(sum(r.get("energy_share", 0.0) for r in rs))
        for c in metric_cols:
            vals = [float(r[c]) for r in rs if c in r and r[c] is not None]
            g[c] = float(np.mean(vals)) if vals else None
        out[k] = g
    return out
