"""Footprint statistics: how the update energy spreads over the matrices, and group means.

  entropy             Shannon entropy of the energy shares over log(N): 1 = evenly spread
  gini                Gini coefficient of the shares: 0 = evenly spread, -> 1 = one matrix
  matrices_for_90pct  fewest matrices (largest shares first) holding 90% of the energy, over N

Variants (docs/metrics.md#footprint-variants): blocks_only (token embeddings and output head
left out) and per_parameter (each share divided by the matrix's rows * cols, renormalised).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def footprint_stats(shares: Sequence[float]) -> dict:
    """Footprint statistics of per-matrix energy shares (the footprint of summary.json).

    Args:
        shares: one energy share per matrix (normalised here; all 0 or empty is allowed).

    Returns:
        {"entropy", "gini", "matrices_for_90pct", "matrices" (N)}. matrices_for_90pct is r / N
        for the smallest r whose largest shares reach 90% of the total (less a 1e-12 relative
        tolerance, so that exactly 90% counts); all 0.0 when there is no energy.
    """
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


NON_BLOCK_MODULES = ("embed", "lm_head")  # diagnostics/names.py: token embeddings and the output head


def blocks_only(rows: Sequence[dict]) -> dict:
    """footprint_stats over the matrices whose module is not in NON_BLOCK_MODULES, their shares
    renormalised; "energy_share" is the fraction of the total energy they hold."""
    s = np.array([float(r["energy_share"]) for r in rows if r.get("module") not in NON_BLOCK_MODULES], np.float64)
    out = footprint_stats(s)
    out["energy_share"] = float(s.sum())
    return out


def per_parameter(rows: Sequence[dict]) -> dict:
    """footprint_stats of each matrix's energy share divided by its parameter count rows * cols
    (renormalised): how the update's energy density spreads, big matrices not counting for more."""
    s = np.array([float(r["energy_share"]) / max(1, int(r["rows"]) * int(r["cols"])) for r in rows], np.float64)
    return footprint_stats(s)


def group_means(rows: Sequence[dict], key: str, metric_cols: Sequence[str]) -> dict:
    """Per-group summary of metric rows for one grouping column.

    Args:
        rows: metric rows (dicts); a missing or empty `key` value groups as "none".
        key: the grouping column ("layer", "module", "component").
        metric_cols: columns averaged per group (None and NaN values left out: a column not
            computed, as in metrics="values", is None).

    Returns:
        {group: {"matrices", "energy_share" (sum, when the rows have it), <metric> (mean or
        None) ...}}, numeric groups first in numeric order, then the others alphabetically.
    """
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
            vals = [float(r[c]) for r in rs if c in r and r[c] is not None and not math.isnan(float(r[c]))]
            g[c] = float(np.mean(vals)) if vals else None
        out[k] = g
    return out
