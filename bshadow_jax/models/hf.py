"""Hugging Face checkpoints: config.json <-> LlamaConfig, safetensors <-> param pytree.

Tensors are read one at a time with `safetensors.safe_open` and upcast to float32; names
map one to one onto the param tree (it mirrors HF names), except a tied lm_head, which is
dropped because the forward reuses the embedding.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from bshadow_jax.errors import ConfigError, UserError
from bshadow_jax.models.llama import MODEL_TYPES, LlamaConfig, flatten_params, param_shapes, unflatten_params

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# non-parameter buffers some exporters store
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")


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

def _read_config(folder: Path) -> LlamaConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: config.json not found beside the weights")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    if raw.get("model_type") not in MODEL_TYPES:
        raise UserError(f"{config_path}: model_type {raw.get('model_type')!r} is not supported "
                        f"(supported: {list(MODEL_TYPES)})")
    try:
        from transformers import AutoConfig

        # no trust_remote_code: only the built-in llama/qwen2/mistral classes
        hf_config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds for a bad config
        raise UserError(f"{config_path}: transformers could not read it ({type(e).__name__}: {e})") from None
    try:
        return config_from_hf(hf_config)
    except UserError as e:
        raise UserError(f"{config_path}: {str(e).removeprefix('config.json: ')}") from None


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single model.safetensors."""
    from bshadow_jax.fileio import safe_join

    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index_path}: not a valid safetensors index ({e})") from None
        out = {}
        for name, shard in weight_map.items():
            shard_path = safe_join(folder, str(shard))
            if not shard_path.is_file():
                raise UserError(f"{shard_path}: shard listed in {index_path.name} is missing")
            out[name] = shard_path
        return out
    single = folder / SAFETENSORS_FILE
    if not single.is_file():
        candidates = sorted(folder.glob("*.safetensors"))
        if len(candidates) != 1:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = f" (found only pickle weights {pickles[0]}, which are refused)" if pickles else ""
            raise UserError(f"{folder}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}{hint}")
        single = candidates[0]
    return {name: single for name in _safetensors_names(single)}


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises SafetensorError / OSError for bad files
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def iter_safetensors(files: dict[str, Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) one tensor at a time, grouped by file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="numpy") as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise UserError(f"{path}: tensor {name} listed in the index is not in this shard")
                    yield name, read_tensor(f, path, name)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_tensor(handle, path: Path, name: str) -> np.ndarray:
    """One tensor as float32; bf16 goes through jax because numpy has no bfloat16."""
    dtype = handle.get_slice(name).get_dtype()
    if dtype == "BF16":
        from safetensors import safe_open

        with safe_open(str(path), framework="flax") as fj:
            return np.asarray(fj.get_tensor(name), dtype=np.float32)
    arr = handle.get_tensor(name)
    if not np.issubdtype(arr.dtype, np.floating):
        raise UserError(f"{path}: tensor {name} has dtype {arr.dtype}, expected floating point weights")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _resolve_hub(path: str) -> Path:
    """A local snapshot of hub repo `org/name` (safetensors and json only)."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=path, allow_patterns=HUB_PATTERNS)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path}: not a local file or folder, and downloading it from the Hugging Face Hub failed "
            f"(offline or not found: {type(e).__name__}: {first})"
        ) from None
    return Path(local)


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def load_hf(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """(cfg, float32 numpy param tree) from an HF folder, a .safetensors file, or a hub id."""
    p = Path(path)
    if not p.exists() and looks_like_hub_id(str(path)):
        p = _resolve_hub(str(path))
    if p.is_file():
        folder, files = p.parent, {name: p for name in _safetensors_names(p)}
    elif p.is_dir():
        folder, files = p, None
    else:
        raise UserError(f"{p}: no such file or folder")
    cfg = _read_config(folder)
    files = files if files is not None else weight_files(folder)
    expected = flatten_params(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    flat: dict[str, np.ndarray] = {}
    wanted = {}
    for name, file in files.items():
        if name in expected:
            wanted[name] = file
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a stored copy of the tied embedding
        elif _IGNORED_TENSORS.match(name):
            continue
        else:
            raise UserError(f"{file}: unexpected tensor {name} for a {cfg.model_type} model "
                            f"with {cfg.num_hidden_layers} layers")
    missing = sorted(set(expected) - set(wanted))
    if missing:
        raise UserError(f"{folder}: tensor {missing[0]} is missing from the checkpoint"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    from tqdm import tqdm

    for name, arr in tqdm(iter_safetensors(wanted), total=len(wanted), desc="loading", unit="tensor",
                          disable=not sys.stderr.isatty(), leave=False):
        if tuple(arr.shape) != tuple(expected[name]):
            raise UserError(f"{wanted[name]}: tensor {name} has shape {tuple(arr.shape)}, "
                            f"expected {tuple(expected[name])} from config.json")
        flat[name] = arr
    return cfg, unflatten_params(flat)


# ----------------------------------------------------------------------------------- writing

def _tokenizer_dirs(source: str | os.PathLike) -> list[Path]:
    """Folders where a checkpoint's tokenizer files may sit: beside it, in tokenizer/, and for an
    orbax step folder (RUN/checkpoints/STEP) in its run folder."""
    p = Path(source)
    if not p.exists():
        return []
    start = p if p.is_dir() else p.parent
    roots = [start]
    if start.name.isdigit() and start.parent.name == "checkpoints":
        roots.append(start.parent.parent)
    dirs = [d for r in roots for d in (r, r / "tokenizer")]
    return [d for d in dirs if d.is_dir()]


def _copy_tokenizer(source: str | os.PathLike, out: Path) -> bool:
    for d in _tokenizer_dirs(source):
        found = [d / f for f in TOKENIZER_FILES if (d / f).is_file()]
        if any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in found):
            for f in found:
                shutil.copy2(f, out / f.name)
            return True
    p = Path(source)
    if p.is_file() and p.suffix == ".gguf":
        try:
            from bshadow_jax.models.gguf import gguf_tokenizer

            tok = gguf_tokenizer(p)
        except Exception as e:  # the weights still export; say why the tokenizer did not
            print(f"warning: {p}: tokenizer not exported ({type(e).__name__}: {e})", file=sys.stderr)
            return False
        tok.save_pretrained(str(out))
        return True
    return False


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
    """Write config.json + model.safetensors (+ tokenizer) as one atomically renamed folder."""
    from safetensors.numpy import save_file

    from bshadow_jax.fileio import atomic_output_dir

    cfg.validate()
    expected = flatten_params(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    flat = flatten_params(params)
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise UserError(f"params: tensor {missing[0]} is missing for this config")
    tensors = {}
    for name, shape in expected.items():
        arr = np.ascontiguousarray(np.asarray(flat[name], dtype=np.float32))
        if tuple(arr.shape) != tuple(shape):
            raise UserError(f"params: tensor {name} has shape {arr.shape}, expected {shape}")
        tensors[name] = arr
    extra = {}
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, key, None) is not None:
                extra[key] = getattr(tokenizer, key)
    hf_config = _hf_config_object(cfg, extra)
    with atomic_output_dir(out_dir) as tmp:
        hf_config.save_pretrained(str(tmp))
        # "format": "pt" is what transformers checks before loading a safetensors file
        save_file(tensors, str(tmp / SAFETENSORS_FILE), metadata={"format": "pt"})
        _chmod_default(tmp / SAFETENSORS_FILE)  # safetensors writes 0600; give it the usual umask mode
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif source is not None:
            _copy_tokenizer(source, tmp)
    return Path(out_dir)
