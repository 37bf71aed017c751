"""The paper's experiments as library code (`bshadow experiment ...`).

    regimes       the controlled intervention study: bases x arms x seeds, narrow vs broad, footprints, claims with power
    repetition    the prompt-repetition (and deduplication) case study on the same machinery
    cross_family  diagnose many base/tuned pairs (incl. multimodal/MoE naming) into one comparison
                  (subpackage: config, checkpoints, figures, study)
    spec          study configs (YAML -> frozen dataclasses; every arm's training config validated up front)
    runner        base + arm/seed units (resumable), in-process diagnose and evals, footprint along training
    aggregate     means with 95% t-intervals over seeds, Welch differences
    claims        each paper claim as explicit comparisons with verdicts and the numbers behind them
    regime_score  place a fine-tune's footprint between the aligned and coverage references, with uncertainty
    report        report.md and figures of a study

Each study module has `run_cli(config_path, out_dir, overrides) -> int` (used by studies/cli.py).
"""
