"""What a diagnose report says about its inputs: the checkpoints, their formats and stored dtypes, a
dequantization note for quantized GGUF tensors, only matrices that changed in the top table, and the
probe's functional change beside the footprint."""
from __future__ import annotations

import json

import gguf
import jax
import numpy as np
from test_gguf_synthetic import tiny_hf_model, write_gguf

from bshadow_jax.cli import main
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.tokenizer import get_tokenizer
from bshadow_jax.models import LlamaConfig, flatten_params, init_params, load_pretrained, save_pretrained, unflatten_params


def test_gguf_base_is_named_dequantized_and_unchanged_matrices_left_out(tmp_path, capsys):
    model = tiny_hf_model("llama", tie=False)
    base = tmp_path / "base.gguf"
    write_gguf(base, model, "llama", qtypes={"model.layers.0.mlp.up_proj.weight": gguf.GGMLQuantizationType.Q8_0})
    cfg, params = load_pretrained(base)
    flat = flatten_params(params)
    flat["model.layers.1.mlp.down_proj.weight"] = flat["model.layers.1.mlp.down_proj.weight"] + 0.01
    tuned = save_pretrained(cfg, unflatten_params(flat), tmp_path / "tuned")  # same weights but one matrix
    out = tmp_path / "diag"
    assert main(["diagnose", str(base), str(tuned), "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    src = summary["sources"]
    assert src["base"]["kind"] == "gguf" and src["base"]["dequantized"] == ["Q8_0"]
    assert src["base"]["dtypes"]["Q8_0"] == 1 and src["tuned"]["kind"] == "hf" and src["tuned"]["dequantized"] == []
    md = (out / "report.md").read_text()
    assert "## Checkpoints" in md and f"`{base}`" in md and "Q8_0 × 1" in md and "dequantized to float32" in md
    n = summary["matrices"]
    assert f"| matrices changed (ΔW ≠ 0) | 1 of {n} |" in md
    top = md.split("## Top ")[1].split("\n## ")[0]
    assert top.startswith("1 matrices") and "`model.layers.1.mlp.down_proj.weight`" in top


def test_probe_sits_beside_the_footprint(tmp_path, capsys):
    tok = get_tokenizer(DataConfig(vocab_size=320, text_source="procedural"))
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    moved = jax.tree.map(lambda w: w * 1.05, params)
    save_pretrained(cfg, params, tmp_path / "base", tokenizer=tok)
    save_pretrained(cfg, moved, tmp_path / "tuned", tokenizer=tok)
    text = tmp_path / "probe.txt"
    text.write_text("Question: what is 3 + 4? Answer: 7. The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "diag"
    assert main(["diagnose", str(tmp_path / "base"), str(tmp_path / "tuned"), "--probe", str(text),
                 "--probe-seq-len", "64", "--out", str(out)]) == 0, capsys.readouterr().err
    probe = json.loads((out / "probe.json").read_text())
    assert probe["tokens"] > 64 and probe["kl_base_tuned"] > 0 and 0 <= probe["top1_agreement"] <= 1
    assert json.loads((out / "summary.json").read_text())["probe"] == probe
    assert "## Functional change on the probe text" in (out / "report.md").read_text()
    # a missing probe text is one error line before anything is computed, and no output
    bad = tmp_path / "bad"
    rc = main(["diagnose", str(tmp_path / "base"), str(tmp_path / "tuned"), "--probe", str(tmp_path / "no.txt"),
               "--out", str(bad)])
    assert rc == 2 and capsys.readouterr().err.count("error:") == 1 and not bad.exists()
