"""Study report: report.md and PNG figures from the per-seed records and results.json.

Figures (each written atomically):
  narrow_broad.png       narrow against broad per arm, 95% intervals as error bars
  footprint_heatmaps.png layer x module energy share of each arm (mean over seeds), side by side
  effective_rank.png     distribution of per-matrix delta effective rank per arm (all seeds pooled)
  footprint_curves.png   cumulative energy over sorted matrices per arm; footprint entropy along training
  training_curves.png    fine-tuning loss per arm (mean over seeds) and the base's pretraining loss
  regime_score.png       regime score per arm and seed with bootstrap intervals
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bshadow_jax.fileio import atomic_write_text
from bshadow_jax.reporting import docs_ref, fmt_or_na, layer_module_grid, save_figure, subplots, table

__all__ = ["category_table", "claims_md", "fig_effective_rank", "fig_footprint_curves", "fig_heatmaps",
           "fig_narrow_broad", "fig_regime_score", "fig_training_curves", "fmt_ci", "lookup", "regime_md",
           "results_table", "write_study_report"]


def _m(ci: Any) -> float:
    if isinstance(ci, Mapping) and ci.get("mean") is not None:
        return float(ci["mean"])
    return float("nan")


def _err(ci: Any) -> tuple[float, float]:
    if isinstance(ci, Mapping) and ci.get("lo") is not None and ci.get("mean") is not None:
        return float(ci["mean"] - ci["lo"]), float(ci["hi"] - ci["mean"])
    return 0.0, 0.0


def lookup(entry: Mapping, path: str) -> Any:
    """entry["a"]["b"]["c"] for path "a.b.c"; None where a step is missing or not a mapping."""
    node: Any = entry
    for p in path.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def fmt_ci(ci: Any, digits: int = 3) -> str:
    """"mean [lo, hi]" of an interval dict ({"mean", "lo", "hi"}), the mean alone without bounds, else "n/a"."""
    if not isinstance(ci, Mapping) or ci.get("mean") is None:
        return "n/a"
    if ci.get("lo") is None:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


# ---------------------------------------------------------------- figures

def fig_narrow_broad(arms: Mapping[str, Any], base_eval: Mapping[str, Any] | None, path: Path) -> str:
    fig, ax = subplots(figsize=(6.5, 5))
    for i, (name, entry) in enumerate(arms.items()):
        n, b = lookup(entry, "narrow.score"), lookup(entry, "broad.score")
        xe, ye = _err(n), _err(b)
        ax.errorbar(_m(n), _m(b), xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt="o", capsize=3,
                    color=f"C{i % 10}", label=name)
    if base_eval:
        bn, bb = lookup(base_eval, "narrow.score"), lookup(base_eval, "broad.score")
        if isinstance(bn, (int, float)) and isinstance(bb, (int, float)):
            ax.plot([bn], [bb], "k*", ms=12, label="base")
    ax.set_xlabel("narrow score (benchmark)")
    ax.set_ylabel("broad score")
    ax.set_title("narrow vs broad per arm (mean, 95% CI over seeds)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def fig_heatmaps(rows_by_arm: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, key: str = "energy_share",
                 title: str = "energy share") -> str:
    names = [a for a, rows in rows_by_arm.items() if rows]
    if not names:
        fig, ax = subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no diagnose rows", ha="center")
        return save_figure(fig, path)
    grids = {a: layer_module_grid(rows_by_arm[a], [r.get(key) for r in rows_by_arm[a]], reduce="sum",
                                  layers_only=True) for a in names}
    vmax = max(float(np.nanmax(g[2])) if np.isfinite(g[2]).any() else 0.0 for g in grids.values()) or 1.0
    ncol = min(len(names), 4)
    nrow = math.ceil(len(names) / ncol)
    fig, axes = subplots(nrow, ncol, figsize=(3.4 * ncol, 2.6 * nrow + 0.4), squeeze=False)
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
    fig.suptitle(f"layer x module {title} per arm (mean over seeds; same colour scale)", fontsize=9)
    return save_figure(fig, path)


def fig_effective_rank(rows_by_arm: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> str:
    names = [a for a, rows in rows_by_arm.items() if rows]
    data = [[float(r["delta_effective_rank"]) for r in rows_by_arm[a] if r.get("delta_effective_rank") is not None]
            for a in names]
    fig, ax = subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
    if names:
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("delta effective rank (per matrix)")
    ax.set_title("effective-rank distribution of the fine-tuning deltas (all matrices, all seeds)")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def fig_footprint_curves(records_by_arm: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> str:
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    for i, (arm, recs) in enumerate(records_by_arm.items()):
        color = f"C{i % 10}"
        curves = []
        for r in recs:
            shares = np.sort(np.array([float(m["energy_share"]) for m in r.get("matrices", [])]))[::-1]
            if shares.size:
                curves.append(np.cumsum(shares) / max(shares.sum(), 1e-30))
        if curves:
            n = min(len(c) for c in curves)
            mean = np.mean([c[:n] for c in curves], axis=0)
            ax1.plot(np.arange(1, n + 1) / n, mean, color=color, label=arm)
        xs, ys = _mean_curve(recs, "footprint_curve", "entropy")
        if xs:
            ax2.plot(xs, ys, "o-", color=color, label=arm, ms=3)
    ax1.set_xlabel("fraction of matrices (sorted by energy share)")
    ax1.set_ylabel("cumulative share of update energy")
    ax1.set_title("footprint curve (final fine-tune vs base)")
    ax1.axhline(0.9, color="grey", lw=0.5, ls="--")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xlabel("fine-tuning step")
    ax2.set_ylabel("footprint entropy")
    ax2.set_title("footprint entropy along training (mean over seeds)")
    ax2.grid(alpha=0.3)
    return save_figure(fig, path)


def _mean_curve(recs: Sequence[Mapping[str, Any]], curve: str, key: str) -> tuple[list[int], list[float]]:
    """Steps and the mean over seeds (records) of `key` along each record's `curve`."""
    steps: dict[int, list[float]] = {}
    for r in recs:
        for pt in r.get(curve, []):
            if pt.get(key) is not None:
                steps.setdefault(int(pt["step"]), []).append(float(pt[key]))
    xs = sorted(steps)
    return xs, [float(np.mean(steps[s])) for s in xs]


def fig_training_curves(records_by_arm: Mapping[str, Sequence[Mapping[str, Any]]],
                        base_curve: Sequence[Mapping[str, Any]] | None, path: Path) -> str:
    fig, axes = subplots(1, 2 if base_curve else 1, figsize=(11 if base_curve else 6, 4), squeeze=False)
    ax = axes[0][0]
    for i, (arm, recs) in enumerate(records_by_arm.items()):
        xs, ys = _mean_curve(recs, "train_curve", "loss")
        if xs:
            ax.plot(xs, ys, color=f"C{i % 10}", label=arm)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("training loss (own data)")
    ax.set_title("fine-tuning loss per arm (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if base_curve:
        ax = axes[0][1]
        pts = [(int(p["step"]), float(p["loss"])) for p in base_curve if p.get("loss") is not None]
        if pts:
            ax.plot(*zip(*pts), color="k")
        ax.set_xlabel("pretraining step")
        ax.set_ylabel("loss")
        ax.set_title("base pretraining loss")
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def fig_regime_score(validation: Mapping[str, Any], path: Path) -> str:
    arms = validation.get("arms", {})
    fig, ax = subplots(figsize=(max(5, 0.9 * len(arms) + 2), 4))
    for i, (arm, entry) in enumerate(arms.items()):
        for j, s in enumerate(entry.get("per_seed", [])):
            x = i + (j - 1) * 0.12
            lo, hi = s.get("lo"), s.get("hi")
            if lo is not None:
                ax.errorbar(x, s["score"], yerr=[[s["score"] - lo], [hi - s["score"]]], fmt="o", color=f"C{i % 10}",
                            capsize=2, ms=4)
            else:
                ax.plot(x, s["score"], "o", color=f"C{i % 10}")
    ax.axhline(0.0, color="C3", lw=0.7, ls="--")
    ax.axhline(1.0, color="C2", lw=0.7, ls="--")
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.set_xticks(range(len(arms)), list(arms), rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("regime score (0 = aligned ref, 1 = coverage ref)")
    ax.set_title("regime score per arm and seed (95% bootstrap interval)")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


# ---------------------------------------------------------------- report.md

def results_table(arms: Mapping[str, Any]) -> str:
    """Markdown table of each arm's seeds, narrow/broad scores and footprint, with intervals."""
    body = [[name, str(len(e.get("seeds", []))), fmt_ci(lookup(e, "narrow.score")), fmt_ci(lookup(e, "broad.score")),
             fmt_ci(lookup(e, "footprint.entropy")), fmt_ci(lookup(e, "footprint.delta_effective_rank"), 2),
             fmt_ci(lookup(e, "footprint.gini"))] for name, e in arms.items()]
    return "\n".join(table(["arm", "seeds", "narrow", "broad", "footprint entropy", "mean delta eff. rank", "gini"],
                           body))


def category_table(arms: Mapping[str, Any], section: str) -> str:
    """Markdown table of each arm's per-category scores of `section` ("narrow" or "broad")."""
    cats: list[str] = []
    for e in arms.values():
        for c in (lookup(e, f"{section}.by_category") or {}):
            if c not in cats:
                cats.append(c)
    if not cats:
        return f"(no per-category {section} scores)"
    body = [[name] + [fmt_ci(lookup(e, f"{section}.by_category.{c}"), 3) for c in cats] for name, e in arms.items()]
    return "\n".join(table(["arm"] + cats, body))


def claims_md(claims: Sequence[Mapping[str, Any]]) -> str:
    """Markdown of each claim's verdict and its tests."""
    out = []
    for c in claims:
        out.append(f"### {c['id']}: {c['claim']}\n\n**{c['verdict'].upper()}** at this scale (held = {c['held']}).\n")
        if c.get("note"):
            out.append(f"_{c['note']}_\n")
        if c.get("design"):
            out.append(f"Design: {c['design']}.\n")
        for t in c.get("tests", []):
            if "data_effect" in t:
                de, se = t["data_effect"], t["setting_effect"]
                out.append(f"- {t['comparison']}: data effect {fmt_or_na(de.get('diff'))} "
                           f"[{fmt_or_na(de.get('lo'))}, {fmt_or_na(de.get('hi'))}], setting effect "
                           f"{fmt_or_na(se.get('diff'))} [{fmt_or_na(se.get('lo'))}, {fmt_or_na(se.get('hi'))}] -> "
                           f"{t['verdict']}")
            else:
                extra = ""
                if "fraction_of_separation" in t:
                    extra = f"; {t['fraction_of_separation']:.2f} of the aligned-coverage separation"
                means = ""
                if t.get("a_mean") is not None:
                    means = f" (means {fmt_or_na(t['a_mean'])} vs {fmt_or_na(t['b_mean'])})"
                out.append(f"- {t['comparison']}{means}: difference {fmt_or_na(t.get('diff'))} 95% CI "
                           f"[{fmt_or_na(t.get('lo'))}, {fmt_or_na(t.get('hi'))}]{extra} -> {t['verdict']}")
        for path, effs in (c.get("footprint_effects") or {}).items():
            parts = [f"{k} {fmt_or_na(v.get('diff'))} [{fmt_or_na(v.get('lo'))}, {fmt_or_na(v.get('hi'))}]"
                     for k, v in effs.items()]
            out.append(f"- {path}: " + "; ".join(parts))
        for k, v in (c.get("score_shifts") or {}).items():
            out.append(f"- {k} score shift: {fmt_or_na(v.get('diff'))} [{fmt_or_na(v.get('lo'))}, {fmt_or_na(v.get('hi'))}]")
        out.append("")
    return "\n".join(out)


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
            return "n/a" if x is None else f"{100 * x:.0f}%"
        lines.append(f"Leave-one-seed-out on the references ({ho.get('n')} held-out fine-tunes): point accuracy "
                     f"{pct(ho.get('point_accuracy'))}, can't-tell rate {pct(ho.get('cant_tell_rate'))}, accuracy "
                     f"when it decides {pct(ho.get('accuracy_when_decided'))}.")
    mono = v.get("mixture_monotonicity")
    if mono:
        lines.append(f"Held-out mixture arms: Spearman(coverage fraction, score) = {fmt_or_na(mono.get('spearman'))} "
                     f"over {len(mono.get('alpha', []))} fine-tunes.")
    body = []
    for arm, e in v.get("arms", {}).items():
        m = e.get("mean")
        body.append([arm, "yes" if e.get("in_sample") else "no", "n/a" if m is None else f"{m:.3f}",
                     ", ".join(s["call"] for s in e.get("per_seed", []))])
    lines += [""] + table(["arm", "in sample", "mean score", "calls per seed"], body)
    return "\n".join(lines)


def write_study_report(out_dir: Path, *, title: str, results: Mapping[str, Any],
                       records_by_arm: Mapping[str, Sequence[Mapping[str, Any]]],
                       base_eval: Mapping[str, Any] | None = None, base_curve: Sequence[Mapping[str, Any]] | None = None,
                       arm_notes: Mapping[str, str] | None = None, extra_md: str = "") -> list[str]:
    """Write report.md and the figures into out_dir; returns the figure file names."""
    out_dir = Path(out_dir)
    arms = results.get("arms", {})
    rows_by_arm: dict[str, list[dict]] = {}
    mean_rows_by_arm: dict[str, list[dict]] = {}
    for arm, recs in records_by_arm.items():
        pooled = [m for r in recs for m in r.get("matrices", [])]
        rows_by_arm[arm] = pooled
        by_name: dict[str, list[dict]] = {}
        for m in pooled:
            by_name.setdefault(m["name"], []).append(m)
        mean_rows_by_arm[arm] = [
            {**ms[0], "energy_share": float(np.mean([float(x["energy_share"]) for x in ms])),
             "delta_effective_rank": float(np.mean([float(x["delta_effective_rank"]) for x in ms]))}
            for ms in by_name.values()]
    figs = [
        fig_narrow_broad(arms, base_eval, out_dir / "narrow_broad.png"),
        fig_heatmaps(mean_rows_by_arm, out_dir / "footprint_heatmaps.png"),
        fig_heatmaps(mean_rows_by_arm, out_dir / "effective_rank_heatmaps.png", key="delta_effective_rank",
                     title="delta effective rank"),
        fig_effective_rank(rows_by_arm, out_dir / "effective_rank.png"),
        fig_footprint_curves(records_by_arm, out_dir / "footprint_curves.png"),
        fig_training_curves(records_by_arm, base_curve, out_dir / "training_curves.png"),
    ]
    if results.get("regime_score", {}).get("arms"):
        figs.append(fig_regime_score(results["regime_score"], out_dir / "regime_score.png"))
    md = [f"# {title}", ""]
    if results.get("description"):
        md += [results["description"], ""]
    md += ["## Results (mean and 95% t-interval over seeds)", "", results_table(arms), "",
           f"Metric definitions: {docs_ref('metrics.md', 'footprint')} (footprint) and "
           f"{docs_ref('metrics.md', 'study-statistics')} (intervals, claims); files: {docs_ref('outputs.md', 'experiment-output')}.",
           ""]
    if base_eval:
        md += [f"Base model before fine-tuning: narrow {fmt_or_na(lookup(base_eval, 'narrow.score'))}, "
               f"broad {fmt_or_na(lookup(base_eval, 'broad.score'))}.", ""]
    text = (results.get("settings") or {}).get("general_text") or {}
    if text.get("used"):
        md += [f"General text used: {text['used']} (requested: {text.get('requested')}).", ""]
    md += ["![narrow vs broad](narrow_broad.png)", "", "## Claims", "", claims_md(results.get("claims", [])),
           "## Narrow by category", "", category_table(arms, "narrow"), "",
           "## Broad by category", "", category_table(arms, "broad"), "",
           "## Footprints", "", "![footprint heatmaps](footprint_heatmaps.png)", "",
           "![delta effective rank heatmaps](effective_rank_heatmaps.png)", "",
           "![effective-rank distributions](effective_rank.png)", "", "![footprint curves](footprint_curves.png)", "",
           "## Training curves", "", "![training curves](training_curves.png)", ""]
    if results.get("regime_score"):
        md += ["## Regime score (beyond the paper)", "", regime_md(results.get("regime_score")), ""]
        if "regime_score.png" in figs:
            md += ["![regime score](regime_score.png)", ""]
    if arm_notes:
        md += ["## Arms", ""] + table(["arm", "what changes"], [[a, n] for a, n in arm_notes.items()]) + [""]
    if extra_md:
        md += [extra_md, ""]
    md += ["## Files", "", "Each arm and seed has a folder `arms/ARM/seedS/` with its training run (`run/`), the diagnose "
           "output against the base (`diagnose/`: metrics.csv, summary.json, report.md), and `record.json` "
           "(evals, footprint, footprint along training, loss curve).", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(md))
    return figs
