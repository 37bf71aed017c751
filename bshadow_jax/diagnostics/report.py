"""report.md and PNG figures for `bshadow diagnose` and `bshadow spectrum` (docs/outputs.md#diagnose-output).

Figures use matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), so
writing a report never touches a user's interactive session. Every figure and report.md is
written atomically. Inputs may be degenerate (no rows, one layer, no layer ids, several
components, MoE experts, values read back from CSV as strings): nothing here raises on them.
"""
from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bshadow_jax.diagnostics.footprint import footprint_stats
from bshadow_jax.fileio import atomic_write_text
from bshadow_jax.diagnostics.report_figures import (FIG_ALPHA, FIG_ENERGY, FIG_ERANK, FIG_FOOTPRINT,
                                                    FIG_SPECTRA, TOP_ESD, _alpha_figure, _esd_fit_figure,
                                                    _footprint_figure, _heatmap, _spectra_figure)
from bshadow_jax.reporting import cell, docs_ref, fmt, module_key, num, table

TOP_SPECTRA = 8
TOP_TABLE = 10

# ------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------

def _energy_shares(rows: Sequence[Mapping], kind: str) -> np.ndarray:
    """energy_share column; for spectrum rows without it, the weights' own ‖W‖F² share."""
    share = np.array([num(r.get("energy_share")) for r in rows], dtype=np.float64)
    if rows and np.all(np.isnan(share)):
        col = "delta_fro" if kind == "diagnose" else "fro"
        fro = np.array([num(r.get(col)) for r in rows], dtype=np.float64)
        e = np.where(np.isfinite(fro), fro * fro, 0.0)
        share = e / e.sum() if e.sum() > 0 else np.zeros_like(e)
    return np.where(np.isfinite(share), share, 0.0)


def _skipped_items(skipped: Any) -> list[tuple[str, str]]:
    """(name, reason) pairs from a list of dicts/strings/pairs or a {name: reason} dict."""
    out: list[tuple[str, str]] = []
    if not skipped:
        return out
    if isinstance(skipped, Mapping):
        for k, v in skipped.items():
            if isinstance(v, (list, tuple)):  # {reason: [names]}
                out += [(str(n), str(k)) for n in v]
            else:
                out.append((str(k), str(v)))
        return out
    for item in skipped:
        if isinstance(item, Mapping):
            out.append((str(item.get("name", item.get("tensor", "?"))), str(item.get("reason", "?"))))
        elif isinstance(item, (list, tuple)) and len(item) >= 2:
            out.append((str(item[0]), str(item[1])))
        else:
            out.append((str(item), "?"))
    return out


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------

def _group_table(rows, shares, key, metric_cols, precomputed) -> list[list[str]]:
    """by_<key> rows: from summary.json when given, else aggregated from the rows."""
    body = []
    if isinstance(precomputed, Mapping) and precomputed:
        for g, d in precomputed.items():
            d = d if isinstance(d, Mapping) else {}
            body.append([cell(g), fmt(d.get("matrices")), fmt(d.get("energy_share"))]
                        + [fmt(d.get(c)) for c in metric_cols])
        return body
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        v = r.get(key)
        groups["none" if v is None or v == "" else str(v)].append(i)
    order = module_key if key == "module" else (lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k))
    for g in sorted(groups, key=order):
        idx = groups[g]
        cols = []
        for c in metric_cols:
            vals = np.array([num(rows[i].get(c)) for i in idx])
            vals = vals[np.isfinite(vals)]
            cols.append(fmt(vals.mean()) if vals.size else "–")
        body.append([cell(g), str(len(idx)), fmt(float(shares[idx].sum()))] + cols)
    return body


def write_report(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any] | None,
                 spectra: Mapping[str, Any] | None, *, kind: str = "diagnose", title: str | None = None) -> dict:
    """Write ``report.md`` and its PNG figures into ``out_dir`` (created if needed).

    rows: one dict per analysed matrix with the metrics.csv columns (name, component, layer,
      module, expert, rows, cols, ... energy_share ...); values may be numbers or CSV strings.
    summary: the summary.json dict (``footprint``, ``by_layer``/``by_module``/``by_component``,
      ``skipped``); missing parts are recomputed from the rows.
    spectra: name -> singular values, of ΔW (diagnose) or of W (spectrum); the matrices with
      the largest energy share among those given are plotted.
    kind: "diagnose" or "spectrum" (adds the alpha histogram; heatmaps use the weights' own
      energy share and effective rank).

    Returns {"report": path of report.md, "figures": [file names written], "esd_fits": [paths
    under esd_fits/ (spectrum only)]}.
    """
    if kind not in ("diagnose", "spectrum"):
        raise ValueError(f"kind must be 'diagnose' or 'spectrum', not {kind!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(rows or [])
    summary = dict(summary or {})
    spectra = dict(spectra or {})
    d = "delta_" if kind == "diagnose" else ""

    shares = _energy_shares(rows, kind)
    fp = footprint_stats(shares)
    given_fp = summary.get("footprint")
    if isinstance(given_fp, Mapping):
        fp.update({k: v for k, v in given_fp.items() if v is not None})
    erank_col = next((c for c in (f"{d}effective_rank", "effective_rank") if any(c in r for r in rows)),
                     f"{d}effective_rank")
    erank = np.array([num(r.get(erank_col)) for r in rows], dtype=np.float64)

    figures: list[str] = []
    what = "ΔW" if kind == "diagnose" else "W"
    for name, vals, reduce, title_, cbar in (
        (FIG_ENERGY, shares, "sum", f"energy share of {what} (sum per cell)", "energy share"),
        (FIG_ERANK, erank, "mean", f"effective rank of {what} (mean per cell)", erank_col),
    ):
        if name == FIG_ERANK and not np.isfinite(erank).any():
            continue
        f = _heatmap(out, name, rows, vals, reduce=reduce, title=title_, cbar=cbar)
        if f:
            figures.append(f)

    share_by_name = {str(r.get("name")): s for r, s in zip(rows, shares)}
    top_spec = sorted(spectra, key=lambda n: -share_by_name.get(str(n), -1.0))[:TOP_SPECTRA]
    f = _spectra_figure(out, top_spec, spectra, kind)
    if f:
        figures.append(f)
    frac90 = num(fp.get("matrices_for_90pct"))
    f = _footprint_figure(out, shares, frac90 if math.isfinite(frac90) else 0.0, kind)
    if f:
        figures.append(f)
    if kind == "spectrum":
        alphas = np.array([num(r.get("alpha")) for r in rows], dtype=np.float64)
        f = _alpha_figure(out, alphas)
        if f:
            figures.append(f)
    esd = []
    if kind == "spectrum":
        row_by_name = {str(r.get("name")): r for r in rows}
        for i, n in enumerate(top_spec[:TOP_ESD]):
            f = _esd_fit_figure(out, i, str(n), spectra[n], row_by_name.get(str(n), {}))
            if f:
                esd.append((str(n), f))

    skipped = _skipped_items(summary.get("skipped"))
    md = _markdown(rows, shares, summary, fp, skipped, figures, kind, title, d, erank_col, top_spec)
    if esd:
        md += "\n## ESD fits\n\nESD of the top matrices by ‖W‖F² share, log-log, with the power law fitted from xmin " \
              f"({docs_ref('metrics.md', 'power-law-metrics')}).\n\n"
        md += "".join(f"![{cell(n)}]({f})\n\n`{cell(n)}`\n\n" for n, f in esd)
        md = md.rstrip() + "\n"
    atomic_write_text(out / "report.md", md)
    return {"report": str(out / "report.md"), "figures": figures, "esd_fits": [f for _, f in esd]}


def _checkpoints_md(sources: Any) -> list[str]:
    """Which checkpoints, in which format and stored dtypes, and what the readers dequantized."""
    if not isinstance(sources, Mapping) or not sources:
        return []
    body, notes = [], []
    for role, d in sources.items():
        if not isinstance(d, Mapping):
            continue
        dt = d.get("dtypes") or {}
        body.append([cell(role), f"`{cell(d.get('path'))}`", cell(d.get("kind")),
                     cell(", ".join(f"{k} × {v}" for k, v in dt.items()))])
        if d.get("dequantized"):
            q = ", ".join(d["dequantized"])
            notes.append(f"The {role} checkpoint stores {q} tensors: they were dequantized to float32 before any "
                         "metric, so its deltas include the quantization error.")
    return ["", "## Checkpoints", ""] + table(["role", "path", "format", "stored dtypes (tensors)"], body) + \
        ([""] + notes if notes else [])


def _probe_md(probe: Any) -> list[str]:
    if not isinstance(probe, Mapping):
        return []
    facts = [("text", f"`{cell(probe.get('text'))}`"), ("tokens scored", fmt(probe.get("tokens"))),
             ("KL(base ‖ tuned), nats/token", fmt(probe.get("kl_base_tuned"))),
             ("KL(tuned ‖ base), nats/token", fmt(probe.get("kl_tuned_base"))),
             ("perplexity base → tuned", f"{fmt(probe.get('ppl_base'))} → {fmt(probe.get('ppl_tuned'))}"),
             ("top-1 agreement", fmt(probe.get("top1_agreement")))]
    return ["", "## Functional change on the probe text", "",
            f"How much the predictions moved, beside how much the weights moved ({docs_ref('metrics.md', 'probe')}).",
            ""] + table(["quantity", "value"], facts)


def _markdown(rows, shares, summary, fp, skipped, figures, kind, title, d, erank_col, top_spec) -> str:
    title = title or ("bshadow diagnose: spectral footprint of the fine-tuning delta" if kind == "diagnose"
                      else "bshadow spectrum: weight spectra")
    L: list[str] = [f"# {title}", ""]
    n = len(rows)
    if kind == "diagnose":
        L.append(f"ΔW = W_tuned − W_base per matrix. Metric definitions: {docs_ref('metrics.md', 'delta-metrics')}; "
                 f"files and columns: {docs_ref('outputs.md', 'diagnose-output')}.")
    else:
        L.append("Spectra of the weights themselves; alpha, xmin, D, log_norm, log_spectral_norm, alpha_weighted, "
                 "num_spikes and mp_softrank "
                 f"as WeightWatcher 0.7.x computes them. Definitions: {docs_ref('metrics.md', 'power-law-metrics')}; "
                 f"files and columns: {docs_ref('outputs.md', 'spectrum-output')}.")
    L += _checkpoints_md(summary.get("sources"))
    L += ["", "## Summary", ""]
    facts = [("matrices analysed", str(n)), ("tensors skipped", str(len(skipped)))]
    if kind == "diagnose":  # a footprint is a property of an update, not of the weights themselves
        facts += [("footprint entropy", fmt(fp.get("entropy"))), ("footprint gini", fmt(fp.get("gini"))),
                  ("matrices_for_90pct", fmt(fp.get("matrices_for_90pct")))]
        frac = num(fp.get("matrices_for_90pct"))
        if math.isfinite(frac) and n:
            facts.append(("matrices holding 90% of the energy", f"{int(round(frac * n))} of {n}"))
        changed = int(np.sum(shares > 0))
        facts.append(("matrices changed (ΔW ≠ 0)", f"{changed} of {n}"))
    if kind == "diagnose":
        dfro = np.array([num(r.get("delta_fro")) for r in rows])
        bfro = np.array([num(r.get("base_fro")) for r in rows])
        if np.isfinite(dfro).any():
            tot_d = math.sqrt(float(np.nansum(dfro ** 2)))
            facts.append(("total ‖ΔW‖F", fmt(tot_d)))
            if np.isfinite(bfro).any() and np.nansum(bfro ** 2) > 0:
                facts.append(("total ‖ΔW‖F / ‖W_base‖F", fmt(tot_d / math.sqrt(float(np.nansum(bfro ** 2))))))
    else:
        alphas = np.array([num(r.get("alpha")) for r in rows])
        ok = alphas[np.isfinite(alphas) & (alphas > 0)]
        if ok.size:
            facts.append(("median alpha", fmt(np.median(ok))))
            facts.append(("alpha < 2 (WW: over-trained)", str(int(np.sum(ok < 2)))))
            facts.append(("alpha > 6 (WW: under-trained)", str(int(np.sum(ok > 6)))))
    L += table(["quantity", "value"], facts)

    if n == 0:
        L += ["", "No matrix was analysed."]
    else:
        order = np.argsort(-shares, kind="stable")[:TOP_TABLE]
        if kind == "diagnose":  # a matrix that did not change has nothing to show
            order = np.array([i for i in order if shares[i] > 0], dtype=int)
        if kind == "diagnose":
            cols = ["rel_delta", "energy_share", f"{d}effective_rank", f"{d}stable_rank", f"{d}energy_rank_90",
                    "base_overlap", "intruder_count"]
        else:
            cols = ["fro", "spectral_norm", "stable_rank", "effective_rank", "alpha", "alpha_weighted",
                    "log_spectral_norm"]
        cols = [c for c in cols if any(c in r for r in rows)]
        body = []
        for i in order:
            r = rows[i]
            shape = f"{fmt(r.get('rows'))}×{fmt(r.get('cols'))}"
            vals = [fmt(shares[i]) if c == "energy_share" else fmt(r.get(c)) for c in cols]
            body.append([f"`{cell(r.get('name'))}`", cell(r.get("component") or ""), fmt(r.get("layer")),
                         cell(r.get("module") or ""), shape] + vals)
        share_of = "‖ΔW‖F²" if kind == "diagnose" else "‖W‖F²"
        L += ["", f"## Top {len(order)} matrices by energy share (of {share_of})", ""]
        L += table(["name", "component", "layer", "module", "shape"] + cols, body) if body else \
            ["No matrix changed: ΔW = 0 everywhere."]

        metric_cols = [c for c in ("rel_delta", f"{d}effective_rank", f"{d}stable_rank") if any(c in r for r in rows)]
        if kind == "spectrum":
            metric_cols = [c for c in ("effective_rank", "stable_rank", "alpha") if any(c in r for r in rows)]
        for key, label in (("component", "component"), ("module", "module")):
            # spectrum summaries carry no energy share: aggregate the rows' own ‖W‖F² shares
            pre = summary.get(f"by_{key}") if kind == "diagnose" else None
            body = _group_table(rows, shares, key, metric_cols, pre)
            L += ["", f"## By {label}", ""]
            L += table([label, "matrices", "energy share"] + [f"mean {c}" for c in metric_cols], body)

    L += _probe_md(summary.get("probe"))
    L += ["", "## Skipped tensors", ""]
    if skipped:
        # group "shape mismatch: base [..] vs tuned [..]" and the like by their lead words
        reasons = Counter(reason.split(":")[0] for _, reason in skipped)
        L += table(["reason", "tensors"], [[cell(k), str(v)] for k, v in reasons.most_common()])
        L += ["", "First skipped tensors: " + ", ".join(f"`{cell(nm)}` ({cell(rs)})" for nm, rs in skipped[:20])]
    else:
        L.append("None.")

    captions = {
        FIG_ENERGY: "Energy share per layer × module (sum over matrices in the cell, e.g. MoE experts).",
        FIG_ERANK: f"Effective rank ({erank_col}) per layer × module (mean over matrices in the cell).",
        FIG_SPECTRA: "Singular value spectra of the matrices with the largest energy share: "
                     + ", ".join(f"`{cell(x)}`" for x in top_spec) + ".",
        FIG_FOOTPRINT: "Footprint curve: cumulative energy share over matrices sorted by share; dashed: 90%.",
        FIG_ALPHA: "Histogram of WeightWatcher alpha; dashed lines at 2 and 6.",
    }
    if figures:
        L += ["", "## Figures", ""]
        for f in figures:
            L += [f"![{f}]({f})", "", captions.get(f, ""), ""]
    return "\n".join(L).rstrip() + "\n"
