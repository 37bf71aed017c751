"""`bshadow experiment repetition CONFIG --out DIR`: the prompt-repetition case study.

The same recipe with and without prompt repetition (and with deduplication), plus the
aligned/coverage reference arms so the regime score can place each variant. The claims
tested (R1, R2 in `studies.claims`): prompt repetition (deduplication) does not shift the
regime, an equivalence test (TOST) on the blocks-only footprint within the margins of
`claims.equivalence_margins`.
"""
from __future__ import annotations

from bshadow_jax.studies import claims
from bshadow_jax.studies.rehearsal import load_study
from bshadow_jax.studies.runner import run_study
from bshadow_jax.studies.spec import load_study_config
from bshadow_jax.studies.summary import print_summary

TITLE = "Prompt-repetition case study: does a data artifact shift the regime?"


def run(config_path: str, out_dir: str, overrides: list[str] | tuple[str, ...] = (), *,
        rehearse: bool = False) -> dict:
    claims.require_margins(load_study_config(config_path, list(overrides)).claims)  # before anything runs
    cfg, rehearsal = load_study(config_path, overrides, out_dir, rehearse=rehearse)
    return run_study(cfg, out_dir, study="repetition", title=("Rehearsal: " if rehearse else "") + TITLE,
                     rehearsal=rehearsal)


def run_cli(config_path: str, out_dir: str, overrides: list[str], *, rehearse: bool = False) -> int:
    results = run(config_path, out_dir, overrides, rehearse=rehearse)
    print_summary(results, out_dir)
    return 0
