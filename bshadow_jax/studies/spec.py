"""Study configs: one YAML file -> a validated, frozen `StudyConfig`.

A study is one or more bases (pretraining seeds) and a list of arms. Every arm fine-tunes each base with
the same `finetune` settings (steps, batch, sequence length, optimizer, learning rate,
seeds); an arm may only change the data section (`data:` keys merged onto
`finetune.data`) and, for the optimizer-change control, the optimizer section
(`optim:`). Each arm's training config is built and validated (`TrainConfig`,
`DataConfig`) when the study config is loaded, so a typo anywhere exits with code 2
before anything is compiled.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from typing import Any, Literal

from bshadow_jax.config import from_dict, load_config
from bshadow_jax.data.evalsets import build_eval_sets
from bshadow_jax.errors import ConfigError
from bshadow_jax.studies.claims import Analysis, ClaimArms
from bshadow_jax.training.config import TrainConfig

# A small valid model section used only to validate the non-model sections when the base
# is loaded from a checkpoint (its real config is known only after loading).
_PLACEHOLDER_MODEL = {"vocab_size": 0, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 4096}


@dataclasses.dataclass(frozen=True)
class ArmSpec:
    name: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)   # merged onto finetune.data
    optim: dict[str, Any] = dataclasses.field(default_factory=dict)  # merged onto finetune.optim (optimizer control only)
    # Descriptive arms may run on fewer fine-tuning seeds and bases than the claim arms:
    # the first n_seeds of `seeds` and the first n_bases of `base.seeds` (0, or more than there are = all).
    n_seeds: int = 0
    n_bases: int = 0
    # Coverage fraction for the regime-score validation (0 = benchmark-aligned, 1 = coverage);
    # None = derived from the data section (aligned 0, coverage 1, mixture alpha) or unlabelled.
    coverage_fraction: float | None = None
    description: str = ""
    # streams this arm is meant to draw more than one epoch of (the runner warns about any other)
    intended_repeats: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if not self.name or any(not (c.isalnum() or c in "_-") for c in self.name):
            raise ConfigError(f"arms: name {self.name!r} must be non-empty letters, digits, _ or -")
        if self.n_seeds < 0 or self.n_bases < 0:
            raise ConfigError(f"arms.{self.name}: n_seeds and n_bases must be >= 0 (0 = all)")
        if self.coverage_fraction is not None and not 0.0 <= self.coverage_fraction <= 1.0:
            raise ConfigError(f"arms.{self.name}.coverage_fraction: must be in [0, 1]")

    def label(self) -> float | None:
        if self.coverage_fraction is not None:
            return self.coverage_fraction
        if self.optim:
            return None  # a setting change, not a point on the data axis
        kind = self.data.get("arm")
        extra = set(self.data) - {"arm", "alpha"}
        if extra:
            return None
        if kind == "benchmark_aligned":
            return 0.0
        if kind == "coverage_expanding":
            return 1.0
        if kind == "mixture":
            return float(self.data.get("alpha", 0.5))
        return None


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    # "" = pretrain with `pretrain`; otherwise a checkpoint (HF folder, .safetensors, .gguf, run folder, hub id)
    load: str = ""
    # a full TrainConfig mapping (model, data, train, optim, seed, mesh) for pretraining the base
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)
    # pretraining seeds: one base per seed, every arm fine-tuned from each ([] = the one base of pretrain.seed)
    seeds: list[int] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        if not self.load and not self.pretrain:
            raise ConfigError("base: give either base.load (a checkpoint) or base.pretrain (a training config)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"base.seeds: duplicates in {self.seeds}")
        if self.load and len(self.seeds) > 1:
            raise ConfigError("base.seeds: a loaded base (base.load) is one base; pretrain to study several")

    def base_seeds(self) -> list[int]:
        """The bases' labels: their pretraining seeds (0 for a loaded base)."""
        if self.load:
            return [int(self.seeds[0])] if self.seeds else [0]
        return [int(s) for s in self.seeds] or [int(self.pretrain.get("seed", 0))]


@dataclasses.dataclass(frozen=True)
class LmEvalSpec:
    """lm-evaluation-harness tasks scored on every model (studies.evalsuite): the narrow section's tasks
    are the benchmark's skills, each broad task is a broad category; every document is an item."""
    narrow: list[str] = dataclasses.field(default_factory=list)   # e.g. [gsm8k]
    broad: list[str] = dataclasses.field(default_factory=list)    # e.g. [arc_easy, piqa, sciq]
    include_path: list[str] = dataclasses.field(default_factory=list)  # folders of extra task YAML files
    limit: int = 0                   # the first N documents of each task (0 = all)
    num_fewshot: int | None = None   # None = each task's own
    batch_size: int = 16
    add_bos_token: bool = True       # the start token in front of every context (docs/cli.md#start-token)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_gen_toks: int = 256          # generation limit for tasks that set none

    def validate(self) -> None:
        if self.limit < 0 or self.batch_size < 1 or self.max_gen_toks < 1:
            raise ConfigError("evals.lm_eval: limit must be >= 0, batch_size and max_gen_toks >= 1")
        both = set(self.narrow) & set(self.broad)
        if both:
            raise ConfigError(f"evals.lm_eval: task {sorted(both)[0]!r} is in both narrow and broad")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    batch_size: int = 32     # packed rows per forward pass
    seq_len: int = 128       # packed row length
    # passed to data.evalsets.build_eval_sets as keyword arguments (e.g. n_narrow_per_skill: 48,
    # broad_formats: [qa, cloze])
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    world: bool = True       # the procedural world's narrow and broad items (off: lm-eval tasks only)
    lm_eval: LmEvalSpec = dataclasses.field(default_factory=LmEvalSpec)

    def validate(self) -> None:
        if self.batch_size < 1 or self.seq_len < 8:
            raise ConfigError("evals: batch_size must be >= 1 and seq_len >= 8")
        if not self.world and not self.lm_eval.narrow:
            raise ConfigError("evals.world: false needs evals.lm_eval.narrow (some narrow benchmark to score)")
        known = [n for n, p in inspect.signature(build_eval_sets).parameters.items() if p.kind == p.KEYWORD_ONLY]
        for k in self.options:
            if k not in known:
                raise ConfigError(f"evals.options: unknown key {k!r} (known: {', '.join(known)})")


@dataclasses.dataclass(frozen=True)
class DiagnoseSpec:
    topk: int = 8
    include: str | None = None
    exclude: str | None = None
    # footprint along training: observe the params this many times per fine-tune (0 = off)
    track_points: int = 4
    # diagnostics engine path: "auto" (exact SVD for small matrices), "svd" or "gram" (Gram + eigh)
    method: Literal["auto", "svd", "gram"] = "auto"
    # PNG figures in every arm/seed diagnose folder (metrics.csv, summary.json and report.md are always written)
    unit_figures: bool = False

    def validate(self) -> None:
        if self.topk < 1 or self.track_points < 0:
            raise ConfigError("diagnose: topk must be >= 1 and track_points >= 0")


@dataclasses.dataclass(frozen=True)
class RegimeScoreSpec:
    enabled: bool = True
    features: list[str] = dataclasses.field(default_factory=lambda: [
        "entropy", "gini", "matrices_for_90pct", "delta_effective_rank", "delta_spectral_entropy",
        "delta_stable_rank", "base_overlap"])
    n_boot: int = 200

    def validate(self) -> None:
        if self.n_boot < 10:
            raise ConfigError("regime_score.n_boot: must be >= 10")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    arms: list[ArmSpec]
    finetune: dict[str, Any]          # a TrainConfig mapping without `model` (the base's model is used)
    base: BaseSpec = dataclasses.field(default_factory=BaseSpec)
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    evals: EvalSpec = dataclasses.field(default_factory=EvalSpec)
    diagnose: DiagnoseSpec = dataclasses.field(default_factory=DiagnoseSpec)
    claims: ClaimArms = dataclasses.field(default_factory=ClaimArms)
    analysis: Analysis = dataclasses.field(default_factory=Analysis)
    regime_score: RegimeScoreSpec = dataclasses.field(default_factory=RegimeScoreSpec)
    description: str = ""
    # run only these arms (e.g. `only_arms=[benchmark_aligned,coverage_expanding]` for a quick look); [] = all
    only_arms: list[str] = dataclasses.field(default_factory=list)

    def active_arms(self) -> list[ArmSpec]:
        return [a for a in self.arms if not self.only_arms or a.name in self.only_arms]

    def arm_units(self, arm: ArmSpec) -> list[tuple[int, int]]:
        """(base, seed) of every fine-tune of `arm`, bases outermost."""
        bases = self.base.base_seeds()
        bases = bases[: arm.n_bases] if arm.n_bases else bases
        seeds = self.seeds[: arm.n_seeds] if arm.n_seeds else self.seeds
        return [(b, s) for b in bases for s in seeds]

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds: at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: duplicates in {self.seeds}")
        names = [a.name for a in self.arms]
        if not names:
            raise ConfigError("arms: at least one arm")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"arms: duplicate arm name {sorted(dup)[0]!r}")
        for n in self.only_arms:
            if n not in names:
                raise ConfigError(f"only_arms: no arm named {n!r} (arms: {', '.join(names)})")
        if "model" in self.finetune:
            raise ConfigError("finetune.model: the fine-tunes use the base model; set the model under base.pretrain.model")
        if "seed" in self.finetune:
            raise ConfigError("finetune.seed: fine-tune seeds come from `seeds`")
        if self.base.pretrain:
            self.pretrain_config()
        for arm in self.arms:
            self.arm_config(arm, self.seeds[0])

    # ------------------------------------------------------------------ derived training configs
    def pretrain_config(self, overrides: dict[str, Any] | None = None):
        data = _deep_merge(self.base.pretrain, overrides or {})
        return _build(TrainConfig, data, "base.pretrain")

    def arm_dict(self, arm: ArmSpec, seed: int, model: dict[str, Any] | None = None) -> dict[str, Any]:
        ft = copy.deepcopy(self.finetune)
        ft["data"] = _deep_merge(ft.get("data", {}), arm.data)
        ft["optim"] = _deep_merge(ft.get("optim", {}), arm.optim)
        ft["seed"] = int(seed)
        if model is None:
            model = dict(self.base.pretrain.get("model", {})) or dict(_PLACEHOLDER_MODEL)
        ft["model"] = model
        return ft

    def arm_config(self, arm: ArmSpec, seed: int, model: dict[str, Any] | None = None):
        return _build(TrainConfig, self.arm_dict(arm, seed, model), f"arms.{arm.name}")

    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"arms: no arm named {name!r}")


def _build(cls, data: dict, where: str):
    try:
        return from_dict(cls, data, "config")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_study_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    return load_config(StudyConfig, path, overrides)
