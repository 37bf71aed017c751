"""Aggregation over seeds: means with 95% Student-t intervals, and Welch differences.

Every number a study reports is a mean over seeds with its interval, so the claims can
say whether a difference is larger than the seed-to-seed noise. Intervals of a single
seed are undefined and reported as None (JSON null), never as a fake zero width.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95


def _finite(values: Iterable[Any]) -> np.ndarray:
    arr = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def mean_ci(values: Sequence[float], level: float = LEVEL) -> dict:
    """Mean and the two-sided Student-t interval of the mean over `values` (seeds)."""
    x = _finite(values)
    n = int(x.size)
    out: dict[str, Any] = {"mean": None, "lo": None, "hi": None, "std": None, "n": n,
                           "values": [float(v) for v in x]}
    if n == 0:
        return out
    mean = float(x.mean())
    out["mean"] = mean
    if n < 2:
        return out
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    out.update(std=std, lo=mean - half, hi=mean + half)
    return out


def welch_diff(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> dict:
    """Difference of means a - b with a Welch (unequal variances) t interval."""
    xa, xb = _finite(a), _finite(b)
    out: dict[str, Any] = {"diff": None, "lo": None, "hi": None, "n_a": int(xa.size), "n_b": int(xb.size)}
    if xa.size == 0 or xb.size == 0:
        return out
    diff = float(xa.mean() - xb.mean())
    out["diff"] = diff
    if xa.size < 2 or xb.size < 2:
        return out
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    se2 = va + vb
    if se2 == 0.0:  # identical seeds on both sides: the difference is exact
        out.update(lo=diff, hi=diff)
        return out
    df = se2**2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(se2)
    out.update(lo=diff - half, hi=diff + half)
    return out


def values_of(ci_or_list: Any) -> list[float]:
    """The per-seed values behind an aggregated entry (or a plain list)."""
    if isinstance(ci_or_list, Mapping):
        return list(ci_or_list.get("values") or [])
    return [float(v) for v in ci_or_list]


# ---------------------------------------------------------------- per-seed records -> arm entry

FOOTPRINT_KEYS = ("entropy", "gini", "matrices_for_90pct")
# Per-matrix columns averaged into one number per fine-tune (energy_share is 1/N on average: useless).
_ROW_SKIP = {"name", "component", "layer", "module", "expert", "rows", "cols", "energy_share", "base_fro"}


def delta_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean over analysed matrices of every delta metric column of a diagnose result."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if key in _ROW_SKIP or not (key.startswith("delta_") or key in ("rel_delta", "base_overlap", "intruder_count")):
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                sums.setdefault(key, []).append(v)
    return {k: float(np.mean(v)) for k, v in sums.items() if v}


def seed_footprint(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One seed's footprint numbers: summary.json's footprint plus delta-metric means."""
    fp = dict(summary.get("footprint", {}) or {})
    out = {k: float(v) for k, v in fp.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    out.update(delta_means(rows))
    return out


def _ci_tree(records: Sequence[Mapping[str, Any]]) -> dict:
    """Aggregate a list of same-shaped nested dicts of numbers into CI dicts, key by key."""
    keys: list[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r.get(k) for r in records]
        if any(isinstance(v, Mapping) for v in vals):
            out[k] = _ci_tree([v for v in vals if isinstance(v, Mapping)])
        else:
            nums = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if nums:
                out[k] = mean_ci(nums)
    return out


def aggregate_arm(seeds: Sequence[int], per_seed: Sequence[Mapping[str, Any]]) -> dict:
    """Turn per-seed records {"narrow": {"score", "by_category"}, "broad": ..., "footprint": {...}}
    into the results.json arm entry: every number becomes {"mean", "lo", "hi", "std", "n", "values"}."""
    entry: dict[str, Any] = {"seeds": [int(s) for s in seeds]}
    for section in ("narrow", "broad", "perplexity", "footprint", "extra"):
        recs = [r[section] for r in per_seed if isinstance(r.get(section), Mapping)]
        if recs:
            entry[section] = _ci_tree(recs)
        elif section in ("narrow", "broad", "footprint"):
            entry[section] = {}
    return entry


def metric_values(arm_entry: Mapping[str, Any], path: str) -> list[float]:
    """Per-seed values of `section.key[.key]` in an aggregated arm entry ([] when absent)."""
    node: Any = arm_entry
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return []
        node = node[part]
    return values_of(node) if isinstance(node, Mapping) else []


def gap_values(arm_entry: Mapping[str, Any]) -> list[float]:
    """Per-seed narrow-minus-broad gap (paired by seed order)."""
    n = metric_values(arm_entry, "narrow.score")
    b = metric_values(arm_entry, "broad.score")
    return [x - y for x, y in zip(n, b)]
