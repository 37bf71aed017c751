"""Study report: report.md and PNG figures from the per-run records and results.json.

report.md, in order: the design (arms x bases x seeds, eval items, how intervals are computed,
chance), the findings (one line per claim with its tests' numbers; the paper's wording only in a
"Paper's claim" quote; a table of tests per claim), power (each test's minimal detectable effect
beside the observed difference), the bases before fine-tuning, scores (overall and per category,
with chance), footprints (with and without embeddings, token diversity, the seed-vs-seed noise
floor), regime score, training curves, files. Every number goes through `fmt_num`, which rounds
by metric kind; an interval is "mean [lo, hi]", a missing value "n/a".

Figures (each written atomically):
  narrow_broad.png       narrow against broad accuracy per arm, 95% intervals, chance lines and the bases
  perplexity.png         held-out perplexity per arm with 95% intervals; the bases as a line and band
  footprint_heatmaps.png layer x module energy share of each arm (mean over runs), side by side
  effective_rank_heatmaps.png  the same for the delta effective rank
  effective_rank.png     distribution of per-matrix delta effective rank per arm (all runs pooled)
  footprint_curves.png   cumulative energy over sorted matrices per arm; footprint entropy along training
  training_curves.png    fine-tuning loss per arm (mean over runs) and each base's pretraining loss
  regime_score.png       regime score per arm and run with bootstrap intervals (when computed)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bshadow_jax.fileio import atomic_write_text
from bshadow_jax.reporting import cell, docs_ref, layer_module_grid, save_figure, subplots, table

__all__ = ["arm_styles", "base_md", "category_table", "claims_md", "design_md", "fig_effective_rank",
           "fig_footprint_curves", "fig_heatmaps", "fig_narrow_broad", "fig_perplexity", "fig_regime_score",
           "fig_training_curves", "findings_md", "fmt_ci", "fmt_num", "footprint_md", "lookup", "metric_kind",
           "power_md", "regime_md", "results_table", "write_study_report"]

NA = "n/a"
# decimals per metric kind: one rounding rule for the whole report
DIGITS = {"acc": 3, "entropy": 3, "margin": 3, "log_ppl": 3, "ppl": 1, "rank": 2, "tokens": 0, "share": 3,
          "fraction": 3, "norm": 4, "ratio": 2, "p": 3}
CHANCE_MARK = "†"
NON_BLOCK = ("embed", "lm_head")


def metric_kind(metric: str | None) -> str:
    """The rounding kind (a key of DIGITS) of a metric or measure name ("acc", "footprint.entropy", ...)."""
    m = (metric or "").split(".")[-1]
    if m in DIGITS:
        return m
    if m in ("score", "accuracy", "correct"):
        return "acc"
    if m in ("perplexity", "value"):
        return "ppl"
    if m == "distinct_tokens" or m == "matrices" or m == "pairs":
        return "tokens"
    if "rank" in m or m == "intruder_count":
        return "rank"
    if m == "energy_share":
        return "share"
    if "fro" in m or "norm" in m or m in ("rel_delta", "total_delta_energy"):
        return "norm"
    if m.startswith("over_floor") or m == "diff_over_seed_sd":
        return "ratio"
    return "fraction"


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(float(v))


def fmt_num(v: Any, kind: str = "fraction", *, signed: bool = False) -> str:
    """A number rounded by metric kind (DIGITS; an unknown kind is looked up with metric_kind), "n/a" when
    missing or not finite; `signed` puts "+" before positive values (differences)."""
    if not _finite(v):
        return NA
    d = DIGITS.get(kind, DIGITS[metric_kind(kind)])
    s = f"{float(v):+.{d}f}" if signed else f"{float(v):.{d}f}"
    if float(s) == 0:  # no "-0.000"
        s = f"{0.0:.{d}f}"
    return s


def fmt_ci(ci: Any, kind: str = "fraction", *, signed: bool = False) -> str:
    """"mean [lo, hi]" of an interval dict ({"mean", "lo", "hi"}), "mean [n/a]" without bounds, else "n/a"."""
    if not isinstance(ci, Mapping) or not _finite(ci.get("mean")):
        return NA
    m = fmt_num(ci["mean"], kind, signed=signed)
    if not (_finite(ci.get("lo")) and _finite(ci.get("hi"))):
        return f"{m} [{NA}]"
    return f"{m} [{fmt_num(ci['lo'], kind, signed=signed)}, {fmt_num(ci['hi'], kind, signed=signed)}]"


def _diff_ci(t: Mapping[str, Any], kind: str, lo: str = "lo", hi: str = "hi") -> str:
    return fmt_ci({"mean": t.get("diff"), "lo": t.get(lo), "hi": t.get(hi)}, kind, signed=True)


def _p(t: Mapping[str, Any]) -> str:
    p, n = t.get("p_value"), t.get("n_boot")
    if not _finite(p):
        return NA
    if p == 0 and n:
        return f"< {2 / n:.3f}"
    return fmt_num(p, "p")


def lookup(entry: Mapping, path: str) -> Any:
    """entry["a"]["b"]["c"] for path "a.b.c"; None where a step is missing or not a mapping."""
    node: Any = entry
    for p in path.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _m(ci: Any) -> float:
    if isinstance(ci, Mapping) and _finite(ci.get("mean")):
        return float(ci["mean"])
    return float("nan")


def _err(ci: Any) -> tuple[float, float]:
    if isinstance(ci, Mapping) and _finite(ci.get("lo")) and _finite(ci.get("mean")) and _finite(ci.get("hi")):
        return max(float(ci["mean"] - ci["lo"]), 0.0), max(float(ci["hi"] - ci["mean"]), 0.0)
    return 0.0, 0.0


def _above(ci: Any, x: float) -> bool | None:
    """Whether the whole interval lies above x (None without bounds)."""
    if not (isinstance(ci, Mapping) and _finite(ci.get("lo"))):
        return None
    return float(ci["lo"]) > x


def _contains(ci: Any, x: float) -> bool | None:
    if not (isinstance(ci, Mapping) and _finite(ci.get("lo")) and _finite(ci.get("hi"))):
        return None
    return float(ci["lo"]) <= x <= float(ci["hi"])


# ---------------------------------------------------------------- styles

_COLOURS = tuple(f"C{i}" for i in range(10))
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def arm_styles(names: Sequence[str]) -> dict[str, dict[str, str]]:
    """A distinct (colour, linestyle, marker) per name, in order: matplotlib kwargs {"color", "ls", "marker"}.

    Neighbouring names differ in all three; the combination is unique for the first 140 names
    (10 colours x 4 line styles x 7 markers, stepped together), so 8+ arms stay distinguishable in
    print and for colour-blind readers.
    """
    return {n: {"color": _COLOURS[i % 10], "ls": _LINESTYLES[i % 4], "marker": _MARKERS[i % 7]}
            for i, n in enumerate(names)}


def _styles_for(names: Sequence[str], styles: Mapping[str, Mapping[str, str]] | None) -> dict:
    """`styles` where it names an arm, arm_styles for the rest (after the given ones, so no combination repeats)."""
    styles = dict(styles or {})
    missing = [n for n in names if n not in styles]
    if missing:
        extra = arm_styles(list(styles) + missing)
        styles.update({n: extra[n] for n in missing})
    return styles


def _legend(ax, **kw) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc=kw.pop("loc", "best"), **kw)


# ---------------------------------------------------------------- figures

def fig_narrow_broad(arms: Mapping[str, Any], base: Mapping[str, Any] | None, path: Path,
                     chance: Mapping[str, float] | None = None, styles: Mapping[str, Mapping[str, str]] | None = None
                     ) -> str:
    """Narrow against broad accuracy per arm (95% intervals), chance dashed on both axes, the bases as stars."""
    fig, ax = subplots(figsize=(7, 5.5))
    styles = _styles_for(list(arms), styles)
    for name, entry in arms.items():
        n, b = lookup(entry, "narrow.score"), lookup(entry, "broad.score")
        if not (_finite(_m(n)) and _finite(_m(b))):
            continue
        xe, ye = _err(n), _err(b)
        st = styles[name]
        ax.errorbar(_m(n), _m(b), xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt=st["marker"], capsize=3,
                    color=st["color"], label=name, ms=6)
    if base:
        bn, bb = lookup(base, "narrow.score"), lookup(base, "broad.score")
        if _finite(_m(bn)) and _finite(_m(bb)):
            xe, ye = _err(bn), _err(bb)
            ax.errorbar(_m(bn), _m(bb), xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt="*", ms=13,
                        color="k", capsize=3, label="base (mean over bases)")
            vn, vb = (bn or {}).get("values") or [], (bb or {}).get("values") or []
            if len(vn) == len(vb) and len(vn) > 1:
                ax.plot(vn, vb, "x", color="0.4", ms=6, ls="none", label="each base")
    for sec, line in (("narrow", ax.axvline), ("broad", ax.axhline)):
        c = (chance or {}).get(sec)
        if _finite(c):
            line(float(c), color="0.3", lw=1.0, ls="--", label=f"chance ({sec} {fmt_num(c, 'acc')})")
    ax.set_xlabel("narrow accuracy (benchmark)")
    ax.set_ylabel("broad accuracy")
    ax.set_title("narrow vs broad accuracy per arm (mean, 95% hierarchical-bootstrap interval)", fontsize=9)
    _legend(ax)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def fig_perplexity(arms: Mapping[str, Any], base: Mapping[str, Any] | None, path: Path,
                   styles: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Held-out perplexity per arm with 95% intervals; the bases' mean as a dashed line over its interval band."""
    names = [a for a, e in arms.items() if _finite(_m(lookup(e, "perplexity.value")))]
    fig, ax = subplots(figsize=(7, max(2.5, 0.45 * len(names) + 1.5)))
    styles = _styles_for(list(arms), styles)
    for k, name in enumerate(names):
        ci = lookup(arms[name], "perplexity.value")
        e = _err(ci)
        st = styles[name]
        ax.errorbar(_m(ci), k, xerr=[[e[0]], [e[1]]], fmt=st["marker"], color=st["color"], capsize=3, label=name)
    bci = lookup(base or {}, "perplexity.value")
    if _finite(_m(bci)):
        ax.axvline(_m(bci), color="k", ls="--", lw=1.0, label=f"base {fmt_num(_m(bci), 'ppl')}")
        if _finite((bci or {}).get("lo")) and _finite((bci or {}).get("hi")):
            ax.axvspan(float(bci["lo"]), float(bci["hi"]), color="0.85", zorder=0, label="base 95% interval")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("held-out text perplexity (lower is better)")
    ax.set_title("held-out perplexity per arm (mean, 95% interval over bases, seeds and passages)", fontsize=9)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def fig_heatmaps(rows_by_arm: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, key: str = "energy_share",
                 title: str = "energy share") -> str:
    """Layer x module grids of `key` per arm (transformer blocks; embeddings and head are in the token table)."""
    names = [a for a, rows in rows_by_arm.items() if rows]
    if not names:
        fig, ax = subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no diagnose rows", ha="center")
        ax.axis("off")
        return save_figure(fig, path)
    grids = {a: layer_module_grid(rows_by_arm[a], [r.get(key) for r in rows_by_arm[a]], reduce="sum",
                                  layers_only=True) for a in names}
    vmax = max(float(np.nanmax(g[2])) if np.isfinite(g[2]).any() else 0.0 for g in grids.values()) or 1.0
    ncol = min(len(names), 4)
    nrow = math.ceil(len(names) / ncol)
    fig, axes = subplots(nrow, ncol, figsize=(3.4 * ncol, 2.9 * nrow + 0.5), squeeze=False,
                         gridspec_kw={"hspace": 0.55, "wspace": 0.35})
    im = None
    for k, a in enumerate(names):
        ax = axes[k // ncol][k % ncol]
        layers, modules, grid = grids[a]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(a, fontsize=8)
        ax.set_xticks(range(len(modules)), [m.replace("_proj", "") for m in modules], rotation=60, fontsize=6)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.set_ylabel("layer", fontsize=7)
    for k in range(len(names), nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=title)
    fig.suptitle(f"layer x module {title} per arm (transformer blocks; mean over runs; same colour scale)",
                 fontsize=9)
    return save_figure(fig, path)


def fig_effective_rank(rows_by_arm: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> str:
    names = [a for a, rows in rows_by_arm.items() if rows]
    data = [[float(r["delta_effective_rank"]) for r in rows_by_arm[a] if _finite(r.get("delta_effective_rank"))]
            for a in names]
    fig, ax = subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    if names:
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("delta effective rank (per matrix)")
    ax.set_title("effective-rank distribution of the fine-tuning deltas (all matrices, all runs)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def _mean_curve(recs: Sequence[Mapping[str, Any]], curve: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and the mean over runs (records, any base) of `key` along each record's `curve`."""
    steps: dict[int, list[float]] = {}
    for r in recs:
        for pt in r.get(curve) or []:
            if _finite(pt.get(key)):
                steps.setdefault(int(pt["step"]), []).append(float(pt[key]))
    xs = sorted(steps)
    return xs, [float(np.mean(steps[s])) for s in xs]


def _line_kw(st: Mapping[str, str], n: int) -> dict:
    return {"color": st["color"], "ls": st["ls"], "marker": st["marker"], "ms": 4,
            "markevery": max(1, n // 8), "lw": 1.4}


def fig_footprint_curves(records_by_arm: Mapping[str, Sequence[Mapping[str, Any]]], path: Path,
                         styles: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Left: cumulative share of update energy over matrices sorted by share (mean over runs). Right: footprint
    entropy along training (mean over runs). Every arm its own (colour, line style, marker)."""
    fig, (ax1, ax2) = subplots(1, 2, figsize=(12, 4.5))
    styles = _styles_for(list(records_by_arm), styles)
    for arm, recs in records_by_arm.items():
        st = styles[arm]
        curves = []
        for r in recs:
            shares = np.sort(np.array([float(m["energy_share"]) for m in r.get("matrices") or []
                                       if _finite(m.get("energy_share"))]))[::-1]
            if shares.size and shares.sum() > 0:
                curves.append(np.cumsum(shares) / shares.sum())
        if curves:
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            ax1.plot(np.arange(1, n + 1) / n, mean, label=arm, **_line_kw(st, n))
        xs, ys = _mean_curve(recs, "footprint_curve", "entropy")
        if xs:
            ax2.plot(xs, ys, label=arm, **_line_kw(st, len(xs)))
    ax1.set_xlabel("fraction of matrices (sorted by energy share)")
    ax1.set_ylabel("cumulative share of update energy")
    ax1.set_title("footprint curve (final fine-tune vs base; all matrices)", fontsize=9)
    ax1.axhline(0.9, color="grey", lw=0.5, ls="--")
    ax1.grid(alpha=0.3)
    _legend(ax1, loc="lower right")
    ax2.set_xlabel("fine-tuning step")
    ax2.set_ylabel("footprint entropy (all matrices)")
    ax2.set_title("footprint entropy along training (mean over runs)", fontsize=9)
    ax2.grid(alpha=0.3)
    _legend(ax2)
    return save_figure(fig, path)


def fig_training_curves(records_by_arm: Mapping[str, Sequence[Mapping[str, Any]]],
                        base_curves: Mapping[int, Sequence[Mapping[str, Any]]] | None, path: Path,
                        styles: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Fine-tuning loss per arm (mean over runs); each base's pretraining loss beside it."""
    base_curves = {b: c for b, c in (base_curves or {}).items() if c}
    fig, axes = subplots(1, 2 if base_curves else 1, figsize=(12 if base_curves else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    styles = _styles_for(list(records_by_arm), styles)
    for arm, recs in records_by_arm.items():
        xs, ys = _mean_curve(recs, "train_curve", "loss")
        if xs:
            ax.plot(xs, ys, label=arm, **_line_kw(styles[arm], len(xs)))
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("training loss (own data)")
    ax.set_title("fine-tuning loss per arm (mean over runs)", fontsize=9)
    ax.grid(alpha=0.3)
    _legend(ax)
    if base_curves:
        ax = axes[0][1]
        bstyles = arm_styles([f"base {b}" for b in sorted(base_curves)])
        for b in sorted(base_curves):
            pts = [(int(p["step"]), float(p["loss"])) for p in base_curves[b] if _finite(p.get("loss"))]
            if pts:
                kw = _line_kw(bstyles[f"base {b}"], len(pts))
                ax.plot(*zip(*pts), label=f"base {b}", **kw)
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("loss")
        ax.set_title("pretraining loss of each base", fontsize=9)
        ax.grid(alpha=0.3)
        _legend(ax)
    return save_figure(fig, path)


def fig_regime_score(validation: Mapping[str, Any], path: Path,
                     styles: Mapping[str, Mapping[str, str]] | None = None) -> str:
    arms = validation.get("arms", {})
    styles = _styles_for(list(arms), styles)
    fig, ax = subplots(figsize=(max(5, 0.9 * len(arms) + 2), 4))
    for i, (arm, entry) in enumerate(arms.items()):
        runs = entry.get("per_seed", [])
        st = styles[arm]
        for j, s in enumerate(runs):
            x = i + (j - (len(runs) - 1) / 2) * min(0.12, 0.6 / max(len(runs), 1))
            lo, hi = s.get("lo"), s.get("hi")
            if _finite(lo) and _finite(hi):
                ax.errorbar(x, s["score"], yerr=[[max(s["score"] - lo, 0)], [max(hi - s["score"], 0)]],
                            fmt=st["marker"], color=st["color"], capsize=2, ms=4)
            else:
                ax.plot(x, s["score"], st["marker"], color=st["color"])
    ax.axhline(0.0, color="C3", lw=0.7, ls="--")
    ax.axhline(1.0, color="C2", lw=0.7, ls="--")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xticks(range(len(arms)), list(arms), rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("regime score (0 = aligned ref, 1 = coverage ref)")
    ax.set_title("regime score per arm and run (95% bootstrap interval)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


# ---------------------------------------------------------------- report.md sections

VERDICT_KEY = ("Verdicts: a directional test is **held** when its 95% interval lies on the claimed side of 0, "
               "**not held** when it lies on the other side (significant in the wrong direction), "
               "**inconclusive** otherwise; an equivalence (no-shift) test is held when its 90% interval lies "
               "inside (−margin, +margin) (TOST at alpha 0.05), not held when it lies beyond a margin, "
               "inconclusive otherwise. A claim is held when all its tests are, not held when any is.")


def design_md(results: Mapping[str, Any], arm_notes: Mapping[str, str] | None = None) -> list[str]:
    """The design: arms x bases x seeds, eval items, chance and how the intervals are computed."""
    arms = results.get("arms", {})
    settings = results.get("settings") or {}
    n_boot = lookup(settings, "analysis.n_boot")
    ev = results.get("eval_items") or {}
    chance = results.get("chance") or {}
    body = []
    for name, e in arms.items():
        bases, seeds = e.get("bases") or [], e.get("seeds") or []
        runs = e.get("runs")
        unbalanced = "" if runs is None or runs == len(bases) * len(seeds) else " (not on every base)"
        body.append([cell(name), f"{len(bases)} ({', '.join(map(str, bases))})",
                     f"{len(seeds)} ({', '.join(map(str, seeds))}){unbalanced}", str(runs if runs is not None else NA),
                     cell((arm_notes or {}).get(name) or e.get("description") or "")])
    lines = ["## Design", ""]
    if arms:
        all_bases = sorted({b for e in arms.values() for b in e.get("bases") or []})
        lines += [f"{len(arms)} arms fine-tune the same {len(all_bases)} base(s) (pretraining seeds "
                  f"{', '.join(map(str, all_bases))}); a run is one fine-tune (arm, base, seed).", ""]
        lines += table(["arm", "bases", "seeds per base", "runs", "what changes"], body) + [""]
    items = []
    for sec in ("narrow", "broad"):
        if sec in ev:
            items.append(f"{sec} {ev[sec]} items (chance {fmt_num(chance.get(sec), 'acc')})")
    if "text_passages" in ev:
        items.append(f"{ev['text_passages']} held-out text passages (perplexity)")
    if items:
        lines += ["Eval sets, the same for every run: " + "; ".join(items) + ". Chance is the mean over items "
                  "of 1 / number of options (0 for a generated answer, scored by exact match).", ""]
    lines += [f"Intervals: 95% percentile intervals of a hierarchical bootstrap over bases, seeds and items "
              f"(n_boot = {n_boot if n_boot is not None else NA}); bases are drawn once for every arm "
              "(comparisons are paired on bases), items once per eval set (paired on items). "
              "Footprint numbers have no item level. A test's mde is its minimal detectable effect: "
              "2.80 × its bootstrap SE (80% power, two-sided alpha 0.05). "
              f"Definitions: {docs_ref('metrics.md', 'study-statistics')}.", ""]
    text = settings.get("general_text") or {}
    if text.get("used"):
        req = text.get("requested")
        req = req.get("path") if isinstance(req, dict) else req  # a dataset: its path (the config has the rest)
        lines += [f"General text used: {cell(text['used'])} (requested: {cell(req)}).", ""]
    if _finite(results.get("wall_s")):
        lines += [f"Wall time: {results['wall_s']:.0f} s.", ""]
    return lines


def _tokens(v: Any) -> str:
    if not _finite(v):
        return NA
    v = float(v)
    return f"{v / 1e9:.2f}B" if v >= 1e9 else f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e3 else f"{v:.0f}"


def data_md(results: Mapping[str, Any]) -> list[str]:
    """Tokens drawn per source and epochs over it, per arm (expected values, see data.budget)."""
    arms = {n: e["data"] for n, e in (results.get("arms") or {}).items() if (e.get("data") or {}).get("streams")}
    if not arms:
        return []
    body, flagged = [], False
    for name, d in arms.items():
        for stream, e in d["streams"].items():
            ep = e.get("epochs")
            mark = ""
            if _finite(ep) and ep > 1.0:
                mark = " (intended)" if stream in (d.get("intended_repeats") or []) else " ‡"
                flagged |= mark == " ‡"
            body.append([cell(name), cell(stream), cell(e.get("kind")), fmt_num(e.get("token_share"), "acc"),
                         _tokens(e.get("tokens_drawn")), _tokens(e.get("source_tokens")),
                         (f"{ep:.2f}" if _finite(ep) else "endless") + mark])
    first = next(iter(arms.values()))
    lines = ["### Data drawn per source", "",
             f"Per fine-tune: {_tokens(first.get('total_tokens'))} tokens; {cell(first.get('method'))}. A world "
             "stream is generated without end (no epochs); epochs above 1 repeat the source.", ""]
    lines += table(["arm", "stream", "kind", "token share", "tokens drawn", "source tokens", "epochs"], body) + [""]
    if flagged:
        lines += ["‡ more than one epoch, and not listed in the arm's `intended_repeats`.", ""]
    return lines


def rehearsal_md(results: Mapping[str, Any]) -> list[str]:
    """What a rehearsal replaced: every hub resource's local stand-in and every scaled-down setting."""
    r = results.get("rehearsal")
    if not r:
        return []
    lines = ["## Rehearsal: stand-ins, not results", "",
             f"This is a rehearsal of {cell(r.get('config'))}: the same config and code paths at toy size on "
             f"{cell(r.get('platform'))}, with every hub resource replaced by a local stand-in in the same format. "
             "Its numbers test the machinery; they say nothing about the claims.", ""]
    lines += table(["resource", "kind", "stand-in", "format"],
                   [[cell(s.get("resource")), cell(s.get("kind")), cell(s.get("stand_in")), cell(s.get("format"))]
                    for s in r.get("stand_ins") or []]) + [""]
    if r.get("scaled"):
        lines += table(["setting", "in the config", "in the rehearsal"],
                       [[cell(k), cell(v[0]), cell(v[1])] for k, v in r["scaled"].items()]) + [""]
    return lines


def _label(t: Mapping[str, Any]) -> str:
    """A test's short name: its comparison up to the arms."""
    return str(t.get("comparison", "?")).split(": ")[0].split("; ")[0]


def _short_labels(tests: Sequence[Mapping[str, Any]]) -> list[str]:
    labels = [_label(t) for t in tests]
    out = []
    for lab, t in zip(labels, tests):
        if labels.count(lab) > 1 and t.get("b"):
            lab = f"{lab} vs {t['b']}"
        out.append(lab)
    return out


def _test_phrase(t: Mapping[str, Any]) -> str:
    kind = metric_kind(t.get("metric"))
    if t.get("kind") == "equivalence":
        return (f"{t.get('comparison')} = {fmt_num(t.get('diff'), kind, signed=True)}, 90% interval "
                f"{_diff_ci({'lo': t.get('lo90'), 'hi': t.get('hi90'), 'diff': t.get('diff')}, kind).split(' ', 1)[1]}"
                f" against ±{fmt_num(t.get('margin'), kind)}: {t.get('verdict')}")
    return f"{t.get('comparison')} = {_diff_ci(t, kind)}: {t.get('verdict')}"


def finding_line(c: Mapping[str, Any]) -> str:
    """`**C1 — inconclusive.**` and the numbers behind it (never the claim's wording)."""
    head = f"**{c.get('id')} — {c.get('verdict')}.**"
    tests = c.get("tests") or []
    if not tests:
        return f"{head} {c.get('note') or 'no tests.'}"
    n_held = sum(t.get("verdict") == "held" for t in tests)
    return f"{head} {n_held} of {len(tests)} tests held: " + "; ".join(_test_phrase(t) for t in tests) + "."


def _extra(t: Mapping[str, Any]) -> str:
    kind = metric_kind(t.get("metric"))
    parts = []
    if _finite(t.get("a_mean")) and _finite(t.get("b_mean")):
        parts.append(f"{cell(t['a'])} {fmt_num(t['a_mean'], kind)} vs {cell(t['b'])} {fmt_num(t['b_mean'], kind)}")
    if "data_effect" in t:
        parts.append(f"data effect {fmt_num(t.get('data_effect'), kind, signed=True)}, setting effect "
                     f"{fmt_num(t.get('setting_effect'), kind, signed=True)}")
    if "seed_sd" in t:
        parts.append(f"seed sd {fmt_num(t.get('seed_sd'), kind)}, diff / seed sd "
                     f"{fmt_num(t.get('diff_over_seed_sd'), 'ratio', signed=True)}")
    sep = t.get("reference_separation (coverage - aligned)")
    if isinstance(sep, Mapping):
        parts.append(f"coverage − aligned separation {fmt_ci(sep, kind, signed=True)}")
    return "; ".join(parts) or "–"


def tests_table(tests: Sequence[Mapping[str, Any]], *, voted: bool = True) -> list[str]:
    """Markdown lines: one row per test (directional and equivalence tests in their own tables)."""
    out: list[str] = []
    dirs = [t for t in tests if t.get("kind") != "equivalence"]
    eqs = [t for t in tests if t.get("kind") == "equivalence"]
    vcol = "verdict" if voted else "verdict (not voted)"
    if dirs and not voted and not any("verdict" in t for t in dirs):  # differences reported without a direction
        body = [[cell(t.get("comparison", "?")), cell(t.get("metric") or "–"),
                 _diff_ci(t, metric_kind(t.get("metric"))), fmt_num(t.get("mde"), metric_kind(t.get("metric"))),
                 _extra(t)] for t in dirs]
        out += table(["comparison", "metric", "diff [95% CI]", "mde", "means"], body)
        dirs = []
    if dirs:
        body = []
        for t in dirs:
            kind = metric_kind(t.get("metric"))
            verdict = t.get("verdict") or "–"
            body.append([cell(t.get("comparison", "?")), cell(t.get("metric") or "–"), cell(t.get("expect") or "–"),
                         _diff_ci(t, kind), fmt_num(t.get("mde"), kind), _p(t), verdict, _extra(t)])
        out += table(["comparison", "metric", "expect", "diff [95% CI]", "mde", "p", vcol, "means and details"], body)
    if eqs:
        if out:
            out.append("")
        body = []
        for t in eqs:
            kind = metric_kind(t.get("metric"))
            body.append([cell(t.get("comparison", "?")), cell(t.get("metric") or "–"),
                         f"±{fmt_num(t.get('margin'), kind)}", _diff_ci(t, kind), _diff_ci(t, kind, "lo90", "hi90"),
                         fmt_num(t.get("min_margin"), kind), fmt_num(t.get("mde"), kind), t.get("verdict") or "–",
                         _extra(t)])
        out += table(["comparison", "metric", "margin", "diff [95% CI]", "90% interval", "min margin", "mde", vcol,
                      "means and details"], body)
    return out


def _descriptive_md(desc: Sequence[Mapping[str, Any]]) -> list[str]:
    tests = [d for d in desc if "comparison" in d]
    effects = [d for d in desc if "comparison" not in d]
    out: list[str] = []
    if tests:
        out += ["Reported beside the tests, not voted:", ""] + tests_table(tests, voted=False) + [""]
    if effects:
        cols = [k for k in effects[0] if isinstance(effects[0][k], Mapping)]
        body = [[cell(d.get("measure", "?"))] + [fmt_ci(d.get(k), metric_kind(d.get("measure")), signed=True)
                                                 for k in cols] for d in effects]
        out += ["Footprint effects of the two switches (not voted):", ""]
        out += table(["measure"] + [cell(k) for k in cols], body) + [""]
    return out


def findings_md(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """The findings: one line per claim, then per claim the paper's wording (quoted) and its tests."""
    lines = ["## Findings", ""]
    if not claims:
        return lines + ["(no claims tested)", ""]
    for c in claims:
        lines += [finding_line(c), ""]
    lines += [VERDICT_KEY + f" Claims: {docs_ref('outputs.md', 'claims')}.", ""]
    lines += claims_md(claims)
    return lines


def claims_md(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per claim: the paper's wording as a quote, design and note, the tests table and what is reported beside it."""
    out: list[str] = []
    for c in claims:
        out += [f"### {c.get('id')} ({c.get('verdict')})", ""]
        if c.get("claim"):
            out += [f"> Paper's claim (what is tested, not a finding): {c['claim']}", ""]
        if c.get("design"):
            out += [f"Design: {c['design']}.", ""]
        if c.get("note"):
            out += [f"Note: {c['note']}.", ""]
        if c.get("tests"):
            out += tests_table(c["tests"]) + [""]
        out += _descriptive_md(c.get("descriptive") or [])
    return out


def power_md(results: Mapping[str, Any]) -> list[str]:
    """What each voted test could detect (mde) beside the observed |diff|, and one reading per claim."""
    rows = results.get("power") or []
    lines = ["## Power", "",
             "mde: the smallest true difference a test detects with 80% power at two-sided alpha 0.05 "
             "(2.80 × its bootstrap SE), in the units of its difference. \"not held\" means significant in the "
             "wrong direction (for an equivalence test: beyond its margin); \"inconclusive\" is everything else — "
             "where the observed |diff| is below the mde, the study was too small to see an effect that size, "
             "which is not evidence that there is none. For an equivalence test, min margin is the smallest margin "
             "it could show equivalence within (80% power, true difference 0).", ""]
    if not rows:
        return lines + ["(no tests with an mde)", ""]
    has_eq = any("margin" in r for r in rows)
    body = []
    for r in rows:
        kind = metric_kind(r.get("metric"))
        exceeds = r.get("observed_exceeds_mde")
        row = [cell(r.get("claim")), cell(r.get("comparison")), cell(r.get("metric") or "–"),
               fmt_num(abs(r["diff"]) if _finite(r.get("diff")) else None, kind), fmt_num(r.get("mde"), kind),
               NA if exceeds is None else ("yes" if exceeds else "no"), cell(r.get("verdict"))]
        if has_eq:
            row += [fmt_num(r.get("margin"), kind) if "margin" in r else "–",
                    fmt_num(r.get("min_margin"), kind) if "margin" in r else "–"]
        body.append(row)
    head = ["claim", "comparison", "metric", "observed abs(diff)", "mde", "abs(diff) ≥ mde", "verdict"]
    if has_eq:
        head += ["margin", "min margin"]
    lines += table(head, body) + [""]
    by_claim: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_claim.setdefault(str(r.get("claim")), []).append(r)
    lines += ["Reading:", ""]
    for cid, rs in by_claim.items():
        lines += [f"- {cid} — {_power_reading(rs)}", ""]
    return lines


def _power_reading(rs: Sequence[Mapping[str, Any]]) -> str:
    """One sentence on what a claim's tests could detect: mde against the observed |diff| (directional tests),
    the margin against the smallest margin the design can show (equivalence tests)."""
    labels = _short_labels(rs)
    parts, notes = [], []
    dirs = [(lab, r) for lab, r in zip(labels, rs) if "margin" not in r]
    eqs = [(lab, r) for lab, r in zip(labels, rs) if "margin" in r]
    for lab, r in dirs:
        kind = metric_kind(r.get("metric"))
        obs = abs(r["diff"]) if _finite(r.get("diff")) else None
        parts.append(f"{lab}: observed {fmt_num(obs, kind)} against mde {fmt_num(r.get('mde'), kind)}")
    if dirs:
        weak = [lab for lab, r in dirs if r.get("verdict") == "inconclusive" and r.get("observed_exceeds_mde") is False]
        big = sum(bool(r.get("observed_exceeds_mde")) for _, r in dirs)
        if big == len(dirs):
            notes.append("every observed difference is at least its mde, so the design could see effects this size")
        else:
            notes.append(f"{big} of {len(dirs)} observed differences reach their mde")
        if weak:
            notes.append(f"{len(weak)} inconclusive test{'s' if len(weak) > 1 else ''} observed less than "
                         f"{'their' if len(weak) > 1 else 'its'} mde: a true difference of the mde or more would "
                         "have been found with 80% power, so the interval bounds how large the difference can be; "
                         "differences smaller than the mde stay undecided")
    for lab, r in eqs:
        kind = metric_kind(r.get("metric"))
        obs = abs(r["diff"]) if _finite(r.get("diff")) else None
        mm = r.get("min_margin")
        reach = (NA if not _finite(mm) else "equivalence was within reach" if float(r["margin"]) >= float(mm)
                 else "the margin is tighter than this design can show")
        parts.append(f"{lab}: observed {fmt_num(obs, kind)} against margin {fmt_num(r['margin'], kind)}, min margin "
                     f"{fmt_num(mm, kind)} ({reach})")
    return "; ".join(parts) + (": " + "; ".join(notes) if notes else "") + "."


def _reading(t: Mapping[str, Any] | None) -> str:
    v = (t or {}).get("verdict")
    return {"held": "above chance", "not held": "below chance",
            "inconclusive": "not distinguishable from chance"}.get(v, NA)


def base_md(results: Mapping[str, Any]) -> list[str]:
    """The bases before fine-tuning: accuracy against chance, margins, perplexity."""
    base = results.get("base")
    lines = ["## Base before fine-tuning", ""]
    if not base:
        return lines + ["(no base evaluation in the results)", ""]
    lines += [f"Bases: {', '.join(map(str, base.get('bases') or [])) or NA}; intervals over bases and items.", ""]
    body = []
    for sec in ("narrow", "broad"):
        s = base.get(sec) or {}
        if not s:
            continue
        t = (base.get("above_chance") or {}).get(sec)
        body.append([sec, str(s.get("n_items", NA)), fmt_num(s.get("chance"), "acc"), fmt_ci(s.get("score"), "acc"),
                     _diff_ci(t, "acc") if t else NA, _reading(t), fmt_ci(s.get("margin"), "margin")])
    lines += table(["eval set", "items", "chance", "accuracy", "accuracy − chance", "reading", "gold margin"],
                   body) + [""]
    ppl = base.get("perplexity") or {}
    if ppl:
        lines += [f"Held-out perplexity: {fmt_ci(ppl.get('value'), 'ppl')} (log-perplexity "
                  f"{fmt_ci(ppl.get('log_ppl'), 'log_ppl')}).", ""]
    low = [f"{sec} ({_reading((base.get('above_chance') or {}).get(sec))})" for sec in ("narrow", "broad")
           if base.get(sec) and ((base.get("above_chance") or {}).get(sec) or {}).get("verdict") != "held"]
    if low:
        lines += [f"The base is not above chance on {' and '.join(low)}: there the fine-tunes start from no better "
                  "than guessing, and a fine-tuned score near chance says nothing about that set.", ""]
    return lines


def results_table(arms: Mapping[str, Any], base: Mapping[str, Any] | None = None,
                  chance: Mapping[str, float] | None = None) -> str:
    """Markdown table per arm (and the base): narrow/broad accuracy and gold margin, held-out perplexity."""
    chance = chance or {}
    rows = list(arms.items()) + ([("base (before fine-tuning)", base)] if base else [])
    body = [[cell(name), str(e.get("runs") if name in arms else f"{len(e.get('bases') or [])} bases"),
             fmt_ci(lookup(e, "narrow.score"), "acc"), fmt_ci(lookup(e, "narrow.margin"), "margin"),
             fmt_ci(lookup(e, "broad.score"), "acc"), fmt_ci(lookup(e, "broad.margin"), "margin"),
             fmt_ci(lookup(e, "perplexity.value"), "ppl")] for name, e in rows]
    head = ["arm", "runs", f"narrow acc (chance {fmt_num(chance.get('narrow'), 'acc')})", "narrow margin",
            f"broad acc (chance {fmt_num(chance.get('broad'), 'acc')})", "broad margin", "held-out perplexity"]
    return "\n".join(table(head, body))


def category_table(arms: Mapping[str, Any], section: str, base: Mapping[str, Any] | None = None, *,
                   key: str = "by_category") -> str:
    """Per-category table of `section` ("narrow": by skill, "broad": by category); `key` "by_category"
    (accuracy, chance per category in the header; † where every arm's interval contains chance) or
    "by_category_margin"."""
    cats: list[str] = []
    chance: dict[str, float] = {}
    for e in list(arms.values()) + ([base] if base else []):
        for c in (lookup(e, f"{section}.{key}") or {}):
            if c not in cats:
                cats.append(c)
        chance.update(lookup(e, f"{section}.chance_by_category") or {})
    if not cats:
        return f"(no per-category {section} scores)"
    acc = key == "by_category"
    kind = "acc" if acc else "margin"
    head = ["arm"]
    for c in cats:
        h = cell(c)
        if acc:
            # flagged when no arm is significantly above chance (inside the interval, or below it)
            above = [_above(lookup(e, f"{section}.{key}.{c}"), chance[c]) for e in arms.values()] if c in chance else []
            if above and all(x is False for x in above):
                h += f" {CHANCE_MARK}"
            h += f" (chance {fmt_num(chance.get(c), 'acc')})"
        head.append(h)
    rows = list(arms.items()) + ([("base", base)] if base else [])
    body = [[cell(name)] + [fmt_ci(lookup(e, f"{section}.{key}.{c}"), kind) for c in cats] for name, e in rows]
    return "\n".join(table(head, body))


def scores_md(results: Mapping[str, Any]) -> list[str]:
    arms, base, chance = results.get("arms", {}), results.get("base"), results.get("chance") or {}
    lines = ["## Scores", "",
             "Accuracy: the share of items whose gold option has the highest log-likelihood. Gold margin: the gold "
             "option's log-likelihood minus the best wrong option's (mean over items; > 0 when right). Held-out "
             "perplexity: exp of the mean negative log-likelihood per token over the held-out passages (lower is "
             "better). Each cell: mean [95% interval].", "",
             results_table(arms, base, chance), "", "![narrow vs broad](narrow_broad.png)", "",
             "![held-out perplexity](perplexity.png)", ""]
    for sec, what in (("narrow", "skill"), ("broad", "category")):
        lines += [f"### {sec.capitalize()} accuracy by {what}", "", category_table(arms, sec, base), ""]
        lines += [f"Gold margin by {what}:", "", category_table(arms, sec, base, key="by_category_margin"), ""]
    lines += [f"{CHANCE_MARK} no arm's 95% interval lies above that column's chance level (it contains chance, or "
              "lies below it): accuracy there does not separate any arm from guessing at this scale; the gold "
              "margin may still move.", ""]
    return lines


def _mean_module_share(recs: Sequence[Mapping[str, Any]], module: str) -> float | None:
    vals = [float((r.get("footprint_by_module") or {}).get(module)) for r in recs
            if _finite((r.get("footprint_by_module") or {}).get(module))]
    return float(np.mean(vals)) if vals else None


def footprint_md(results: Mapping[str, Any], records_by_arm: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """Footprints with and without embeddings, token diversity, the noise floor and C2's effect sizes."""
    arms = results.get("arms", {})
    lines = ["## Footprints", "",
             "How the update energy (‖ΔW‖F² per matrix, fine-tune minus its own base) spreads over the matrices "
             f"({docs_ref('metrics.md', 'footprint')}): *all* counts every matrix, *blocks only* leaves out the "
             "token embeddings and the output head, *per parameter* weighs each matrix's share by its size "
             f"({docs_ref('metrics.md', 'footprint-variants')}). Mean delta effective rank: the mean over matrices of "
             "the delta's effective rank. The claims use blocks only.", ""]
    body = []
    for name, e in arms.items():
        fv = e.get("footprint_variants") or {"all": e.get("footprint") or {}}
        body.append([cell(name)] + [fmt_ci(lookup(fv, f"{v}.entropy"), "entropy") for v in ("all", "blocks_only",
                                                                                            "per_parameter")]
                    + [fmt_ci(lookup(fv, f"{v}.delta_effective_rank"), "rank") for v in ("all", "blocks_only")]
                    + [fmt_ci(lookup(fv, "blocks_only.gini"), "fraction")])
    lines += table(["arm", "entropy (all)", "entropy (blocks only)", "entropy (per parameter)",
                    "mean Δ eff. rank (all)", "mean Δ eff. rank (blocks only)", "gini (blocks only)"], body) + [""]
    # token diversity
    lines += ["### Token diversity and the embeddings", "",
              "An embedding row that no batch touches gets no update, so the share of the update in the embeddings and "
              "the head follows how many distinct tokens the fine-tuning stream holds, not what it teaches: compare "
              "entropy with and without them. Distinct tokens: distinct token ids in the arm's fine-tuning stream; "
              "embed / lm_head: their share of the update energy (mean over runs).", ""]
    body = []
    for name, e in arms.items():
        recs = records_by_arm.get(name) or []
        emb, head = _mean_module_share(recs, "embed"), _mean_module_share(recs, "lm_head")
        both = (emb or 0.0) + (head or 0.0) if emb is not None or head is not None else None
        body.append([cell(name), fmt_ci(e.get("distinct_tokens"), "tokens"), fmt_num(emb, "share"),
                     fmt_num(head, "share"), fmt_num(both, "share"),
                     fmt_ci(lookup(e, "footprint_variants.all.entropy") or lookup(e, "footprint.entropy"), "entropy"),
                     fmt_ci(lookup(e, "footprint_variants.blocks_only.entropy"), "entropy")])
    lines += table(["arm", "distinct tokens", "embed share", "lm_head share", "embed + lm_head", "entropy (all)",
                    "entropy (blocks only)"], body) + [""]
    lines += noise_floor_md(results)
    lines += ["![footprint heatmaps](footprint_heatmaps.png)", "",
              "Layer × module energy share (transformer blocks only, mean over runs, one colour scale). The embeddings "
              "and output head are left out of the grid; their shares are in the token-diversity table above.", "",
              "![delta effective rank heatmaps](effective_rank_heatmaps.png)", "",
              "![effective-rank distributions](effective_rank.png)", "", "![footprint curves](footprint_curves.png)", ""]
    return lines


def _floor_table(first: str, entries: Mapping[str, Any], *, ratios: bool) -> list[str]:
    """Rows of a noise-floor table: pairs, the blocks-only footprint of the delta and its norms (with
    their ratio to the seed floor for between-arm deltas)."""
    body = []
    for name, f in entries.items():
        fp = f.get("footprint") or {}
        row = [cell(name), fmt_num(f.get("pairs"), "tokens"), fmt_num(fp.get("footprint_blocks_only.entropy"), "entropy"),
               fmt_num(fp.get("footprint_blocks_only.delta_effective_rank"), "rank")]
        for kind in ("blocks_only", "total"):
            row.append(fmt_num(f.get(f"delta_fro_{kind}"), "norm"))
            if ratios:
                row.append(fmt_num(f.get(f"over_floor_{kind}"), "ratio"))
        body.append(row)
    head = [first, "pairs", "entropy (blocks only)", "mean Δ eff. rank (blocks only)", "‖Δ‖F blocks only"]
    head += ["over floor (blocks only)", "‖Δ‖F total", "over floor (total)"] if ratios else ["‖Δ‖F total"]
    return table(head, body)


def noise_floor_md(results: Mapping[str, Any]) -> list[str]:
    """The seed-vs-seed floor per arm, the between-arms distances against it, and C2's effect sizes in seed sds."""
    floor = results.get("noise_floor") or {}
    lines = ["### Noise floor", ""]
    per_arm = floor.get("arms") or {}
    between = floor.get("between_arms") or {}
    if not per_arm:
        lines += ["(no noise floor computed: `analysis.noise_floor_pairs` is 0 or no claim arm has two seeds on a "
                  "base)", ""]
    else:
        lines += ["Two fine-tunes of one arm from one base with different seeds, diffed against each other: the "
                  "footprint of that seed-vs-seed delta (blocks only) and its Frobenius norm, mean over the pairs. "
                  "A difference between arms smaller than this is within what seeds alone produce.", ""]
        lines += _floor_table("arm", per_arm, ratios=False) + [""]
    if between:
        lines += ["Same base, different arm, on the floor's seed pairs (seed i of one arm against seed j of the other, "
                  "so the seed differs on both sides): how far apart two arms' fine-tunes are, and that distance over "
                  "the mean seed-vs-seed distance of the two arms (1 = no further apart than two seeds).", ""]
        lines += _floor_table("arms", between, ratios=True) + [""]
    sized = [t for c in results.get("claims") or [] for t in c.get("tests") or [] if "seed_sd" in t]
    if sized:
        lines += ["Footprint tests in units of the seed-to-seed spread (pooled within-base sd over seeds of the two "
                  "arms):", ""]
        body = [[cell(t.get("comparison")), fmt_num(t.get("diff"), metric_kind(t.get("metric")), signed=True),
                 fmt_num(t.get("seed_sd"), metric_kind(t.get("metric"))),
                 fmt_num(t.get("diff_over_seed_sd"), "ratio", signed=True), t.get("verdict") or "–"] for t in sized]
        lines += table(["comparison", "diff", "seed sd", "diff / seed sd", "verdict"], body) + [""]
    return lines


def regime_md(v: Mapping[str, Any] | None) -> str:
    """Markdown of the regime-score validation (results["regime_score"])."""
    if not v:
        return "(regime score not computed)"
    if v.get("note") and "arms" not in v:
        return f"(regime score: {v['note']})"
    lines = [f"Method: {v.get('method')}. Features: {', '.join(v.get('features', []))}.", ""]
    ho = v.get("held_out_seeds", {})
    if ho:
        def pct(x):
            return NA if x is None else f"{100 * x:.0f}%"
        lines.append(f"Leave-one-seed-out on the references ({ho.get('n')} held-out fine-tunes): point accuracy "
                     f"{pct(ho.get('point_accuracy'))}, can't-tell rate {pct(ho.get('cant_tell_rate'))}, accuracy "
                     f"when it decides {pct(ho.get('accuracy_when_decided'))}.")
    mono = v.get("mixture_monotonicity")
    if mono:
        lines.append(f"Held-out mixture arms: Spearman(coverage fraction, score) = {fmt_num(mono.get('spearman'), 'ratio')} "
                     f"over {len(mono.get('alpha', []))} fine-tunes.")
    body = []
    for arm, e in v.get("arms", {}).items():
        calls: dict[str, int] = {}
        for s in e.get("per_seed", []):
            calls[s["call"]] = calls.get(s["call"], 0) + 1
        body.append([cell(arm), "yes" if e.get("in_sample") else "no", fmt_num(e.get("mean"), "fraction"),
                     ", ".join(f"{k} × {n}" for k, n in calls.items())])
    lines += [""] + table(["arm", "in sample", "mean score", "calls over runs"], body)
    return "\n".join(lines)


FILES_MD = ["## Files", "",
            "| path | content |", "|---|---|",
            "| `results.json` | every number of this report (written last: its presence means the study finished) |",
            "| `arms/ARM/baseB/seedS/run/` | the fine-tune of arm ARM from base B with seed S (a training run folder) |",
            "| `arms/ARM/baseB/seedS/diagnose/` | its diagnose output against base B: metrics.csv, summary.json, "
            "report.md |",
            "| `arms/ARM/baseB/seedS/record.json` | that run's evals (every item and passage), footprint variants, "
            "distinct tokens, energy share per module, per-matrix rows, footprint and loss along training |",
            "| `bases/baseB/` | base B: its pretraining run (`run/`), `done.json`, `eval.json` (before fine-tuning) |",
            "| `noise_floor/` | seed-vs-seed (`ARM/baseB/seedA-seedB.json`) and arm-vs-arm "
            "(`A-vs-B/baseB/seedS.json`) footprints behind the noise floor |",
            "| `items.csv` | one row per eval item per run: arm, base, seed, category, skill, format, item_id, correct, "
            "gold_logprob, margin (arm `base`, seed empty: the bases before fine-tuning) |",
            "| `passages.csv` | one row per held-out passage per run: arm, base, seed, passage, tokens, logprob |",
            "| `*.png` | the figures above |", ""]


def _matrix_rows(records_by_arm: Mapping[str, Sequence[Mapping[str, Any]]]):
    rows_by_arm: dict[str, list[dict]] = {}
    mean_rows_by_arm: dict[str, list[dict]] = {}
    for arm, recs in records_by_arm.items():
        pooled = [m for r in recs for m in r.get("matrices") or []]
        rows_by_arm[arm] = pooled
        by_name: dict[str, list[dict]] = {}
        for m in pooled:
            by_name.setdefault(m["name"], []).append(m)

        def mean(ms, k):
            v = [float(x[k]) for x in ms if _finite(x.get(k))]
            return float(np.mean(v)) if v else float("nan")

        mean_rows_by_arm[arm] = [{**ms[0], "energy_share": mean(ms, "energy_share"),
                                  "delta_effective_rank": mean(ms, "delta_effective_rank")} for ms in by_name.values()]
    return rows_by_arm, mean_rows_by_arm


def write_study_report(out_dir: Path, *, title: str, results: Mapping[str, Any],
                       records_by_arm: Mapping[str, Sequence[Mapping[str, Any]]],
                       base_curves: Mapping[int, Sequence[Mapping[str, Any]]] | None = None,
                       arm_notes: Mapping[str, str] | None = None, extra_md: str = "") -> list[str]:
    """Write report.md and the figures into out_dir; returns the figure file names."""
    out_dir = Path(out_dir)
    arms = results.get("arms", {})
    base = results.get("base")
    order = list(arms) + [a for a in records_by_arm if a not in arms]
    records_by_arm = {a: list(records_by_arm[a]) for a in order if records_by_arm.get(a)}
    styles = arm_styles(order)  # one (colour, line style, marker) per arm in every figure
    rows_by_arm, mean_rows_by_arm = _matrix_rows(records_by_arm)
    figs = [
        fig_narrow_broad(arms, base, out_dir / "narrow_broad.png", results.get("chance"), styles),
        fig_perplexity(arms, base, out_dir / "perplexity.png", styles),
        fig_heatmaps(mean_rows_by_arm, out_dir / "footprint_heatmaps.png"),
        fig_heatmaps(mean_rows_by_arm, out_dir / "effective_rank_heatmaps.png", key="delta_effective_rank",
                     title="delta effective rank"),
        fig_effective_rank(rows_by_arm, out_dir / "effective_rank.png"),
        fig_footprint_curves(records_by_arm, out_dir / "footprint_curves.png", styles),
        fig_training_curves(records_by_arm, base_curves, out_dir / "training_curves.png", styles),
    ]
    if (results.get("regime_score") or {}).get("arms"):
        figs.append(fig_regime_score(results["regime_score"], out_dir / "regime_score.png", styles))
    md = [f"# {title}", ""]
    if results.get("description"):
        md += [str(results["description"]), ""]
    md += rehearsal_md(results)
    md += design_md(results, arm_notes)
    md += data_md(results)
    md += findings_md(results.get("claims") or [])
    md += power_md(results)
    md += base_md(results)
    md += scores_md(results)
    md += footprint_md(results, records_by_arm)
    if results.get("regime_score"):
        md += ["## Regime score (beyond the paper)", "", regime_md(results.get("regime_score")), ""]
        if "regime_score.png" in figs:
            md += ["![regime score](regime_score.png)", ""]
    md += ["## Training curves", "", "![training curves](training_curves.png)", ""]
    if extra_md:
        md += [extra_md, ""]
    md += FILES_MD + [f"Layout and keys: {docs_ref('outputs.md', 'experiment-output')}.", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    return figs
