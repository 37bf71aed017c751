"""Option log-likelihood scoring (as lm-evaluation-harness scores multiple choice) and perplexity.

For an item with context c and options o_k, LL_k = sum_t log p(o_k[t] | c, o_k[<t]);
acc = [argmax_k LL_k == gold], acc_norm = [argmax_k LL_k / bytes(o_k) == gold], and the continuous
margin = LL_gold - max_{k != gold} LL_k (positive iff acc = 1, ties aside). Exact match is
greedy decoding of the gold answer followed by the end token, computed teacher-forced in the same
forward pass: greedy decoding emits the gold sequence iff every gold token is the argmax given the
gold prefix. When every option is one token (lettered multiple choice), one sequence scores all
options at once.

Sequences are packed into fixed [rows, T] arrays with segment ids (attention stays within a
sequence), so the jitted log-prob function compiles once per (model, T, rows).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from bshadow_jax.data.evalsets import EvalItem, EvalSets
from bshadow_jax.data.tokenizer import special_ids
from bshadow_jax.models import forward

K_GATHER = 5  # ids gathered per position: the target, then up to 4 single-token options

# (inputs, segment_ids, positions, gather_ids[B,T,K]) -> (logp[B,T,K], argmax[B,T]) as numpy;
# gather_ids[..., 0] is the target token, the other slots hold single-token options (or 0)
LogprobFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class _Seq:
    tokens: list[int]  # [sep] context option ... ; inputs = tokens[:-1], targets = tokens[1:]
    alt: tuple[int, list[int]] | None = None  # (target index, ids) scored at one position (single-token options)
    row: int = -1
    offset: int = 0


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids if text else []


def _keep_last(ids: list[int], n: int) -> list[int]:
    """The last n context tokens (long contexts lose their beginning, as in lm-eval)."""
    return ids[max(len(ids) - n, 0) :] if n > 0 else []


def _build_item_seqs(item: EvalItem, tokenizer, eos: int, T: int) -> tuple[list[_Seq], dict]:
    ctx = _encode(tokenizer, item.context)
    opts = [_encode(tokenizer, o) for o in item.options]
    single = all(len(o) == 1 for o in opts) and len(opts) <= K_GATHER - 1
    seqs = []
    if single:
        ids = [o[0] for o in opts]
        gold = opts[item.gold]
        room = T - len(gold) - 1  # inputs hold sep + ctx + gold (the trailing eos is a target only)
        c = _keep_last(ctx, room - 1)
        toks = [eos, *c, *gold, eos]
        seqs.append(_Seq(toks, (len(c), ids)))
        info = {"mode": "single", "pos": len(c), "n": len(ids)}
    else:
        for k, o in enumerate(opts):
            tail = o + [eos] if k == item.gold else o
            room = T - len(tail)
            c = _keep_last(ctx, room - 1)
            toks = [eos, *c, *tail]
            seqs.append(_Seq(toks))
        info = {"mode": "multi", "lens": [len(o) for o in opts]}
    return seqs, info


def pack(seqs: Sequence[_Seq], T: int) -> int:
    """First-fit-decreasing packing into rows of T targets; sets seq.row/offset; returns the row count."""
    fill: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i].tokens)):
        s = seqs[i]
        n = len(s.tokens) - 1
        if n > T:
            raise ValueError(f"sequence of {n} targets exceeds T={T}")
        row = next((r for r, f in enumerate(fill) if f + n <= T), len(fill))
        if row == len(fill):
            fill.append(0)
        s.row, s.offset = row, fill[row]
        fill[row] += n
    return len(fill)


def _arrays(seqs: Sequence[_Seq], rows: int, T: int):
    inputs = np.zeros((rows, T), np.int32)
    seg = np.zeros((rows, T), np.int32)
    pos = np.zeros((rows, T), np.int32)
    gather = np.zeros((rows, T, K_GATHER), np.int32)
    counts = np.zeros(rows, np.int32)
    for s in seqs:
        n = len(s.tokens) - 1
        sl = slice(s.offset, s.offset + n)
        counts[s.row] += 1
        inputs[s.row, sl] = s.tokens[:-1]
        seg[s.row, sl] = counts[s.row]
        pos[s.row, sl] = np.arange(n)
        gather[s.row, sl] = np.asarray(s.tokens[1:], np.int32)[:, None]
        if s.alt is not None:
            j, ids = s.alt
            gather[s.row, s.offset + j, 1 : 1 + len(ids)] = ids
    return inputs, seg, pos, gather


def run_packed(fn: LogprobFn, seqs: Sequence[_Seq], *, T: int, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack, run `fn` over fixed-shape batches of rows, return (logp[R,T,K], argmax[R,T])."""
    rows = pack(seqs, T)
    inputs, seg, pos, gather = _arrays(seqs, rows, T)
    pad = (-rows) % batch_rows
    if pad:
        z = lambda a: np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])  # noqa: E731
        inputs, seg, pos, gather = z(inputs), z(seg), z(pos), z(gather)
    lps, ams = [], []
    for b in range(0, inputs.shape[0], batch_rows):
        sl = slice(b, b + batch_rows)
        lp, am = fn(inputs[sl], seg[sl], pos[sl], gather[sl])
        lps.append(np.asarray(lp))
        ams.append(np.asarray(am))
    return np.concatenate(lps)[:rows], np.concatenate(ams)[:rows]


def score_items(fn: LogprobFn, items: Sequence[EvalItem], tokenizer, *, eos: int, T: int = 128,
                batch_rows: int = 32) -> list[dict]:
    """Option log-likelihoods and the metrics derived from them, one row per item.

    Args:
        fn: the log-prob function (see LogprobFn).
        items: the items to score.
        tokenizer: a Hugging Face fast tokenizer.
        eos: the end/separator token id.
        T: targets per packed row.
        batch_rows: rows per call of `fn`.

    Returns:
        Per item, in order: {"ll": [..], "acc", "acc_norm", "exact_match", "gold_logprob" (ll[gold]),
        "margin" (ll[gold] minus the best wrong option's ll), "item_id", "skill", "category",
        "family", "format"}.
    """
    all_seqs, plans = [], []
    for it in items:
        seqs, info = _build_item_seqs(it, tokenizer, eos, T)
        plans.append((len(all_seqs), len(seqs), info))
        all_seqs += seqs
    if not all_seqs:
        return []
    logp, amax = run_packed(fn, all_seqs, T=T, batch_rows=batch_rows)
    out = []
    for it, (start, n, info) in zip(items, plans):
        seqs = all_seqs[start : start + n]
        if info["mode"] == "single":
            s = seqs[0]
            p = s.offset + info["pos"]
            ll = [float(x) for x in logp[s.row, p, 1 : 1 + info["n"]]]
            tgt = s.tokens[1:]
            em = bool(amax[s.row, p] == tgt[info["pos"]] and amax[s.row, p + 1] == tgt[info["pos"] + 1])
        else:
            ll = []
            em = False
            for k, (s, L) in enumerate(zip(seqs, info["lens"])):
                n_t = len(s.tokens) - 1
                extra = 1 if k == it.gold else 0  # gold carries the end token (exact match only)
                first = s.offset + n_t - L - extra
                ll.append(float(logp[s.row, first : first + L, 0].sum()))
                if k == it.gold:
                    tgt = np.asarray(s.tokens[1:][n_t - L - extra :])
                    em = bool(np.all(amax[s.row, first : first + L + extra] == tgt))
        lens = [max(len(o.encode("utf-8")), 1) for o in it.options]
        wrong = [x for k, x in enumerate(ll) if k != it.gold]
        out.append({
            "ll": ll,
            "acc": float(int(np.argmax(ll)) == it.gold),
            "acc_norm": float(int(np.argmax(np.asarray(ll) / np.asarray(lens))) == it.gold),
            "exact_match": float(em),
            "gold_logprob": ll[it.gold],
            "margin": ll[it.gold] - max(wrong) if wrong else float("nan"),  # no wrong option: no margin
            "item_id": it.item_id, "skill": it.skill,
            "category": it.category, "family": it.family, "format": it.format,
        })
    return out


def perplexity_parts(fn: LogprobFn, passages: Sequence[str], tokenizer, *, eos: int, T: int = 128,
                     batch_rows: int = 32) -> list[tuple[float, int]]:
    """Per passage, its total log-probability and target-token count; each cut into windows of T targets.

    Args:
        fn: the log-prob function (see LogprobFn).
        passages: held-out texts; each is read after a leading `eos`.
        tokenizer: a Hugging Face fast tokenizer.
        eos: the end/separator token id.
        T: targets per window (and per packed row).
        batch_rows: rows per call of `fn`.

    Returns:
        [(sum of log p over the passage's tokens, number of those tokens)], in passage order
        ((0.0, 0) for a passage with no tokens).
    """
    seqs, owner = [], []
    for i, p in enumerate(passages):
        toks = [eos, *_encode(tokenizer, p)]
        for a in range(0, len(toks) - 1, T):
            seqs.append(_Seq(toks[a : a + T + 1]))
            owner.append(i)
    parts = [[0.0, 0] for _ in passages]
    if not seqs:
        return [tuple(x) for x in parts]
    logp, _ = run_packed(fn, seqs, T=T, batch_rows=batch_rows)
    for i, s in zip(owner, seqs):
        n = len(s.tokens) - 1
        parts[i][0] += float(logp[s.row, s.offset : s.offset + n, 0].sum())
        parts[i][1] += n
    return [(float(lp), int(n)) for lp, n in parts]


def perplexity(fn: LogprobFn, passages: Sequence[str], tokenizer, *, eos: int, T: int = 128,
               batch_rows: int = 32) -> float:
    """exp(mean NLL per token) over held-out passages (token-weighted); nan when there are no tokens.

    Args:
        fn, passages, tokenizer, eos, T, batch_rows: as for perplexity_parts.

    Returns:
        exp(-sum of log-probabilities / number of tokens) over all passages.
    """
    parts = perplexity_parts(fn, passages, tokenizer, eos=eos, T=T, batch_rows=batch_rows)
    n = sum(k for _, k in parts)
    if n == 0:
        return float("nan")
    return float(np.exp(-sum(lp for lp, _ in parts) / n))


def summarize(rows: list[dict], by: str) -> dict:
    """Per group of `by`: mean acc, acc_norm, exact_match, margin and the item count."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r[by], []).append(r)
    detail = {
        g: {m: float(np.mean([r[m] for r in rs])) for m in ("acc", "acc_norm", "exact_match", "margin")}
        | {"n": len(rs)}
        for g, rs in sorted(groups.items())
    }
    return detail


# ----------------------------------------------------------------------------- model side
_FN_CACHE: dict = {}


def model_logprob_fn(model_cfg, params, *, compute_dtype="float32") -> LogprobFn:
    """A LogprobFn over models.forward, jitted once per (config, dtype) and reused across params."""
    import jax
    import jax.numpy as jnp

    key = (model_cfg, compute_dtype)
    jitted = _FN_CACHE.get(key)
    if jitted is None:
        def f(params, inputs, seg, pos, gather):
            logits = forward(model_cfg, params, inputs, seg, pos, compute_dtype=jnp.dtype(compute_dtype))
            logp = jax.nn.log_softmax(logits, axis=-1)
            return jnp.take_along_axis(logp, gather, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)

        jitted = _FN_CACHE[key] = jax.jit(f)
    params = jax.tree.map(jnp.asarray, params)

    def fn(inputs, seg, pos, gather):
        lp, am = jitted(params, inputs, seg, pos, gather)
        return np.asarray(lp), np.asarray(am)

    return fn


def evaluate(model_cfg, params, tokenizer, eval_sets: EvalSets, *, batch_size: int = 32, seq_len: int = 128,
             logprob_fn: LogprobFn | None = None) -> dict:
    """Narrow benchmark, broad suite (per category), held-out perplexity, and every item's scores.

    Args:
        model_cfg, params: the model (ignored when `logprob_fn` is given).
        tokenizer: a Hugging Face fast tokenizer.
        eval_sets: from data.evalsets.build_eval_sets.
        batch_size: packed rows per forward call.
        seq_len: targets per packed row.
        logprob_fn: a LogprobFn to use instead of the model's.

    Returns:
        {"narrow": {"score", "by_category", "margin", "by_category_margin", "acc", "acc_norm",
                    "exact_match", "n", "detail"},
         "broad": {"score", "by_category", "margin", "by_category_margin", "detail"},
         "perplexity": float,
         "items": {"narrow": ROWS, "broad": ROWS},
         "passages": {"logprob": [...], "tokens": [...]}}.
        score is acc (option log-likelihood, lm-eval style) averaged over the section's items
        (broad too: each item counts once, whatever its category's size); margin is the mean of
        LL_gold - max wrong LL; by_category* are per category (per skill for narrow). ROWS holds
        parallel lists {"item_id", "correct" (0/1), "gold_logprob", "margin"} in the order of
        eval_sets.narrow / eval_sets.broad, and passages those of eval_sets.text, so a study can
        resample items and passages.
    """
    eos, _ = special_ids(tokenizer)
    fn = logprob_fn or model_logprob_fn(model_cfg, params)
    kw = dict(eos=eos, T=seq_len, batch_rows=batch_size)
    rows = score_items(fn, list(eval_sets.narrow) + list(eval_sets.broad), tokenizer, **kw)
    n_narrow = len(eval_sets.narrow)
    narrow_rows, broad_rows = rows[:n_narrow], rows[n_narrow:]
    narrow_fam = summarize(narrow_rows, "family")
    broad_cat = summarize(broad_rows, "category")
    mean = lambda rs, m: float(np.mean([r[m] for r in rs])) if rs else float("nan")  # noqa: E731
    parts = perplexity_parts(fn, eval_sets.text, tokenizer, **kw) if eval_sets.text else []
    n_tok = sum(k for _, k in parts)
    return {
        "narrow": {
            "score": mean(narrow_rows, "acc"),
            "by_category": {k: v["acc"] for k, v in narrow_fam.items()},
            "margin": mean(narrow_rows, "margin"),
            "by_category_margin": {k: v["margin"] for k, v in narrow_fam.items()},
            "acc": mean(narrow_rows, "acc"), "acc_norm": mean(narrow_rows, "acc_norm"),
            "exact_match": mean(narrow_rows, "exact_match"), "n": len(narrow_rows), "detail": narrow_fam,
        },
        "broad": {
            "score": mean(broad_rows, "acc"),
            "by_category": {k: v["acc"] for k, v in broad_cat.items()},
            "margin": mean(broad_rows, "margin"),
            "by_category_margin": {k: v["margin"] for k, v in broad_cat.items()},
            "detail": broad_cat | {"by_family": summarize(broad_rows, "family")},
        },
        "perplexity": float(np.exp(-sum(lp for lp, _ in parts) / n_tok)) if n_tok else float("nan"),
        "items": {"narrow": _item_columns(narrow_rows), "broad": _item_columns(broad_rows)},
        "passages": {"logprob": [lp for lp, _ in parts], "tokens": [k for _, k in parts]},
    }


def _item_columns(rows: list[dict]) -> dict[str, list]:
    """Parallel per-item lists (JSON-friendly, compact) of the scores a study resamples."""
    return {"item_id": [int(r["item_id"]) for r in rows], "correct": [int(r["acc"]) for r in rows],
            "gold_logprob": [float(r["gold_logprob"]) for r in rows], "margin": [float(r["margin"]) for r in rows]}
