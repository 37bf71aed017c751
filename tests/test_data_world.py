"""The procedural skill world: families, formats, determinism, answers that are right."""
import re

import pytest

from bshadow_jax.data import world


def test_at_least_twelve_families_and_four_formats():
    assert len(world.FAMILIES) >= 12
    assert len(world.FORMATS) >= 4
    assert "compositional" not in world.FAMILIES  # eval-only


@pytest.mark.parametrize("family", list(world.FAMILIES) + list(world.EVAL_ONLY_FAMILIES))
def test_items_are_deterministic_and_well_formed(family):
    a = world.sample_items(3, family, 50)
    b = world.sample_items(3, family, 50)
    assert a == b
    assert a != world.sample_items(4, family, 50)
    for it in a:
        assert len(it.distractors) == 3 and len(set(it.distractors)) == 3 and it.answer not in it.distractors
        for fmt in world.FORMATS:
            ex = world.render(it, fmt)
            assert ex.answer == ex.options[ex.gold]
            assert ex.item_id == it.item_id  # identity does not depend on the surface format
            if fmt != "mc":
                assert it.answer.replace('"', '\\"') in ex.answer
        assert len((world.render(it, "qa").prompt + it.answer).split()) < 60  # items stay short


def test_answers_are_correct_where_checkable():
    for it in world.sample_items(0, "arithmetic", 200):
        a, op, b = re.match(r"(\d+)([+-])(\d+)", it.key).groups()
        assert int(it.answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    for it in world.sample_items(0, "sorting", 100):
        assert it.answer.split() == sorted(it.key.split(), key=int)
    for it in world.sample_items(0, "reverse", 100):
        assert it.answer.split() == it.key.split()[::-1]
    for it in world.sample_items(0, "counting", 100):
        target, shown = it.key.split(":")
        assert int(it.answer) == shown.split().count(target)


def test_mc_renders_lettered_options_and_gold_letter():
    it = world.sample_items(0, "comparison", 1)[0]
    ex = world.render(it, "mc")
    assert ex.options == (" A", " B", " C", " D")
    letter = ex.answer.strip()
    assert f"\n{letter}. {it.answer}\n" in ex.prompt + "\n"


def test_prompt_repetition_duplicates_prompt_only():
    it = world.sample_items(0, "dates", 1)[0]
    plain, rep = world.render(it, "qa"), world.render(it, "qa", prompt_repetition=True)
    assert rep.prompt == plain.prompt + "\n" + plain.prompt
    assert rep.answer == plain.answer
