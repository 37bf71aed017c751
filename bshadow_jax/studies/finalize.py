"""From per-seed records to results.json (docs/outputs.md, "Experiment output") and the report."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bshadow_jax.config import to_dict
from bshadow_jax.data import decontam
from bshadow_jax.data.text import text_corpus
from bshadow_jax.errors import UserError
from bshadow_jax.fileio import atomic_write_json, atomic_write_text
from bshadow_jax.studies import regime_score, stats
from bshadow_jax.studies.aggregate import ArmRuns, arm_entry, measure
from bshadow_jax.studies.claims import evaluate_claims
from bshadow_jax.studies.report import write_study_report
from bshadow_jax.studies.spec import StudyConfig


def arm_note(arm) -> str:
    parts = []
    if arm.description:
        parts.append(arm.description)
    if arm.data:
        parts.append("data: " + ", ".join(f"{k}={v}" for k, v in arm.data.items()))
    if arm.optim:
        parts.append("optim: " + ", ".join(f"{k}={v}" for k, v in arm.optim.items()))
    return "; ".join(parts) or "the shared fine-tuning settings"


ITEM_COLUMNS = ("arm", "base", "seed", "category", "skill", "format", "item_id", "correct", "gold_logprob", "margin")
PASSAGE_COLUMNS = ("arm", "base", "seed", "passage", "tokens", "logprob")
BASE_ARM = "base"  # items.csv's label for the bases before fine-tuning (seed left empty)


def item_meta(suite) -> dict[str, dict[str, list]]:
    """Per item set, the parallel lists of what every run's items are (their order in the records)."""
    return {sec: {"category": [it.category for it in items], "skill": [it.skill for it in items],
                  "format": [it.format for it in items], "item_id": [int(it.item_id) for it in items],
                  "chance": [float(it.chance) for it in items]}
            for sec, items in ((sec, suite.catalog(sec)) for sec in ("narrow", "broad"))}


def _base_runs(base_evals: Mapping[int, Mapping[str, Any]]) -> ArmRuns:
    return ArmRuns(BASE_ARM, [{"base": int(b), "seed": 0, "items": ev["items"], "passages": ev["passages"]}
                              for b, ev in sorted(base_evals.items())])


def base_summary(base_evals: Mapping[int, Mapping[str, Any]], meta, plan) -> dict:
    """The bases before fine-tuning: scores over bases and items, and how far above chance they start."""
    runs = _base_runs(base_evals)
    entry = arm_entry(runs, meta, n_boot=plan.n_boot, seed=plan.seed)
    out = {"bases": entry["bases"], "narrow": entry["narrow"], "broad": entry["broad"],
           "perplexity": entry.get("perplexity"), "above_chance": {}}
    boot = stats.Bootstrap(runs.bases, n_boot=plan.n_boot, seed=plan.seed)
    for sec in ("narrow", "broad"):
        if not entry[sec]:
            continue
        chance = entry[sec]["chance"]
        est, reps = measure(runs, f"{sec}.acc", boot)
        out["above_chance"][sec] = stats.directional(f"base {sec} accuracy - chance ({chance:.3f})", "acc",
                                                      est - chance, reps - chance)
    return out


def power_table(claims: Sequence[Mapping[str, Any]]) -> list[dict]:
    """What each voted test could detect: its mde beside the observed difference."""
    rows = []
    for c in claims:
        for t in c.get("tests", []):
            if t.get("mde") is None:
                continue
            rows.append({"claim": c["id"], "comparison": t["comparison"], "metric": t.get("metric"),
                         "diff": t.get("diff"), "mde": t["mde"], "verdict": t["verdict"],
                         "observed_exceeds_mde": abs(t["diff"]) >= t["mde"] if t.get("diff") is not None else None,
                         **({"margin": t["margin"], "min_margin": t.get("min_margin")} if "margin" in t else {})})
    return rows


def build_results(cfg: StudyConfig, records: Mapping[str, Sequence[Mapping[str, Any]]], *, study: str,
                  eval_sets, base_evals: Mapping[int, Mapping[str, Any]] | None = None,
                  floor: Mapping[str, Any] | None = None, wall_s: float | None = None,
                  rehearsal: Mapping[str, Any] | None = None) -> dict:
    plan = cfg.analysis
    meta = item_meta(eval_sets)
    runs = {name: ArmRuns(name, list(recs)) for name, recs in records.items() if recs}
    arms: dict[str, Any] = {}
    for arm in cfg.active_arms():
        if arm.name not in runs:
            continue
        entry = arm_entry(runs[arm.name], meta, n_boot=plan.n_boot, seed=plan.seed)
        entry["description"] = arm_note(arm)
        first = min(runs[arm.name].records, key=lambda r: (r["base"], r["seed"]))
        if first.get("data_budget"):
            entry["data"] = {**first["data_budget"], "intended_repeats": list(arm.intended_repeats),
                             "of_run": {"base": first["base"], "seed": first["seed"]}}
        label = arm.label()
        if label is not None:
            entry["coverage_fraction"] = label
        arms[arm.name] = entry
    floor = dict(floor or {})
    claims = evaluate_claims(runs, cfg.claims, study=study, plan=plan, floor=floor.get("arms"))
    results: dict[str, Any] = {"study": study, "arms": arms, "claims": claims, "power": power_table(claims)}
    if rehearsal:
        results["rehearsal"] = dict(rehearsal)
    if cfg.description:
        results["description"] = cfg.description
    if base_evals:
        results["base"] = base_summary(base_evals, meta, plan)
    results["chance"] = {sec: float(np.mean(m["chance"])) for sec, m in meta.items()}
    results["eval_items"] = {sec: len(m["item_id"]) for sec, m in meta.items()} | {"text_passages": len(eval_sets.text)}
    if getattr(eval_sets, "tasks", None):
        results["eval_items"]["lm_eval"] = {sec: {t: len(eval_sets.bench[t]) for t in ts}
                                            for sec, ts in eval_sets.tasks.items()}
    results["noise_floor"] = floor
    if cfg.regime_score.enabled:
        results["regime_score"] = _regime(cfg, records)
    results["settings"] = {"seeds": list(cfg.seeds), "bases": cfg.base.base_seeds(), "finetune": cfg.finetune,
                           "base": to_dict(cfg.base), "evals": to_dict(cfg.evals), "diagnose": to_dict(cfg.diagnose),
                           "claims": to_dict(cfg.claims), "analysis": to_dict(cfg.analysis),
                           "arm_units": {a.name: len(cfg.arm_units(a)) for a in cfg.active_arms()}}
    results["settings"]["general_text"] = _general_text_used(cfg)
    if wall_s is not None:
        results["wall_s"] = wall_s
    return results


def _csv(columns: Sequence[str], rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue()


def _models(records: Mapping[str, Sequence[Mapping[str, Any]]], base_evals: Mapping[int, Mapping[str, Any]]):
    """(arm, base, seed, record) of every scored model: the bases first (arm "base", seed empty), then each
    arm's fine-tunes by base and seed."""
    yield from ((BASE_ARM, int(b), "", ev) for b, ev in sorted(base_evals.items()))
    for arm, recs in records.items():
        yield from ((arm, int(r["base"]), int(r["seed"]), r) for r in sorted(recs, key=lambda r: (r["base"], r["seed"])))


def _number(v: Any) -> str:
    """A float cell; empty where there is none (a generated answer has no option log-likelihoods)."""
    return "" if v is None or not np.isfinite(float(v)) else repr(float(v))


def items_csv(records: Mapping[str, Sequence[Mapping[str, Any]]], base_evals: Mapping[int, Mapping[str, Any]],
              meta) -> str:
    """items.csv: one row per scored eval item per fine-tune (and per base, arm "base", seed empty)."""
    def rows():
        for arm, base, seed, rec in _models(records, base_evals):
            for sec in ("narrow", "broad"):
                m, it = meta[sec], rec["items"][sec]
                for k in range(len(m["item_id"])):
                    yield (arm, base, seed, m["category"][k], m["skill"][k], m["format"][k], m["item_id"][k],
                           int(it["correct"][k]), _number(it["gold_logprob"][k]), _number(it["margin"][k]))
    return _csv(ITEM_COLUMNS, rows())


def passages_csv(records: Mapping[str, Sequence[Mapping[str, Any]]], base_evals: Mapping[int, Mapping[str, Any]],
                 eval_sets) -> str:
    """passages.csv: each held-out text passage's token count and total log-probability per model."""
    ids = [decontam.text_id(p) for p in eval_sets.text]
    return _csv(PASSAGE_COLUMNS, ((arm, base, seed, pid, int(rec["passages"]["tokens"][k]),
                                   repr(float(rec["passages"]["logprob"][k])))
                                  for arm, base, seed, rec in _models(records, base_evals) for k, pid in enumerate(ids)))


def _general_text_used(cfg: StudyConfig) -> dict:
    """Which general text the fine-tunes really got (Shakespeare, the procedural fallback, or a dataset)."""
    key = cfg.arm_config(cfg.active_arms()[0], cfg.seeds[0]).data.text_key
    requested = key if isinstance(key, str) else to_dict(key)
    try:
        corpus = text_corpus(key)
    except (ValueError, OSError, UserError) as e:  # a report must not fail over a provenance note
        return {"requested": requested, "error": str(e)}
    return {"requested": requested, "used": corpus.name, **corpus.metadata}


def _regime(cfg: StudyConfig, records: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict:
    roles = cfg.claims
    per_arm = {a: [r["footprint"] for r in recs] for a, recs in records.items()}
    if roles.aligned not in per_arm or roles.coverage not in per_arm:
        return {"note": f"needs the reference arms {roles.aligned!r} and {roles.coverage!r}"}
    mixture = {}
    for arm in cfg.arms:
        lab = arm.label()
        if lab is not None and arm.name in per_arm and arm.name not in (roles.aligned, roles.coverage):
            mixture[arm.name] = lab
    try:
        return regime_score.validate(per_arm, aligned=roles.aligned, coverage=roles.coverage,
                                     mixture_alpha=mixture or None, features=cfg.regime_score.features,
                                     n_boot=cfg.regime_score.n_boot)
    except ValueError as e:
        return {"note": str(e)}


def write_outputs(cfg: StudyConfig, out: Path, results: dict, records: Mapping[str, Sequence[Mapping[str, Any]]], *,
                  eval_sets, base_evals: Mapping[int, Mapping[str, Any]] | None = None,
                  base_curves: Mapping[int, Sequence[Mapping[str, Any]]] | None = None, title: str = "Study") -> None:
    base_evals = base_evals or {}
    atomic_write_text(out / "items.csv", items_csv(records, base_evals, item_meta(eval_sets)))
    atomic_write_text(out / "passages.csv", passages_csv(records, base_evals, eval_sets))
    notes = {a.name: arm_note(a) for a in cfg.arms if a.name in records}
    figs = write_study_report(out, title=title, results=results, records_by_arm=records,
                              base_curves=base_curves, arm_notes=notes)
    results["figures"] = figs
    # results.json last: its presence means the study finished.
    atomic_write_json(out / "results.json", results)
