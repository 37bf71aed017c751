"""Option log-likelihood scoring (as lm-evaluation-harness scores multiple choice) and perplexity.

For an item with context c and options o_k, LL_k = sum_t log p(o_k[t] | c, o_k[<t]);
acc = [argmax_k LL_k == gold], acc_norm = [argmax_k LL_k / bytes(o_k) == gold], and the continuous
margin = LL_gold - max_{k != gold} LL_k (positive iff acc = 1, ties aside). Exact match is
greedy decoding of the gold answer followed by the end token, computed teacher-forced in the same
forward pass: greedy decoding emits the gold sequence iff every gold token is the argmax given the
gold prefix. When every option is one token (lettered multiple choice), one sequence scores all
options at once; when an item fits in one row, its context is read once and each option is a
branch that attends to the context and to itself (models.attention_mask's branch ids), instead of
one sequence per option.

Sequences are packed into fixed [rows, T] arrays with segment ids (attention stays within a
sequence), so the jitted log-prob function compiles once per (model, T, rows). The packing does
not depend on the model: `evaluate` builds it once for a set of items and reuses it for every
model it scores on them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import numpy as np

from bshadow_jax.data.evalsets import EvalItem, EvalSets
from bshadow_jax.data.tokenizer import special_ids
from bshadow_jax.models import forward

K_GATHER = 5  # ids gathered per position: the target, then up to 4 options' (first) tokens

# (inputs, segment_ids, positions, gather_ids[B,T,K], branch_ids) -> (logp[B,T,K], argmax[B,T]) as numpy;
# gather_ids[..., 0] is the target token, the other slots hold options' tokens (or copies of the target);
# branch_ids (models.attention_mask) are 0 outside the shared-context layout
LogprobFn = Callable[..., tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class _Seq:
    """One sequence of a packed row: inputs[i] is read at positions[i] and predicts targets[i]."""
    inputs: list[int]
    targets: list[int]
    positions: list[int] | None = None  # default 0..n-1
    branch: list[int] | None = None  # default 0 (one causal sequence); see models.attention_mask
    alt: tuple[int, list[int]] | None = None  # (index, ids) also scored at that one position
    row: int = -1
    offset: int = 0


def _causal(tokens: list[int], alt: tuple[int, list[int]] | None = None) -> _Seq:
    """[sep] context continuation...: every token predicts the next."""
    return _Seq(tokens[:-1], tokens[1:], alt=alt)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids if text else []


def _keep_last(ids: list[int], n: int) -> list[int]:
    """The last n context tokens (long contexts lose their beginning, as in lm-eval)."""
    return ids[max(len(ids) - n, 0) :] if n > 0 else []


def _build_item_seqs(item: EvalItem, tokenizer, eos: int, T: int) -> tuple[list[_Seq], dict]:
    """An item's sequences and how to read its options' log-likelihoods from them.

    Three layouts, all scoring the same quantities:
      single: every option is one token; one sequence, the options gathered at one position;
      shared: the context once, then each option as its own branch (attending to the context and
              to itself only), when it all fits in T; about a third of the tokens of one sequence
              per option for short-answer items;
      multi: one causal sequence per option, the context cut from the left to fit.
    """
    ctx = _encode(tokenizer, item.context)
    opts = [_encode(tokenizer, o) for o in item.options]
    fits_gather = len(opts) <= K_GATHER - 1
    gold = opts[item.gold]
    if fits_gather and all(len(o) == 1 for o in opts):
        ids = [o[0] for o in opts]
        room = T - len(gold) - 1  # inputs hold sep + ctx + gold (the trailing eos is a target only)
        c = _keep_last(ctx, room - 1)
        return [_causal([eos, *c, *gold, eos], (len(c), ids))], {"mode": "single", "pos": len(c), "n": len(ids)}
    if fits_gather and all(opts) and 1 + len(ctx) + sum(map(len, opts)) <= T:
        m = len(ctx)  # the trunk's last input (the sep when there is no context) predicts each option's first token
        inputs, targets = [eos, *ctx], [*ctx, gold[0]]
        positions, branch, starts = list(range(m + 1)), [0] * (m + 1), []
        for k, o in enumerate(opts):
            starts.append(len(inputs))
            inputs += o
            targets += [*o[1:], eos]  # each branch ends predicting the end token (read for gold only)
            positions += range(m + 1, m + 1 + len(o))
            branch += [k + 1] * len(o)
        seq = _Seq(inputs, targets, positions, branch, alt=(m, [o[0] for o in opts]))
        return [seq], {"mode": "shared", "last": m, "starts": starts, "lens": [len(o) for o in opts]}
    seqs = []
    for k, o in enumerate(opts):
        tail = o + [eos] if k == item.gold else o
        c = _keep_last(ctx, T - len(tail) - 1)
        seqs.append(_causal([eos, *c, *tail]))
    return seqs, {"mode": "multi", "lens": [len(o) for o in opts]}


def pack(seqs: Sequence[_Seq], T: int) -> int:
    """First-fit-decreasing packing into rows of T targets; sets seq.row/offset; returns the row count."""
    fill: list[int] = []
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i].inputs)):
        s = seqs[i]
        n = len(s.inputs)
        if n > T:
            raise ValueError(f"sequence of {n} targets exceeds T={T}")
        row = next((r for r, f in enumerate(fill) if f + n <= T), len(fill))
        if row == len(fill):
            fill.append(0)
        s.row, s.offset = row, fill[row]
        fill[row] += n
    return len(fill)


class Packed(NamedTuple):
    """Sequences packed into fixed-shape rows (model-independent: built once, scored by many models)."""
    rows: int  # rows that hold sequences (the arrays are padded to a multiple of the batch)
    inputs: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    gather: np.ndarray
    branch: np.ndarray


def pack_arrays(seqs: Sequence[_Seq], *, T: int, batch_rows: int) -> Packed:
    """Pack `seqs` (setting each one's row and offset) into arrays padded to a multiple of batch_rows."""
    rows = pack(seqs, T)
    total = rows + (-rows) % batch_rows
    inputs = np.zeros((total, T), np.int32)
    seg = np.zeros((total, T), np.int32)
    pos = np.zeros((total, T), np.int32)
    gather = np.zeros((total, T, K_GATHER), np.int32)
    branch = np.zeros((total, T), np.int32)
    counts = np.zeros(total, np.int32)
    for s in seqs:
        n = len(s.inputs)
        sl = slice(s.offset, s.offset + n)
        counts[s.row] += 1
        inputs[s.row, sl] = s.inputs
        seg[s.row, sl] = counts[s.row]
        pos[s.row, sl] = np.arange(n) if s.positions is None else s.positions
        gather[s.row, sl] = np.asarray(s.targets, np.int32)[:, None]
        if s.branch is not None:
            branch[s.row, sl] = s.branch
        if s.alt is not None:
            j, ids = s.alt
            gather[s.row, s.offset + j, 1 : 1 + len(ids)] = ids
    return Packed(rows, inputs, seg, pos, gather, branch)


def run_packed(fn: LogprobFn, packed: Packed, *, batch_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Run `fn` over the packed rows in batches of batch_rows; returns (logp[R,T,K], argmax[R,T])."""
    lps, ams = [], []
    for b in range(0, packed.inputs.shape[0], batch_rows):
        sl = slice(b, b + batch_rows)
        lp, am = fn(packed.inputs[sl], packed.segment_ids[sl], packed.positions[sl], packed.gather[sl],
                    packed.branch[sl])
        lps.append(np.asarray(lp))
        ams.append(np.asarray(am))
    return np.concatenate(lps)[: packed.rows], np.concatenate(ams)[: packed.rows]


class ItemPlan(NamedTuple):
    """Items laid out for scoring: per item (first sequence, sequence count, layout), and the packing."""
    seqs: list[_Seq]
    plans: list[tuple[int, int, dict]]
    packed: Packed


def plan_items(items: Sequence[EvalItem], tokenizer, *, eos: int, T: int, batch_rows: int) -> ItemPlan:
    """The model-independent half of score_items: tokenize, lay out and pack the items."""
    all_seqs, plans = [], []
    for it in items:
        seqs, info = _build_item_seqs(it, tokenizer, eos, T)
        plans.append((len(all_seqs), len(seqs), info))
        all_seqs += seqs
    return ItemPlan(all_seqs, plans, pack_arrays(all_seqs, T=T, batch_rows=batch_rows))


def _item_ll(seqs: list[_Seq], info: dict, gold: int, logp: np.ndarray, amax: np.ndarray) -> tuple[list[float], bool]:
    """An item's option log-likelihoods and whether greedy decoding gives its gold answer."""
    if info["mode"] == "single":
        s = seqs[0]
        p = s.offset + info["pos"]
        ll = [float(x) for x in logp[s.row, p, 1 : 1 + info["n"]]]
        em = bool(amax[s.row, p] == s.targets[info["pos"]] and amax[s.row, p + 1] == s.targets[info["pos"] + 1])
        return ll, em
    if info["mode"] == "shared":
        s = seqs[0]
        last = s.offset + info["last"]
        ll, em = [], False
        for k, (start, L) in enumerate(zip(info["starts"], info["lens"])):
            a = s.offset + start
            ll.append(float(logp[s.row, last, 1 + k] + logp[s.row, a : a + L - 1, 0].sum()))
            if k == gold:  # the first token from the trunk, then the branch's own tokens and the end token
                em = bool(amax[s.row, last] == s.targets[info["last"]]
                          and np.all(amax[s.row, a : a + L] == np.asarray(s.targets[start : start + L])))
        return ll, em
    ll, em = [], False
    for k, (s, L) in enumerate(zip(seqs, info["lens"])):
        n_t = len(s.inputs)
        extra = 1 if k == gold else 0  # gold carries the end token (exact match only)
        first = s.offset + n_t - L - extra
        ll.append(float(logp[s.row, first : first + L, 0].sum()))
        if k == gold:
            tgt = np.asarray(s.targets[n_t - L - extra :])
            em = bool(np.all(amax[s.row, first : first + L + extra] == tgt))
    return ll, em


def score_plan(fn: LogprobFn, items: Sequence[EvalItem], plan: ItemPlan, *, batch_rows: int) -> list[dict]:
    """score_items on a plan_items layout of the same items."""
    if not plan.seqs:
        return []
    logp, amax = run_packed(fn, plan.packed, batch_rows=batch_rows)
    out = []
    for it, (start, n, info) in zip(items, plan.plans):
        ll, em = _item_ll(plan.seqs[start : start + n], info, it.gold, logp, amax)
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
    plan = plan_items(items, tokenizer, eos=eos, T=T, batch_rows=batch_rows)
    return score_plan(fn, items, plan, batch_rows=batch_rows)


def _passage_seqs(passages: Sequence[str], tokenizer, eos: int, T: int) -> tuple[list[_Seq], list[int]]:
    seqs, owner = [], []
    for i, p in enumerate(passages):
        toks = [eos, *_encode(tokenizer, p)]
        for a in range(0, len(toks) - 1, T):
            seqs.append(_causal(toks[a : a + T + 1]))
            owner.append(i)
    return seqs, owner


def _passage_parts(fn: LogprobFn, n_passages: int, seqs: list[_Seq], owner: list[int], packed: Packed | None, *,
                   batch_rows: int) -> list[tuple[float, int]]:
    parts = [[0.0, 0] for _ in range(n_passages)]
    if seqs:
        logp, _ = run_packed(fn, packed, batch_rows=batch_rows)
        for i, s in zip(owner, seqs):
            n = len(s.inputs)
            parts[i][0] += float(logp[s.row, s.offset : s.offset + n, 0].sum())
            parts[i][1] += n
    return [(float(lp), int(n)) for lp, n in parts]


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
    seqs, owner = _passage_seqs(passages, tokenizer, eos, T)
    packed = pack_arrays(seqs, T=T, batch_rows=batch_rows) if seqs else None
    return _passage_parts(fn, len(passages), seqs, owner, packed, batch_rows=batch_rows)


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
        def f(params, inputs, seg, pos, gather, branch):
            logits = forward(model_cfg, params, inputs, seg, pos, compute_dtype=jnp.dtype(compute_dtype),
                             branch_ids_BxT=branch)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return jnp.take_along_axis(logp, gather, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)

        jitted = _FN_CACHE[key] = jax.jit(f)
    params = jax.tree.map(jnp.asarray, params)

    def fn(inputs, seg, pos, gather, branch=None):
        lp, am = jitted(params, inputs, seg, pos, gather, np.zeros_like(inputs) if branch is None else branch)
        return np.asarray(lp), np.asarray(am)

    return fn


class _SetsPlan(NamedTuple):
    items: ItemPlan
    passages: tuple[list[_Seq], list[int], Packed | None]


# The last eval sets' layout: a study scores every base and fine-tune on one EvalSets object, so the
# tokenizing and packing are done once. The entry holds the sets and tokenizer themselves, so an
# identity check cannot match a new object that reuses a freed one's id.
_LAST_PLAN: list[tuple[EvalSets, object, tuple[int, int, int], _SetsPlan]] = []


def _sets_plan(eval_sets: EvalSets, tokenizer, *, eos: int, T: int, batch_rows: int) -> _SetsPlan:
    for sets, tok, key, plan in _LAST_PLAN:
        if sets is eval_sets and tok is tokenizer and key == (eos, T, batch_rows):
            return plan
    items = plan_items(list(eval_sets.narrow) + list(eval_sets.broad), tokenizer, eos=eos, T=T, batch_rows=batch_rows)
    seqs, owner = _passage_seqs(eval_sets.text, tokenizer, eos, T)
    plan = _SetsPlan(items, (seqs, owner, pack_arrays(seqs, T=T, batch_rows=batch_rows) if seqs else None))
    _LAST_PLAN[:] = [(eval_sets, tokenizer, (eos, T, batch_rows), plan)]
    return plan


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
    plan = _sets_plan(eval_sets, tokenizer, eos=eos, T=seq_len, batch_rows=batch_size)
    rows = score_plan(fn, list(eval_sets.narrow) + list(eval_sets.broad), plan.items, batch_rows=batch_size)
    n_narrow = len(eval_sets.narrow)
    narrow_rows, broad_rows = rows[:n_narrow], rows[n_narrow:]
    narrow_fam = summarize(narrow_rows, "family")
    broad_cat = summarize(broad_rows, "category")
    mean = lambda rs, m: float(np.mean([r[m] for r in rs])) if rs else float("nan")  # noqa: E731
    parts = _passage_parts(fn, len(eval_sets.text), *plan.passages, batch_rows=batch_size)
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
