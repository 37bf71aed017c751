"""The figures of a diagnose or spectrum report: layer x module heatmaps, spectra of the top matrices,
the footprint curve, the alpha histogram and the ESD fits (matplotlib's object API on Agg canvases)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bshadow_jax.reporting import fmt, layer_module_grid, new_figure, num, save_figure

FIG_ENERGY = "heatmap_energy_share.png"
FIG_ERANK = "heatmap_effective_rank.png"
FIG_SPECTRA = "spectra_top.png"
FIG_FOOTPRINT = "footprint_curve.png"
FIG_ALPHA = "alpha_hist.png"
ESD_DIR = "esd_fits"  # spectrum: one log-log ESD with its power-law fit per top matrix
TOP_ESD = 4



def _heatmap(out_dir: Path, name: str, rows, values, *, reduce: str, title: str, cbar: str) -> str | None:
    if not rows:
        return None
    row_labels, mod_labels, grid = layer_module_grid(rows, values, reduce=reduce)
    nr, nc = grid.shape
    fig = new_figure(min(2.0 + 0.9 * nc, 24), min(1.6 + 0.28 * nr, 40))
    ax = fig.add_subplot(1, 1, 1)
    masked = np.ma.masked_invalid(grid)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    finite = grid[np.isfinite(grid)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax <= vmin:
        vmax = vmin + (abs(vmin) or 1.0) * 1e-6
    im = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(nc), mod_labels, rotation=45, ha="right", fontsize=8)
    step = max(1, nr // 40)
    ax.set_yticks(range(0, nr, step), row_labels[::step], fontsize=7)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=cbar)
    if nr * nc <= 160:  # small grids: print the numbers too
        for i in range(nr):
            for j in range(nc):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < (vmin + vmax) / 2 else "black")
    return save_figure(fig, out_dir / name)


def _spectra_figure(out_dir: Path, names: Sequence[str], spectra: Mapping[str, Any], kind: str) -> str | None:
    curves = []
    for n in names:
        sv = np.asarray(spectra.get(n), dtype=np.float64).reshape(-1)
        sv = np.sort(sv[np.isfinite(sv)])[::-1]
        if sv.size:
            curves.append((n, sv))
    if not curves:
        return None
    fig = new_figure(11, 4.2)
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    for n, sv in curves:
        short = n if len(n) <= 48 else "…" + n[-47:]
        idx = np.arange(1, sv.size + 1)
        pos = sv > 0
        if pos.any():
            ax1.loglog(idx[pos], sv[pos], lw=1.2, label=short)
        e = sv * sv
        tot = e.sum()
        ax2.plot(idx, np.cumsum(e) / tot if tot > 0 else np.zeros_like(e), lw=1.2)
    what = "ΔW" if kind == "diagnose" else "W"
    ax1.set_xlabel("index i")
    ax1.set_ylabel(f"σ_i of {what}")
    ax1.set_title(f"singular values of the top matrices ({what})")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=6, loc="lower left")
    ax2.set_xscale("log")
    ax2.axhline(0.9, color="grey", ls="--", lw=0.8)
    ax2.set_xlabel("index i")
    ax2.set_ylabel("cumulative fraction of Σσ²")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("cumulative energy within each matrix")
    return save_figure(fig, out_dir / FIG_SPECTRA)


def _footprint_figure(out_dir: Path, shares: np.ndarray, frac90: float, kind: str) -> str | None:
    n = shares.size
    if n == 0 or not shares.sum() > 0:
        return None
    s = np.sort(shares / shares.sum())[::-1]
    x = np.arange(1, n + 1) / n
    fig = new_figure(5.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.concatenate([[0], x]), np.concatenate([[0], np.cumsum(s)]), marker="." if n <= 60 else None,
            lw=1.5, label="cumulative energy share")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="uniform")
    ax.axhline(0.9, color="tab:red", lw=0.8, ls="--", label="90%")
    if frac90 > 0:
        ax.axvline(frac90, color="tab:red", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"fraction of matrices (sorted by share, N={n})")
    ax.set_ylabel("cumulative share of " + ("‖ΔW‖F²" if kind == "diagnose" else "‖W‖F²"))
    ax.set_title(f"footprint curve: 90% in {frac90:.1%} of matrices")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, out_dir / FIG_FOOTPRINT)


def _alpha_figure(out_dir: Path, alphas: np.ndarray) -> str | None:
    a = alphas[np.isfinite(alphas) & (alphas > 0)]  # WW reports -1 for a failed fit
    if a.size == 0:
        return None
    fig = new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(np.clip(a, 0, 20), bins=min(40, max(5, a.size // 2)), color="tab:blue", alpha=0.8)
    for t in (2.0, 6.0):  # WW's over-/under-trained thresholds
        ax.axvline(t, color="tab:red", ls="--", lw=0.8)
    ax.set_xlabel("alpha (WeightWatcher power-law exponent, clipped at 20)")
    ax.set_ylabel("matrices")
    ax.set_title(f"alpha over {a.size} matrices (median {np.median(a):.2f})")
    return save_figure(fig, out_dir / FIG_ALPHA)


def _esd_fit_figure(out_dir: Path, i: int, name: str, sv, row: Mapping) -> str | None:
    """log-log ESD (density of λ = σ²) of one matrix with its fitted power law from xmin."""
    lam = np.asarray(sv, dtype=np.float64).reshape(-1) ** 2
    lam = lam[np.isfinite(lam) & (lam > 0)]
    if lam.size < 2 or lam.max() <= lam.min():
        return None
    alpha, xmin, D = num(row.get("alpha")), num(row.get("xmin")), num(row.get("D"))
    fig = new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.logspace(np.log10(lam.min()), np.log10(lam.max()), min(60, max(8, lam.size // 4)) + 1)
    dens, edges = np.histogram(lam, bins=bins, density=True)
    mid = np.sqrt(edges[:-1] * edges[1:])
    ax.loglog(mid[dens > 0], dens[dens > 0], ".", color="tab:blue", label="ESD")
    if math.isfinite(alpha) and alpha > 1 and math.isfinite(xmin) and xmin > 0:
        x = np.logspace(np.log10(xmin), np.log10(lam.max()), 50)
        tail = float(np.mean(lam >= xmin))
        ax.loglog(x, tail * (alpha - 1) / xmin * (x / xmin) ** (-alpha), color="tab:red",
                  label=f"power law, alpha={alpha:.2f}")
        ax.axvline(xmin, color="grey", ls="--", lw=0.8, label=f"xmin={xmin:.3g}")
    ax.set_xlabel("eigenvalue λ = σ² of WᵀW")
    ax.set_ylabel("density")
    short = name if len(name) <= 48 else "…" + name[-47:]
    ax.set_title(f"{short}\nD={fmt(D)}", fontsize=8)
    ax.legend(fontsize=7)
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)[:80]
    (out_dir / ESD_DIR).mkdir(exist_ok=True)
    return f"{ESD_DIR}/" + save_figure(fig, out_dir / ESD_DIR / f"{i:02d}_{safe}.png")


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
