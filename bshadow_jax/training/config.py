"""Training config: one YAML file -> a validated, frozen `TrainConfig` tree.

Sections: `seed`, `model` (the fields of `models.LlamaConfig`; `vocab_size: 0` takes the
size from the tokenizer), `data` (`data.config.DataConfig`), `train`, `optim`, `mesh`.
Every mistake a user can make here (unknown key, wrong type, bad value) raises
`ConfigError` (exit code 2) before jax compiles anything. The mesh is checked against the
device count in `training.mesh.make_mesh`, also before compiling.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from bshadow_jax.config import from_dict, load_config
from bshadow_jax.data.config import DataConfig
from bshadow_jax.errors import ConfigError
from bshadow_jax.models.llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    batch_size: int = 8           # global batch (all hosts, all micro-batches) in sequences
    seq_len: int = 128
    grad_accum: int = 1           # micro-batches per step, accumulated inside the jitted step
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    compute_dtype: Literal["float32", "bfloat16"] = "float32"   # master weights stay float32
    # activation memory of the backward pass, per decoder layer: "none" keeps every activation;
    # "dots" keeps the matmul outputs and recomputes the elementwise ops and attention probabilities;
    # "full" keeps only each layer's input and recomputes the layer (least memory, about one extra forward)
    remat: Literal["none", "dots", "full"] = "none"
    # (answer-only loss is `data.answer_only_loss`: the pipeline writes it into loss_mask)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"train.grad_accum: batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )


@dataclasses.dataclass(frozen=True)
class OptimSection:
    name: Literal["adamw", "lion", "sgd", "sgd_momentum", "adafactor"] = "adamw"
    lr: float = 3e-3
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.1     # end of the cosine/linear decay, as a fraction of lr
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms and biases are never decayed
    b1: float = 0.9               # sgd_momentum: the momentum
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0        # 0 = no clipping

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.clip_norm < 0 or self.eps <= 0:
            raise ConfigError("optim: weight_decay and clip_norm must be >= 0 and eps > 0")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"optim.{name}: must be in [0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class MeshSection:
    """Device mesh. `data: 0` means "every device not used by fsdp x tensor".

    When data*fsdp*tensor is smaller than the device count, the first N devices are used
    (so a 1-device reference run works inside an 8-device process); larger is an error.
    """

    data: int = 0
    fsdp: int = 1
    tensor: int = 1

    def validate(self) -> None:
        if self.data < 0 or self.fsdp < 1 or self.tensor < 1:
            raise ConfigError(
                f"mesh: data must be >= 0 (0 = all devices), fsdp and tensor >= 1; got "
                f"data={self.data} fsdp={self.fsdp} tensor={self.tensor}"
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # The model's LlamaConfig fields. With `init`, leave it out: the checkpoint's config is used (a
    # model section that is given must then equal it).
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Start from this checkpoint instead of a random init: any kind `models.load_pretrained` reads
    # (HF folder or hub id, .safetensors, .gguf, a bshadow run folder, an orbax checkpoint). Its tokenizer
    # is the run's unless data.tokenizer names another. `bshadow train CFG --out DIR init=PATH`.
    init: str = ""
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)

    def validate(self) -> None:
        if not self.model:
            if self.init:
                return  # the checkpoint gives the model; train() checks the rest once it is read
            raise ConfigError("model: required, unless `init` names a checkpoint to start from "
                              "(e.g. init=path/to/checkpoint)")
        vocab = self.model.get("vocab_size", 0)
        if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 0:
            raise ConfigError(f"model.vocab_size: expected an integer >= 0 (0 = from the tokenizer), got {vocab!r}")
        model_cfg = self.llama_config(vocab or 1)  # validates every model field now, before any compile
        # compare with the validated value: the raw YAML may spell the number as a string ("1e3")
        if self.train.seq_len > model_cfg.max_position_embeddings:
            raise ConfigError(
                f"train.seq_len: {self.train.seq_len} exceeds model.max_position_embeddings "
                f"{model_cfg.max_position_embeddings}"
            )

    def llama_config(self, vocab_size: int | None = None):
        """The model's `LlamaConfig`; `vocab_size` fills in `model.vocab_size: 0`."""
        model = dict(self.model)
        if not model.get("vocab_size"):
            if vocab_size is None:
                raise ConfigError("model.vocab_size: 0 needs the tokenizer's vocabulary size")
            model["vocab_size"] = int(vocab_size)
        return from_dict(LlamaConfig, model, "model")


def load_train_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


def train_config_from_dict(data: dict) -> TrainConfig:
    return from_dict(TrainConfig, data)
