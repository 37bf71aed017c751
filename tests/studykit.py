"""Synthetic study records (no training) for the statistics, claims and report tests (not a test module).

`synthetic_study(...)` makes per-run records shaped like studies.runner's record.json (items,
passages, footprint variants, matrices, curves) for any arms x bases x seeds, with known effects,
plus the matching base evals and a stand-in for the eval sets, so results.json can be built by
studies.finalize without a model.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bshadow_jax.data.evalsets import EvalSets
from bshadow_jax.studies.evalsuite import EvalSuite

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NARROW_SKILLS = ("sorting", "counting")
BROAD_CATEGORIES = ("other_skills", "compositional")


@dataclasses.dataclass(frozen=True)
class FakeItem:
    category: str
    family: str
    format: str
    item_id: int
    options: tuple[str, ...] = ("a", "b", "c", "d")

    @property
    def chance(self) -> float:
        return 1.0 / len(self.options)


def fake_eval_sets(n_narrow: int = 40, n_broad: int = 40, n_text: int = 6) -> EvalSuite:
    narrow = tuple(FakeItem("narrow", NARROW_SKILLS[i % 2], "qa", 1000 + i) for i in range(n_narrow))
    broad = tuple(FakeItem(BROAD_CATEGORIES[i % 2], f"fam{i % 4}", ("qa", "cloze")[i % 2], 5000 + i)
                  for i in range(n_broad))
    return EvalSuite(EvalSets(narrow, broad, tuple(f"passage number {i}" for i in range(n_text)), {}), {}, {})


@dataclasses.dataclass(frozen=True)
class ArmTruth:
    """An arm's true effects: accuracy (prob. of correct), margin mean, log-ppl, footprint numbers."""

    narrow: float = 0.5
    broad: float = 0.4
    log_ppl: float = 4.0
    entropy: float = 0.8
    eff_rank: float = 50.0
    tokens: int = 500


def _items(rng, n, p, noise):
    correct = (rng.uniform(size=n) < p).astype(int)
    margin = np.where(correct == 1, 1.0, -1.0) * rng.uniform(0.1, 1.0, n) + rng.normal(0, noise, n)
    gold = -rng.uniform(0.5, 3.0, n)
    return {"item_id": list(range(n)), "correct": correct.tolist(), "gold_logprob": gold.tolist(),
            "margin": margin.tolist()}


def run_record(arm: str, base: int, seed: int, truth: ArmTruth, es: EvalSuite, *, rng,
               footprint_noise: float = 0.01) -> dict:
    n_mat = 2 * len(MODULES) + 2
    ent = truth.entropy + rng.normal(0, footprint_noise)
    er = truth.eff_rank + rng.normal(0, footprint_noise * 50)
    shares = rng.dirichlet(np.full(n_mat, 5.0))
    mats = [{"name": f"model.layers.{i // len(MODULES)}.{m}.weight", "component": "language_model",
             "layer": i // len(MODULES), "module": m, "expert": None, "energy_share": float(shares[i]),
             "delta_effective_rank": float(er + rng.normal())} for i, m in enumerate(MODULES * 2)]
    mats += [{"name": n, "component": "language_model", "layer": None, "module": mod, "expert": None,
              "energy_share": float(shares[-1 - k]), "delta_effective_rank": float(er / 2)}
             for k, (n, mod) in enumerate((("model.embed_tokens.weight", "embed"), ("lm_head.weight", "lm_head")))]
    fp_all = {"entropy": ent - 0.05, "gini": 1 - ent, "matrices_for_90pct": ent, "delta_effective_rank": er - 3}
    fp_blocks = {"entropy": ent, "gini": 1 - ent, "matrices_for_90pct": ent, "energy_share": 0.7,
                 "delta_effective_rank": er}
    nt = len(es.text)
    tokens = rng.integers(50, 80, nt)
    logprob = -(truth.log_ppl + rng.normal(0, 0.05, nt)) * tokens
    items = {"narrow": _items(rng, len(es.narrow), truth.narrow, 0.05),
             "broad": _items(rng, len(es.broad), truth.broad, 0.05)}
    narrow = float(np.mean(items["narrow"]["correct"]))
    broad = float(np.mean(items["broad"]["correct"]))
    return {
        "arm": arm, "base": base, "seed": seed, "config_hash": f"{arm}-{base}-{seed}",
        "narrow": {"score": narrow, "by_category": {s: narrow for s in NARROW_SKILLS}},
        "broad": {"score": broad, "by_category": {c: broad for c in BROAD_CATEGORIES}},
        "perplexity": {"value": float(np.exp(truth.log_ppl))},
        "items": items, "passages": {"logprob": logprob.tolist(), "tokens": tokens.tolist()},
        "distinct_tokens": int(truth.tokens + rng.integers(-5, 5)),
        "footprint": fp_all, "footprint_variants": {"all": fp_all, "blocks_only": fp_blocks,
                                                    "per_parameter": {"entropy": ent - 0.1, "gini": 1 - ent}},
        "footprint_by_module": {m: 1.0 / 9 for m in MODULES} | {"embed": 0.1, "lm_head": 0.2},
        "footprint_curve": [{"step": s, "entropy": ent * s / 4} for s in (1, 2, 3, 4)],
        "train_curve": [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3, 4)],
        "matrices": mats,
    }


def synthetic_study(truths: dict[str, ArmTruth], *, bases=(0, 1), seeds=(0, 1, 2), seed: int = 0,
                    es: EvalSuite | None = None, footprint_noise: float = 0.01):
    """(records by arm, base evals by base, eval sets) for arms with the given true effects."""
    rng = np.random.default_rng(seed)
    es = es or fake_eval_sets()
    records = {arm: [run_record(arm, b, s, t, es, rng=rng, footprint_noise=footprint_noise)
                     for b in bases for s in seeds] for arm, t in truths.items()}
    base_truth = ArmTruth(narrow=0.35, broad=0.3)
    base_evals = {}
    for b in bases:
        r = run_record("base", b, 0, base_truth, es, rng=rng)
        base_evals[b] = {k: r[k] for k in ("narrow", "broad", "perplexity", "items", "passages")}
    return records, base_evals, es
