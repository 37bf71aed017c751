"""Report plumbing shared by diagnostics/report.py and studies/report.py: figures, markdown, grids.

Figures use matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so
writing a report never touches a user's interactive session; every PNG is written atomically.
This module sits below diagnostics and studies: it imports only bshadow_jax.fileio and
third-party libraries (matplotlib lazily: importing it costs a second).
"""
from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from bshadow_jax.fileio import atomic_write_bytes

PNG_DPI = 110

# Canonical column order of the layer x module grids; other modules follow alphabetically.
MODULE_ORDER = (
    "embed", "q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "o_proj", "out_proj", "c_proj",
    "gate_proj", "up_proj", "gate_up_proj", "down_proj", "c_fc", "fc1", "fc2", "lm_head",
)


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------

def new_figure(w: float, h: float):
    """A matplotlib Figure of w x h inches on its own Agg canvas (not registered with pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kw):
    """pyplot.subplots without pyplot: (figure, axes) on a new_figure.

    Args:
        nrows, ncols: the grid of axes.
        figsize: (width, height) in inches.
        **kw: passed to Figure.subplots (squeeze, sharex, gridspec_kw, ...).

    Returns:
        (figure, axes): axes as Figure.subplots returns them.
    """
    fig = new_figure(*figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def save_figure(fig, path: str | os.PathLike) -> str:
    """Write `fig` as a PNG (PNG_DPI, tight bounding box) to `path`, atomically.

    Args:
        fig: a matplotlib Figure (an Agg canvas is attached when it has none).
        path: the PNG file to write.

    Returns:
        The file name (path's last component), as the reports link it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, bbox_inches="tight")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path.name


# ------------------------------------------------------------------------------------------
# numbers and markdown
# ------------------------------------------------------------------------------------------

def num(v: Any) -> float:
    """float of a row value (CSV strings, None, numpy scalars); NaN when absent or unparsable."""
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def layer_of(v: Any) -> int | None:
    """A row's layer as an int, None when absent."""
    f = num(v)
    return int(f) if math.isfinite(f) else None


def cell(s: Any) -> str:
    """Markdown-table-safe text (tensor names may contain anything)."""
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("`", "'")


def fmt(v: Any, digits: int = 4) -> str:
    """A table value: whole numbers as integers, others to `digits` significant digits, "–" when
    absent; strings are made table-safe (cell)."""
    if isinstance(v, str):
        return cell(v)
    f = num(v)
    if math.isnan(f):
        return "–"
    if f == int(f) and abs(f) < 1e9:
        return str(int(f))
    return f"{f:.{digits}g}"


def fmt_or_na(v: Any) -> str:
    """"n/a" for None, floats to 4 significant digits, anything else as str()."""
    return "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    """Lines of a markdown table (cells are used as given: make them safe with cell())."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


# ------------------------------------------------------------------------------------------
# layer x module grid
# ------------------------------------------------------------------------------------------

def module_key(m: str) -> tuple:
    """Sort key putting modules in MODULE_ORDER, others after them alphabetically."""
    return (MODULE_ORDER.index(m), "") if m in MODULE_ORDER else (len(MODULE_ORDER), m)


def layer_module_grid(rows: Sequence[Mapping], values: Sequence[float], *, reduce: str,
                      layers_only: bool = False) -> tuple[list[str], list[str], np.ndarray]:
    """Per-matrix values on a layer x module grid.

    Rows are layers (prefixed by component when several components have layers, so a VLM's
    vision tower and language model do not collide); matrices without a layer go to one
    trailing "other" row per component unless layers_only. MoE experts of one (layer, module)
    share a cell.

    Args:
        rows: metric rows with "component", "layer", "module" (or "name") entries; layers and
            values may be CSV strings.
        values: one value per row; NaN or None values leave their cell out.
        reduce: "sum" or "mean" over the matrices of a cell.
        layers_only: leave out the matrices without a layer.

    Returns:
        (row labels, module labels in module_key order, grid [rows, modules] with NaN for empty cells).
    """
    cells: dict[tuple, list[float]] = defaultdict(list)
    row_keys: set[tuple] = set()
    modules: set[str] = set()
    kept = [(r, num(v)) for r, v in zip(rows, values) if not (layers_only and layer_of(r.get("layer")) is None)]
    prefix = len({str(r.get("component") or "") for r, _ in kept}) > 1
    for r, v in kept:
        comp = str(r.get("component") or "")
        layer = layer_of(r.get("layer"))
        module = str(r.get("module") or r.get("name") or "?")
        # no layer: sort after every layer of its component
        key = (comp, 0, layer) if layer is not None else (comp, 1, -1)
        row_keys.add(key)
        modules.add(module)
        if math.isfinite(v):
            cells[(key, module)].append(float(v))
    ordered_rows = sorted(row_keys, key=lambda k: (k[0], k[1], k[2]))
    ordered_mods = sorted(modules, key=module_key)
    grid = np.full((len(ordered_rows), len(ordered_mods)), np.nan)
    for i, rk in enumerate(ordered_rows):
        for j, m in enumerate(ordered_mods):
            vals = cells.get((rk, m))
            if vals:
                grid[i, j] = float(np.sum(vals) if reduce == "sum" else np.mean(vals))

    def label(k):
        base = str(k[2]) if k[1] == 0 else "other"
        return f"{k[0]}:{base}" if prefix else base

    return [label(k) for k in ordered_rows], ordered_mods, grid


def docs_ref(page: str, anchor: str = "") -> str:
    """A pointer from a report to the project's documentation, e.g. `docs/metrics.md#footprint`.

    Reports are written into the user's folders, so the reference names the page in the
    bshadow_jax repository rather than a relative link; tests check every page and anchor exists.
    """
    return f"`docs/{page}{'#' + anchor if anchor else ''}` (bshadow_jax documentation)"


def footprint_curves_figure(curves: Sequence[tuple[str, Any]], path: str | os.PathLike) -> str:
    """Footprint curves overlaid: for each (label, energy shares), the cumulative share of update energy
    over its matrices sorted by share (x as a fraction of the matrices); dashed line at 90%.

    Past ten curves the colours repeat, so the line style changes with each round of ten.
    """
    fig, axes = subplots(figsize=(6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    styles = ("-", "--", "-.", ":")
    for i, (label, shares) in enumerate(curves):
        s = np.sort(np.asarray([num(x) for x in shares], np.float64))[::-1]
        s = s[np.isfinite(s)]
        if s.size and s.sum() > 0:
            ax.plot(np.arange(1, s.size + 1) / s.size, np.cumsum(s) / s.sum(), label=label,
                    color=f"C{i % 10}", ls=styles[(i // 10) % len(styles)])
    ax.axhline(0.9, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("fraction of matrices (sorted by energy share)")
    ax.set_ylabel("cumulative share of update energy")
    ax.set_title("footprint curves")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
