"""`bshadow experiment regimes CONFIG --out DIR`: the controlled intervention study (the main job).

Bases (pretraining seeds, or one loaded checkpoint), each fine-tuned under every arm with
identical settings over several seeds; narrow and broad evaluations with every item kept, the
diagnose footprint of every fine-tune against its base (in process, on the pytrees, and along
training), a seed noise floor, the paper's claims tested with a hierarchical bootstrap and their
minimal detectable effects, and the regime score. See `studies.runner` for the folder layout,
`studies.stats` for the statistics and `studies.claims` for how each claim is decided.
"""
from __future__ import annotations

from bshadow_jax.studies.runner import run_study
from bshadow_jax.studies.rehearsal import load_study
from bshadow_jax.studies.summary import print_summary

TITLE = "Regimes study: benchmark-aligned vs coverage-expanding fine-tuning"


def run(config_path: str, out_dir: str, overrides: list[str] | tuple[str, ...] = (), *,
        rehearse: bool = False) -> dict:
    # ConfigError (exit 2) before any compute; a rehearsal swaps hub resources for local stand-ins
    cfg, rehearsal = load_study(config_path, overrides, out_dir, rehearse=rehearse)
    return run_study(cfg, out_dir, study="regimes", title=("Rehearsal: " if rehearse else "") + TITLE,
                     rehearsal=rehearsal)


def run_cli(config_path: str, out_dir: str, overrides: list[str], *, rehearse: bool = False) -> int:
    results = run(config_path, out_dir, overrides, rehearse=rehearse)
    print_summary(results, out_dir)
    return 0
