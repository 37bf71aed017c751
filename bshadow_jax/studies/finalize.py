"""From per-seed records to results.json (docs/outputs.md, "Experiment output") and the report."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from bshadow_jax.config import to_dict
from bshadow_jax.data.text import text_corpus
from bshadow_jax.fileio import atomic_write_json
from bshadow_jax.studies import regime_score
from bshadow_jax.studies.aggregate import aggregate_arm
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


def build_results(cfg: StudyConfig, records: Mapping[str, Sequence[Mapping[str, Any]]], *, study: str,
                  base_eval: Mapping[str, Any] | None = None, wall_s: float | None = None) -> dict:
    arms: dict[str, Any] = {}
    for arm in cfg.active_arms():
        recs = list(records.get(arm.name, []))
        if not recs:
            continue
        entry = aggregate_arm([r["seed"] for r in recs], recs)
        entry["description"] = arm_note(arm)
        label = arm.label()
        if label is not None:
            entry["coverage_fraction"] = label
        arms[arm.name] = entry
    results: dict[str, Any] = {"study": study, "arms": arms, "claims": evaluate_claims(arms, cfg.claims, study=study)}
    if cfg.description:
        results["description"] = cfg.description
    if base_eval is not None:
        results["base"] = {"narrow": base_eval.get("narrow"), "broad": base_eval.get("broad"),
                           "perplexity": base_eval.get("perplexity")}
    if cfg.regime_score.enabled:
        results["regime_score"] = _regime(cfg, records)
    results["settings"] = {"seeds": list(cfg.seeds), "finetune": cfg.finetune,
                           "base": to_dict(cfg.base), "evals": to_dict(cfg.evals), "diagnose": to_dict(cfg.diagnose),
                           "claims": to_dict(cfg.claims)}
    results["settings"]["general_text"] = _general_text_used(cfg)
    if wall_s is not None:
        results["wall_s"] = wall_s
    return results


def _general_text_used(cfg: StudyConfig) -> dict:
    """Which general text the fine-tunes really got (Shakespeare, or the procedural fallback)."""
    data = cfg.finetune.get("data") if isinstance(cfg.finetune, Mapping) else None
    source = (data or {}).get("text_source", "auto")
    try:
        corpus = text_corpus(source)
    except (ValueError, OSError) as e:  # a report must not fail over a provenance note
        return {"requested": source, "error": str(e)}
    return {"requested": source, "used": corpus.name, **corpus.metadata}


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
                  base_eval=None, base_curve=None, title: str = "Study") -> None:
    notes = {a.name: arm_note(a) for a in cfg.arms if a.name in records}
    figs = write_study_report(out, title=title, results=results, records_by_arm=records, base_eval=base_eval,
                              base_curve=base_curve, arm_notes=notes)
    results["figures"] = figs
    # results.json last: its presence means the study finished.
    atomic_write_json(out / "results.json", results)
