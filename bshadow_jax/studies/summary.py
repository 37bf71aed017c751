"""A short plain-text summary of a study's results on stdout: scores per arm, each claim's verdict, the paths."""
from __future__ import annotations

from typing import Any, Mapping

from bshadow_jax.studies.report import fmt_ci, lookup


def summary_lines(results: Mapping[str, Any], out_dir: str) -> list[str]:
    """The lines print_summary prints: a table per arm (narrow and broad accuracy, held-out perplexity,
    blocks-only footprint entropy; mean [95% interval]), one verdict line per claim (never its wording) and the
    results and report paths."""
    w = 22
    lines = [f"{'arm':24s} {'narrow acc':>{w}s} {'broad acc':>{w}s} {'perplexity':>{w}s} {'entropy (blocks)':>{w}s}"]
    rows = list((results.get("arms") or {}).items())
    if results.get("base"):
        rows.append(("base", results["base"]))
    for name, e in rows:
        lines.append(f"{name:24s} {fmt_ci(lookup(e, 'narrow.score'), 'acc'):>{w}s} "
                     f"{fmt_ci(lookup(e, 'broad.score'), 'acc'):>{w}s} "
                     f"{fmt_ci(lookup(e, 'perplexity.value'), 'ppl'):>{w}s} "
                     f"{fmt_ci(lookup(e, 'footprint_variants.blocks_only.entropy'), 'entropy'):>{w}s}")
    chance = results.get("chance") or {}
    if chance:
        lines.append("chance: " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()))
    for c in results.get("claims") or []:
        tests = c.get("tests") or []
        held = sum(t.get("verdict") == "held" for t in tests)
        lines.append(f"claim {c['id']}: {c['verdict']}" + (f" ({held} of {len(tests)} tests held)" if tests else ""))
    lines.append(f"results: {out_dir}/results.json  report: {out_dir}/report.md")
    return lines


def print_summary(results: Mapping[str, Any], out_dir: str) -> None:
    if not results:  # a process other than 0 of a multi-process study: process 0 prints
        return
    print("\n".join(summary_lines(results, out_dir)))
