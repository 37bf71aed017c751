"""The functional probe: KL divergence, perplexity and top-1 agreement of two models on a text, against
a NumPy computation from the models' logits; the rows cover every prediction once."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from bshadow_jax.errors import UserError
from bshadow_jax.evals.probe import probe, probe_checkpoints, token_rows
from bshadow_jax.models import LlamaConfig, forward, init_params, save_pretrained

CFG = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64)


def _logsoftmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_rows_predict_every_token_once():
    ids = np.arange(23)
    rows, mask = token_rows(ids, 5)
    assert rows.shape == (4, 6) and mask.sum() == 20  # 22 predictions; the partial tail row is dropped
    predicted = [rows[r, c + 1] for r in range(4) for c in range(5) if mask[r, c]]
    assert predicted == list(range(1, 21))
    rows, mask = token_rows(np.arange(4), 8)  # one short row keeps all of it
    assert rows.shape == (1, 4) and mask.sum() == 3


def test_probe_matches_numpy_from_logits():
    rng = np.random.default_rng(0)
    pb = init_params(CFG, jax.random.key(0))
    pt = jax.tree.map(lambda w: w + 0.05 * rng.standard_normal(w.shape).astype(np.float32), pb)
    ids = rng.integers(0, CFG.vocab_size, size=41)
    res = probe((CFG, pb), (CFG, pt), ids, seq_len=10, batch_rows=3)
    rows, mask = token_rows(ids, 10)
    kl, nb, nt, agree = [], [], [], []
    for r, m in zip(rows, mask):
        lb = _logsoftmax(np.asarray(forward(CFG, pb, r[None, :-1]), np.float64))[0]
        lt = _logsoftmax(np.asarray(forward(CFG, pt, r[None, :-1]), np.float64))[0]
        for i in np.nonzero(m)[0]:
            kl.append(np.sum(np.exp(lb[i]) * (lb[i] - lt[i])))
            nb.append(-lb[i, r[i + 1]])
            nt.append(-lt[i, r[i + 1]])
            agree.append(lb[i].argmax() == lt[i].argmax())
    assert res.tokens == len(kl) == 40
    np.testing.assert_allclose(res.kl_base_tuned, np.mean(kl), rtol=1e-4)
    np.testing.assert_allclose(res.ppl_base, math.exp(np.mean(nb)), rtol=1e-5)
    np.testing.assert_allclose(res.ppl_tuned, math.exp(np.mean(nt)), rtol=1e-5)
    assert res.top1_agreement == pytest.approx(np.mean(agree))
    assert res.kl_base_tuned > 0 and res.kl_tuned_base > 0
    same = probe((CFG, pb), (CFG, pb), ids, seq_len=10)
    assert same.kl_base_tuned == pytest.approx(0, abs=1e-6) and same.top1_agreement == 1.0


def test_probe_refuses_other_vocabularies_and_bad_text(tmp_path):
    other = LlamaConfig(**{**CFG.__dict__, "vocab_size": 51})
    p = init_params(CFG, jax.random.key(0))
    with pytest.raises(UserError, match="vocabularies differ"):
        probe((CFG, p), (other, init_params(other, jax.random.key(0))), np.arange(10))
    with pytest.raises(UserError, match="outside"):
        probe((CFG, p), (CFG, p), np.array([1, 2, 99]))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        probe_checkpoints(tmp_path, tmp_path, empty)


def test_probe_checkpoints_uses_the_checkpoints_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>"] + [f"w{i}" for i in range(CFG.vocab_size - 1)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    pb = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    pt = jax.tree.map(lambda w: w * 1.01, pb)
    save_pretrained(CFG, pb, tmp_path / "base", tokenizer=tok)
    save_pretrained(CFG, pt, tmp_path / "tuned")
    text = tmp_path / "probe.txt"
    text.write_text(" ".join(f"w{i % 40}" for i in range(300)))
    out = probe_checkpoints(tmp_path / "base", tmp_path / "tuned", text, seq_len=32)
    assert out["tokens_in_text"] == 300 and out["tokens"] == 9 * 32 and out["tokenizer"] == str(tmp_path / "base")
    assert out["kl_base_tuned"] > 0 and math.isclose(out["ppl_ratio"], out["ppl_tuned"] / out["ppl_base"])
