"""Data pipeline throughput against what training consumes.

    python benchmarks/data_throughput.py                       # default mixture, measured training step
    python benchmarks/data_throughput.py --arm benchmark_aligned --train-tokens-per-s 5000

Prints batches/s and tokens/s of `make_train_dataset` (one host, synchronous), the tokens/s of a
jitted forward+backward step of a small Llama on the same batch shape (or the figure given with
--train-tokens-per-s), and their ratio. The pipeline must stay >= 10x ahead of training.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def pipeline_rate(data_cfg, tok, *, seq_len: int, batch_size: int, batches: int) -> tuple[float, float]:
    from bshadow_jax.data.pipeline import make_train_dataset

    it = iter(make_train_dataset(data_cfg, tok, seq_len=seq_len, batch_size=batch_size, seed=0))
    next(it)  # first batch pays one-off costs (eval n-gram table, text corpus)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    return batches / dt, batches * batch_size * seq_len / dt


def train_rate(vocab: int, *, seq_len: int, batch_size: int, hidden: int, layers: int, steps: int = 5) -> float:
    """Tokens/s of a jitted loss+grad step (forward and backward; optimizer update excluded)."""
    import jax
    import jax.numpy as jnp

    from bshadow_jax.models import LlamaConfig, forward, init_params

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(hidden // 32, 1), num_key_value_heads=max(hidden // 32, 1),
                      tie_word_embeddings=True, max_position_embeddings=max(seq_len, 256))
    params = init_params(cfg, jax.random.key(0))

    def loss(p, x, y):
        logp = jax.nn.log_softmax(forward(cfg, p, x), -1)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))

    step = jax.jit(jax.grad(loss))
    x = jnp.zeros((batch_size, seq_len), jnp.int32)
    jax.block_until_ready(step(params, x, x))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x, x))
        times.append(time.perf_counter() - t0)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"training step: {n / 1e6:.2f}M params, median {np.median(times) * 1e3:.0f} ms/step")
    return batch_size * seq_len / float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", default="coverage_expanding")
    ap.add_argument("--text-source", default="procedural")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--train-tokens-per-s", type=float, default=0.0, help="skip measuring the training step")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    from bshadow_jax.config import from_dict
    from bshadow_jax.data.config import DataConfig
    from bshadow_jax.data.tokenizer import get_tokenizer

    cfg = from_dict(DataConfig, {"arm": args.arm, "text_source": args.text_source})
    tok = get_tokenizer(cfg)
    bps, tps = pipeline_rate(cfg, tok, seq_len=args.seq_len, batch_size=args.batch_size, batches=args.batches)
    print(f"pipeline ({args.arm}, {args.batch_size}x{args.seq_len}): {bps:.1f} batches/s, {tps:,.0f} tokens/s")
    train_tps = args.train_tokens_per_s or train_rate(len(tok), seq_len=args.seq_len, batch_size=args.batch_size,
                                                      hidden=args.hidden, layers=args.layers)
    print(f"training consumes: {train_tps:,.0f} tokens/s")
    ratio = tps / train_tps
    print(f"ratio pipeline/training: {ratio:.1f}x ({'OK' if ratio >= 10 else 'BELOW'} the 10x target)")


if __name__ == "__main__":
    main()
