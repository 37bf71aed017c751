"""What a study scores every model on: the world's eval sets and lm-eval tasks, as one item catalog.

The narrow and broad sections each list their items in a fixed order: the procedural world's items
(data.evalsets, unless `evals.world` is off), then every document of the configured lm-eval tasks
(`evals.lm_eval.narrow` / `.broad`, scored by the JAX adapter of evals.harness). Every model's record
keeps one entry per catalog item in that order, so items.csv, the bootstrap and the claims treat a
GSM8K document and a world item alike: an lm-eval task is a skill of the narrow section, or a
category of the broad one. Held-out text passages (perplexity) come from the general text's split.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from bshadow_jax.data.evalsets import EvalSets, build_eval_sets
from bshadow_jax.errors import UserError
from bshadow_jax.evals import evaluate as world_evaluate

SECTIONS = ("narrow", "broad")
LM_EVAL_FORMAT = "lm_eval"


@dataclasses.dataclass(frozen=True)
class CatalogItem:
    """One scored item as items.csv lists it."""
    category: str
    skill: str
    format: str
    item_id: int
    chance: float


@dataclasses.dataclass(frozen=True)
class EvalSuite:
    world: EvalSets                                    # narrow/broad empty when evals.world is off
    tasks: Mapping[str, Sequence[str]]                 # section -> lm-eval task names
    bench: Mapping[str, Sequence[Any]]                 # task -> evals.harness.BenchmarkItem, doc_id order
    spec: Any = None                                   # studies.spec.LmEvalSpec
    task_manager: Any = None

    @property
    def text(self) -> tuple[str, ...]:
        return self.world.text

    def catalog(self, section: str) -> list[CatalogItem]:
        items = [CatalogItem(it.category, it.family, it.format, int(it.item_id), it.chance)
                 for it in getattr(self.world, section)]
        for task in self.tasks.get(section, ()):
            # a narrow task is one of the benchmark's skills; a broad task is its own category
            category = "narrow" if section == "narrow" else task
            items += [CatalogItem(category, task, LM_EVAL_FORMAT, b.doc_id, b.chance) for b in self.bench[task]]
        return items

    @property
    def narrow(self) -> list[CatalogItem]:
        return self.catalog("narrow")

    @property
    def broad(self) -> list[CatalogItem]:
        return self.catalog("broad")


def build_suite(evals_spec, data_cfg) -> EvalSuite:
    """The study's eval suite from its `evals` section (lm-eval tasks are resolved, and their documents
    listed, here: an unknown task fails before anything trains)."""
    world = build_eval_sets(data_cfg, **evals_spec.options)
    if not evals_spec.world:
        world = dataclasses.replace(world, narrow=(), broad=())
    le = evals_spec.lm_eval
    tasks = {sec: list(getattr(le, sec)) for sec in SECTIONS if getattr(le, sec)}
    names = [t for ts in tasks.values() for t in ts]
    if not names:
        return EvalSuite(world, {}, {})
    from bshadow_jax.evals import harness

    tm = harness.task_manager(names, le.include_path)
    bench = harness.benchmark_items(names, tm, limit=le.limit or None)
    return EvalSuite(world, tasks, bench, le, tm)



def _mean(vals: Sequence[float]) -> float:
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _summary(section: str, items: Mapping[str, list], catalog: Sequence[CatalogItem]) -> dict:
    group = (lambda c: c.skill) if section == "narrow" else (lambda c: c.category)
    by: dict[str, list[int]] = {}
    for k, c in enumerate(catalog):
        by.setdefault(group(c), []).append(k)
    return {"score": _mean(items["correct"]), "margin": _mean(items["margin"]),
            "by_category": {g: _mean([items["correct"][k] for k in ks]) for g, ks in sorted(by.items())},
            "by_category_margin": {g: _mean([items["margin"][k] for k in ks]) for g, ks in sorted(by.items())}}


def evaluate(suite: EvalSuite, model_cfg, params, tokenizer, evals_spec) -> dict:
    """One model's scores on the suite, with every item (in catalog order) and held-out passage.

    Returns:
        {"narrow": {score, margin, by_category, by_category_margin}, "broad": {...},
         "perplexity": {"value"}, "items": {section: {item_id, correct, gold_logprob, margin}},
         "passages": {logprob, tokens}, "lm_eval": {task: lm-eval's own aggregate metrics}}.
    """
    raw = world_evaluate(model_cfg, params, tokenizer, suite.world, batch_size=evals_spec.batch_size,
                         seq_len=evals_spec.seq_len)
    items = {sec: {k: list(v) for k, v in raw["items"][sec].items()} for sec in SECTIONS}
    lm_eval_metrics: dict[str, Any] = {}
    names = [t for sec in SECTIONS for t in suite.tasks.get(sec, ())]
    if names:
        from bshadow_jax.evals import harness

        le = suite.spec
        lm = harness.JaxLM.from_model(model_cfg, params, tokenizer, batch_size=le.batch_size,
                                      add_bos_token=le.add_bos_token, dtype=le.dtype, max_gen_toks=le.max_gen_toks)
        res = harness.run_tasks(lm, names, tm=suite.task_manager, limit=le.limit or None,
                                num_fewshot=le.num_fewshot, bootstrap_iters=0)
        for sec in SECTIONS:
            for task in suite.tasks.get(sec, ()):
                rows = harness.item_rows(res, task)
                want = [b.doc_id for b in suite.bench[task]]
                if rows["item_id"] != want:
                    raise UserError(f"lm-eval task {task!r}: scored documents {rows['item_id'][:5]}... differ from "
                                    f"the catalog's {want[:5]}... (the task's data changed during the study?)")
                for k in items[sec]:
                    items[sec][k] += rows[k]
        lm_eval_metrics = {t: {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                           for t, r in res["results"].items()}
    out = {sec: _summary(sec, items[sec], suite.catalog(sec)) for sec in SECTIONS}
    ppl = raw.get("perplexity")
    out["perplexity"] = dict(ppl) if isinstance(ppl, Mapping) else {"value": ppl}
    out["items"] = items
    out["passages"] = raw["passages"]
    if lm_eval_metrics:
        out["lm_eval"] = lm_eval_metrics
    return out
