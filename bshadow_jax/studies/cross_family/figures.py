"""The cross-family study's three figures (footprint bars, energy by component/module, footprint curves).

Each takes the pair records and a PNG path, writes the PNG atomically (`reporting.save_figure`)
and returns its file name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bshadow_jax.reporting import footprint_curves_figure, save_figure, subplots


def bars_figure(records: list[dict], path: Path) -> str:
    names = [r["name"] for r in records]
    fig, axes = subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(axes, ("entropy", "gini", "delta_effective_rank"),
                              ("footprint entropy", "gini of energy shares", "mean delta effective rank")):
        ax.bar(range(len(names)), [r["footprint"].get(key, np.nan) for r in records],
               color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def components_figure(records: list[dict], path: Path, key: str, title: str) -> str:
    groups: list[str] = []
    for r in records:
        for g in r[key]:
            if g not in groups:
                groups.append(g)
    fig, ax = subplots(figsize=(max(6, 0.8 * len(records) + 3), 4))
    bottom = np.zeros(len(records))
    for i, g in enumerate(groups):
        vals = np.array([r[key].get(g, 0.0) for r in records])
        ax.bar(range(len(records)), vals, bottom=bottom, label=g, color=f"C{i % 10}")
        bottom += vals
    ax.set_xticks(range(len(records)), [r["name"] for r in records], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("share of update energy")
    ax.set_title(title)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save_figure(fig, path)


def curves_figure(records: list[dict], path: Path) -> str:
    return footprint_curves_figure([(r["name"], r["sorted_shares"]) for r in records], path)
