"""Eval sets: narrow and broad share no item, broad items are unique, broad formats are honoured."""
from collections import Counter

import pytest

from bshadow_jax.config import from_dict
from bshadow_jax.data import decontam, world
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.evalsets import (MAX_EVAL_PER_SALT, EvalItem, _eval_ngram_strings, build_eval_sets,
                                       chance_level, eval_items)

CATEGORIES = ("other_skills", "bench_skills_other_formats", "compositional")


@pytest.fixture(scope="module")
def cfg():
    return from_dict(DataConfig, {"text_source": "procedural"})


@pytest.fixture(scope="module")
def default_sets(cfg):
    return build_eval_sets(cfg)


def ids(items):
    # item_id hashes (family, key): equal ids are the same question
    return [it.item_id for it in items]


def test_narrow_and_broad_share_no_item(default_sets):
    assert not set(ids(default_sets.narrow)) & set(ids(default_sets.broad))
    assert len(set(ids(default_sets.broad))) == len(default_sets.broad)
    assert len(set(ids(default_sets.narrow))) == len(default_sets.narrow)


def test_broad_draws_skip_narrow_items_and_still_fill_up(cfg):
    # sorting's small partition overlaps heavily between the two salts: the old draw re-rendered narrow items
    narrow = eval_items(cfg.world_seed, "sorting", 40, cfg.eval_fraction)
    old = eval_items(cfg.world_seed, "sorting", 16, cfg.eval_fraction, salt="eval-broad")
    assert {it.key for it in old} & {it.key for it in narrow}  # precondition: there was overlap to remove
    sets = build_eval_sets(cfg, n_narrow_per_skill=40, n_bench_other_per_skill=16)
    broad_sorting = [it for it in sets.broad if it.family == "sorting"]
    assert len(broad_sorting) == 16
    assert not set(ids(broad_sorting)) & {it.item_id for it in narrow}


def test_decontam_superset_covers_the_largest_eval_sets(cfg):
    # broad draws that skip narrow items reach deeper into their sequence than MAX_EVAL_PER_SALT
    m = MAX_EVAL_PER_SALT
    sets = build_eval_sets(cfg, n_narrow_per_skill=m, n_other_per_skill=m, n_bench_other_per_skill=m,
                           n_compositional=m, n_text=0)
    banned = set(_eval_ngram_strings(cfg.world_seed, cfg.eval_fraction))
    for it in sets.narrow + sets.broad:
        grams = {" ".join(g) for g in decontam.ngrams(it.text)}
        assert grams <= banned, (it.family, it.category, it.format)


def test_counts_in_metadata(default_sets):
    meta = default_sets.metadata
    assert meta["n_narrow"] == len(default_sets.narrow)
    assert meta["n_broad"] == len(default_sets.broad)
    assert meta["n_broad_by_category"] == dict(Counter(it.category for it in default_sets.broad))
    assert meta["n_narrow_by_skill"] == dict(Counter(it.family for it in default_sets.narrow))
    assert sum(meta["n_broad_by_category"].values()) == meta["n_broad"]
    assert meta["broad_formats"] == list(world.FORMATS)
    assert meta["n_text"] == len(default_sets.text)


def test_broad_formats_restrict_the_broad_suite(cfg):
    assert cfg.benchmark_format == "qa"
    sets = build_eval_sets(cfg, broad_formats=("qa", "cloze"))
    by_cat = {c: {it.format for it in sets.broad if it.category == c} for c in CATEGORIES}
    assert by_cat["other_skills"] == {"qa", "cloze"}
    assert by_cat["compositional"] == {"qa", "cloze"}
    assert by_cat["bench_skills_other_formats"] == {"cloze"}  # never the benchmark format
    assert {it.format for it in sets.narrow} == {"qa"}
    assert sets.metadata["broad_formats"] == ["qa", "cloze"]
    default = build_eval_sets(cfg)
    assert {it.format for it in default.broad} == set(world.FORMATS)


@pytest.mark.parametrize("formats, match", [(("qa", "essay"), "essay"), ((), "empty"), (("qa",), "benchmark")])
def test_bad_broad_formats_raise(cfg, formats, match):
    with pytest.raises(ValueError, match=match):
        build_eval_sets(cfg, n_text=0, broad_formats=formats)


def test_deterministic(cfg, default_sets):
    again = build_eval_sets(cfg)
    assert again == default_sets


def test_skill_and_chance_level():
    it = EvalItem("Q:", (" a", " b", " c"), 0, "narrow", "sorting", "qa", 1)
    assert it.skill == "sorting"
    assert chance_level(it) == pytest.approx(1 / 3)
