"""Distribution interventions as pure transforms on a `Plan` (named streams + staged weights).

A `Plan` says what each named stream draws (skills, formats, rewrite, prompt repetition,
dedup, a repeated pool) and how streams are mixed from which step on. Base arms build a plan;
transforms return a new plan. The token budget is the pipeline's (steps x batch x seq_len,
packed without padding), so every arm trains on the same number of tokens by construction.

    plan = coverage_expanding(cfg)               # all skills x all formats + general text
    plan = benchmark_aligned(cfg)                # benchmark skills in the benchmark format
    plan = mixture(cfg, alpha)                   # (1 - alpha) aligned + alpha coverage
    plan = normalised_rewrite(plan, "mc")        # every world item re-rendered in one format
    plan = prompt_repetition(plan)               # the prompt twice in every example
    plan = dedup(plan, pool=20000)               # no exact duplicate examples (within a 20000-draw pool)
    plan = repeated_subset(plan, k=4, steps=100, pool_size=N)   # N items seen k times first
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from bshadow_jax.data import world
from bshadow_jax.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    kind: Literal["world", "text", "hf"]
    families: tuple[str, ...] = ()
    formats: tuple[str, ...] = ()
    rewrite_to: str | None = None  # normalised rewrite: render every item in this format
    prompt_repetition: bool = False
    dedup: bool = False
    pool_size: int = 0  # > 0: draw only from a fixed pool of `pool_size` items, reshuffled every pass
    pool_of: str = ""  # the stream this pool is a subset of (same skills and formats, its own items)


@dataclasses.dataclass(frozen=True)
class Plan:
    streams: dict[str, StreamSpec]
    stages: tuple[tuple[int, dict[str, float]], ...]  # (start_step, weights); first start is 0

    def weights_at(self, step: int) -> dict[str, float]:
        w = self.stages[0][1]
        for start, ws in self.stages:
            if step >= start:
                w = ws
        return w


def _norm(weights: dict[str, float]) -> dict[str, float]:
    w = {k: float(v) for k, v in weights.items() if v > 0}
    s = sum(w.values())
    if not w or s <= 0:
        raise ValueError("a mixture needs at least one stream with positive weight")
    return {k: v / s for k, v in w.items()}


def _all_formats() -> tuple[str, ...]:
    return tuple(world.FORMATS)


def benchmark_aligned(cfg: DataConfig) -> Plan:
    s = StreamSpec("world", tuple(cfg.benchmark_skills), (cfg.benchmark_format,))
    return Plan({"aligned": s}, ((0, {"aligned": 1.0}),))


def coverage_expanding(cfg: DataConfig) -> Plan:
    s = StreamSpec("world", tuple(world.FAMILIES), _all_formats())
    ts = cfg.text_share
    return Plan({"world": s, "text": StreamSpec("text")}, ((0, _norm({"world": 1 - ts, "text": ts})),))


def world_only(cfg: DataConfig) -> Plan:
    return Plan({"world": StreamSpec("world", tuple(world.FAMILIES), _all_formats())}, ((0, {"world": 1.0}),))


def general_text(cfg: DataConfig) -> Plan:
    return Plan({"text": StreamSpec("text")}, ((0, {"text": 1.0}),))


def mixture(cfg: DataConfig, alpha: float) -> Plan:
    """alpha = 0 is benchmark-aligned, alpha = 1 is coverage-expanding."""
    a, c = benchmark_aligned(cfg), coverage_expanding(cfg)
    weights = {k: (1 - alpha) * v for k, v in a.stages[0][1].items()}
    weights.update({k: alpha * v for k, v in c.stages[0][1].items()})
    return Plan({**a.streams, **c.streams}, ((0, _norm(weights)),))


def hf_only(cfg: DataConfig) -> Plan:
    return Plan({"hf": StreamSpec("hf")}, ((0, {"hf": 1.0}),))


def with_hf(plan: Plan, weight: float) -> Plan:
    """Mix a Hugging Face stream into every stage with `weight` (relative to the stage's total 1)."""
    stages = tuple((s, _norm({**w, "hf": weight})) for s, w in plan.stages)
    return Plan({**plan.streams, "hf": StreamSpec("hf")}, stages)


def _map_world(plan: Plan, **changes) -> Plan:
    streams = {k: dataclasses.replace(v, **changes) if v.kind == "world" else v for k, v in plan.streams.items()}
    return Plan(streams, plan.stages)


def normalised_rewrite(plan: Plan, fmt: str) -> Plan:
    """Every world item, whatever format it was drawn in, is rendered in `fmt` (the benchmark's)."""
    return _map_world(plan, rewrite_to=fmt)


def prompt_repetition(plan: Plan) -> Plan:
    return _map_world(plan, prompt_repetition=True)


def dedup(plan: Plan, pool: int) -> Plan:
    """Exact-duplicate examples are dropped from each world stream (first `pool` draws, deduplicated)."""
    return _map_world(plan, dedup=True, pool_size=pool)


def repeated_subset(plan: Plan, *, k: int, steps: int, pool_size: int) -> Plan:
    """For the first `steps` steps the world streams draw from a pool of `pool_size` items only.

    The pipeline sizes the pool so that each pool item is seen about k times in that phase
    (`pool_size_for`). Text streams keep their weight; after `steps` the plan continues unchanged.
    """
    if k <= 1 or steps <= 0:
        return plan
    streams = dict(plan.streams)
    first = []
    for start, w in plan.stages:
        if start >= steps:
            break
        ws = {}
        for name, weight in w.items():
            spec = plan.streams[name]
            if spec.kind == "world":
                sub = f"{name}__subset"
                streams[sub] = dataclasses.replace(spec, pool_size=pool_size, pool_of=name, dedup=False)
                ws[sub] = weight
            else:
                ws[name] = weight
        first.append((start, ws))
    later = [(s, w) for s, w in plan.stages if s >= steps]
    if not later or later[0][0] != steps:
        later.insert(0, (steps, plan.weights_at(steps)))
    return Plan(streams, tuple(first + later))


def pool_size_for(*, k: int, steps: int, tokens_per_step: int, world_share: float, mean_item_tokens: float) -> int:
    """Pool size such that each item is seen ~k times in `steps` steps."""
    items = steps * tokens_per_step * world_share / max(mean_item_tokens, 1.0)
    return max(1, int(round(items / k)))


def plan_from_config(cfg: DataConfig) -> Plan:
    """The base arm of `cfg` with its flags applied (repeated subset is sized by the pipeline)."""
    if cfg.arm == "coverage_expanding":
        plan = coverage_expanding(cfg)
    elif cfg.arm == "benchmark_aligned":
        plan = benchmark_aligned(cfg)
    elif cfg.arm == "mixture":
        plan = mixture(cfg, cfg.alpha)
    elif cfg.arm == "general_text":
        plan = general_text(cfg)
    elif cfg.arm == "world":
        plan = world_only(cfg)
    elif cfg.arm == "hf":
        plan = hf_only(cfg)
    else:  # custom: weights over the standard named streams
        known = standard_streams(cfg)  # DataConfig.validate has checked the names
        used = {k: known[k] for k in cfg.sources}
        plan = Plan(used, ((0, _norm(cfg.sources)),))
    if cfg.hf is not None and cfg.arm != "hf":
        plan = with_hf(plan, cfg.hf.weight)
    if cfg.stages:
        streams = {**standard_streams(cfg), **plan.streams}
        names = {n for st in cfg.stages for n in st.weights}
        plan = Plan({n: streams[n] for n in sorted(names)},
                    tuple((st.start_step, _norm(st.weights)) for st in cfg.stages))
    if cfg.rewrite:
        plan = normalised_rewrite(plan, cfg.benchmark_format)
    if cfg.prompt_repetition:
        plan = prompt_repetition(plan)
    if cfg.dedup:
        plan = dedup(plan, cfg.dedup_pool)
    return plan


def standard_streams(cfg: DataConfig) -> dict[str, StreamSpec]:
    """Streams a `custom` arm or `stages` may name."""
    out = {  # the names are DataConfig's STREAM_NAMES, in that order
        "aligned": StreamSpec("world", tuple(cfg.benchmark_skills), (cfg.benchmark_format,)),
        "world": StreamSpec("world", tuple(world.FAMILIES), _all_formats()),
        "text": StreamSpec("text"),
        "bench_skills_all_formats": StreamSpec("world", tuple(cfg.benchmark_skills), _all_formats()),
        "other_skills": StreamSpec(
            "world", tuple(f for f in world.FAMILIES if f not in cfg.benchmark_skills), _all_formats()
        ),
    }
    if cfg.hf is not None:
        out["hf"] = StreamSpec("hf")
    return out
