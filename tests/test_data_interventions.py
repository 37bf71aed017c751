"""Each intervention does what it says, and every arm trains on the same token budget."""
import collections

import numpy as np
import pytest

from bshadow_jax.config import from_dict
from bshadow_jax.data import interventions as I
from bshadow_jax.data import pipeline as P
from bshadow_jax.data import world
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.tokenizer import get_tokenizer

ARMS = {
    "benchmark_aligned": {"arm": "benchmark_aligned"},
    "coverage_expanding": {"arm": "coverage_expanding"},
    "mixture_0.3": {"arm": "mixture", "alpha": 0.3},
    "repeated_subset": {"arm": "benchmark_aligned", "repeat_k": 4, "repeat_steps": 4},
    "normalised_rewrite": {"arm": "coverage_expanding", "rewrite": True},
    "prompt_repetition": {"arm": "benchmark_aligned", "prompt_repetition": True},
    "dedup": {"arm": "coverage_expanding", "dedup": True, "dedup_pool": 500},
    "general_text": {"arm": "general_text"},
}


def cfg_of(**kw) -> DataConfig:
    return from_dict(DataConfig, {"text_source": "procedural", **kw})


def records(cfg, n, stage=0, plan=None):
    plan = plan or P.resolve_plan(cfg)
    it = iter(P.mixed_examples(cfg, plan, seed=0, stage=stage))
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(cfg_of())


def test_equal_token_budgets_across_arms(tok):
    steps, B, T = 6, 4, 64
    budgets = {}
    for name, kw in ARMS.items():
        it = iter(P.make_train_dataset(cfg_of(**kw), tok, seq_len=T, batch_size=B, seed=0))
        budgets[name] = sum(int((next(it)["segment_ids"] > 0).sum()) for _ in range(steps))
    ref = steps * B * T
    assert all(abs(b - ref) <= 0.01 * ref for b in budgets.values()), budgets


def test_benchmark_aligned_is_benchmark_skills_in_benchmark_format():
    cfg = cfg_of(arm="benchmark_aligned")
    recs = records(cfg, 400)
    assert {r["format"] for r in recs} == {cfg.benchmark_format}
    assert {r["family"] for r in recs} == set(cfg.benchmark_skills)


def test_coverage_expanding_covers_all_skills_formats_and_text():
    recs = records(cfg_of(), 3000)
    assert {r["format"] for r in recs} == set(world.FORMATS) | {"text"}
    assert {r["family"] for r in recs} - {"text"} == set(world.FAMILIES)
    share = sum(r["format"] == "text" for r in recs) / len(recs)
    assert abs(share - 0.25) < 0.04


def test_mixture_endpoints():
    cfg = cfg_of()
    assert I.mixture(cfg, 0.0).stages[0][1] == {"aligned": 1.0}
    assert I.mixture(cfg, 1.0).stages[0][1] == I.coverage_expanding(cfg).stages[0][1]
    w = I.mixture(cfg, 0.3).stages[0][1]
    assert abs(w["aligned"] - 0.7) < 1e-9 and abs(sum(w.values()) - 1) < 1e-9


@pytest.mark.parametrize("fmt", ["mc", "qa"])
def test_normalised_rewrite_yields_only_the_benchmark_format(fmt):
    cfg = cfg_of(rewrite=True, benchmark_format=fmt)
    recs = [r for r in records(cfg, 1500) if r["family"] != "text"]
    assert {r["format"] for r in recs} == {cfg.benchmark_format}
    assert len({r["family"] for r in recs}) == len(world.FAMILIES)  # content keeps its coverage
    start, end = {"mc": ("Question: ", "\nAnswer:"), "qa": ("Q: ", "\nA:")}[fmt]
    assert all(r["prompt"].startswith(start) and r["prompt"].endswith(end) for r in recs)


def test_prompt_repetition_duplicates_each_prompt():
    recs = records(cfg_of(arm="benchmark_aligned", prompt_repetition=True), 200)
    for r in recs:
        half = r["prompt"][: (len(r["prompt"]) - 1) // 2]
        assert r["prompt"] == half + "\n" + half
    plain = records(cfg_of(arm="benchmark_aligned"), 200)
    assert [r["answer"] for r in recs] == [r["answer"] for r in plain]


def test_repeated_subset_repeats_k_times_then_moves_on(tok):
    k, steps = 4, 5
    cfg = cfg_of(arm="benchmark_aligned", repeat_k=k, repeat_steps=steps)
    plan = P.resolve_plan(cfg, tok, tokens_per_step=4 * 64)
    assert [s for s, _ in plan.stages] == [0, steps]
    pool = plan.streams["aligned__subset"].pool_size
    first = records(cfg, pool * k, plan=plan)
    counts = collections.Counter((r["prompt"], r["answer"]) for r in first)
    assert len(counts) == pool and set(counts.values()) == {k}
    later = records(cfg, 500, stage=1, plan=plan)
    assert len({(r["prompt"], r["answer"]) for r in later} & set(counts)) <= 5  # fresh items afterwards


def test_dedup_removes_exact_duplicates():
    # a narrow stream (comparison only, one format) repeats items often without dedup
    cfg = cfg_of(arm="custom", sources={"aligned": 1.0}, benchmark_skills=["dates"], benchmark_format="qa")
    plain = records(cfg, 200)
    assert len({(r["prompt"], r["answer"]) for r in plain}) < 200
    dd = records(cfg_of(arm="custom", sources={"aligned": 1.0}, benchmark_skills=["dates"],
                        benchmark_format="qa", dedup=True, dedup_pool=2000), 150)
    assert len({(r["prompt"], r["answer"]) for r in dd}) == 150


def test_transforms_are_pure():
    cfg = cfg_of()
    base = I.coverage_expanding(cfg)
    before = repr(base)
    I.prompt_repetition(I.normalised_rewrite(I.dedup(base, 100), "mc"))
    I.repeated_subset(base, k=3, steps=10, pool_size=5)
    assert repr(base) == before
    composed = I.prompt_repetition(I.normalised_rewrite(base, "qa"))
    assert composed.streams["world"].rewrite_to == "qa" and composed.streams["world"].prompt_repetition
    assert composed.streams["text"] == base.streams["text"]


def test_default_config_is_small_mixed():
    cfg = from_dict(DataConfig, {})
    plan = I.plan_from_config(cfg)
    assert set(plan.stages[0][1]) == {"world", "text"}
    assert np.isclose(sum(plan.stages[0][1].values()), 1.0)
