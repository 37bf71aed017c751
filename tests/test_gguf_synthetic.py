"""GGUF import on small files written here the way llama.cpp's converter writes them.

References are independent of bshadow_jax.formats.gguf: tensor names come from the gguf
package's own TensorNameMap, the q/k permutation is llama.cpp's `LlamaModel.permute`, and
logits come from transformers' torch models with the original (unpermuted) weights.
"""
from __future__ import annotations

import importlib
import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from testkit import fuzz_settings

import gguf

from bshadow_jax.errors import UserError
from bshadow_jax.models import forward
from bshadow_jax.formats.gguf import GGUFFile, gguf_tokenizer
from bshadow_jax.models import load_pretrained
from bshadow_jax.formats.sources import open_checkpoint

torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_model(model_type: str, *, tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
    )
    if model_type == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    model.eval()
    with torch.no_grad():  # HF inits norms to ones and biases to zero; make them informative
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_gguf(path, model, arch: str, *, qtypes: dict[str, gguf.GGMLQuantizationType] | None = None):
    """Write `model` as llama.cpp would: GGUF names, q/k permuted for llama, optional quant types."""
    cfg = model.config
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    expected = {}
    for hf, t in state.items():
        if arch == "llama" and ".q_proj." in hf:
            t = llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf:
            t = llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        name = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        qtype = (qtypes or {}).get(hf)
        if qtype is None:
            w.add_tensor(name, np.ascontiguousarray(t))
            expected[hf] = state[hf]
        else:
            q = gguf.quants.quantize(np.ascontiguousarray(t), qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            expected[hf] = None  # checked against gguf's own dequantize
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_weights_config_and_logits_match_transformers(tmp_path, arch, tie):
    model = tiny_hf_model(arch, tie=tie)
    path = tmp_path / "tiny.gguf"
    expected = write_gguf(path, model, arch)

    cfg, params = load_pretrained(path)
    hf = model.config
    assert (cfg.model_type, cfg.tie_word_embeddings, cfg.attention_bias) == (arch, tie, arch == "qwen2")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (hf.vocab_size, hf.hidden_size, hf.intermediate_size)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.rope_theta == pytest.approx(hf.rope_parameters["rope_theta"])
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-6)

    with open_checkpoint(path) as src:
        assert sorted(src.names()) == sorted(expected)
        for name, want in expected.items():
            got = src.read(name)
            assert got.dtype == np.float32 and got.shape == want.shape == src.shape(name), name
            np.testing.assert_array_equal(got, want, err_msg=name)

    tokens = np.random.default_rng(0).integers(0, hf.vocab_size, size=(2, 12), dtype=np.int32)
    with torch.no_grad():
        ref = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(forward(cfg, params, tokens))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_quantized_tensors_dequantize_like_gguf(tmp_path):
    model = tiny_hf_model("llama", tie=False, seed=1)
    Q = gguf.GGMLQuantizationType
    qtypes = {
        "model.layers.0.self_attn.k_proj.weight": Q.Q8_0,  # quantized AND permuted
        "model.layers.0.mlp.up_proj.weight": Q.Q4_1,
        "model.layers.1.mlp.down_proj.weight": Q.F16,
    }
    path = tmp_path / "q.gguf"
    write_gguf(path, model, "llama", qtypes=qtypes)
    state = model.state_dict()
    hf = model.config
    with open_checkpoint(path) as src:
        for name, qtype in qtypes.items():
            t = state[name].numpy()
            if ".k_proj." in name:
                t = llama_cpp_permute(t, hf.num_attention_heads, hf.num_key_value_heads)
            want = gguf.quants.dequantize(gguf.quants.quantize(t, qtype), qtype)
            if ".k_proj." in name:
                # undo with transformers' own inverse, independent of ours
                from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

                want = LlamaTensorProcessor()._reverse_permute_weights(want, hf.num_attention_heads, hf.num_key_value_heads)
            assert src.dtype(name) == qtype.name
            np.testing.assert_array_equal(src.read(name), want.astype(np.float32), err_msg=name)
            # quantization error is small relative to the weights: layout is right
            assert np.abs(src.read(name) - state[name].numpy()).max() < 0.2 * np.abs(state[name].numpy()).max()


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "t.gguf"
    write_gguf(path, tiny_hf_model("llama", tie=True, seed=2), "llama")
    return path.read_bytes()


def _load_all(path):
    with GGUFFile(path) as f:
        f.config_dict()
        for n in f.names():
            f.read(n)


def test_truncated_and_bad_gguf_are_user_errors(tmp_path, tiny_gguf_bytes):
    cases = {
        "empty.gguf": b"",
        "text.gguf": b"this is not a model\n" * 10,
        "magic_only.gguf": b"GGUF",
        "header_cut.gguf": tiny_gguf_bytes[:200],
        "data_cut.gguf": tiny_gguf_bytes[:-100],
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        for fn in (_load_all, load_pretrained, open_checkpoint):
            with pytest.raises(UserError, match=name):
                fn(p)


@fuzz_settings(60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_gguf_never_crashes(tmp_path, tiny_gguf_bytes, data):
    """Any truncation or byte damage: either reads fine or raises UserError, nothing else."""
    raw = bytearray(tiny_gguf_bytes)
    cut = data.draw(st.integers(4, len(raw)))
    raw = raw[:cut]
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(4, max(4, len(raw) - 1)))
        if i < len(raw):
            raw[i] = data.draw(st.integers(0, 255))
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(raw))
    try:
        _load_all(p)
    except UserError as e:
        assert "fuzz.gguf" in str(e) and "\n" not in str(e)


def _write_tokenizer_gguf(path):
    """A GGUF holding only a tiny byte-level BPE tokenizer (llama.cpp "gpt2" model)."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<s>", "</s>"] + alphabet + ["Ġt", "he", "Ġthe", "in"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t", "h e", "Ġt he", "i n"])
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def test_tokenizer_from_gguf_and_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BSHADOW_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tok.gguf"
    vocab = _write_tokenizer_gguf(path)
    text = "in the tin, then: théâtre!"
    fresh = gguf_tokenizer(path, cache=False)
    assert not (tmp_path / "cache").exists()
    built = gguf_tokenizer(path)
    entries = list((tmp_path / "cache" / "gguf_tokenizers").iterdir())
    assert len(entries) == 1 and (entries[0] / "tokenizer.json").is_file()
    hit = gguf_tokenizer(path)
    ids = fresh(text)["input_ids"]
    assert fresh.convert_ids_to_tokens(ids)[:3] == ["in", "Ġthe", "Ġt"]  # merges from the file are used
    assert fresh.decode(ids) == text and fresh.vocab_size == len(vocab)
    for tok in (built, hit):
        assert tok(text)["input_ids"] == ids
        assert (tok.bos_token, tok.eos_token, len(tok)) == (fresh.bos_token, fresh.eos_token, len(fresh))
    # a damaged cache entry is rebuilt, not trusted
    (entries[0] / "tokenizer.json").write_text("{broken")
    assert gguf_tokenizer(path)(text)["input_ids"] == ids


def test_tokenizer_bad_files(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("not a model")
    with pytest.raises(UserError, match="x.gguf"):
        gguf_tokenizer(bad)
    no_tok = tmp_path / "notok.gguf"
    write_gguf(no_tok, tiny_hf_model("llama", tie=True), "llama")
    with pytest.raises(UserError, match="notok.gguf"):
        gguf_tokenizer(no_tok, cache=False)
