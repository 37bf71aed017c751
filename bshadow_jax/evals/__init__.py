"""Scoring models on the narrow benchmark, the broad suite and held-out perplexity.

    sets = data.evalsets.build_eval_sets(data_cfg)          # the eval split is the data package's
    res = evaluate(model_cfg, params, tokenizer, sets, batch_size=32)
    res["narrow"]["score"], res["broad"]["by_category"], res["perplexity"]
    res["items"]["broad"]["margin"]                          # per item, for resampling over items
"""
from bshadow_jax.evals.scoring import evaluate, model_logprob_fn, perplexity, perplexity_parts, score_items

__all__ = ["evaluate", "model_logprob_fn", "perplexity", "perplexity_parts", "score_items"]
