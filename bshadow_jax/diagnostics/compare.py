"""One base against several fine-tunes: labels, the side-by-side table and figures (comparison.*).

`bshadow diagnose BASE T1 T2 ...` writes each pair's usual files under DIR/<label>/ and, from the
pairs' DiagnoseResults, `comparison.csv`, `comparison.md` and three figures that set the footprints
side by side (docs/outputs.md#comparison-output).
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bshadow_jax.fileio import atomic_write_text, sanitize_filename
from bshadow_jax.reporting import docs_ref, fmt, footprint_curves_figure, module_key, num, save_figure, subplots, table

# the columns of comparison.csv, one row per tuned checkpoint
COMPARISON_COLS = (
    "label", "tuned", "matrices", "skipped", "entropy", "gini", "matrices_for_90pct",
    "entropy_blocks_only", "total_delta_energy", "embed_lm_head_share", "top_module", "top_module_share",
    "mean_rel_delta", "mean_delta_effective_rank", "mean_delta_stable_rank", "mean_base_overlap",
    "mean_intruder_count",
)
FIG_BARS = "comparison_footprints.png"
FIG_MODULES = "comparison_modules.png"
FIG_CURVES = "comparison_curves.png"


def unique_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each tuned path's last component as a folder name, made unique.

    Equal names take their parent folder in front ("runA_final", "runB_final"), and a name still
    taken gets a number ("final-2").
    """
    def last(p, n: int) -> str:
        parts = [x for x in Path(os.fspath(p)).parts if x not in ("/", "")]
        return sanitize_filename("_".join(parts[-n:]) or "tuned")

    labels = [last(p, 1) for p in paths]
    counts = defaultdict(int)
    for lab in labels:
        counts[lab] += 1
    labels = [last(p, 2) if counts[lab] > 1 else lab for p, lab in zip(paths, labels)]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}-{seen[lab]}")
    return out


def _mean(rows: Sequence[Mapping], col: str) -> float:
    vals = [num(r.get(col)) for r in rows]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _module_shares(rows: Sequence[Mapping]) -> dict[str, float]:
    shares: dict[str, float] = defaultdict(float)
    for r in rows:
        s = num(r.get("energy_share"))
        if math.isfinite(s):
            shares[str(r.get("module"))] += s
    return dict(shares)


def comparison_row(label: str, result) -> dict[str, Any]:
    """One tuned checkpoint's row of comparison.csv from its DiagnoseResult."""
    rows, summary = result.rows, result.summary
    fp = summary.get("footprint", {})
    blocks = summary.get("footprint_blocks_only") or {}
    mods = _module_shares(rows)
    top = max(mods.items(), key=lambda kv: kv[1]) if mods else (None, float("nan"))
    return {
        "label": label,
        "tuned": summary.get("tuned"),
        "matrices": len(rows),
        "skipped": len(summary.get("skipped", [])),
        "entropy": fp.get("entropy"),
        "gini": fp.get("gini"),
        "matrices_for_90pct": fp.get("matrices_for_90pct"),
        "entropy_blocks_only": blocks.get("entropy"),
        "total_delta_energy": fp.get("total_delta_energy"),
        "embed_lm_head_share": mods.get("embed", 0.0) + mods.get("lm_head", 0.0),
        "top_module": top[0],
        "top_module_share": top[1],
        "mean_rel_delta": _mean(rows, "rel_delta"),
        "mean_delta_effective_rank": _mean(rows, "delta_effective_rank"),
        "mean_delta_stable_rank": _mean(rows, "delta_stable_rank"),
        "mean_base_overlap": _mean(rows, "base_overlap"),
        "mean_intruder_count": _mean(rows, "intruder_count"),
    }


def _csv(rows: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COMPARISON_COLS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None or (isinstance(r.get(c), float) and not math.isfinite(r[c]))
                        else r[c]) for c in COMPARISON_COLS})
    return buf.getvalue()


def _bars_figure(out: Path, crow: Sequence[Mapping]) -> str:
    labels = [r["label"] for r in crow]
    fig, axes = subplots(1, 3, figsize=(max(9.0, 1.2 * len(labels) + 6), 3.6), squeeze=False)
    for ax, key, title in zip(axes[0], ("entropy", "gini", "mean_delta_effective_rank"),
                              ("footprint entropy", "Gini of energy shares", "mean ΔW effective rank")):
        ax.bar(range(len(labels)), [num(r[key]) for r in crow], color=[f"C{i % 10}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, out / FIG_BARS)


def _modules_figure(out: Path, labels: Sequence[str], results: Sequence[Any]) -> str:
    shares = [_module_shares(r.rows) for r in results]
    mods = sorted({m for s in shares for m in s}, key=module_key)
    fig, axes = subplots(figsize=(max(6.0, 1.0 * len(labels) + 4), 4.0), squeeze=False)
    ax = axes[0][0]
    bottom = np.zeros(len(labels))
    for i, m in enumerate(mods):
        vals = np.array([s.get(m, 0.0) for s in shares])
        ax.bar(range(len(labels)), vals, bottom=bottom, label=m, color=f"C{i % 10}",
               hatch="//" if i >= 10 else None)  # more modules than colours: hatch the second round
        bottom += vals
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of update energy")
    ax.set_title("update energy by module")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return save_figure(fig, out / FIG_MODULES)


def write_comparison(out_dir: str | os.PathLike, base: str, labels: Sequence[str], results: Sequence[Any]) -> list[dict]:
    """comparison.csv, comparison.md and the figures for one base against several fine-tunes.

    Args:
        out_dir: the (temporary) output folder; each pair's own files sit in out_dir/<label>/.
        base: the base checkpoint, as given.
        labels: one folder name per fine-tune (`unique_labels`).
        results: the DiagnoseResult of each pair, in the same order.

    Returns:
        The comparison rows (as in comparison.csv).
    """
    out = Path(out_dir)
    crow = [comparison_row(lab, res) for lab, res in zip(labels, results)]
    atomic_write_text(out / "comparison.csv", _csv(crow))
    figs = [_bars_figure(out, crow), _modules_figure(out, labels, results), footprint_curves_figure(
        [(lab, [r.get("energy_share") for r in res.rows]) for lab, res in zip(labels, results)], out / FIG_CURVES)]
    head = ["fine-tune", "matrices", "entropy", "gini", "matrices_for_90pct", "embed + lm_head share",
            "top module (share)", "mean ΔW eff. rank", "mean base_overlap", "mean intruders"]
    body = [[f"[{r['label']}]({r['label']}/report.md)", str(r["matrices"]), fmt(r["entropy"]), fmt(r["gini"]),
             fmt(r["matrices_for_90pct"]), fmt(r["embed_lm_head_share"]),
             f"{r['top_module']} ({fmt(r['top_module_share'])})", fmt(r["mean_delta_effective_rank"]),
             fmt(r["mean_base_overlap"]), fmt(r["mean_intruder_count"])] for r in crow]
    md = [f"# bshadow diagnose: one base, {len(labels)} fine-tunes", "",
          f"Base: `{base}`. Each fine-tune's own metrics.csv, summary.json and report.md are in its folder.", "",
          f"Metric definitions: {docs_ref('metrics.md', 'footprint')} and {docs_ref('metrics.md', 'delta-metrics')}; "
          f"files: {docs_ref('outputs.md', 'comparison-output')}.", "",
          "| fine-tune | checkpoint |", "|---|---|"]
    md += [f"| {r['label']} | `{r['tuned']}` |" for r in crow]
    md += ["", "## Footprints side by side", ""] + table(head, body) + [""]
    md += [f"![{f}]({f})" for f in figs] + [""]
    atomic_write_text(out / "comparison.md", "\n".join(md))
    return crow
