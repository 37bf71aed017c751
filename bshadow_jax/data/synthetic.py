"""A built-in synthetic token stream: deterministic, checkpointable, no tokenizer needed.

Used by tests and benchmarks to exercise training without the data pipeline's cost. Each
row packs two segments of a noisy repeating pattern (so the loss can fall), with the
loss masked on the first quarter of each segment, like a prompt under answer-only loss.
"""
from __future__ import annotations

import grain
import numpy as np


def synthetic_batch(index: int, *, vocab_size: int, seq_len: int, batch_size: int, seed: int, shard_index: int = 0):
    rng = np.random.default_rng([seed, shard_index, index])
    period = rng.integers(3, 9, size=(batch_size, 1))
    start = rng.integers(0, vocab_size, size=(batch_size, 1))
    t = np.arange(seq_len + 1)[None, :]
    stream = (start + (t % period) * 7) % vocab_size
    noise = rng.random((batch_size, seq_len + 1)) < 0.1
    stream = np.where(noise, rng.integers(0, vocab_size, size=stream.shape), stream).astype(np.int32)
    cut = seq_len // 2
    seg = np.where(np.arange(seq_len) < cut, 1, 2).astype(np.int32)
    pos = np.where(seg == 1, np.arange(seq_len), np.arange(seq_len) - cut).astype(np.int32)
    mask = (pos >= max(1, cut // 4)).astype(np.float32)
    rows = lambda x: np.broadcast_to(x, (batch_size, seq_len)).copy()  # noqa: E731
    return {
        "inputs": stream[:, :-1],
        "targets": stream[:, 1:],
        "segment_ids": rows(seg),
        "positions": rows(pos),
        "loss_mask": rows(mask),
    }


def make_synthetic_dataset(*, vocab_size: int, seq_len: int, batch_size: int, seed: int = 0,
                           shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """Endless grain IterDataset of batch dicts (batch_size rows for this host)."""
    del shard_count  # every shard draws from its own seeded stream
    fn = lambda i: synthetic_batch(  # noqa: E731
        int(i), vocab_size=vocab_size, seq_len=seq_len, batch_size=batch_size, seed=seed, shard_index=shard_index
    )
    return grain.MapDataset.range(0, 1 << 40).map(fn).to_iter_dataset()
