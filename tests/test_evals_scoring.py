"""Eval scoring: option log-likelihood (acc, acc_norm), exact match, perplexity, packing invariance."""
import jax
import numpy as np
import pytest

from bshadow_jax.config import from_dict
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.tokenizer import get_tokenizer
from bshadow_jax.data.evalsets import EvalItem, build_eval_sets
from bshadow_jax.evals import evaluate, perplexity, score_items
from bshadow_jax.evals import scoring


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(from_dict(DataConfig, {"text_source": "procedural"}))


def enc(tok, s):
    return tok.encode(s, add_special_tokens=False)


def fake_fn(logp_of_id, argmax="targets"):
    """A LogprobFn where log p(token) depends only on the token id (a context-free 'model')."""
    def fn(inputs, seg, pos, gather, branch=None):
        lp = logp_of_id(gather).astype(np.float32)
        if argmax == "targets":
            am = gather[..., 0]
        else:
            am = np.zeros(inputs.shape, np.int32)
        return lp, am
    return fn


ITEMS = [
    EvalItem("Q: pick one\nA:", (" apple", " banana split", " kiwi", " fig"), 2, "c1", "f1", "qa", 1),
    EvalItem("Question: x\nA. a\nB. b\nC. c\nD. d\nAnswer:", (" A", " B", " C", " D"), 1, "c1", "f2", "mc", 2),
    EvalItem("The sum is", (" 12.", " 7.", " 100.", " 3."), 0, "c2", "f3", "sentence", 3),
] * 7  # several per row: exercises packing bookkeeping


def test_option_loglikelihood_matches_hand_computation(tok):
    weight = lambda ids: -(ids % 97) / 10.0  # noqa: E731  arbitrary per-token log-probs
    rows = score_items(fake_fn(weight), ITEMS, tok, eos=tok.eos_token_id, T=48, batch_rows=4)
    assert len(rows) == len(ITEMS)
    for it, r in zip(ITEMS, rows):
        ll = [float(weight(np.asarray(enc(tok, o))).sum()) for o in it.options]
        np.testing.assert_allclose(r["ll"], ll, rtol=1e-5, atol=1e-5)
        assert r["acc"] == float(int(np.argmax(ll)) == it.gold)
        norm = np.asarray(ll) / np.asarray([len(o.encode()) for o in it.options])
        assert r["acc_norm"] == float(int(np.argmax(norm)) == it.gold)


def test_exact_match_is_teacher_forced_greedy(tok):
    perfect = score_items(fake_fn(lambda ids: -np.ones(ids.shape)), ITEMS, tok, eos=tok.eos_token_id, T=48,
                          batch_rows=4)
    assert all(r["exact_match"] == 1.0 for r in perfect)
    wrong = score_items(fake_fn(lambda ids: -np.ones(ids.shape), argmax="zeros"), ITEMS, tok,
                        eos=tok.eos_token_id, T=48, batch_rows=4)
    assert all(r["exact_match"] == 0.0 for r in wrong)


def test_known_answer_model_scores_one(tok):
    favoured = {t for it in ITEMS for t in enc(tok, it.options[it.gold])}
    for it in ITEMS:  # precondition: every wrong option has a token the fake model dislikes
        assert all(set(enc(tok, o)) - favoured for k, o in enumerate(it.options) if k != it.gold)
    fn = fake_fn(lambda ids: np.where(np.isin(ids, list(favoured)), 0.0, -5.0))
    rows = score_items(fn, ITEMS, tok, eos=tok.eos_token_id, T=48, batch_rows=4)
    assert np.mean([r["acc"] for r in rows]) == 1.0
    flipped = score_items(fake_fn(lambda ids: np.where(np.isin(ids, list(favoured)), -5.0, 0.0)), ITEMS, tok,
                          eos=tok.eos_token_id, T=48, batch_rows=4)
    assert np.mean([r["acc"] for r in flipped]) == 0.0


def test_perplexity_of_uniform_model_is_vocab_size(tok):
    V = len(tok)
    fn = fake_fn(lambda ids: np.full(ids.shape, -np.log(V)))
    ppl = perplexity(fn, ["some held out words " * 30, "more text"], tok, eos=tok.eos_token_id, T=32, batch_rows=3)
    assert np.isclose(ppl, V, rtol=1e-5)


def tiny_model(vocab):
    from bshadow_jax.models import LlamaConfig, init_params

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)  # sharper, less uniform logits
    return cfg, params


def test_packed_scores_equal_unpacked_forward(tok):
    from bshadow_jax.models import forward

    cfg, params = tiny_model(len(tok))
    fn = scoring.model_logprob_fn(cfg, params)
    rows = score_items(fn, ITEMS[:3], tok, eos=tok.eos_token_id, T=64, batch_rows=2)
    eos = tok.eos_token_id
    # reference: one unpacked sequence per row, right-padded (causal: padding cannot leak backwards)
    seqs = [[eos, *enc(tok, it.context), *enc(tok, o)] for it in ITEMS[:3] for o in it.options]
    L = max(map(len, seqs))
    toks = np.zeros((len(seqs), L), np.int32)
    for i, q in enumerate(seqs):
        toks[i, : len(q)] = q
    logits = np.asarray(jax.jit(forward, static_argnums=0)(cfg, params, toks)).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    i = 0
    for it, r in zip(ITEMS[:3], rows):
        ref = []
        for o in it.options:
            n_opt, q = len(enc(tok, o)), seqs[i]
            pos = np.arange(len(q) - 1 - n_opt, len(q) - 1)
            ref.append(float(logp[i, pos, np.asarray(q[1:])[pos]].sum()))
            i += 1
        np.testing.assert_allclose(r["ll"], ref, rtol=1e-4, atol=1e-3)


def test_branch_mask_shares_the_trunk_and_separates_branches():
    from bshadow_jax.models import LlamaConfig
    from bshadow_jax.models.llama import attention_mask

    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                      num_key_value_heads=1)
    seg = np.asarray([[1, 1, 1, 1, 1, 1, 2, 2, 0]])
    branch = np.asarray([[0, 0, 1, 1, 2, 3, 0, 1, 0]])  # segment 1: trunk of 2, branches of 2, 1 and 1 tokens
    pos = np.asarray([[0, 1, 2, 3, 2, 2, 0, 1, 0]])
    got = np.asarray(attention_mask(cfg, seg, branch, pos))[0].astype(int)
    want = np.asarray([
        [1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0, 0],  # branch 2 sees the trunk and itself, not branch 1
        [1, 1, 0, 0, 0, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0, 0],  # a new segment starts fresh
        [0, 0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1],  # padding sees itself
    ])
    np.testing.assert_array_equal(got, want)
    plain = np.asarray(attention_mask(cfg, seg))[0]
    np.testing.assert_array_equal(np.asarray(attention_mask(cfg, seg, np.zeros_like(seg), pos))[0], plain)


def test_shared_context_layout_is_used_and_matches_one_sequence_per_option(tok):
    cfg, params = tiny_model(len(tok))
    fn = scoring.model_logprob_fn(cfg, params)
    eos = tok.eos_token_id
    multi = [it for it in ITEMS[:3] if scoring._build_item_seqs(it, tok, eos, 64)[1]["mode"] != "single"]
    assert [scoring._build_item_seqs(it, tok, eos, 64)[1]["mode"] for it in multi] == ["shared", "shared"]
    shared = score_items(fn, multi, tok, eos=eos, T=64, batch_rows=2)
    # each item again in a row too short for the shared layout but long enough for each option alone
    for it, a in zip(multi, shared):
        T = 1 + len(enc(tok, it.context)) + max(len(enc(tok, o)) for o in it.options) + 1
        assert scoring._build_item_seqs(it, tok, eos, T)[1]["mode"] == "multi"
        (b,) = score_items(fn, [it], tok, eos=eos, T=T, batch_rows=2)
        np.testing.assert_allclose(a["ll"], b["ll"], rtol=1e-5, atol=1e-4)
        assert a["acc"] == b["acc"] and a["exact_match"] == b["exact_match"]


def test_evaluate_structure(tok):
    cfg, params = tiny_model(len(tok))
    sets = build_eval_sets(from_dict(DataConfig, {"text_source": "procedural"}), n_narrow_per_skill=4,
                           n_other_per_skill=1, n_bench_other_per_skill=2, n_compositional=3, n_text=2)
    res = evaluate(cfg, params, tok, sets, batch_size=8)
    assert set(res) == {"narrow", "broad", "perplexity", "items", "passages"}
    assert set(res["narrow"]["by_category"]) == set(sets.metadata["benchmark_skills"])
    assert set(res["broad"]["by_category"]) == {"other_skills", "bench_skills_other_formats", "compositional"}
    for part in ("narrow", "broad"):
        assert 0.0 <= res[part]["score"] <= 1.0
    assert np.isfinite(res["perplexity"]) and res["perplexity"] > 1
    again = evaluate(cfg, params, tok, sets, batch_size=8)
    assert again == res


def test_long_contexts_are_cut_from_the_left(tok):
    weight = lambda ids: -(ids % 89) / 7.0  # noqa: E731  context-free: LL does not depend on the context
    long_item = EvalItem("word " * 80 + "\nA:", (" apple", " banana split", " kiwi", " fig"), 1, "c", "f", "qa", 9)
    long_mc = EvalItem("word " * 80 + "\nAnswer:", (" A", " B", " C", " D"), 3, "c", "f", "mc", 10)
    rows = score_items(fake_fn(weight), [long_item, long_mc], tok, eos=tok.eos_token_id, T=16, batch_rows=2)
    for it, r in zip([long_item, long_mc], rows):
        ll = [float(weight(np.asarray(enc(tok, o))).sum()) for o in it.options]
        np.testing.assert_allclose(r["ll"], ll, rtol=1e-5, atol=1e-5)


def test_margin_and_gold_logprob_match_hand_computation(tok):
    weight = lambda ids: -(ids % 97) / 10.0  # noqa: E731
    rows = score_items(fake_fn(weight), ITEMS, tok, eos=tok.eos_token_id, T=48, batch_rows=4)
    for it, r in zip(ITEMS, rows):
        ll = [float(weight(np.asarray(enc(tok, o))).sum()) for o in it.options]
        best_wrong = max(x for k, x in enumerate(ll) if k != it.gold)
        np.testing.assert_allclose(r["gold_logprob"], ll[it.gold], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(r["margin"], ll[it.gold] - best_wrong, rtol=1e-5, atol=1e-5)
        assert (r["margin"] > 0) == (r["acc"] == 1.0)
        assert r["item_id"] == it.item_id and r["skill"] == it.family
    assert {r["margin"] > 0 for r in rows} == {True, False}  # the weights give both signs: the check can fail


def test_perplexity_is_exp_of_its_parts(tok):
    weight = lambda ids: -(ids % 13) / 5.0 - 0.1  # noqa: E731  token-dependent, so passages differ
    passages = ["some held out words " * 30, "more text", "a third passage, of middling length " * 4]
    kw = dict(eos=tok.eos_token_id, T=32, batch_rows=3)
    parts = scoring.perplexity_parts(fake_fn(weight), passages, tok, **kw)
    assert len(parts) == len(passages)
    for p, (lp, n) in zip(passages, parts):
        ids = np.asarray([tok.eos_token_id, *enc(tok, p)])[1:]  # every token after the leading eos is a target
        assert n == len(ids)
        np.testing.assert_allclose(lp, float(weight(ids).sum()), rtol=1e-5)
    ppl = perplexity(fake_fn(weight), passages, tok, **kw)
    np.testing.assert_allclose(ppl, np.exp(-sum(lp for lp, _ in parts) / sum(n for _, n in parts)), rtol=1e-6)
    assert scoring.perplexity_parts(fake_fn(weight), [], tok, **kw) == []


def test_evaluate_keeps_every_item_and_broad_score_is_the_item_mean(tok):
    sets = build_eval_sets(from_dict(DataConfig, {"text_source": "procedural"}), n_narrow_per_skill=3,
                           n_other_per_skill=1, n_bench_other_per_skill=2, n_compositional=7, n_text=3)
    weight = lambda ids: -(ids % 97) / 10.0  # noqa: E731
    fn = fake_fn(weight)
    res = evaluate(None, None, tok, sets, batch_size=8, logprob_fn=fn)
    rows = score_items(fn, list(sets.broad), tok, eos=tok.eos_token_id, T=128, batch_rows=8)
    items = res["items"]["broad"]
    assert items["item_id"] == [it.item_id for it in sets.broad]
    assert items["correct"] == [int(r["acc"]) for r in rows]
    np.testing.assert_allclose(items["margin"], [r["margin"] for r in rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(items["gold_logprob"], [r["gold_logprob"] for r in rows], rtol=1e-5, atol=1e-5)
    assert np.isclose(res["broad"]["score"], np.mean(items["correct"]))
    # the categories differ in size and accuracy, so the item mean is not the mean of category means
    cat_mean = np.mean(list(res["broad"]["by_category"].values()))
    assert not np.isclose(res["broad"]["score"], cat_mean)
    assert np.isclose(res["broad"]["margin"], np.mean(items["margin"]))
    assert np.isclose(res["narrow"]["margin"], np.mean(res["items"]["narrow"]["margin"]))
    assert set(res["narrow"]["by_category_margin"]) == set(sets.metadata["benchmark_skills"])
    assert set(res["broad"]["by_category_margin"]) == set(res["broad"]["by_category"])
    assert res["items"]["narrow"]["item_id"] == [it.item_id for it in sets.narrow]
    lp, n = res["passages"]["logprob"], res["passages"]["tokens"]
    assert len(lp) == len(n) == len(sets.text)
    assert np.isclose(res["perplexity"], np.exp(-sum(lp) / sum(n)))
    assert np.isclose(res["perplexity"], perplexity(fn, sets.text, tok, eos=tok.eos_token_id, T=128, batch_rows=8))
