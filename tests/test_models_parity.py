"""Our JAX forward against transformers' torch models (random small checkpoints, float32)."""
from __future__ import annotations

import importlib
import numpy as np
import pytest

torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bshadow_jax import models  # noqa: E402

TOL = 2e-4
VOCAB = 96

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CONFIGS = {
    # GQA: 4 query heads share 2 kv heads; untied head
    "llama_gqa": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # MQA, explicit head_dim != hidden/heads, llama attention/mlp biases
    "llama_mqa_bias": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                           attention_bias=True, mlp_bias=True),
    # qwen2: q/k/v biases, tied embeddings
    "qwen2_tied": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # llama3 scaling with a small theta and positions (up to 80) past original_max_position_embeddings:
    # head_dim 16, theta 500 gives wavelengths 6.3 (< 32/4: kept), 13 and 28 (smoothed), 58+ (divided by 8)
    "llama3_rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                        max_position_embeddings=512, rope_parameters=dict(LLAMA3_ROPE, rope_theta=500.0)),
    "linear_rope": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4, rope_theta=1000.0,
                        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}),
    "yarn_rope": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                       "rope_theta": 1000.0}),
    # mistral with a sliding window shorter than the sequence
    "mistral_window": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                           sliding_window=8),
}


def make_hf_model(name: str, seed: int = 0):
    """A random transformers model whose weights are large enough for sharp logits."""
    kw = dict(CONFIGS[name])
    model_type = kw.pop("model_type")
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, rms_norm_eps=1e-6,
                max_position_embeddings=256)
    base.update(kw)
    hf_cfg = transformers.AutoConfig.for_model(model_type, **base)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                # std ~ 1/sqrt(fan_in) keeps activations O(1): far from uniform softmax
                scale = 0.1 if p.ndim == 1 else 1.5 / np.sqrt(p.shape[-1])
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def torch_logprobs(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor(tokens, dtype=torch.long)).logits
    return torch.log_softmax(logits.float(), -1).numpy()


def our_logprobs(cfg, params, tokens, **kw) -> np.ndarray:
    fwd = jax.jit(models.forward, static_argnums=0, static_argnames=("compute_dtype",))
    return np.asarray(jax.nn.log_softmax(fwd(cfg, params, tokens, **kw), -1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, torch model), saved with safe_serialization; built on first use."""

    class Lazy(dict):
        def __missing__(self, name):
            model = make_hf_model(name)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder, safe_serialization=True)
            self[name] = (folder, model)
            return self[name]

    return Lazy()


def _tokens(T: int, B: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(B, T)).astype(np.int32)


# the configs the brief requires run by default; the other variants are slow-marked (each is a compile)
DEFAULT_CONFIGS = ("llama_gqa", "qwen2_tied", "llama3_rope", "mistral_window")
PARITY_CASES = [n if n in DEFAULT_CONFIGS else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS]


@pytest.mark.parametrize("name", PARITY_CASES)
def test_logprob_parity_with_transformers(checkpoints, name):
    folder, model = checkpoints[name]
    cfg, params = models.load_pretrained(folder)
    T = 80 if "rope" in name else 24
    tokens = _tokens(T)
    ref = torch_logprobs(model, tokens)
    ours = our_logprobs(cfg, params, tokens)
    err = float(np.abs(ours - ref).max())
    print(f"parity {name}: max |dlogp| = {err:.3g}")
    assert err < TOL, (name, err)
    # the reference is sharp enough that a wrong model would be caught
    assert float(ref.max(-1).mean()) > np.log(1.0 / VOCAB) + 1.0


def test_config_read_from_checkpoints(checkpoints):
    cfg, _ = models.load_pretrained(checkpoints["qwen2_tied"][0])
    assert (cfg.model_type, cfg.attention_bias, cfg.tie_word_embeddings) == ("qwen2", True, True)
    cfg, _ = models.load_pretrained(checkpoints["llama3_rope"][0])
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta == 500.0
    cfg, _ = models.load_pretrained(checkpoints["mistral_window"][0])
    assert (cfg.sliding_window, cfg.head_dim, cfg.num_key_value_heads) == (8, 24, 2)


@pytest.mark.parametrize("name,field,value", [
    ("llama3_rope", "rope_scaling", None),
    ("mistral_window", "sliding_window", None),
])
def test_parity_detects_wrong_settings(checkpoints, name, field, value):
    """Dropping rope scaling / the window (or a wrong eps) must break parity: the tests can fail."""
    import dataclasses

    folder, model = checkpoints[name]
    cfg, params = models.load_pretrained(folder)
    T = 80 if "rope" in name else 24
    tokens = _tokens(T)
    wrong = dataclasses.replace(cfg, **{field: value})
    err = float(np.abs(our_logprobs(wrong, params, tokens) - torch_logprobs(model, tokens)).max())
    assert err > 100 * TOL


def test_packed_segments_equal_separate_runs(checkpoints):
    folder, _ = checkpoints["llama_gqa"]
    cfg, params = models.load_pretrained(folder)
    rng = np.random.default_rng(3)
    lengths = (7, 12, 5)
    pieces = [rng.integers(0, VOCAB, size=n).astype(np.int32) for n in lengths]
    pad = 4
    packed = np.concatenate(pieces + [np.zeros(pad, np.int32)])[None]
    seg = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)] + [np.zeros(pad, np.int32)])[None]
    packed_lp = our_logprobs(cfg, params, packed, segment_ids_BxT=seg)
    assert np.isfinite(packed_lp).all()
    T = packed.shape[1]
    start = 0
    for piece in pieces:
        # alone: the piece at the start of a row; what follows it cannot matter (causal), and the
        # row keeps the packed shape so one compilation serves every piece
        row = np.concatenate([piece, rng.integers(0, VOCAB, size=T - len(piece)).astype(np.int32)])[None]
        alone = our_logprobs(cfg, params, row)[0, :len(piece)]
        np.testing.assert_allclose(packed_lp[0, start:start + len(piece)], alone, atol=1e-5)
        start += len(piece)
    # explicit positions equal to the restarted ones give the same result
    pos = np.concatenate([np.arange(n) for n in lengths] + [np.arange(pad)])[None].astype(np.int32)
    np.testing.assert_allclose(our_logprobs(cfg, params, packed, segment_ids_BxT=seg, positions_BxT=pos),
                               packed_lp, atol=1e-6)


def test_packed_segments_match_torch(checkpoints):
    """Independent reference for packing: each segment run through transformers on its own."""
    folder, model = checkpoints["qwen2_tied"]
    cfg, params = models.load_pretrained(folder)
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, VOCAB, size=(1, 9)), rng.integers(0, VOCAB, size=(1, 6))
    packed = np.concatenate([a, b], 1).astype(np.int32)
    seg = np.array([[1] * 9 + [2] * 6], np.int32)
    ours = our_logprobs(cfg, params, packed, segment_ids_BxT=seg)
    ref = np.concatenate([torch_logprobs(model, a), torch_logprobs(model, b)], 1)
    assert float(np.abs(ours - ref).max()) < TOL


def test_bf16_compute_close_and_float32_logits(checkpoints):
    folder, _ = checkpoints["llama_gqa"]
    cfg, params = models.load_pretrained(folder)
    tokens = _tokens(16)
    logits16 = jax.jit(models.forward, static_argnums=0, static_argnames=("compute_dtype",))(
        cfg, params, tokens, compute_dtype=jnp.bfloat16)
    assert logits16.dtype == jnp.float32
    lp32 = our_logprobs(cfg, params, tokens)
    lp16 = np.asarray(jax.nn.log_softmax(logits16, -1))
    assert np.abs(lp16 - lp32).max() < 0.5
    assert (lp16.argmax(-1) == lp32.argmax(-1)).mean() > 0.8
