"""Scoring models on the narrow benchmark, the broad suite and held-out perplexity; lm-eval tasks.

    sets = data.evalsets.build_eval_sets(data_cfg)          # the eval split is the data package's
    res = evaluate(model_cfg, params, tokenizer, sets, batch_size=32)
    res["narrow"]["score"], res["broad"]["by_category"], res["perplexity"]
    res["items"]["broad"]["margin"]                          # per item, for resampling over items
    lm = JaxLM(ckpt); run_tasks(lm, ["task"], include_path=["tasks/"])   # lm-eval (evals.harness)

Attributes load lazily, so that `bshadow --help` (which imports evals/cli.py) does not import jax.
"""
from __future__ import annotations

from bshadow_jax.lazy import lazy_exports

_EXPORTS = {
    "evaluate": "bshadow_jax.evals.scoring",
    "model_logprob_fn": "bshadow_jax.evals.scoring",
    "perplexity": "bshadow_jax.evals.scoring",
    "perplexity_parts": "bshadow_jax.evals.scoring",
    "score_items": "bshadow_jax.evals.scoring",
    "JaxLM": "bshadow_jax.evals.harness",
    "run_tasks": "bshadow_jax.evals.harness",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
