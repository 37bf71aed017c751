"""grain pipeline: batch contract, determinism, exact resume (also through orbax), mixing, sharding."""
import collections
import math

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bshadow_jax.config import from_dict
from bshadow_jax.data import pipeline as P
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.interventions import mixture
from bshadow_jax.data.tokenizer import get_tokenizer

T, B = 64, 4


def cfg_of(**kw) -> DataConfig:
    return from_dict(DataConfig, {"text_source": "procedural", **kw})


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(cfg_of())


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in P.BATCH_KEYS)


def test_batch_contract(tok):
    b = take(P.make_train_dataset(cfg_of(), tok, seq_len=T, batch_size=B, seed=0), 1)[0]
    assert set(b) == set(P.BATCH_KEYS)
    for k in ("inputs", "targets", "segment_ids", "positions"):
        assert b[k].dtype == np.int32 and b[k].shape == (B, T)
    assert b["loss_mask"].dtype == np.float32 and b["loss_mask"].shape == (B, T)
    # targets are inputs shifted by one within a segment
    for r in range(B):
        seg = b["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(b["inputs"][r, idx[1:]], b["targets"][r, idx[:-1]])
            assert np.array_equal(np.diff(b["positions"][r, idx]), np.ones(len(idx) - 1))
    assert b["inputs"].max() < len(tok)


def test_same_seed_same_data_other_seed_other_data(tok):
    mk = lambda seed: P.make_train_dataset(cfg_of(), tok, seq_len=T, batch_size=B, seed=seed)  # noqa: E731
    assert same(take(mk(0), 5), take(mk(0), 5))
    assert not same(take(mk(0), 5), take(mk(1), 5))


@pytest.mark.parametrize("extra", [{}, {"arm": "benchmark_aligned", "repeat_k": 3, "repeat_steps": 3},
                                   {"packing": "first_fit", "answer_only_loss": True}])
def test_resume_get_set_state_is_exact(tok, extra):
    ds = P.make_train_dataset(cfg_of(**extra), tok, seq_len=T, batch_size=B, seed=0)
    it = iter(ds)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    fresh = iter(ds)
    fresh.set_state(state)
    assert same([next(fresh) for _ in range(4)], expected)


def test_resume_through_orbax_checkpoint_manager(tok, tmp_path):
    cfg = cfg_of(arm="mixture", alpha=0.5, repeat_k=2, repeat_steps=2)
    ds = P.make_train_dataset(cfg, tok, seq_len=T, batch_size=B, seed=3)
    it = iter(ds)
    for _ in range(3):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(max_to_keep=2))
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    it2 = iter(ds)
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert same([next(it2) for _ in range(3)], expected)
    mngr.close()


def test_mixture_proportions_within_sampling_error():
    cfg = cfg_of(arm="mixture", alpha=0.4)
    plan = mixture(cfg, 0.4)
    weights = plan.stages[0][1]
    n = 3000
    it = iter(P.mixed_examples(cfg, plan, seed=0))
    counts = collections.Counter(next(it)["stream"] for _ in range(n))
    assert set(counts) == set(weights)
    for name, w in weights.items():
        assert abs(counts[name] / n - w) <= 4 * math.sqrt(w * (1 - w) / n) + 1e-9, (name, counts, weights)


def test_staged_mixture_switches_at_step(tok):
    cfg = cfg_of(benchmark_format="mc", stages=[{"start_step": 0, "weights": {"text": 1.0}},
                         {"start_step": 3, "weights": {"aligned": 1.0}}])
    batches = take(P.make_train_dataset(cfg, tok, seq_len=T, batch_size=B, seed=0), 6)
    texts = [tok.decode(b["inputs"].ravel()) for b in batches]
    assert all("Question:" not in t for t in texts[:3])
    assert all("Question:" in t for t in texts[3:])


def test_hosts_get_disjoint_shards(tok):
    # skills with large content spaces, so that natural repeats do not blur the index split
    cfg = cfg_of(arm="benchmark_aligned", benchmark_skills=["copy", "deduction"])
    plan = P.resolve_plan(cfg)
    recs = []
    for shard in range(2):
        it = iter(P.mixed_examples(cfg, plan, seed=0, shard_index=shard, shard_count=2))
        recs.append({next(it)["prompt"] for _ in range(200)})
    assert not recs[0] & recs[1]
    one = iter(P.mixed_examples(cfg, plan, seed=0))
    assert {next(one)["prompt"] for _ in range(400)} == recs[0] | recs[1]
    b0 = take(P.make_train_dataset(cfg, tok, seq_len=T, batch_size=B, seed=0, shard_index=0, shard_count=2), 2)
    b1 = take(P.make_train_dataset(cfg, tok, seq_len=T, batch_size=B, seed=0, shard_index=1, shard_count=2), 2)
    assert not same(b0, b1)


def test_answer_only_loss_masks_prompts(tok):
    cfg = cfg_of(arm="benchmark_aligned", answer_only_loss=True, packing="first_fit", benchmark_format="mc")
    b = take(P.make_train_dataset(cfg, tok, seq_len=128, batch_size=B, seed=0), 1)[0]
    eos = tok.eos_token_id
    for r in range(B):
        for s in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
            idx = np.flatnonzero(b["segment_ids"][r] == s)
            on = idx[b["loss_mask"][r, idx] > 0]
            # the loss covers exactly the answer letter and the end token of each example
            assert tok.decode(b["targets"][r, on]).startswith(" ") and b["targets"][r, on[-1]] == eos
            assert len(on) == 2
    assert np.all(b["loss_mask"][b["segment_ids"] == 0] == 0)
