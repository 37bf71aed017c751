"""`load_pretrained` and `checkpoint_config`: model weights from any checkpoint kind, through one reader.

The format is decided once, by `formats.open_checkpoint`; this module only adds what a model
needs on top of tensors: its config (from config.json, GGUF metadata or a run's model section)
and the check that the tensors are exactly the ones that config has, with its shapes.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

from bshadow_jax.config import from_dict
from bshadow_jax.errors import ConfigError, UserError
from bshadow_jax.formats.gguf import SUPPORTED_ARCHS, GGUFFile, hf_name
from bshadow_jax.formats.orbax import CONFIG_NAME
from bshadow_jax.formats.pytree import flatten, unflatten
from bshadow_jax.formats.sources import CheckpointSource, GGUFSource, OrbaxSource, SafetensorsSource, open_checkpoint
from bshadow_jax.models.hf import read_hf_config
from bshadow_jax.models.llama import LlamaConfig, param_shapes

# non-parameter buffers some exporters store
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
_EMBED = "model.embed_tokens.weight"
# safetensors dtype names of the weights a model can hold (ints and bools are not weights)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def config_from_gguf(file: GGUFFile) -> LlamaConfig:
    """The validated LlamaConfig of a GGUF file's metadata."""
    cfg = LlamaConfig(**file.config_dict())
    try:
        cfg.validate()
    except ConfigError as e:
        raise UserError(f"{file.path}: metadata gives an invalid model config ({e})") from None
    return cfg


def checkpoint_config(src: CheckpointSource, *, required: bool = True) -> LlamaConfig | None:
    """The model config a checkpoint carries.

    Args:
      src: an open source from `formats.open_checkpoint`.
      required: True raises when the checkpoint has no Llama-family config (loading weights
        into a model needs one); False returns None instead (diagnostics read any tensors).

    Returns:
      A validated LlamaConfig, or None (only when `required` is False).
    """
    if isinstance(src, SafetensorsSource):
        if src.config_path is None:
            if not required:
                return None
            folder = Path(src.path) if Path(src.path).is_dir() else Path(src.path).parent
            raise UserError(f"{folder / 'config.json'}: missing; a Hugging Face checkpoint needs it beside the safetensors")
        return read_hf_config(src.config_path, required=required)
    if isinstance(src, GGUFSource):
        if src.file.arch not in SUPPORTED_ARCHS and not required:
            return None
        return config_from_gguf(src.file)
    if isinstance(src, OrbaxSource):
        if src.model_section is None:  # another stack's orbax checkpoint: tensors, no Llama config
            if not required:
                return None
            raise UserError(f"{src.path}: an orbax checkpoint without a bshadow run's {CONFIG_NAME} carries no "
                            "model config (diagnose and spectrum read it; loading a model needs a bshadow run)")
        if _EMBED not in src.names():
            raise UserError(f"{src.path}: no {_EMBED} in the params checkpoint")
        model = dict(src.model_section)
        if not model.get("vocab_size"):  # `vocab_size: 0` in a run config means "from the tokenizer"
            model["vocab_size"] = int(src.shape(_EMBED)[0])
        return from_dict(LlamaConfig, model, "model")
    if required:
        raise UserError(f"{src.path}: a {src.kind} checkpoint carries no model config")
    return None


def load_pretrained(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """(cfg, float32 numpy param tree) from any checkpoint `formats.open_checkpoint` reads.

    Args:
      path: an HF folder or hub id, a .safetensors or .gguf file, a bshadow run folder or orbax
        step folder.

    Returns:
      The model config and the param tree `models.forward` takes (HF names as nested dicts).

    Raises:
      UserError: naming the file and tensor, for pickle files, unreadable files, and tensors
        that are missing, unexpected, of the wrong shape or not floating point.
    """
    with open_checkpoint(path) as src:
        cfg = checkpoint_config(src)
        expected = flatten(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
        wanted = _check_names(src, cfg, expected)
        arrays = _read_all(src, wanted)
    return cfg, unflatten({name: arrays[name] for name in expected})


def _where(src: CheckpointSource, name: str) -> str:
    return src.file.gguf_name(name) if isinstance(src, GGUFSource) else name


def _check_names(src: CheckpointSource, cfg: LlamaConfig, expected: dict) -> list[str]:
    names = src.names()
    for name in names:
        if name in expected:
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a stored copy of the tied embedding
        if _IGNORED_TENSORS.match(name) or (isinstance(src, GGUFSource) and hf_name(_where(src, name)) is None):
            continue  # buffers, and GGUF tensors with no HF counterpart (llama3's rope_freqs), are not parameters
        raise UserError(f"{src.path}: unexpected tensor {_where(src, name)} for a {cfg.model_type} model "
                        f"with {cfg.num_hidden_layers} layers")
    present = set(names)
    missing = [n for n in expected if n not in present]
    if missing:
        raise UserError(f"{src.path}: tensor {missing[0]} is missing from the checkpoint"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in expected.items():
        if tuple(src.shape(name)) != tuple(shape):
            raise UserError(f"{src.path}: tensor {_where(src, name)} has shape {list(src.shape(name))}, "
                            f"the config needs {list(shape)}")
        if isinstance(src, SafetensorsSource) and src.dtype(name) not in _FLOAT_DTYPES:
            raise UserError(f"{src.path}: tensor {name} has dtype {src.dtype(name)}, expected floating point weights")
    return list(expected)


def _read_all(src: CheckpointSource, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(src, OrbaxSource):  # one partial restore: each restore re-reads the whole tree's metadata
        return dict(zip(names, src.read_many(names)))
    from tqdm import tqdm

    return {name: np.ascontiguousarray(src.read(name))
            for name in tqdm(names, desc="loading", unit="tensor", disable=not sys.stderr.isatty(), leave=False)}
