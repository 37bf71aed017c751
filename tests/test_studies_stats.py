"""Aggregation, claims and regime score on synthetic numbers (no training)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from bshadow_jax.studies import aggregate, claims, regime_score


# ---------------------------------------------------------------- aggregation vs scipy

@pytest.mark.parametrize("n", [2, 3, 5, 11])
def test_mean_ci_matches_scipy_t_interval(n):
    x = np.random.default_rng(n).normal(3.0, 2.0, size=n)
    got = aggregate.mean_ci(x)
    lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
    assert got["mean"] == pytest.approx(x.mean())
    assert got["lo"] == pytest.approx(lo, rel=1e-10)
    assert got["hi"] == pytest.approx(hi, rel=1e-10)
    assert got["n"] == n and got["values"] == pytest.approx(list(x))


def test_mean_ci_single_and_empty_and_nonfinite():
    one = aggregate.mean_ci([1.5])
    assert one["mean"] == 1.5 and one["lo"] is None and one["hi"] is None
    assert aggregate.mean_ci([])["mean"] is None
    assert aggregate.mean_ci([1.0, float("nan"), None, 3.0])["n"] == 2


def test_welch_diff_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 4), rng.normal(0.0, 3.0, 6)
    got = aggregate.welch_diff(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert got["diff"] == pytest.approx(a.mean() - b.mean())
    assert got["lo"] == pytest.approx(ci.low, rel=1e-9)
    assert got["hi"] == pytest.approx(ci.high, rel=1e-9)


def test_aggregate_arm_nested_categories():
    recs = [{"narrow": {"score": s, "by_category": {"arith": s / 2}}, "broad": {"score": 1 - s},
             "footprint": {"entropy": 0.5 + s}} for s in (0.1, 0.2, 0.3)]
    entry = aggregate.aggregate_arm([0, 1, 2], recs)
    assert entry["seeds"] == [0, 1, 2]
    assert entry["narrow"]["score"]["mean"] == pytest.approx(0.2)
    assert entry["narrow"]["by_category"]["arith"]["mean"] == pytest.approx(0.1)
    assert entry["footprint"]["entropy"]["values"] == pytest.approx([0.6, 0.7, 0.8])
    assert aggregate.gap_values(entry) == pytest.approx([-0.8, -0.6, -0.4])


def test_delta_means_skip_non_delta_columns():
    rows = [{"name": "a", "layer": 0, "energy_share": 0.7, "delta_effective_rank": 2.0, "rel_delta": 0.1},
            {"name": "b", "layer": 1, "energy_share": 0.3, "delta_effective_rank": 4.0, "rel_delta": float("nan")}]
    m = aggregate.delta_means(rows)
    assert m == {"delta_effective_rank": 3.0, "rel_delta": 0.1}


# ---------------------------------------------------------------- claims

def _arm(narrow, broad, entropy, erank):
    recs = [{"narrow": {"score": n}, "broad": {"score": b}, "footprint": {"entropy": e, "delta_effective_rank": r}}
            for n, b, e, r in zip(narrow, broad, entropy, erank)]
    return aggregate.aggregate_arm(list(range(len(recs))), recs)


def _study(aligned_narrow_shift=0.2, coverage_entropy_shift=0.1, opt_gap_shift=0.0, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    e = lambda: rng.normal(0, noise, 3)  # noqa: E731
    return {
        "benchmark_aligned": _arm(0.5 + aligned_narrow_shift + e(), 0.3 + e(), 0.6 + e(), 5 + e()),
        "coverage_expanding": _arm(0.5 + e(), 0.4 + e(), 0.6 + coverage_entropy_shift + e(), 5 + 10 * coverage_entropy_shift + e()),
        "optimizer_control": _arm(0.5 + opt_gap_shift + e(), 0.4 + e(), 0.9 + e(), 9 + e()),
    }


def test_claims_hold_on_planted_effects():
    out = {c["id"]: c for c in claims.evaluate_claims(_study())}
    assert out["C1"]["held"] and out["C1"]["verdict"] == "held"
    assert out["C2"]["held"]
    assert out["C3"]["held"], out["C3"]
    # the numbers are reported
    t = out["C1"]["tests"][0]
    assert t["diff"] == pytest.approx(np.mean(t["a_values"]) - np.mean(t["b_values"]))


def test_claims_fail_when_reversed_or_noisy():
    out = {c["id"]: c for c in claims.evaluate_claims(_study(aligned_narrow_shift=-0.2, coverage_entropy_shift=-0.1))}
    assert not out["C1"]["held"] and out["C1"]["verdict"] == "not held"
    assert out["C1"]["tests"][0]["verdict"] == "reversed"
    assert not out["C2"]["held"] and out["C2"]["verdict"] == "not held"
    noisy = {c["id"]: c for c in claims.evaluate_claims(_study(aligned_narrow_shift=0.01, noise=0.2, seed=3))}
    assert not noisy["C1"]["held"]


def test_optimizer_claim_fails_when_setting_moves_gap_more():
    out = {c["id"]: c for c in claims.evaluate_claims(_study(aligned_narrow_shift=0.05, opt_gap_shift=0.5))}
    assert not out["C3"]["held"]
    assert out["C3"]["tests"][1]["verdict"] == "reversed"


def test_claims_not_tested_when_arms_missing():
    out = claims.evaluate_claims({"benchmark_aligned": _study()["benchmark_aligned"]})
    assert all(c["verdict"] == "not tested" and not c["held"] for c in out)


def test_repetition_claim():
    base = _study()
    same = _arm([0.5, 0.51, 0.49], [0.4, 0.4, 0.41], [0.65, 0.66, 0.64], [5.5, 5.4, 5.6])
    arms = {**base, "prompt_repetition": same, "plain": same}
    (r,) = claims.evaluate_claims(arms, study="repetition")
    assert r["id"] == "R1" and r["held"]
    shifted = _arm([0.5, 0.51, 0.49], [0.4, 0.4, 0.41], [0.95, 0.96, 0.94], [9.5, 9.4, 9.6])
    (r2,) = claims.evaluate_claims({**base, "prompt_repetition": shifted, "plain": same}, study="repetition")
    assert not r2["held"]


# ---------------------------------------------------------------- regime score

def _fp(rng, center, n):
    return [{"entropy": center + rng.normal(0, 0.02), "gini": 1 - center + rng.normal(0, 0.02),
             "delta_effective_rank": 10 * center + rng.normal(0, 0.2)} for _ in range(n)]


def test_regime_score_places_references_and_midpoints():
    rng = np.random.default_rng(0)
    al, co = _fp(rng, 0.3, 4), _fp(rng, 0.8, 4)
    m = regime_score.fit(al, co, features=("entropy", "gini", "delta_effective_rank"), n_boot=100)
    mid = m.score({"entropy": 0.55, "gini": 0.45, "delta_effective_rank": 5.5})
    assert mid["score"] == pytest.approx(0.5, abs=0.1)
    assert mid["call"] == "can't tell" or abs(mid["score"] - 0.5) > 0.0
    assert m.score(_fp(rng, 0.3, 1)[0])["call"] == "aligned"
    assert m.score(_fp(rng, 0.8, 1)[0])["call"] == "coverage"
    far = m.score({"entropy": 0.8, "gini": 0.2, "delta_effective_rank": 8.0})
    assert far["lo"] <= far["score"] <= far["hi"]


def test_regime_score_validation_reports_accuracy_and_monotonicity():
    rng = np.random.default_rng(1)
    per_arm = {"al": _fp(rng, 0.3, 3), "co": _fp(rng, 0.8, 3), "m25": _fp(rng, 0.425, 3), "m75": _fp(rng, 0.675, 3)}
    v = regime_score.validate(per_arm, aligned="al", coverage="co", mixture_alpha={"m25": 0.25, "m75": 0.75},
                              features=("entropy", "gini", "delta_effective_rank"), n_boot=50)
    ho = v["held_out_seeds"]
    assert ho["n"] == 6 and ho["point_accuracy"] == 1.0
    assert v["mixture_monotonicity"]["spearman"] > 0.8
    # indistinguishable references: the score must not claim accuracy it does not have
    same = {"al": _fp(rng, 0.5, 3), "co": _fp(rng, 0.5, 3)}
    v2 = regime_score.validate(same, aligned="al", coverage="co", features=("entropy", "gini"), n_boot=50)
    assert v2["held_out_seeds"]["cant_tell_rate"] >= 0.5
