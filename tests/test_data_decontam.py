"""No contamination: zero exact and zero 13-gram overlap between training streams and eval sets.

The n-grams here are computed independently of bshadow_jax.data.decontam.
"""
import re

import pytest

from bshadow_jax.config import from_dict
from bshadow_jax.data import pipeline as P
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.text import load_text
from bshadow_jax.data.evalsets import build_eval_sets

ARMS = [{"arm": "coverage_expanding"}, {"arm": "benchmark_aligned"}, {"arm": "mixture", "alpha": 0.5},
        {"rewrite": True}, {"prompt_repetition": True}, {"arm": "world", "dedup": True, "dedup_pool": 1500}]


def grams(text, n=13):
    w = re.findall(r"[a-z0-9]+", text.lower())
    return {" ".join(w[i : i + n]) for i in range(len(w) - n + 1)}


@pytest.fixture(scope="module")
def eval_sets():
    cfg = from_dict(DataConfig, {"text_source": "procedural"})
    big = build_eval_sets(cfg, n_narrow_per_skill=128, n_other_per_skill=64, n_bench_other_per_skill=128,
                          n_compositional=64, n_text=64)
    return big


@pytest.mark.parametrize("kw", ARMS, ids=[str(a) for a in ARMS])
def test_training_streams_never_hold_eval_items(kw, eval_sets):
    cfg = from_dict(DataConfig, {"text_source": "procedural", **kw})
    plan = P.resolve_plan(cfg)
    it = iter(P.mixed_examples(cfg, plan, seed=0))
    recs = [next(it) for _ in range(1500)]
    train_texts = [r["prompt"] + r["answer"] for r in recs]
    eval_texts = eval_sets.texts()
    assert not set(train_texts) & set(eval_texts)
    eval_ids = {e.item_id for e in eval_sets.narrow + eval_sets.broad}
    assert not {r["item_id"] for r in recs if r["item_id"]} & eval_ids
    eval_grams = set().union(*(grams(t) for t in eval_texts))
    hits = [t for t in train_texts if grams(t) & eval_grams]
    assert hits == []


def test_eval_sets_are_unique_and_from_the_eval_partition(eval_sets):
    keys = [(e.family, e.context) for e in eval_sets.narrow]
    assert len(keys) == len(set(keys))
    assert {e.category for e in eval_sets.broad} == {"other_skills", "bench_skills_other_formats", "compositional"}


def test_general_text_heldout_never_trained():
    corpus = load_text("procedural")
    held = set().union(*(grams(p) for p in corpus.heldout))
    assert not set(corpus.train) & set(corpus.heldout)
    assert not [p for p in corpus.train if grams(p) & held]
