"""How benchmark-aligned is a mixture? Format shares, skill-coverage entropy, eval overlap.

`audit(data_cfg)` samples each stage of the training stream (example records, before
tokenization) and reports:
  format_shares        share of examples per surface format ("text" for general text, "hf")
  family_shares        share per skill family among world items
  skill_entropy        normalised entropy of the skill distribution (0 = one skill, 1 = uniform over all)
  benchmark_alignment  share of examples that are a benchmark skill in the benchmark format
  overlap              exact matches and 13-gram overlap with the evaluation sets (should be 0)
`bshadow data audit CONFIG` runs it on a training config (its `data` section) or on every arm of
a study config (`finetune.data` merged with each arm's `data`, and `base.pretrain.data`).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import math
import sys
from pathlib import Path

from bshadow_jax.config import apply_overrides, from_dict, read_yaml
from bshadow_jax.data import decontam, world
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.evalsets import build_eval_sets
from bshadow_jax.data.interventions import repeated_subset
from bshadow_jax.data.pipeline import mixed_examples, resolve_plan
from bshadow_jax.errors import ConfigError
from bshadow_jax.fileio import atomic_write_text


def sample_records(data_cfg: DataConfig, *, items: int = 2000, seed: int = 0) -> list[tuple[int, dict]]:
    """(stage start step, record) pairs: `items` records from each stage of the training stream."""
    plan = resolve_plan(data_cfg)
    if data_cfg.repeat_k > 1 and data_cfg.repeat_steps > 0 and not data_cfg.dedup:
        # without a tokenizer the pool is sized for `items` draws, so the audit sees the k repeats
        plan = repeated_subset(plan, k=data_cfg.repeat_k, steps=data_cfg.repeat_steps,
                               pool_size=max(1, items // data_cfg.repeat_k))
    out = []
    for k, (start, _) in enumerate(plan.stages):
        it = iter(mixed_examples(data_cfg, plan, seed=seed, stage=k))
        out += [(start, next(it)) for _ in range(items)]
    return out


def _entropy(counts: dict[str, int], n_classes: int) -> float:
    total = sum(counts.values())
    if total == 0 or n_classes <= 1:
        return 0.0
    h = -sum(c / total * math.log(c / total) for c in counts.values() if c)
    return h / math.log(n_classes)


def summarize_records(records: list[dict], data_cfg: DataConfig, eval_sets=None) -> dict:
    n = len(records)
    fmt = collections.Counter(r["format"] for r in records)
    fam = collections.Counter(r["family"] for r in records if r["family"] in world.FAMILIES)
    n_world = sum(fam.values())
    bench = set(data_cfg.benchmark_skills)
    aligned = sum(1 for r in records if r["family"] in bench and r["format"] == data_cfg.benchmark_format)
    out = {
        "examples": n,
        "format_shares": {k: v / n for k, v in sorted(fmt.items())},
        "family_shares": {k: v / max(n_world, 1) for k, v in sorted(fam.items())},
        "skill_entropy": _entropy(fam, len(world.FAMILIES)),
        "benchmark_alignment": aligned / n if n else 0.0,
        "unique_examples": len({(r["prompt"], r["answer"]) for r in records}) / n if n else 0.0,
    }
    if eval_sets is not None:
        eval_texts = eval_sets.texts()
        eval_ids = {it.item_id for it in eval_sets.narrow + eval_sets.broad}
        eval_set = set(eval_texts)
        train_texts = [r["prompt"] + r["answer"] for r in records]
        ov = decontam.overlap(train_texts, decontam.ngram_set(eval_texts))
        out["overlap"] = {
            "exact": sum(1 for t in train_texts if t in eval_set),
            "item_ids": sum(1 for r in records if r["item_id"] and r["item_id"] in eval_ids),
            "ngram": decontam.NGRAM,
            **ov,
        }
    return out


def audit(data_cfg: DataConfig, *, items: int = 2000, seed: int = 0, eval_sets=None) -> dict:
    """Audit numbers of one data config, over all its stages together and per stage."""
    if eval_sets is None:
        eval_sets = build_eval_sets(data_cfg)
    pairs = sample_records(data_cfg, items=items, seed=seed)
    out = summarize_records([r for _, r in pairs], data_cfg, eval_sets)
    starts = sorted({s for s, _ in pairs})
    if len(starts) > 1:
        out["stages"] = {str(s): summarize_records([r for t, r in pairs if t == s], data_cfg) for s in starts}
    out["arm"] = data_cfg.arm
    return out


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def data_sections(raw: dict, where: str) -> dict[str, dict]:
    """Named data sections of a training config ({"data": ...}) or a study config (per arm)."""
    if "arms" in raw and "finetune" in raw:
        base = (raw.get("finetune") or {}).get("data") or {}
        out = {}
        pre = ((raw.get("base") or {}).get("pretrain") or {}).get("data")
        if pre is not None:
            out["base"] = pre
        for arm in raw.get("arms") or []:
            if not isinstance(arm, dict) or "name" not in arm:
                raise ConfigError(f"{where}: arms: each arm needs a name")
            out[str(arm["name"])] = _merge(base, arm.get("data") or {})
        return out
    if "data" in raw:
        return {"data": raw["data"] or {}}
    raise ConfigError(f"{where}: no data section (expected `data:` or a study config with `arms:` and `finetune:`)")


def audit_cli(args: argparse.Namespace) -> int:
    raw = apply_overrides(read_yaml(args.config), args.overrides or [])
    results = {}
    for name, section in data_sections(raw, args.config).items():
        try:
            cfg = from_dict(DataConfig, section, f"{name}.data")
        except ConfigError as e:
            raise ConfigError(f"{args.config}: {e}") from None
        results[name] = audit(cfg, items=args.items, eval_sets=build_eval_sets(cfg))
    for name, r in results.items():
        fmts = ", ".join(f"{k} {v:.2f}" for k, v in r["format_shares"].items())
        ov = r["overlap"]
        print(f"{name}: alignment {r['benchmark_alignment']:.2f}  skill entropy {r['skill_entropy']:.2f}  "
              f"formats [{fmts}]  eval overlap: exact {ov['exact']}, {ov['ngram']}-gram {ov['texts_with_overlap']}")
    if args.out:
        out = Path(args.out)
        target = out / "audit.json" if out.is_dir() or not out.suffix else out
        atomic_write_text(target, json.dumps(results, indent=2, sort_keys=True))
        print(f"wrote {target}", file=sys.stderr)
    return 0
