"""Llama-family decoder (llama, qwen2, mistral) as pure functions of a nested param dict.

Params mirror Hugging Face tensor names and layouts exactly (linear weights are [out, in]),
so `flatten_params` gives names like "model.layers.0.self_attn.q_proj.weight" and a
checkpoint converts both ways without renaming or transposing.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bshadow_jax.errors import ConfigError
# the param tree mirrors HF names: one naming rule for every reader and writer
from bshadow_jax.formats.pytree import flatten as flatten_params
from bshadow_jax.formats.pytree import unflatten as unflatten_params

MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor",),
}
INIT_STD = 0.02  # HF's initializer_range default for these families


def _freeze(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    sliding_window: int | None = None

    # rope_scaling is a dict, so the generated hash would fail; jit needs cfg hashable (static).
    def __hash__(self) -> int:
        return hash(tuple(_freeze(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_attention_heads: {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size: {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads} (set head_dim)"
            )
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ConfigError(f"model.head_dim: must be positive and even, got {self.head_dim}")
        if self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim: RoPE needs an even head_dim, got {self.resolved_head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"model.{name}: must be a positive finite number, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model.model_type: {self.model_type!r} is not one of {list(MODEL_TYPES)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window: must be positive, got {self.sliding_window}")
        if self.model_type == "qwen2" and (not self.attention_bias or self.mlp_bias):
            raise ConfigError("model.attention_bias: qwen2 has q/k/v biases and no MLP bias "
                              "(set attention_bias: true, mlp_bias: false)")
        if self.model_type == "mistral" and (self.attention_bias or self.mlp_bias):
            raise ConfigError("model.attention_bias: mistral has no biases (set attention_bias and mlp_bias false)")
        rope_type = self.rope_type
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"model.rope_scaling: rope_type {rope_type!r} is not supported (supported: {list(ROPE_TYPES)})")
        missing = [k for k in _ROPE_REQUIRED[rope_type] if k not in (self.rope_scaling or {})]
        if missing:
            raise ConfigError(f"model.rope_scaling: rope_type {rope_type!r} needs key {missing[0]!r}")
        for key, value in (self.rope_scaling or {}).items():
            if key in ("rope_type", "type", "truncate"):
                continue
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            ):
                raise ConfigError(f"model.rope_scaling.{key}: must be a positive finite number, got {value!r}")


# ----------------------------------------------------------------------------------- params

def param_shapes(cfg: LlamaConfig) -> dict:
    """The nested shape tree of `init_params(cfg, ...)`, without allocating anything."""
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = cfg.resolved_head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def linear(out_dim: int, in_dim: int, bias: bool) -> dict:
        return {"weight": (out_dim, in_dim), **({"bias": (out_dim,)} if bias else {})}

    layer = {
        "self_attn": {
            "q_proj": linear(q_out, D, cfg.attention_bias),
            "k_proj": linear(kv_out, D, cfg.attention_bias),
            "v_proj": linear(kv_out, D, cfg.attention_bias),
            # qwen2 has q/k/v biases only; llama's attention_bias also covers o_proj
            "o_proj": linear(D, q_out, cfg.attention_bias and cfg.model_type != "qwen2"),
        },
        "mlp": {
            "gate_proj": linear(F, D, cfg.mlp_bias),
            "up_proj": linear(F, D, cfg.mlp_bias),
            "down_proj": linear(D, F, cfg.mlp_bias),
        },
        "input_layernorm": {"weight": (D,)},
        "post_attention_layernorm": {"weight": (D,)},
    }
    tree = {
        "model": {
            "embed_tokens": {"weight": (V, D)},
            "layers": {str(i): layer for i in range(cfg.num_hidden_layers)},
            "norm": {"weight": (D,)},
        }
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {"weight": (V, D)}
    return tree


def init_params(cfg: LlamaConfig, key: jax.Array) -> dict:
    """HF-style init: normal(0, 0.02) weights, zero biases, unit norms; float32.

    Jitted as a whole (one compilation per config instead of one per tensor shape); it also
    traces fine under an outer jit with out_shardings.
    """
    return _init_params_jit(cfg, key)


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(cfg: LlamaConfig, key: jax.Array) -> dict:
    flat_shapes = flatten_params(param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    random_names = [n for n in sorted(flat_shapes) if not n.endswith(("norm.weight", ".bias"))]
    sizes = [math.prod(flat_shapes[n]) for n in random_names]
    # one RNG call sliced into tensors: XLA compiles one threefry instead of one per tensor
    noise = INIT_STD * jax.random.normal(key, (sum(sizes),), jnp.float32)
    offsets = np.cumsum([0] + sizes)
    noise_of = {n: noise[offsets[i]:offsets[i + 1]].reshape(flat_shapes[n]) for i, n in enumerate(random_names)}
    flat = {}
    for name, shape in flat_shapes.items():  # HF order: embed, layers 0.., norm, lm_head
        if name.endswith("norm.weight"):
            flat[name] = jnp.ones(shape, jnp.float32)
        elif name.endswith(".bias"):
            flat[name] = jnp.zeros(shape, jnp.float32)
        else:
            flat[name] = noise_of[name]
    return unflatten_params(flat)


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> tuple[float, int]:
    """Model FLOPs of one trained token (forward + backward) and the matmul parameter count.

    6 N + 12 L (H hd) T, with N the parameters that enter a matmul (the LM head counts, tied or
    not; the embedding lookup does not) and the second term the attention score and value
    products at sequence length T. This is the MFU numerator the benchmarks quote.
    """
    hd = cfg.resolved_head_dim
    D, F, V, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    n_matmul = L * (D * q + 2 * D * kv + q * D + 3 * D * F) + V * D
    return 6.0 * n_matmul + 12.0 * L * q * seq_len, n_matmul


# ----------------------------------------------------------------------------------- rope

def rope_inv_freq(cfg: LlamaConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [hd/2] (float32, as HF computes them) and the cos/sin scale."""
    dim = cfg.resolved_head_dim
    base = np.float32(cfg.rope_theta)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (base ** exponents)).astype(np.float32)
    rs = cfg.rope_scaling or {}
    rope_type = cfg.rope_type
    attention_factor = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(rs["factor"])
    elif rope_type == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    elif rope_type == "yarn":
        inv_freq, attention_factor = _yarn_inv_freq(cfg, dim, float(cfg.rope_theta), rs)
    return inv_freq.astype(np.float32), float(attention_factor)


def _yarn_inv_freq(cfg: LlamaConfig, dim: int, base: float, rs: dict) -> tuple[np.ndarray, float]:
    orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = rs.get("factor") or cfg.max_position_embeddings / orig

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if rs.get("mscale") and rs.get("mscale_all_dim"):
            attention_factor = get_mscale(factor, rs["mscale"]) / get_mscale(factor, rs["mscale_all_dim"])
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extra, inter = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    extra_factor = 1 - ramp
    inv_freq = inter * (1 - extra_factor) + extra * extra_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope_cos_sin(cfg: LlamaConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv_freq, scale = rope_inv_freq(cfg)
    freqs_BxTxH = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb_BxTxhd = jnp.concatenate([freqs_BxTxH, freqs_BxTxH], axis=-1)
    return jnp.cos(emb_BxTxhd) * scale, jnp.sin(emb_BxTxhd) * scale


# ----------------------------------------------------------------------------------- forward

# jax.checkpoint policies per decoder layer, by the name `train.remat` uses
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _rms_norm(x_BxTxD: jax.Array, weight_D: jax.Array, eps: float) -> jax.Array:
    # statistics in float32 whatever the compute dtype, as HF does
    x32 = x_BxTxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight_D.astype(x_BxTxD.dtype) * x32.astype(x_BxTxD.dtype)


def _linear(x: jax.Array, p: dict, dtype) -> jax.Array:
    # a 2-D dot: XLA:CPU takes a faster GEMM path than for the 3-D einsum (-9% per train step, measured)
    w_FxD = p["weight"].astype(dtype)
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w_FxD.T).reshape(*x.shape[:-1], w_FxD.shape[0])
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Positions restarting at 0 at each change of segment id along a row."""
    T = segment_ids_BxT.shape[-1]
    idx_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BxT.shape)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
    )
    start_BxT = jax.lax.cummax(jnp.where(is_start, idx_BxT, 0), axis=1)
    return idx_BxT - start_BxT


def attention_mask(cfg: LlamaConfig, segment_ids_BxT: jax.Array, branch_ids_BxT: jax.Array | None = None,
                   positions_BxT: jax.Array | None = None) -> jax.Array:
    """bool [B, T(q), T(k)]: causal, same segment, within the sliding window if any.

    Padding (segment 0) attends to padding only, so every row keeps its diagonal and the
    softmax never sees an all-masked row.

    branch_ids (optional) make each segment a tree: branch 0 is the trunk, and a token of branch
    b > 0 attends to the trunk and to its own branch, never to another branch. Several
    continuations of one prefix then share its tokens in one row (evals.scoring's options). The
    sliding window is then measured in positions (which restart per branch after the trunk), not
    in row indices.
    """
    T = segment_ids_BxT.shape[-1]
    q_idx, k_idx = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    allowed = (k_idx <= q_idx)[None]
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    if branch_ids_BxT is None:
        if cfg.sliding_window is not None:
            allowed &= (k_idx > q_idx - cfg.sliding_window)[None]
        return allowed & same_BxTxT
    b_q, b_k = branch_ids_BxT[:, :, None], branch_ids_BxT[:, None, :]
    allowed = allowed & same_BxTxT & ((b_k == 0) | (b_k == b_q))
    if cfg.sliding_window is not None:
        pos = positions_BxT if positions_BxT is not None else segment_positions(segment_ids_BxT)
        allowed &= pos[:, None, :] > pos[:, :, None] - cfg.sliding_window
    return allowed


def _attention(cfg: LlamaConfig, p: dict, x_BxTxD, cos_BxTxhd, sin_BxTxhd, mask_BxTxT, dtype):
    B, T, _ = x_BxTxD.shape
    hd, N, K = cfg.resolved_head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q_BxTxNxhd = _linear(x_BxTxD, p["q_proj"], dtype).reshape(B, T, N, hd)
    k_BxTxKxhd = _linear(x_BxTxD, p["k_proj"], dtype).reshape(B, T, K, hd)
    v_BxTxKxhd = _linear(x_BxTxD, p["v_proj"], dtype).reshape(B, T, K, hd)
    cos, sin = cos_BxTxhd[:, :, None, :], sin_BxTxhd[:, :, None, :]
    q_BxTxNxhd = (q_BxTxNxhd * cos + _rotate_half(q_BxTxNxhd) * sin).astype(dtype)
    k_BxTxKxhd = (k_BxTxKxhd * cos + _rotate_half(k_BxTxKxhd) * sin).astype(dtype)
    # jax's XLA attention: grouped kv heads without repeating them, f32 logits and softmax,
    # 1/sqrt(hd) scale; bit-identical here to the explicit einsum version and faster to differentiate
    out_BxTxNxhd = jax.nn.dot_product_attention(q_BxTxNxhd, k_BxTxKxhd, v_BxTxKxhd, mask=mask_BxTxT[:, None])
    return _linear(out_BxTxNxhd.reshape(B, T, N * hd), p["o_proj"], dtype)


def _mlp(p: dict, x_BxTxD, dtype):
    gate = _linear(x_BxTxD, p["gate_proj"], dtype)
    up = _linear(x_BxTxD, p["up_proj"], dtype)
    return _linear(jax.nn.silu(gate) * up, p["down_proj"], dtype)


def forward(
    cfg: LlamaConfig,
    params: dict,
    tokens_BxT: jax.Array,
    segment_ids_BxT: jax.Array | None = None,
    positions_BxT: jax.Array | None = None,
    *,
    compute_dtype=jnp.float32,
    remat: str = "none",
    branch_ids_BxT: jax.Array | None = None,
) -> jax.Array:
    """Logits float32 [B, T, V]. Pure; jit with cfg static.

    segment_ids: 0 = padding; tokens attend causally within their own segment only.
    positions: default arange per row, restarting per segment when segment_ids are given.
    branch_ids: optional tree attention within a segment (see attention_mask); give positions with them.
    compute_dtype: params stay as given (f32) and are cast inside the computation.
    remat: what a gradient keeps of each decoder layer (see REMAT_POLICIES); the values are the same.
    """
    dtype = jnp.dtype(compute_dtype)
    tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
    B, T = tokens_BxT.shape
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((B, T), jnp.int32)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    segment_ids_BxT = jnp.asarray(segment_ids_BxT, jnp.int32)
    if positions_BxT is None:
        positions_BxT = segment_positions(segment_ids_BxT)
    cos, sin = _rope_cos_sin(cfg, jnp.asarray(positions_BxT))
    mask_BxTxT = attention_mask(cfg, segment_ids_BxT,
                                None if branch_ids_BxT is None else jnp.asarray(branch_ids_BxT, jnp.int32),
                                jnp.asarray(positions_BxT, jnp.int32))

    def decoder_layer(layer, x_BxTxD, cos, sin, mask_BxTxT):
        h = _rms_norm(x_BxTxD, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
        x_BxTxD = x_BxTxD + _attention(cfg, layer["self_attn"], h, cos, sin, mask_BxTxT, dtype)
        h = _rms_norm(x_BxTxD, layer["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        return x_BxTxD + _mlp(layer["mlp"], h, dtype)

    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    if remat != "none":
        decoder_layer = jax.checkpoint(decoder_layer, policy=REMAT_POLICIES[remat])

    model = params["model"]
    x_BxTxD = jnp.take(model["embed_tokens"]["weight"], tokens_BxT, axis=0).astype(dtype)
    for i in range(cfg.num_hidden_layers):
        x_BxTxD = decoder_layer(model["layers"][str(i)], x_BxTxD, cos, sin, mask_BxTxT)
    x_BxTxD = _rms_norm(x_BxTxD, model["norm"]["weight"], cfg.rms_norm_eps)
    head_VxD = model["embed_tokens"]["weight"] if cfg.tie_word_embeddings else params["lm_head"]["weight"]
    logits = jnp.dot(x_BxTxD.reshape(B * T, -1), head_VxD.astype(dtype).T, preferred_element_type=jnp.float32)
    return logits.reshape(B, T, -1)
