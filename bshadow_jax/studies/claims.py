"""The paper's claims, each tested explicitly with the numbers behind it (docs/metrics.md#study-statistics).

Every test is a difference between arms, estimated and resampled with the hierarchical bootstrap
of studies.stats over the bases the arms share, their seeds, and the eval items where there are
any. Each test carries its 95% interval, its minimal detectable effect (`mde`, 80% power,
two-sided alpha 0.05, in the units of `diff`), its `metric`, and a verdict: "held" (significant on
the claimed side), "not held" (significant on the other side; for a no-shift claim: significantly
beyond its margin) or "inconclusive". A claim is held when all its tests are, not held when any
is, inconclusive otherwise. Tests listed under a claim's `descriptive` are reported, not voted.
The arms and the equivalence margins come from the study config's `claims` section, fixed before
the run.

Claims:
  C1 benchmark-aligned data wins on the narrow benchmark (accuracy and gold margin), and
     coverage-expanding data wins on broad ability (broad accuracy, broad margin, held-out text
     log-perplexity).
  C2 coverage-expanding updates are more distributed than benchmark-aligned ones, and than the
     token-matched control's (benchmark-aligned items with the coverage arm's share of general
     text): higher blocks-only footprint entropy and higher blocks-only mean delta effective rank.
     Blocks only, because an embedding row no batch touches gets no update, which ties the
     embedding's delta to the stream's token diversity rather than to what it teaches.
  C3 the optimizer-change control separates a training-setting effect from a data effect: changing
     the data moves the narrow-minus-broad gap significantly, and by more than changing the
     optimizer at fixed data does.
  R1 (repetition study) prompt repetition does not shift the regime: the blocks-only footprint
     (entropy, mean delta effective rank) stays within the configured equivalence margins
     (TOST). R2: the same for deduplication.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from bshadow_jax.errors import ConfigError
from bshadow_jax.studies import stats
from bshadow_jax.studies.aggregate import LOG_PPL, ArmRuns, measure, seed_sd

ENTROPY_BLOCKS = "footprint_blocks_only.entropy"
EFF_RANK_BLOCKS = "footprint_blocks_only.delta_effective_rank"
FOOTPRINT_TESTS = (ENTROPY_BLOCKS, EFF_RANK_BLOCKS)
# reported beside the voted blocks-only tests: the same numbers with the embeddings and head in
FOOTPRINT_DESCRIPTIVE = ("footprint.entropy", "footprint.delta_effective_rank", "footprint_per_parameter.entropy")


@dataclasses.dataclass(frozen=True)
class ClaimArms:
    """Which arms of a study play which role in the claims, and the equivalence margins."""

    aligned: str = "benchmark_aligned"
    coverage: str = "coverage_expanding"
    token_matched: str = "token_matched"  # aligned items + the coverage arm's share of general text
    optimizer: str = "optimizer_control"
    optimizer_partner: str = "coverage_expanding"  # the arm with the optimizer arm's data and the shared optimizer
    # repetition study
    repeated: str = "prompt_repetition"
    plain: str = "plain"
    dedup: str = "dedup"
    # no-shift claims: |treated - plain| < margin on these run-level measures (TOST), fixed before the run
    equivalence_margins: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        for k, m in self.equivalence_margins.items():
            if not m > 0:
                raise ConfigError(f"claims.equivalence_margins.{k}: must be > 0, got {m}")


@dataclasses.dataclass(frozen=True)
class Analysis:
    """The analysis plan, fixed before the run (the study config's `analysis` section)."""

    n_boot: int = stats.N_BOOT  # bootstrap replicates
    seed: int = 0  # the bootstrap's seed
    # disjoint seed pairs per (arm, base) whose delta W_i - W_j is diagnosed: the change no data
    # difference explains (0 = no noise floor)
    noise_floor_pairs: int = 2

    def validate(self) -> None:
        if self.n_boot < 100:
            raise ConfigError("analysis.n_boot: must be >= 100")
        if self.noise_floor_pairs < 0:
            raise ConfigError("analysis.noise_floor_pairs: must be >= 0")


def require_margins(roles: ClaimArms) -> None:
    """The no-shift claims are equivalence tests: ConfigError unless every margin they use is fixed."""
    absent = [m for m in FOOTPRINT_TESTS if m not in roles.equivalence_margins]
    if absent:
        raise ConfigError(f"claims.equivalence_margins: no margin for {', '.join(absent)} (the no-shift claims "
                          "are TOST within margins fixed in the config before the run)")


def _missing(arms: Mapping[str, ArmRuns], *names: str) -> list[str]:
    return [n for n in names if n not in arms or not arms[n].records]


def _claim(cid: str, text: str, tests: list[dict], **extra: Any) -> dict:
    verdict = stats.combine([t["verdict"] for t in tests])
    return {"id": cid, "claim": text, "verdict": verdict, "held": verdict == "held", "tests": tests, **extra}


def _not_tested(cid: str, text: str, missing: list[str]) -> dict:
    return {"id": cid, "claim": text, "held": False, "verdict": "not tested", "tests": [],
            "note": f"arms missing from this study: {', '.join(missing)}"}


def _boot(arms: Mapping[str, ArmRuns], names: list[str], plan: Analysis) -> stats.Bootstrap:
    shared = set.intersection(*(set(arms[n].bases) for n in names))
    if not shared:
        raise ValueError(f"arms {', '.join(names)} share no base")
    return stats.Bootstrap(sorted(shared), n_boot=plan.n_boot, seed=plan.seed)


def _diff(boot: stats.Bootstrap, arms: Mapping[str, ArmRuns], a: str, b: str, what: str):
    ea, ra = measure(arms[a], what, boot)
    eb, rb = measure(arms[b], what, boot)
    return ea - eb, ra - rb, ea, eb


def _metric_name(what: str) -> str:
    return {"narrow.acc": "acc", "broad.acc": "acc", "narrow.margin": "margin", "broad.margin": "margin",
            LOG_PPL: "log_ppl"}.get(what, what.split(".")[-1])


def _directional(boot, arms, a: str, b: str, what: str, label: str, **extra) -> dict:
    d, reps, ea, eb = _diff(boot, arms, a, b, what)
    return stats.directional(f"{label}: {a} - {b}", _metric_name(what), d, reps, expect=">", measure=what,
                             a=a, b=b, a_mean=ea, b_mean=eb, bases=boot.bases, **extra)


def _describe(boot, arms, a: str, b: str, what: str, label: str) -> dict:
    """A difference reported with its interval and mde, not voted (no claimed direction)."""
    d, reps, ea, eb = _diff(boot, arms, a, b, what)
    ci = stats.interval(d, reps)
    return {"comparison": f"{label}: {a} - {b}", "metric": _metric_name(what), "measure": what, "a": a, "b": b,
            "diff": ci["mean"],
            "lo": ci["lo"], "hi": ci["hi"], "se": ci["se"], "mde": None if ci["se"] is None else stats.MDE_FACTOR * ci["se"],
            "a_mean": ea, "b_mean": eb}


def _footprint_extra(arms, a: str, b: str, what: str, floor: Mapping[str, Any] | None) -> dict:
    sds = [s for s in (seed_sd(arms[a], what), seed_sd(arms[b], what)) if s is not None]
    sd = float(np.sqrt(np.mean(np.square(sds)))) if sds else None
    extra: dict[str, Any] = {"seed_sd": sd}
    if floor:
        extra["noise_floor"] = {arm: floor.get(arm, {}).get("footprint", {}).get(what) for arm in (a, b)}
    return extra


def _with_effect_size(t: dict) -> dict:
    sd = t.get("seed_sd")
    t["diff_over_seed_sd"] = t["diff"] / sd if sd and t.get("diff") is not None else None
    return t


def claim_narrow_broad(arms: Mapping[str, ArmRuns], roles: ClaimArms, plan: Analysis) -> dict:
    text = ("benchmark-aligned data wins on the narrow benchmark, coverage-expanding data on broad ability "
            "(broad items and held-out text)")
    al, co = roles.aligned, roles.coverage
    miss = _missing(arms, al, co)
    if miss:
        return _not_tested("C1", text, miss)
    boot = _boot(arms, [al, co], plan)
    plan_ = [(al, co, "narrow.acc", "narrow accuracy"), (al, co, "narrow.margin", "narrow gold margin"),
             (co, al, "broad.acc", "broad accuracy"), (co, al, "broad.margin", "broad gold margin"),
             # lower is better: test log-ppl(aligned) - log-ppl(coverage) > 0
             (al, co, LOG_PPL, "held-out text log-perplexity (lower is better)")]
    tests = [_directional(boot, arms, a, b, what, label) for a, b, what, label in plan_ if _both(arms, a, b, what)]
    absent = [what for a, b, what, _ in plan_ if not _both(arms, a, b, what)]
    extra = {"not_measured": absent, "note": f"not measured in this study: {', '.join(absent)} (a generated-answer "
                                             "benchmark has no option margin)"} if absent else {}
    return _claim("C1", text, tests, **extra)


def _both(arms: Mapping[str, ArmRuns], a: str, b: str, what: str) -> bool:
    return arms[a].has(what) and arms[b].has(what)


def claim_distributed(arms: Mapping[str, ArmRuns], roles: ClaimArms, plan: Analysis,
                      floor: Mapping[str, Any] | None = None) -> dict:
    text = ("coverage-expanding updates are more distributed than benchmark-aligned ones (and than the "
            "token-matched control's): higher footprint entropy and higher delta effective rank, blocks only")
    co, al, tm = roles.coverage, roles.aligned, roles.token_matched
    miss = _missing(arms, co, al)
    if miss:
        return _not_tested("C2", text, miss)
    refs = [al] + ([tm] if not _missing(arms, tm) else [])
    boot = _boot(arms, [co, *refs], plan)
    tests, desc = [], []
    for ref in refs:
        for what in FOOTPRINT_TESTS:
            tests.append(_with_effect_size(_directional(boot, arms, co, ref, what, what,
                                                        **_footprint_extra(arms, co, ref, what, floor))))
        for what in FOOTPRINT_DESCRIPTIVE:
            desc.append(_with_effect_size(_directional(boot, arms, co, ref, what, what,
                                                       **_footprint_extra(arms, co, ref, what, floor))))
    extra: dict[str, Any] = {"descriptive": desc}
    if tm not in refs:
        extra["note"] = f"no token-matched arm {tm!r} in this study: C2 is tested against {al!r} only"
    return _claim("C2", text, tests, **extra)


def _gap_stat(boot, arms, a: str, b: str, metric: str):
    """gap(a) - gap(b), gap = narrow - broad of `metric` ("acc" or "margin")."""
    na, ra_n = measure(arms[a], f"narrow.{metric}", boot)
    ba, ra_b = measure(arms[a], f"broad.{metric}", boot)
    nb, rb_n = measure(arms[b], f"narrow.{metric}", boot)
    bb, rb_b = measure(arms[b], f"broad.{metric}", boot)
    return (na - ba) - (nb - bb), (ra_n - ra_b) - (rb_n - rb_b)


def claim_optimizer_control(arms: Mapping[str, ArmRuns], roles: ClaimArms, plan: Analysis) -> dict:
    text = ("the optimizer-change control separates a training-setting effect from a data effect: "
            "changing the data moves the narrow-minus-broad gap significantly and by more than "
            "changing the optimizer at fixed data")
    al, co, pa, op = roles.aligned, roles.coverage, roles.optimizer_partner, roles.optimizer
    miss = _missing(arms, al, co, pa, op)
    if miss:
        return _not_tested("C3", text, miss)
    boot = _boot(arms, list(dict.fromkeys([al, co, pa, op])), plan)
    tests = []
    for metric in ("acc", "margin"):
        if not all(_both(arms, x, y, f"{sec}.{metric}") for x, y in ((al, co), (op, pa)) for sec in ("narrow", "broad")):
            continue  # no margin on a generated-answer benchmark
        d, rd = _gap_stat(boot, arms, al, co, metric)
        s, rs = _gap_stat(boot, arms, op, pa, metric)
        tests.append(stats.directional(f"data effect on the narrow-broad gap ({metric}): {al} - {co}", metric, d, rd,
                                       bases=boot.bases))
        tests.append(stats.directional(
            f"|data effect| - |setting effect| on the gap ({metric}); setting: {op} - {pa}", metric,
            abs(d) - abs(s), np.abs(rd) - np.abs(rs), data_effect=d, setting_effect=s,
            data_effect_ci=stats.interval(d, rd), setting_effect_ci=stats.interval(s, rs), bases=boot.bases))
    desc = []
    for what in FOOTPRINT_TESTS:
        d, rd, _, _ = _diff(boot, arms, co, al, what)
        s, rs, _, _ = _diff(boot, arms, op, pa, what)
        desc.append({"measure": what, "data_effect (coverage - aligned)": stats.interval(d, rd),
                     "setting_effect (optimizer - partner)": stats.interval(s, rs)})
    return _claim("C3", text, tests, descriptive=desc,
                  design=(f"optimizer arm '{op}' = the data of '{pa}' with another optimizer; "
                          "every other setting identical"))


def claim_repetition(arms: Mapping[str, ArmRuns], roles: ClaimArms, plan: Analysis, *, treated: str | None = None,
                     cid: str = "R1", what: str = "prompt repetition") -> dict:
    treated = treated or roles.repeated
    text = f"{what} does not shift the regime: the blocks-only footprint stays within the equivalence margins"
    miss = _missing(arms, treated, roles.plain)
    if miss:
        return _not_tested(cid, text, miss)
    require_margins(roles)
    names = [treated, roles.plain]
    refs = [r for r in (roles.coverage, roles.aligned) if not _missing(arms, r)]
    boot = _boot(arms, names + (refs if len(refs) == 2 else []), plan)
    tests = []
    for m in FOOTPRINT_TESTS:
        d, reps, ea, eb = _diff(boot, arms, treated, roles.plain, m)
        extra: dict[str, Any] = {"measure": m, "a": treated, "b": roles.plain, "a_mean": ea, "b_mean": eb,
                                 "bases": boot.bases}
        if len(refs) == 2:
            sep, sreps, _, _ = _diff(boot, arms, roles.coverage, roles.aligned, m)
            extra["reference_separation (coverage - aligned)"] = stats.interval(sep, sreps)
        tests.append(stats.equivalence(f"{m}: {treated} - {roles.plain}", _metric_name(m), d, reps,
                                       margin=float(roles.equivalence_margins[m]), **extra))
    desc = [_describe(boot, arms, treated, roles.plain, w, f"score shift ({w})")
            for w in ("narrow.acc", "narrow.margin", "broad.acc", "broad.margin", LOG_PPL)
            if arms[treated].has(w) and arms[roles.plain].has(w)]
    return _claim(cid, text, tests, descriptive=desc)


def evaluate_claims(arms: Mapping[str, ArmRuns], roles: ClaimArms | None = None, *, study: str = "regimes",
                    plan: Analysis | None = None, floor: Mapping[str, Any] | None = None) -> list[dict]:
    """Every claim of the study's kind ("regimes" or "repetition") as a results.json claim record."""
    roles = roles or ClaimArms()
    plan = plan or Analysis()
    if study == "repetition":
        out = [claim_repetition(arms, roles, plan)]
        if roles.dedup in arms:
            out.append(claim_repetition(arms, roles, plan, treated=roles.dedup, cid="R2", what="deduplication"))
        return out
    return [claim_narrow_broad(arms, roles, plan), claim_distributed(arms, roles, plan, floor),
            claim_optimizer_control(arms, roles, plan)]
