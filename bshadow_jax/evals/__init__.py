"""Narrow benchmark, broad suite and held-out perplexity.

    sets = build_eval_sets(data_cfg)                       # deterministic, eval partition only
    res = evaluate(model_cfg, params, tokenizer, sets, batch_size=32)
    res["narrow"]["score"], res["broad"]["by_category"], res["perplexity"]
"""
from bshadow_jax.evals.scoring import evaluate, model_logprob_fn, perplexity, score_items
from bshadow_jax.evals.sets import EvalItem, EvalSets, build_eval_sets, eval_items

__all__ = ["EvalItem", "EvalSets", "build_eval_sets", "eval_items", "evaluate", "model_logprob_fn", "perplexity",
           "score_items"]
