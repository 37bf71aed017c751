"""Llama-family models: config, init, pure forward, and checkpoint import/export.

    cfg, params = load_pretrained(path)       # HF folder/hub id, .safetensors, .gguf, run/orbax folder
    logits = forward(cfg, params, tokens)      # int32 [B, T] -> float32 [B, T, V]
    save_pretrained(cfg, params, out_dir)      # loadable by transformers' AutoModelForCausalLM

Attributes load lazily, so that `bshadow --help` (which imports models/cli.py) does not import jax.
"""
from __future__ import annotations

from bshadow_jax.lazy import lazy_exports

_EXPORTS = {
    "LlamaConfig": "bshadow_jax.models.llama",
    "flatten_params": "bshadow_jax.models.llama",
    "flops_per_token": "bshadow_jax.models.llama",
    "forward": "bshadow_jax.models.llama",
    "init_params": "bshadow_jax.models.llama",
    "param_shapes": "bshadow_jax.models.llama",
    "unflatten_params": "bshadow_jax.models.llama",
    "checkpoint_tokenizer": "bshadow_jax.models.hf",
    "config_from_hf": "bshadow_jax.models.hf",
    "config_to_hf_dict": "bshadow_jax.models.hf",
    "save_pretrained": "bshadow_jax.models.hf",
    "checkpoint_config": "bshadow_jax.models.loading",
    "config_from_gguf": "bshadow_jax.models.loading",
    "load_pretrained": "bshadow_jax.models.loading",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
