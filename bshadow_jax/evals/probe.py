"""The functional change between a base and a fine-tune on a text sample: KL divergence and perplexity.

`bshadow diagnose BASE TUNED --probe TEXT` puts this beside the footprint, so that how much the
weights moved sits next to how much the model's predictions moved (docs/metrics.md#probe).

Both models read the same tokens (the base checkpoint's tokenizer, else the fine-tune's): the text
is tokenized once, without special tokens, cut into rows of `seq_len` tokens (the last partial row
dropped unless it is the only one), and every next-token prediction counts.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bshadow_jax.errors import UserError
from bshadow_jax.models import LlamaConfig, checkpoint_tokenizer, forward, load_pretrained

MAX_TOKENS = 65536  # a probe is a sample: longer texts are cut here (the result says how many were read)


class ProbeResult(NamedTuple):
    """Per-token means over the probed predictions.

    Attributes:
        tokens: next-token predictions scored.
        kl_base_tuned: mean KL(p_base ‖ p_tuned) in nats.
        kl_tuned_base: mean KL(p_tuned ‖ p_base) in nats.
        ppl_base, ppl_tuned: perplexity of each model on the text.
        top1_agreement: the share of positions where both models' most likely next token is the same.
    """

    tokens: int
    kl_base_tuned: float
    kl_tuned_base: float
    ppl_base: float
    ppl_tuned: float
    top1_agreement: float

    def as_dict(self) -> dict:
        d = self._asdict()
        d["ppl_ratio"] = self.ppl_tuned / self.ppl_base if self.ppl_base > 0 else float("nan")
        return d


def _sums_fn():
    def sums(cfg_b, cfg_t, params_b, params_t, tokens_BxT1, mask_BxT):
        x, y = tokens_BxT1[:, :-1], tokens_BxT1[:, 1:]
        lb = jax.nn.log_softmax(forward(cfg_b, params_b, x).astype(jnp.float32), axis=-1)
        lt = jax.nn.log_softmax(forward(cfg_t, params_t, x).astype(jnp.float32), axis=-1)
        kl_bt = jnp.sum(jnp.exp(lb) * (lb - lt), axis=-1)
        kl_tb = jnp.sum(jnp.exp(lt) * (lt - lb), axis=-1)
        nll_b = -jnp.take_along_axis(lb, y[..., None], axis=-1)[..., 0]
        nll_t = -jnp.take_along_axis(lt, y[..., None], axis=-1)[..., 0]
        agree = (jnp.argmax(lb, -1) == jnp.argmax(lt, -1)).astype(jnp.float32)
        m = mask_BxT.astype(jnp.float32)
        return jnp.stack([jnp.sum(v * m) for v in (kl_bt, kl_tb, nll_b, nll_t, agree)])

    return jax.jit(sums, static_argnums=(0, 1))


def token_rows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows [R, seq_len + 1] of consecutive tokens, mask [R, seq_len] of the predictions that count).

    Rows overlap by one token, so every token after the first is predicted exactly once.
    """
    ids = np.asarray(ids, np.int32)
    if ids.size < 2:
        raise UserError("--probe: the text has fewer than 2 tokens")
    n_pred = ids.size - 1
    rows = max(1, n_pred // seq_len) if n_pred >= seq_len else 1
    width = min(seq_len, n_pred)
    out = np.zeros((rows, width + 1), np.int32)
    mask = np.zeros((rows, width), bool)
    for r in range(rows):
        chunk = ids[r * width: r * width + width + 1]
        out[r, :chunk.size] = chunk
        mask[r, :chunk.size - 1] = True
    return out, mask


def probe(base: tuple[LlamaConfig, dict], tuned: tuple[LlamaConfig, dict], token_ids: np.ndarray, *,
          seq_len: int = 256, batch_rows: int = 8) -> ProbeResult:
    """KL divergence, perplexities and top-1 agreement of two models on one token sequence.

    Args:
        base, tuned: (config, params) of each model; their vocabularies must match.
        token_ids: the text's token ids (one sequence).
        seq_len: tokens per row.
        batch_rows: rows per forward pass.

    Returns:
        A ProbeResult.
    """
    (cfg_b, params_b), (cfg_t, params_t) = base, tuned
    if cfg_b.vocab_size != cfg_t.vocab_size:
        raise UserError(f"--probe: the models' vocabularies differ ({cfg_b.vocab_size} vs {cfg_t.vocab_size} tokens); "
                        "a KL divergence needs the same token space")
    ids = np.asarray(token_ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= cfg_b.vocab_size):
        raise UserError(f"--probe: token id {int(ids.max())} is outside the models' vocabulary of {cfg_b.vocab_size}")
    limit = min(cfg_b.max_position_embeddings, cfg_t.max_position_embeddings) - 1
    rows, mask = token_rows(ids, max(1, min(seq_len, limit)))
    fn = _sums_fn()
    pb, pt = jax.device_put(params_b), jax.device_put(params_t)
    total = np.zeros(5, np.float64)
    for i in range(0, rows.shape[0], batch_rows):
        r, m = rows[i:i + batch_rows], mask[i:i + batch_rows]
        if r.shape[0] < batch_rows and rows.shape[0] > batch_rows:  # one compiled shape: pad the last batch
            pad = batch_rows - r.shape[0]
            r = np.concatenate([r, np.zeros((pad, r.shape[1]), r.dtype)])
            m = np.concatenate([m, np.zeros((pad, m.shape[1]), bool)])
        total += np.asarray(fn(cfg_b, cfg_t, pb, pt, r, m), np.float64)
    n = int(mask.sum())
    kl_bt, kl_tb, nll_b, nll_t, agree = total / n
    return ProbeResult(tokens=n, kl_base_tuned=float(kl_bt), kl_tuned_base=float(kl_tb),
                       ppl_base=float(math.exp(nll_b)), ppl_tuned=float(math.exp(nll_t)),
                       top1_agreement=float(agree))


def read_probe_text(path: str | os.PathLike) -> str:
    """The probe text file (UTF-8), with a one-line error for anything unreadable or empty."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: no such file (--probe)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read the probe text ({type(e).__name__}: {e})") from None
    if not text.strip():
        raise UserError(f"{p}: the probe text is empty")
    return text


def probe_checkpoints(base_path, tuned_path, text_path, *, seq_len: int = 256, max_tokens: int = MAX_TOKENS) -> dict:
    """`probe` of two checkpoints on a text file, tokenized by the base's tokenizer (else the fine-tune's).

    Returns:
        The ProbeResult's fields plus `ppl_ratio`, `tokens_in_text`, `text` and `tokenizer` (which checkpoint's).
    """
    return probe_many(base_path, [tuned_path], text_path, seq_len=seq_len, max_tokens=max_tokens)[0]


def probe_many(base_path, tuned_paths, text_path, *, seq_len: int = 256, max_tokens: int = MAX_TOKENS) -> list[dict]:
    """probe_checkpoints() of one base against each fine-tune: the text is read, and the base model and
    (when it has one) its tokenizer are loaded and applied, once."""
    text = read_probe_text(text_path)
    try:
        base_tok = checkpoint_tokenizer(base_path)
    except UserError:
        base_tok = None
    base = load_pretrained(base_path)
    base_ids = None if base_tok is None else np.asarray(base_tok(text, add_special_tokens=False)["input_ids"], np.int64)
    out = []
    for tuned_path in tuned_paths:
        if base_ids is not None:
            ids, origin = base_ids, str(base_path)
        else:
            tok = checkpoint_tokenizer(tuned_path)
            ids, origin = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64), str(tuned_path)
        res = probe(base, load_pretrained(tuned_path), ids[:max_tokens], seq_len=seq_len)
        out.append({**res.as_dict(), "tokens_in_text": int(ids.size), "text": str(text_path), "tokenizer": origin})
    return out
