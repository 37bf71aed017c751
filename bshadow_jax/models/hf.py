"""Hugging Face layout: config.json <-> LlamaConfig, and writing a loadable HF folder.

Reading weights is `models.load_pretrained` (through `formats.open_checkpoint`); names map one
to one onto the param tree (it mirrors HF names), except a tied lm_head, which is dropped
because the forward reuses the embedding.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bshadow_jax.errors import ConfigError, UserError
from bshadow_jax.fileio import atomic_output_dir
from bshadow_jax.formats.gguf import gguf_tokenizer
from bshadow_jax.formats.hub import looks_like_hub_id, snapshot
from bshadow_jax.formats.orbax import CKPT_DIRNAME, TOKENIZER_DIRNAME
from bshadow_jax.formats.pytree import flatten
from bshadow_jax.formats.safetensors import SAFETENSORS_FILE
from bshadow_jax.models.llama import MODEL_TYPES, LlamaConfig, param_shapes

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


# ----------------------------------------------------------------------------------- config

def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope = dict(rope)
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope.pop("type")
    theta = rope.pop("rope_theta", None)
    if theta is None:
        theta = d.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") == "default":
        rope = {k: v for k, v in rope.items() if k not in ("rope_type",)}
        return float(theta), (dict(rope, rope_type="default") if rope else None)
    return float(theta), rope


def config_from_hf(hf_config: Any) -> LlamaConfig:
    """LlamaConfig from a transformers PretrainedConfig or its config.json dict (llama, qwen2, mistral)."""
    d = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    try:
        return _config_from_hf_dict(d)
    except UserError:
        raise
    except KeyError as e:
        raise UserError(f"config.json: missing key {e}") from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError, AttributeError) as e:
        # config.json is untrusted input: a value of the wrong type is bad input, not a bug
        raise UserError(f"config.json: bad value ({type(e).__name__}: {e})") from None


def _config_from_hf_dict(d: dict) -> LlamaConfig:
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"config.json: model_type {model_type!r} is not supported (supported: {list(MODEL_TYPES)})")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"config.json: hidden_act {act!r} is not supported (only silu)")
    theta, scaling = _rope_from_hf(d)
    if scaling is not None and float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("config.json: partial_rotary_factor != 1 is not supported")
    sliding = d.get("sliding_window")
    if model_type == "qwen2":
        attention_bias, mlp_bias = True, False
        layer_types = d.get("layer_types") or []
        if not d.get("use_sliding_window", False) or not any(t == "sliding_attention" for t in layer_types):
            sliding = None
        elif not all(t == "sliding_attention" for t in layer_types):
            raise UserError("config.json: qwen2 with sliding window on only some layers is not supported")
    elif model_type == "mistral":
        attention_bias, mlp_bias = False, False
    else:
        attention_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
    num_heads = int(d["num_attention_heads"])
    if num_heads <= 0:
        raise UserError(f"config.json: num_attention_heads must be positive, got {num_heads}")
    head_dim = int(d["head_dim"]) if d.get("head_dim") else None
    if head_dim == int(d["hidden_size"]) // num_heads:
        head_dim = None  # the default: keeps load(save(cfg)) == cfg for configs that never set it
    cfg = LlamaConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=num_heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        mlp_bias=mlp_bias,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        model_type=model_type,
        sliding_window=int(sliding) if sliding else None,
    )
    try:
        cfg.validate()
    except ConfigError as e:
        raise UserError(f"config.json: {e}") from None
    return cfg


def _hf_config_object(cfg: LlamaConfig, extra: dict | None = None):
    from transformers import AutoConfig

    rope_parameters = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    rope_parameters.pop("type", None)
    kwargs: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[cfg.model_type]],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.resolved_head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope_parameters,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        dtype="float32",
    )
    if cfg.model_type == "llama":
        kwargs.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.model_type == "qwen2":
        kwargs.update(use_sliding_window=cfg.sliding_window is not None, max_window_layers=0)
        if cfg.sliding_window is not None:
            kwargs["sliding_window"] = cfg.sliding_window
    elif cfg.model_type == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    kwargs.update(extra or {})
    return AutoConfig.for_model(cfg.model_type, **kwargs)


def config_to_hf_dict(cfg: LlamaConfig) -> dict:
    """The config.json dict transformers writes for this model (its installed version's format)."""
    return _hf_config_object(cfg).to_dict()


# ----------------------------------------------------------------------------------- reading

def read_hf_config(config_path: Path, *, required: bool = True) -> LlamaConfig | None:
    """The LlamaConfig of a config.json, parsed by transformers' built-in classes (no remote code).

    Args:
      config_path: the config.json beside the weights.
      required: False returns None for a model type outside the Llama family instead of raising.
    """
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    if raw.get("model_type") not in MODEL_TYPES:
        if not required:
            return None
        raise UserError(f"{config_path}: model_type {raw.get('model_type')!r} is not supported "
                        f"(supported: {list(MODEL_TYPES)})")
    try:
        from transformers import AutoConfig

        # no trust_remote_code: only the built-in llama/qwen2/mistral classes
        hf_config = AutoConfig.from_pretrained(str(config_path.parent), trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds for a bad config
        raise UserError(f"{config_path}: transformers could not read it ({type(e).__name__}: {e})") from None
    try:
        return config_from_hf(hf_config)
    except UserError as e:
        raise UserError(f"{config_path}: {str(e).removeprefix('config.json: ')}") from None


# ----------------------------------------------------------------------------------- tokenizers

def _tokenizer_dirs(source: str | os.PathLike) -> list[Path]:
    """Folders where a checkpoint's tokenizer files may sit: beside it, in tokenizer/, and for an
    orbax step folder (RUN/checkpoints/STEP) in its run folder."""
    p = Path(source)
    if not p.exists():
        return []
    start = p if p.is_dir() else p.parent
    roots = [start]
    if start.name.isdigit() and start.parent.name == CKPT_DIRNAME:
        roots.append(start.parent.parent)
    dirs = [d for r in roots for d in (r, r / TOKENIZER_DIRNAME)]
    return [d for d in dirs if d.is_dir()]


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def checkpoint_tokenizer(source: str | os.PathLike):
    """The tokenizer a checkpoint carries, as a transformers tokenizer (no remote code).

    Args:
        source: any checkpoint path `load_pretrained` reads, or a hub id: the tokenizer files
            beside it or in its tokenizer/ folder (a run folder's), or a GGUF file's metadata.

    Raises:
        UserError: when the checkpoint carries no tokenizer, or it cannot be loaded.
    """
    name = os.fspath(source)
    if not os.path.exists(name) and looks_like_hub_id(name):
        source = snapshot(name)
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return gguf_tokenizer(p)
    for d in _tokenizer_dirs(p):
        if _has_tokenizer(d):
            from transformers import AutoTokenizer

            try:
                return AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
            except Exception as e:  # transformers raises many kinds for damaged tokenizer files
                raise UserError(f"{d}: tokenizer files cannot be loaded ({type(e).__name__}: {e})") from None
    raise UserError(f"{p}: no tokenizer beside the checkpoint (tokenizer.json, tokenizer.model or vocab.json, "
                    f"or a {TOKENIZER_DIRNAME}/ folder)")


def _copy_tokenizer(source: str | os.PathLike, out: Path) -> bool:
    for d in _tokenizer_dirs(source):
        found = [d / f for f in TOKENIZER_FILES if (d / f).is_file()]
        if _has_tokenizer(d):
            for f in found:
                shutil.copy2(f, out / f.name)
            return True
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".gguf":
        try:
            tok = gguf_tokenizer(p)
        except Exception as e:  # the weights still export; say why the tokenizer did not
            print(f"warning: {p}: tokenizer not exported ({type(e).__name__}: {e})", file=sys.stderr)
            return False
        tok.save_pretrained(str(out))
        return True
    return False


# ----------------------------------------------------------------------------------- writing

def _source_tokenizer(source):
    """The tokenizer beside an export's source, or None (the weights still export without one)."""
    if source is None:
        return None
    try:
        return checkpoint_tokenizer(source)
    except UserError:
        return None


def _chmod_default(path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pretrained(
    cfg: LlamaConfig,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors (+ tokenizer) as one atomically renamed folder.

    Args:
        cfg, params: the model.
        out_dir: the folder to write (replaced as a whole on success).
        tokenizer: a transformers tokenizer to save beside the weights; its special ids go into the configs.
        source: without `tokenizer`, the checkpoint exported from: its tokenizer files are copied and
            its tokenizer's special ids go into the configs.
    """
    from safetensors.numpy import save_file

    cfg.validate()
    expected = flatten(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    flat = flatten(params)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise UserError(f"params: tensor {missing[0]} is missing for this config")
    tensors = {}
    for name, shape in expected.items():
        arr = np.ascontiguousarray(np.asarray(flat[name], dtype=np.float32))
        if tuple(arr.shape) != tuple(shape):
            raise UserError(f"params: tensor {name} has shape {arr.shape}, expected {shape}")
        tensors[name] = arr
    # config.json's special ids must be the tokenizer's: transformers' defaults (bos 1, eos 2) name other
    # tokens of our vocabularies, and generate() would then never stop at end-of-text
    ids_from = tokenizer if tokenizer is not None else _source_tokenizer(source)
    extra = {}
    if ids_from is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            extra[key] = getattr(ids_from, key, None)
    hf_config = _hf_config_object(cfg, extra)
    from transformers import GenerationConfig

    with atomic_output_dir(out_dir) as tmp:
        hf_config.save_pretrained(str(tmp))
        # generate() reads its stop token from here first: the same tokenizer ids as config.json
        GenerationConfig.from_model_config(hf_config).save_pretrained(str(tmp))
        # "format": "pt" is what transformers checks before loading a safetensors file
        save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        _chmod_default(tmp / SAFETENSORS_FILE)  # safetensors writes 0600; give it the usual umask mode
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif source is not None:
            _copy_tokenizer(source, tmp)
    return Path(out_dir)
