"""The paper's claims, each tested explicitly with the numbers behind it.

A claim is a list of directional comparisons between arms (Welch 95% interval of the
difference of seed means). A comparison "holds" when its interval lies entirely on the
claimed side of zero; "direction only" when the point estimate is on the claimed side but
the interval reaches zero (too few seeds or too small an effect); "reversed" otherwise.
A claim holds only when every comparison holds. Nothing here is tuned to make a claim
hold: thresholds are fixed in code and documented in the output.

Claims (arm names come from the study config's `claims` section):
  C1 benchmark-aligned wins narrow; coverage-expanding wins broad.
  C2 coverage-expanding updates are more distributed: higher footprint entropy and higher
     delta effective rank (mean over matrices) than benchmark-aligned.
  C3 the optimizer-change control separates a training-setting effect from a data effect:
     switching data (aligned vs coverage, same optimizer) moves the narrow-minus-broad gap
     significantly, and by more than switching the optimizer at fixed data (optimizer arm
     vs its same-data partner arm) does. The footprint shifts of both switches are reported
     beside it, because a setting change can move the footprint without moving the regime.
  R1 (repetition study) prompt repetition does not shift the regime (R2: the same for deduplication): its effect on the
     footprint (entropy, delta effective rank) is indistinguishable from zero or small
     (< `small_fraction` of the aligned-vs-coverage separation when references exist).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from bshadow_jax.errors import ConfigError
from bshadow_jax.studies.aggregate import gap_values, metric_values, welch_diff

ENTROPY = "footprint.entropy"
EFF_RANK = "footprint.delta_effective_rank"


@dataclasses.dataclass(frozen=True)
class ClaimArms:
    """Which arms of a study play which role in the claims."""

    aligned: str = "benchmark_aligned"
    coverage: str = "coverage_expanding"
    optimizer: str = "optimizer_control"
    optimizer_partner: str = "coverage_expanding"  # the arm with the optimizer arm's data and the shared optimizer
    # repetition study
    repeated: str = "prompt_repetition"
    plain: str = "plain"
    dedup: str = "dedup"
    # an effect is "small" next to the aligned-vs-coverage separation below this fraction
    small_fraction: float = 0.25

    def validate(self) -> None:
        if not 0.0 < self.small_fraction < 1.0:
            raise ConfigError(f"claims.small_fraction: must be in (0, 1), got {self.small_fraction}")


def compare(a: list[float], b: list[float], expect: str, *, label: str) -> dict:
    """Test mean(a) `expect` mean(b) (expect '>' or '<') with a Welch 95% interval."""
    d = welch_diff(a, b)
    out = {"comparison": label, "expect": f"a {expect} b", "a_values": list(a), "b_values": list(b),
           "a_mean": (sum(a) / len(a)) if a else None, "b_mean": (sum(b) / len(b)) if b else None, **d}
    if d["diff"] is None:
        out["verdict"] = "not tested"
        return out
    sign = 1.0 if expect == ">" else -1.0
    right_way = sign * d["diff"] > 0
    significant = d["lo"] is not None and (sign * d["lo"] > 0 if sign > 0 else sign * d["hi"] > 0)
    if d["diff"] == 0.0:
        out["verdict"] = "no difference"
    else:
        out["verdict"] = "held" if (right_way and significant) else ("direction only" if right_way else "reversed")
    return out


def _combine(tests: list[dict]) -> tuple[bool, str]:
    verdicts = [t["verdict"] for t in tests]
    if not verdicts or any(v == "not tested" for v in verdicts):
        return False, "not tested"
    if all(v == "held" for v in verdicts):
        return True, "held"
    if any(v in ("reversed", "no difference", "shifted") for v in verdicts):
        return False, "not held"
    return False, "inconclusive (right direction, not significant)"


def _missing(arms: Mapping[str, Any], *names: str) -> list[str]:
    return [n for n in names if n not in arms]


def _claim(cid: str, text: str, tests: list[dict], **extra) -> dict:
    held, verdict = _combine(tests)
    return {"id": cid, "claim": text, "held": held, "verdict": verdict, "tests": tests, **extra}


def _not_tested(cid: str, text: str, missing: list[str]) -> dict:
    return {"id": cid, "claim": text, "held": False, "verdict": "not tested",
            "tests": [], "note": f"arms missing from this study: {', '.join(missing)}"}


def claim_narrow_broad(arms: Mapping[str, Any], roles: ClaimArms) -> dict:
    text = "benchmark-aligned data wins on the narrow metric, coverage-expanding data on the broad one"
    miss = _missing(arms, roles.aligned, roles.coverage)
    if miss:
        return _not_tested("C1", text, miss)
    al, co = arms[roles.aligned], arms[roles.coverage]
    tests = [
        compare(metric_values(al, "narrow.score"), metric_values(co, "narrow.score"), ">",
                label=f"narrow: {roles.aligned} vs {roles.coverage}"),
        compare(metric_values(co, "broad.score"), metric_values(al, "broad.score"), ">",
                label=f"broad: {roles.coverage} vs {roles.aligned}"),
    ]
    return _claim("C1", text, tests)


def claim_distributed(arms: Mapping[str, Any], roles: ClaimArms) -> dict:
    text = ("coverage-expanding updates are more distributed than benchmark-aligned ones: "
            "higher footprint entropy and higher delta effective rank")
    miss = _missing(arms, roles.aligned, roles.coverage)
    if miss:
        return _not_tested("C2", text, miss)
    al, co = arms[roles.aligned], arms[roles.coverage]
    tests = [
        compare(metric_values(co, ENTROPY), metric_values(al, ENTROPY), ">",
                label=f"footprint entropy: {roles.coverage} vs {roles.aligned}"),
        compare(metric_values(co, EFF_RANK), metric_values(al, EFF_RANK), ">",
                label=f"mean delta effective rank: {roles.coverage} vs {roles.aligned}"),
    ]
    return _claim("C2", text, tests)


def claim_optimizer_control(arms: Mapping[str, Any], roles: ClaimArms) -> dict:
    text = ("the optimizer-change control separates a training-setting effect from a data effect: "
            "changing the data moves the narrow-minus-broad gap significantly and by more than "
            "changing the optimizer at fixed data")
    miss = _missing(arms, roles.aligned, roles.coverage, roles.optimizer_partner, roles.optimizer)
    if miss:
        return _not_tested("C3", text, miss)
    al, co, ge, op = (arms[roles.aligned], arms[roles.coverage], arms[roles.optimizer_partner], arms[roles.optimizer])
    data_gap = welch_diff(gap_values(al), gap_values(co))
    setting_gap = welch_diff(gap_values(op), gap_values(ge))
    data_test = compare(gap_values(al), gap_values(co), ">",
                        label=f"data effect on narrow-broad gap: {roles.aligned} vs {roles.coverage}")
    bigger = {"comparison": "|data effect| > |setting effect| on the gap (upper bound of |setting| below |data| point)",
              "data_effect": data_gap, "setting_effect": setting_gap}
    if data_gap["diff"] is None or setting_gap["diff"] is None:
        bigger["verdict"] = "not tested"
    else:
        setting_bound = max(abs(setting_gap["lo"]), abs(setting_gap["hi"])) if setting_gap["lo"] is not None \
            else abs(setting_gap["diff"])
        if abs(data_gap["diff"]) > setting_bound:
            bigger["verdict"] = "held"
        elif abs(data_gap["diff"]) > abs(setting_gap["diff"]):
            bigger["verdict"] = "direction only"
        else:
            bigger["verdict"] = "reversed"
    footprint_effects = {}
    for path in (ENTROPY, EFF_RANK):
        footprint_effects[path] = {
            "data_effect (coverage - aligned)": welch_diff(metric_values(co, path), metric_values(al, path)),
            "setting_effect (optimizer - partner)": welch_diff(metric_values(op, path), metric_values(ge, path)),
        }
    return _claim("C3", text, [data_test, bigger], footprint_effects=footprint_effects,
                  design=(f"optimizer arm '{roles.optimizer}' = the data of '{roles.optimizer_partner}' with another optimizer; "
                          "every other setting identical"))


def claim_repetition(arms: Mapping[str, Any], roles: ClaimArms, *, treated: str | None = None,
                     cid: str = "R1", what: str = "prompt repetition") -> dict:
    treated = treated or roles.repeated
    text = f"{what} does not shift the regime (footprint unchanged even where scores move)"
    miss = _missing(arms, treated, roles.plain)
    if miss:
        return _not_tested(cid, text, miss)
    rep, plain = arms[treated], arms[roles.plain]
    have_refs = roles.aligned in arms and roles.coverage in arms
    tests = []
    for path in (ENTROPY, EFF_RANK):
        eff = welch_diff(metric_values(rep, path), metric_values(plain, path))
        t = {"comparison": f"{path}: {treated} - {roles.plain}", **eff}
        if eff["diff"] is None:
            t["verdict"] = "not tested"
            tests.append(t)
            continue
        includes_zero = eff["lo"] is not None and eff["lo"] <= 0.0 <= eff["hi"]
        small = None
        if have_refs:
            sep = welch_diff(metric_values(arms[roles.coverage], path), metric_values(arms[roles.aligned], path))
            t["reference_separation (coverage - aligned)"] = sep
            if sep["diff"] is not None and sep["diff"] != 0:
                small = abs(eff["diff"]) < roles.small_fraction * abs(sep["diff"])
                t["fraction_of_separation"] = abs(eff["diff"]) / abs(sep["diff"])
        t["verdict"] = "held" if (includes_zero or small) else "shifted"
        tests.append(t)
    score_shifts = {
        "narrow": welch_diff(metric_values(rep, "narrow.score"), metric_values(plain, "narrow.score")),
        "broad": welch_diff(metric_values(rep, "broad.score"), metric_values(plain, "broad.score")),
    }
    return _claim(cid, text, tests, score_shifts=score_shifts)


def evaluate_claims(arms: Mapping[str, Any], roles: ClaimArms | None = None, *, study: str = "regimes") -> list[dict]:
    roles = roles or ClaimArms()
    if study == "repetition":
        out = [claim_repetition(arms, roles)]
        if roles.dedup in arms:
            out.append(claim_repetition(arms, roles, treated=roles.dedup, cid="R2", what="deduplication"))
        return out
    return [claim_narrow_broad(arms, roles), claim_distributed(arms, roles), claim_optimizer_control(arms, roles)]
