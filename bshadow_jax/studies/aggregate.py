"""Per-run records -> the arrays the statistics resample, and each arm's summary entry.

A run is one fine-tune (arm, base, seed). Its record (studies.runner) keeps every scored eval
item (`items`), every held-out passage's log-probability (`passages`) and its footprint in three
variants (`footprint_variants`). `ArmRuns` turns an arm's records into base -> [seeds, items]
arrays; `measure` gives a named quantity's estimate and bootstrap replicates; `arm_entry` is the
arm's results.json entry, every number a {"mean", "lo", "hi", "se", "n_boot", "values"} interval
from the hierarchical bootstrap of studies.stats (over bases and seeds, and items where there are).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from bshadow_jax.diagnostics.footprint import NON_BLOCK_MODULES
from bshadow_jax.studies import stats

FOOTPRINT_KEYS = ("entropy", "gini", "matrices_for_90pct")
VARIANTS = ("all", "blocks_only", "per_parameter")
# Per-matrix columns averaged into one number per fine-tune (energy_share is 1/N on average: useless).
_ROW_SKIP = {"name", "component", "layer", "module", "expert", "rows", "cols", "energy_share", "base_fro"}
# measure names of item-level quantities: (section, record column)
ITEM_MEASURES = {"narrow.acc": ("narrow", "correct"), "narrow.margin": ("narrow", "margin"),
                 "broad.acc": ("broad", "correct"), "broad.margin": ("broad", "margin")}
LOG_PPL = "text.log_ppl"  # mean negative log-likelihood per held-out text token (log perplexity)


def delta_means(rows: Sequence[Mapping[str, Any]], *, blocks_only: bool = False) -> dict[str, float]:
    """Mean over analysed matrices (only the transformer blocks' with `blocks_only`) of every delta metric column."""
    sums: dict[str, list[float]] = {}
    for row in rows:
        if blocks_only and row.get("module") in NON_BLOCK_MODULES:
            continue
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


def _finite_numbers(d: Mapping[str, Any] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (d or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def seed_footprint(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One fine-tune's footprint numbers: summary.json's footprint plus delta-metric means."""
    out = _finite_numbers(summary.get("footprint"))
    out.update(delta_means(rows))
    return out


def footprint_variants(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """The footprint as `all` (seed_footprint), `blocks_only` (token embeddings and output head left out,
    with the block matrices' delta means) and `per_parameter` (shares per weight), as in summary.json."""
    blocks = _finite_numbers(summary.get("footprint_blocks_only"))
    blocks.update(delta_means(rows, blocks_only=True))
    return {"all": seed_footprint(summary, rows), "blocks_only": blocks,
            "per_parameter": _finite_numbers(summary.get("footprint_per_parameter"))}


def _run_level(record: Mapping[str, Any], path: str) -> float:
    """A run-level number by path: footprint[_blocks_only|_per_parameter].KEY, or a dotted record path."""
    head, _, key = path.partition(".")
    variant = {"footprint": "all", "footprint_blocks_only": "blocks_only",
               "footprint_per_parameter": "per_parameter"}.get(head)
    node: Any = (record.get("footprint_variants") or {}).get(variant, {}) if variant else record
    for part in (key.split(".") if variant else path.split(".")):
        node = node.get(part) if isinstance(node, Mapping) else None
    return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else float("nan")


@dataclasses.dataclass
class ArmRuns:
    """One arm's runs, grouped by base (pretraining seed) and ordered by fine-tuning seed."""

    name: str
    records: list[Mapping[str, Any]]

    @property
    def bases(self) -> list[int]:
        return sorted({int(r.get("base", 0)) for r in self.records})

    @property
    def seeds(self) -> list[int]:
        return sorted({int(r["seed"]) for r in self.records})

    def by_base(self) -> dict[int, list[Mapping[str, Any]]]:
        out: dict[int, list[Mapping[str, Any]]] = {}
        for r in sorted(self.records, key=lambda r: (int(r.get("base", 0)), int(r["seed"]))):
            out.setdefault(int(r.get("base", 0)), []).append(r)
        return out

    def items(self, section: str, column: str, bases: Sequence[int] | None = None) -> stats.Values:
        """base -> [seeds, items] of one item column ("correct", "gold_logprob", "margin")."""
        return {b: np.asarray([r["items"][section][column] for r in rs], np.float64)
                for b, rs in self.by_base().items() if bases is None or b in bases}

    def passages(self, bases: Sequence[int] | None = None) -> tuple[stats.Values, stats.Values]:
        """(base -> [seeds, passages] negative log-probabilities, base -> [seeds, passages] token counts)."""
        sel = {b: rs for b, rs in self.by_base().items() if bases is None or b in bases}
        nll = {b: -np.asarray([r["passages"]["logprob"] for r in rs], np.float64) for b, rs in sel.items()}
        tok = {b: np.asarray([r["passages"]["tokens"] for r in rs], np.float64) for b, rs in sel.items()}
        return nll, tok

    def finite_columns(self, section: str, column: str) -> np.ndarray:
        """The item columns with a number in every run: a generated-answer task (lm-eval generate_until)
        has accuracy but no option margin, so its items drop out of the margin measures."""
        vals = [np.asarray(r["items"][section][column], np.float64) for r in self.records
                if ((r.get("items") or {}).get(section) or {}).get(column)]
        if not vals:
            return np.zeros(0, np.int64)
        return np.flatnonzero(np.all(np.isfinite(np.stack(vals)), axis=0))

    def run_level(self, path: str, bases: Sequence[int] | None = None) -> stats.Values:
        return {b: np.asarray([_run_level(r, path) for r in rs], np.float64)
                for b, rs in self.by_base().items() if bases is None or b in bases}

    def has(self, what: str) -> bool:
        if not self.records:
            return False
        r = self.records[0]
        if what in ITEM_MEASURES:
            return bool(self.finite_columns(*ITEM_MEASURES[what]).size)
        if what == LOG_PPL:
            return bool((r.get("passages") or {}).get("tokens"))
        return math.isfinite(_run_level(r, what))


def measure(arm: ArmRuns, what: str, boot: stats.Bootstrap | None = None, *,
            cols: np.ndarray | None = None) -> tuple[float, np.ndarray | None]:
    """The arm's estimate of `what` and, with `boot`, its replicates (over boot's bases).

    `what` is an item-level measure (ITEM_MEASURES, e.g. "narrow.acc"), LOG_PPL, or a run-level
    path ("footprint_blocks_only.entropy", "distinct_tokens"). `cols` restricts an item set to a
    category.
    """
    bases = boot.bases if boot is not None else None
    if what in ITEM_MEASURES:
        section, column = ITEM_MEASURES[what]
        vals = arm.items(section, column, bases)
        finite = arm.finite_columns(section, column)
        if finite.size < next(iter(vals.values())).shape[1]:
            cols = finite if cols is None else np.intersect1d(cols, finite)
        est = stats.point(vals, cols=cols)
        reps = boot.mean(arm.name, vals, items=section, cols=cols) if boot is not None else None
    elif what == LOG_PPL:
        nll, tok = arm.passages(bases)
        est = stats.point(nll, denom=tok)
        reps = boot.mean(arm.name, nll, items="text", denom=tok) if boot is not None else None
    else:
        vals = arm.run_level(what, bases)
        est = stats.point(vals)
        reps = boot.mean(arm.name, vals) if boot is not None else None
    return est, reps


def run_values(arm: ArmRuns, what: str) -> list[float]:
    """Each run's own value of `what` (bases in order, then seeds)."""
    if what in ITEM_MEASURES:
        finite = arm.finite_columns(*ITEM_MEASURES[what])
        return stats.run_values({b: v[:, finite] for b, v in arm.items(*ITEM_MEASURES[what]).items()})
    if what == LOG_PPL:
        nll, tok = arm.passages()
        return stats.run_values(nll, denom=tok)
    return stats.run_values(arm.run_level(what))


def seed_sd(arm: ArmRuns, what: str) -> float | None:
    """The pooled within-base standard deviation over seeds of a run-level quantity (None with < 2 seeds)."""
    ss, df = 0.0, 0
    for v in arm.run_level(what).values():
        v = v[np.isfinite(v)]
        if v.size >= 2:
            ss += float(((v - v.mean()) ** 2).sum())
            df += v.size - 1
    return math.sqrt(ss / df) if df else None


def _ci(arm: ArmRuns, what: str, boot: stats.Bootstrap, *, cols: np.ndarray | None = None,
        transform=None) -> dict:
    est, reps = measure(arm, what, boot, cols=cols)
    if transform is not None:
        est, reps = transform(est), transform(reps)
    out = stats.interval(est, reps)
    if cols is None:
        vals = run_values(arm, what)
        out["values"] = [transform(v) for v in vals] if transform is not None else vals
    return out


def arm_entry(arm: ArmRuns, item_meta: Mapping[str, Mapping[str, Sequence[Any]]], *, n_boot: int,
              seed: int) -> dict:
    """The arm's results.json entry (docs/outputs.md), every number with its bootstrap interval.

    Args:
        arm: the arm's runs.
        item_meta: per item set ("narrow", "broad"): parallel lists "category", "skill", "chance"
            in the order of the records' items.
        n_boot, seed: the bootstrap plan (studies.stats.Bootstrap).
    """
    boot = stats.Bootstrap(arm.bases, n_boot=n_boot, seed=seed)
    entry: dict[str, Any] = {"seeds": arm.seeds, "bases": arm.bases, "runs": len(arm.records)}
    for section, group in (("narrow", "skill"), ("broad", "category")):
        if not arm.has(f"{section}.acc"):
            entry[section] = {}
            continue
        meta = item_meta[section]
        groups = np.asarray(meta[group])
        margin = arm.finite_columns(section, "margin")
        sec: dict[str, Any] = {"score": _ci(arm, f"{section}.acc", boot),
                               "margin": _ci(arm, f"{section}.margin", boot) if margin.size else None,
                               "chance": float(np.mean(meta["chance"])), "n_items": int(groups.size),
                               "by_category": {}, "by_category_margin": {}, "chance_by_category": {}}
        for g in sorted(set(groups.tolist())):
            cols = np.flatnonzero(groups == g)
            sec["by_category"][g] = _ci(arm, f"{section}.acc", boot, cols=cols)
            if np.intersect1d(cols, margin).size:  # a generated-answer task has no margin
                sec["by_category_margin"][g] = _ci(arm, f"{section}.margin", boot, cols=cols)
            sec["chance_by_category"][g] = float(np.mean(np.asarray(meta["chance"])[cols]))
        entry[section] = sec
    if arm.has(LOG_PPL):
        entry["perplexity"] = {"value": _ci(arm, LOG_PPL, boot, transform=np.exp),
                               "log_ppl": _ci(arm, LOG_PPL, boot)}
    variants: dict[str, Any] = {}
    for variant in VARIANTS:
        prefix = "footprint" if variant == "all" else f"footprint_{variant}"
        keys = sorted({k for r in arm.records for k in ((r.get("footprint_variants") or {}).get(variant) or {})})
        variants[variant] = {k: _ci(arm, f"{prefix}.{k}", boot) for k in keys}
    entry["footprint"] = variants["all"]
    entry["footprint_variants"] = variants
    if arm.has("distinct_tokens"):
        entry["distinct_tokens"] = _ci(arm, "distinct_tokens", boot)
    return entry
