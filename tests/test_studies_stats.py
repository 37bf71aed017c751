"""The study statistics: hierarchical bootstrap, intervals, mde, TOST, verdict rules, claims on synthetic runs."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from studykit import ArmTruth, synthetic_study

from bshadow_jax.studies import aggregate, claims, finalize, stats
from bshadow_jax.studies.aggregate import ArmRuns
from bshadow_jax.studies.claims import Analysis, ClaimArms


def test_mde_factor_is_80_percent_power_two_sided_005():
    assert stats.MDE_FACTOR == pytest.approx(sps.norm.ppf(0.975) + sps.norm.ppf(0.8))
    assert stats.MDE_FACTOR == pytest.approx(2.8016, abs=1e-4)


def test_item_bootstrap_se_matches_the_binomial_se():
    # one base, one seed, N items: the bootstrap SE of the accuracy is sqrt(p(1-p)/N)
    rng = np.random.default_rng(0)
    n = 400
    x = (rng.uniform(size=n) < 0.3).astype(float)
    boot = stats.Bootstrap([0], n_boot=4000, seed=1)
    reps = boot.mean("a", {0: x[None, :]}, items="narrow")
    p = x.mean()
    assert reps.std() == pytest.approx(np.sqrt(p * (1 - p) / n), rel=0.06)
    ci = stats.interval(stats.point({0: x[None, :]}), reps)
    assert ci["mean"] == pytest.approx(p)
    assert 0.0 <= ci["lo"] < p < ci["hi"] <= 1.0


def test_seed_level_bootstrap_se_matches_the_standard_error():
    # run-level values, one base: the bootstrap of the seed mean has SE ~ sd * sqrt((n-1)/n) / sqrt(n)
    rng = np.random.default_rng(1)
    v = rng.normal(0, 1, 30)
    boot = stats.Bootstrap([0], n_boot=4000, seed=2)
    reps = boot.mean("a", {0: v})
    want = v.std(ddof=0) / np.sqrt(v.size)
    assert reps.std() == pytest.approx(want, rel=0.07)


def test_bases_are_resampled_a_base_effect_widens_the_interval():
    # the same seed spread, plus a large between-base shift: only the base level can carry it
    rng = np.random.default_rng(2)
    runs_flat = {b: rng.normal(0, 0.01, 5) for b in range(4)}
    runs_shift = {b: runs_flat[b] + (1.0 if b % 2 else -1.0) for b in range(4)}
    boot = stats.Bootstrap(range(4), n_boot=2000, seed=0)
    assert boot.mean("x", runs_shift).std() > 20 * boot.mean("x", runs_flat).std()


def test_paired_items_cancel_a_shared_item_effect():
    # both arms share per-item difficulty; arm a is better by exactly 0.1 on every item
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 1, 300)
    a = {0: (difficulty + 0.1)[None, :].repeat(3, 0)}
    b = {0: difficulty[None, :].repeat(3, 0)}
    boot = stats.Bootstrap([0], n_boot=500, seed=0)
    diff = boot.mean("a", a, items="s") - boot.mean("b", b, items="s")
    np.testing.assert_allclose(diff, 0.1, atol=1e-12)


def test_ratio_measure_is_token_weighted():
    nll = {0: np.array([[10.0, 30.0]])}
    tok = {0: np.array([[10.0, 10.0]])}
    assert stats.point(nll, denom=tok) == pytest.approx(2.0)
    boot = stats.Bootstrap([0], n_boot=300, seed=0)
    reps = boot.mean("a", nll, items="text", denom=tok)
    assert set(np.round(reps, 9)) <= {1.0, 2.0, 3.0}


def test_draws_do_not_depend_on_call_order():
    v = {0: np.arange(12.0).reshape(3, 4), 1: np.arange(12.0).reshape(3, 4)[::-1]}
    b1, b2 = stats.Bootstrap([0, 1], n_boot=50, seed=5), stats.Bootstrap([0, 1], n_boot=50, seed=5)
    b2.mean("other", v, items="s")
    np.testing.assert_array_equal(b1.mean("a", v, items="s"), b2.mean("a", v, items="s"))


@pytest.mark.parametrize("reps_center, expect, verdict", [
    (0.5, ">", "held"), (-0.5, ">", "not held"), (0.0, ">", "inconclusive"),
    (-0.5, "<", "held"), (0.5, "<", "not held"),
])
def test_directional_verdicts_are_symmetric(reps_center, expect, verdict):
    reps = np.random.default_rng(0).normal(reps_center, 0.1, 2000)
    t = stats.directional("x", "acc", reps_center, reps, expect=expect)
    assert t["verdict"] == verdict
    assert t["mde"] == pytest.approx(stats.MDE_FACTOR * reps.std(ddof=1))
    assert t["lo"] < reps_center < t["hi"]


@pytest.mark.parametrize("center, sd, verdict", [
    (0.0, 0.01, "held"),          # tight around 0, margin 0.1
    (0.3, 0.01, "not held"),      # tight beyond the margin
    (0.0, 0.2, "inconclusive"),   # too noisy to show equivalence
    (0.09, 0.02, "inconclusive"),  # straddles the margin
])
def test_tost_verdicts(center, sd, verdict):
    reps = np.random.default_rng(1).normal(center, sd, 4000)
    t = stats.equivalence("x", "entropy", center, reps, margin=0.1)
    assert t["verdict"] == verdict
    assert t["lo90"] > t["lo"] and t["hi90"] < t["hi"]
    assert t["min_margin"] == pytest.approx(stats.TOST_FACTOR * reps.std(ddof=1))


def test_combine():
    assert stats.combine(["held", "held"]) == "held"
    assert stats.combine(["held", "inconclusive"]) == "inconclusive"
    assert stats.combine(["inconclusive", "not held"]) == "not held"
    assert stats.combine(["held", "not tested"]) == "not tested"
    assert stats.combine([]) == "not tested"


# ---------------------------------------------------------------- claims on synthetic runs

ROLES = ClaimArms(equivalence_margins={"footprint_blocks_only.entropy": 0.05,
                                       "footprint_blocks_only.delta_effective_rank": 3.0})
PLAN = Analysis(n_boot=400, seed=0)
BIG = dict(items=400)


def _runs(truths, **kw):
    from studykit import fake_eval_sets
    recs, _, _ = synthetic_study(truths, es=fake_eval_sets(n_narrow=400, n_broad=400), **kw)
    return {a: ArmRuns(a, r) for a, r in recs.items()}


def _by_id(out):
    return {c["id"]: c for c in out}


def test_c1_held_when_the_paper_is_right_and_not_held_when_reversed():
    right = _runs({"benchmark_aligned": ArmTruth(narrow=0.8, broad=0.3, log_ppl=5.0),
                   "coverage_expanding": ArmTruth(narrow=0.5, broad=0.5, log_ppl=4.0)})
    c1 = _by_id(claims.evaluate_claims(right, ROLES, plan=PLAN))["C1"]
    assert c1["verdict"] == "held", [t["verdict"] for t in c1["tests"]]
    assert {t["metric"] for t in c1["tests"]} == {"acc", "margin", "log_ppl"}
    for t in c1["tests"]:
        assert t["mde"] > 0 and t["lo"] <= t["diff"] <= t["hi"]
    wrong = _runs({"benchmark_aligned": ArmTruth(narrow=0.4, broad=0.5),
                   "coverage_expanding": ArmTruth(narrow=0.7, broad=0.3)})
    assert _by_id(claims.evaluate_claims(wrong, ROLES, plan=PLAN))["C1"]["verdict"] == "not held"


def test_c1_null_effect_is_inconclusive_not_reversed():
    null = _runs({"benchmark_aligned": ArmTruth(), "coverage_expanding": ArmTruth()}, seed=4)
    c1 = _by_id(claims.evaluate_claims(null, ROLES, plan=PLAN))["C1"]
    assert c1["verdict"] in ("inconclusive", "held")  # never "not held" without significance
    assert all(t["verdict"] != "not held" or t["hi"] < 0 for t in c1["tests"])


def test_c2_needs_the_token_matched_arm_and_reports_the_seed_sd():
    truths = {"benchmark_aligned": ArmTruth(entropy=0.6, eff_rank=30), "coverage_expanding": ArmTruth(entropy=0.8),
              "token_matched": ArmTruth(entropy=0.8)}
    c2 = _by_id(claims.evaluate_claims(_runs(truths), ROLES, plan=PLAN))["C2"]
    by_b = {}
    for t in c2["tests"]:
        by_b.setdefault(t["b"], []).append(t["verdict"])
        assert t["seed_sd"] > 0 and t["diff_over_seed_sd"] == pytest.approx(t["diff"] / t["seed_sd"])
    assert set(by_b["benchmark_aligned"]) == {"held"}
    assert "held" not in by_b["token_matched"]  # coverage and token_matched have the same footprint
    assert c2["verdict"] != "held"


def test_repetition_tost_uses_config_margins():
    same = _runs({"plain": ArmTruth(), "prompt_repetition": ArmTruth(), "benchmark_aligned": ArmTruth(entropy=0.5)},
                 seeds=(0, 1, 2, 3, 4), footprint_noise=0.002)
    r1 = _by_id(claims.evaluate_claims(same, ROLES, study="repetition", plan=PLAN))["R1"]
    assert r1["verdict"] == "held"
    assert {t["kind"] for t in r1["tests"]} == {"equivalence"}
    assert {t["margin"] for t in r1["tests"]} == {0.05, 3.0}
    moved = _runs({"plain": ArmTruth(), "prompt_repetition": ArmTruth(entropy=0.95, eff_rank=60)},
                  seeds=(0, 1, 2, 3, 4), footprint_noise=0.002)
    assert _by_id(claims.evaluate_claims(moved, ROLES, study="repetition", plan=PLAN))["R1"]["verdict"] == "not held"


def test_repetition_without_margins_is_a_config_error():
    from bshadow_jax.errors import ConfigError
    runs = _runs({"plain": ArmTruth(), "prompt_repetition": ArmTruth()})
    with pytest.raises(ConfigError, match="equivalence_margins"):
        claims.evaluate_claims(runs, ClaimArms(), study="repetition", plan=PLAN)


def test_missing_arms_are_not_tested():
    out = _by_id(claims.evaluate_claims(_runs({"benchmark_aligned": ArmTruth()}), ROLES, plan=PLAN))
    assert {c["verdict"] for c in out.values()} == {"not tested"}


def test_arm_entry_intervals_stay_in_range_and_keep_run_values():
    recs, bev, es = synthetic_study({"a": ArmTruth(narrow=0.97, broad=0.02)}, seeds=(0, 1, 2))
    meta = finalize.item_meta(es)
    e = aggregate.arm_entry(ArmRuns("a", recs["a"]), meta, n_boot=300, seed=0)
    for sec in ("narrow", "broad"):
        s = e[sec]["score"]
        assert 0.0 <= s["lo"] <= s["mean"] <= s["hi"] <= 1.0
        assert len(s["values"]) == 6
        assert e[sec]["chance"] == pytest.approx(0.25)
        for ci in e[sec]["by_category"].values():
            assert 0.0 <= ci["lo"] <= ci["hi"] <= 1.0
    assert e["bases"] == [0, 1] and e["runs"] == 6
    assert set(e["footprint_variants"]) == {"all", "blocks_only", "per_parameter"}
    assert e["perplexity"]["value"]["mean"] == pytest.approx(np.exp(e["perplexity"]["log_ppl"]["mean"]))
    assert e["distinct_tokens"]["mean"] > 0


def test_items_csv_has_one_row_per_item_per_run_and_the_design_columns():
    import csv
    import io
    recs, bev, es = synthetic_study({"a": ArmTruth(), "b": ArmTruth()}, bases=(3,), seeds=(0, 1))
    text = finalize.items_csv(recs, bev, finalize.item_meta(es))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(finalize.ITEM_COLUMNS)
    n_items = len(es.narrow) + len(es.broad)
    assert len(rows) == n_items * (4 + 1)  # 2 arms x 2 seeds, and the base
    first = recs["a"][0]["items"]["narrow"]
    a_rows = [r for r in rows if r["arm"] == "a" and r["seed"] == "0" and r["category"] == "narrow"]
    assert [int(r["correct"]) for r in a_rows] == first["correct"]
    assert [float(r["margin"]) for r in a_rows] == pytest.approx(first["margin"])
    assert {r["seed"] for r in rows if r["arm"] == "base"} == {""}
