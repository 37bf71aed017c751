"""How many tokens a run draws from each source, and how many times that passes over the source.

The mixer picks examples by weight, so a stream's share of the tokens is its weight times its mean
example length, normalised over the stage's streams. Over `steps` x `batch_size` x `seq_len` packed
tokens that gives the expected tokens drawn per stream; for a finite source (general text, a dataset,
a repeated pool of world items) dividing by the source's size (examples x that mean length) gives the
epochs. Mean lengths come from the first `n_sample` examples of each stream, so the numbers are
estimates (within a few percent at the default) and are labelled so. World streams without a pool are generated without
end: they have no epochs.

    budget = source_budget(data_cfg, tokenizer, steps=2000, batch_size=64, seq_len=512)
    budget["streams"]["text"]["epochs"]
"""
from __future__ import annotations

from typing import Any

import numpy as np

from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.pipeline import _hf_records, _Tokenize, example_stream, resolve_plan
from bshadow_jax.data.text import text_corpus
from bshadow_jax.data.tokenizer import special_ids


def _source_examples(spec, cfg: DataConfig) -> int | None:
    """How many examples a finite source holds; None for an endless one."""
    if spec.kind == "text":
        return len(text_corpus(cfg.text_key).train)
    if spec.kind == "hf":
        return len(_hf_records(cfg.hf))
    if spec.kind == "world" and spec.pool_size > 0:
        return spec.pool_size
    return None


def source_budget(data_cfg: DataConfig, tokenizer, *, steps: int, batch_size: int, seq_len: int, seed: int = 0,
                  n_sample: int = 256) -> dict[str, Any]:
    """Expected tokens drawn per stream over a run, and epochs over each finite source.

    Args:
        data_cfg: the run's data section.
        tokenizer: its tokenizer.
        steps, batch_size, seq_len: the run's size (global batch).
        seed: the run's data seed.
        n_sample: examples per stream whose lengths are measured.

    Returns:
        {"total_tokens", "method", "streams": {name: {"kind", "token_share", "tokens_drawn",
         "mean_example_tokens", "source_examples", "source_tokens", "epochs"}}}; the last three are None for
        an endless stream.
    """
    plan = resolve_plan(data_cfg, tokenizer, tokens_per_step=batch_size * seq_len, seed=seed)
    eos, _ = special_ids(tokenizer)
    tok = _Tokenize(tokenizer.backend_tokenizer, eos, False, 0)
    per_step = batch_size * seq_len
    starts = [s for s, _ in plan.stages] + [steps]
    streams: dict[str, dict[str, Any]] = {}
    mean_len: dict[tuple[int, str], float] = {}
    for k, (start, weights) in enumerate(plan.stages):
        n_steps = max(0, min(starts[k + 1], steps) - min(start, steps))
        live = {n: w for n, w in weights.items() if w > 0}
        for n in live:
            src = example_stream(n, plan.streams[n], data_cfg, seed=seed, stage=k)
            mean_len[k, n] = float(np.mean([len(tok(src[i])["inputs"]) for i in range(n_sample)]))
        norm = sum(w * mean_len[k, n] for n, w in live.items())
        for n, w in live.items():
            e = streams.setdefault(n, {"kind": plan.streams[n].kind, "tokens_drawn": 0.0})
            e["tokens_drawn"] += n_steps * per_step * w * mean_len[k, n] / norm
    total = steps * per_step
    for n, e in streams.items():
        e["token_share"] = e["tokens_drawn"] / total if total else 0.0
        e["mean_example_tokens"] = float(np.mean([v for (_, m), v in mean_len.items() if m == n]))
        # a finite stream draws uniformly from its shuffled source, so its mean length is the source's
        examples = _source_examples(plan.streams[n], data_cfg)
        tokens = examples * e["mean_example_tokens"] if examples is not None else None
        e["source_examples"] = examples
        e["source_tokens"] = tokens
        e["epochs"] = e["tokens_drawn"] / tokens if tokens else None
    return {"total_tokens": total, "method": f"expected: weight x mean example tokens (first {n_sample} examples)",
            "streams": dict(sorted(streams.items()))}


def unintended_repeats(budget: dict[str, Any], intended: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Streams drawn for more than one epoch that the config does not name as intended repeats."""
    return [n for n, e in budget["streams"].items() if (e.get("epochs") or 0) > 1.0 and n not in intended]
