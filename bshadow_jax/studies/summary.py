"""A short plain-text summary of a study's results on stdout."""
from __future__ import annotations

from typing import Any, Mapping

from bshadow_jax.studies.report import fmt_ci, lookup


def print_summary(results: Mapping[str, Any], out_dir: str) -> None:
    print(f"{'arm':24s} {'narrow':>26s} {'broad':>26s} {'fp entropy':>26s} {'delta eff rank':>26s}")
    for name, e in results.get("arms", {}).items():
        print(f"{name:24s} {fmt_ci(lookup(e, 'narrow.score')):>26s} {fmt_ci(lookup(e, 'broad.score')):>26s} "
              f"{fmt_ci(lookup(e, 'footprint.entropy')):>26s} {fmt_ci(lookup(e, 'footprint.delta_effective_rank'), 2):>26s}")
    for c in results.get("claims", []):
        print(f"claim {c['id']}: {c['verdict']} - {c['claim']}")
    print(f"results: {out_dir}/results.json  report: {out_dir}/report.md")
