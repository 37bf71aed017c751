"""Cross-family study config: one YAML file -> a validated, frozen `CrossFamilyConfig`.

Sections: `pairs` (`PairSpec`), `finetunes` (`FinetuneSpec`, whose `data`, `train` and `optim`
are the training config's own typed sections: `DataConfig`, `TrainSection`, `OptimSection`),
`synthetic` (`SyntheticSpec`), plus `reference`, `topk`, `method` and `description`.
Every mistake here (unknown key, wrong type, bad value, in any section) raises `ConfigError`
(exit code 2) when the config is loaded, before any checkpoint is generated, trained or read.
The fine-tunes' model section comes from their base checkpoint, so the checks that need the
model (e.g. `train.seq_len` against the model's context) run when that base is loaded.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

from bshadow_jax.config import load_config
from bshadow_jax.data.config import DataConfig
from bshadow_jax.errors import ConfigError
from bshadow_jax.training.config import OptimSection, TrainSection


@dataclasses.dataclass(frozen=True)
class PairSpec:
    name: str
    base: str
    tuned: str
    rename: list[str] = dataclasses.field(default_factory=list)
    include: str | None = None
    exclude: str | None = None
    family: str = ""
    note: str = ""

    def validate(self) -> None:
        _check_name(self.name, "pairs")


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    name: str
    base: str
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # a few short steps unless the config says otherwise (a `train:` mapping starts from TrainSection's defaults)
    train: TrainSection = dataclasses.field(default_factory=lambda: TrainSection(steps=4, batch_size=2, seq_len=64))
    optim: OptimSection = dataclasses.field(default_factory=lambda: OptimSection(lr=1e-4, warmup_steps=0))
    seed: int = 0
    family: str = ""
    note: str = ""

    def validate(self) -> None:
        _check_name(self.name, "finetunes")

    def data_summary(self) -> dict:
        """The data arm and the data settings that differ from `DataConfig`'s defaults (for the pair's note)."""
        default = DataConfig()
        return {f.name: getattr(self.data, f.name) for f in dataclasses.fields(DataConfig)
                if f.name == "arm" or getattr(self.data, f.name) != getattr(default, f.name)}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    name: str
    kind: Literal["llava", "qwen_vl", "moe", "llava_vs_lm"]
    layers: int = 2
    width: int = 64
    seed: int = 0
    note: str = ""

    def validate(self) -> None:
        _check_name(self.name, "synthetic")
        if not 1 <= self.layers <= 64 or not 8 <= self.width <= 1024:
            raise ConfigError(f"synthetic.{self.name}: layers in [1, 64] and width in [8, 1024]")


@dataclasses.dataclass(frozen=True)
class CrossFamilyConfig:
    pairs: list[PairSpec] = dataclasses.field(default_factory=list)
    finetunes: list[FinetuneSpec] = dataclasses.field(default_factory=list)
    synthetic: list[SyntheticSpec] = dataclasses.field(default_factory=list)
    reference: str = ""   # a regimes results.json (regime score references)
    topk: int = 8
    method: Literal["auto", "svd", "gram"] = "auto"   # diagnostics engine path ("gram" is the fast one on CPU)
    description: str = ""

    def validate(self) -> None:
        names = [p.name for p in self.pairs] + [f.name for f in self.finetunes] + [s.name for s in self.synthetic]
        if not names:
            raise ConfigError("cross-family: give at least one of pairs, finetunes, synthetic")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"cross-family: duplicate pair name {sorted(dup)[0]!r}")
        if self.topk < 1:
            raise ConfigError("topk: must be >= 1")


def _check_name(name: str, where: str) -> None:
    if not name or any(not (c.isalnum() or c in "_-.") for c in name) or name.startswith("."):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.'")


def load_cross_family_config(path: str | os.PathLike,
                             overrides: list[str] | tuple[str, ...] = ()) -> CrossFamilyConfig:
    return load_config(CrossFamilyConfig, path, list(overrides))
