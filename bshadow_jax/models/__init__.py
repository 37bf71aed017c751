"""Llama-family models: config, init, pure forward, and checkpoint import/export.

    cfg, params = load_pretrained(path)       # HF folder/hub id, .safetensors, .gguf, run/orbax folder
    logits = forward(cfg, params, tokens)      # int32 [B, T] -> float32 [B, T, V]
    save_pretrained(cfg, params, out_dir)      # loadable by transformers' AutoModelForCausalLM
"""
from bshadow_jax.models.hf import checkpoint_tokenizer, config_from_hf, config_to_hf_dict, save_pretrained
from bshadow_jax.models.llama import (
    LlamaConfig,
    flatten_params,
    flops_per_token,
    forward,
    init_params,
    param_shapes,
    unflatten_params,
)
from bshadow_jax.models.loading import checkpoint_config, config_from_gguf, load_pretrained

__all__ = [
    "LlamaConfig",
    "checkpoint_config",
    "checkpoint_tokenizer",
    "config_from_gguf",
    "config_from_hf",
    "config_to_hf_dict",
    "flatten_params",
    "flops_per_token",
    "forward",
    "init_params",
    "load_pretrained",
    "param_shapes",
    "save_pretrained",
    "unflatten_params",
]
