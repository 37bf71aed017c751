"""Training throughput: tokens/s and MFU of the jitted train step, against baselines in the same process.

  python benchmarks/train_throughput.py [--config configs/smoke.yaml] [--steps 20] [--batch-size B] [--seq-len T]
                                       [--seeds 1,3]

Times every system once per round, back to back, for --rounds rounds, and prints per-round medians
and the median of the per-round ratios (this machine's speed drifts by 2x within minutes), for:
  * our jitted train step (AdamW, clipping, masked CE; the config's compute dtype and remat), one device;
    with --seeds S > 1, S models (different seeds) vmapped through one step (tokens/s counts all S);
  * a jitted float32 1024^3 matmul: the roofline MFU is quoted against (same process, same moment);
  * a PyTorch eager CPU step of the same architecture/batch/optimizer
    (transformers LlamaForCausalLM + torch.optim.AdamW, masked CE, grad clipping).
Model FLOPs per token = 6 * N_matmul + 12 * L * (H * hd) * T  (forward + backward; N_matmul counts every
matmul weight including the LM head, not the embedding gather; attention FLOPs counted for the full T x T
square, as PaLM's MFU definition does).
Goals (issue 6): MFU >= 50% on the default CPU model and >= 1.25x PyTorch tokens/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_time(fn, *, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_roofline(n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of a jitted float32 n x n matmul (2 n^3 FLOPs)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    sec = _median_time(lambda: f(a, b).block_until_ready(), warmup=3, reps=reps)
    return 2 * n**3 / sec


def setup_jax(train_cfg, model_cfg, batch_size: int, seq_len: int, seeds: int = 1):
    """(one timed step, compile seconds) of the jitted, donated train step; seeds > 1: that many models vmapped."""
    import jax
    import numpy as np

    from bshadow_jax.data.synthetic import synthetic_batch
    from bshadow_jax.models.llama import init_params
    from bshadow_jax.training.compiled import compile_train_step
    from bshadow_jax.training.mesh import make_mesh
    from bshadow_jax.training.optim import make_optimizer
    from bshadow_jax.training.state import init_state
    from bshadow_jax.training.step import make_train_step, remat_compiler_options

    tx, schedule = make_optimizer(train_cfg.optim, 10_000)
    tc = train_cfg.train
    kw = dict(compute_dtype=tc.compute_dtype, grad_accum=tc.grad_accum, remat=tc.remat)
    jit_kw = dict(donate_argnums=0, compiler_options=remat_compiler_options(tc.remat, jax.devices()[0].platform))

    def batch(i, seed):
        return synthetic_batch(i, vocab_size=model_cfg.vocab_size, seq_len=seq_len, batch_size=batch_size, seed=seed)

    if seeds == 1:  # exactly the step `bshadow train` runs
        mesh = make_mesh(train_cfg.mesh, batch_size=batch_size, grad_accum=tc.grad_accum)
        prog = compile_train_step(model_cfg, train_cfg.optim, steps=10_000, mesh=mesh, **kw)
        state, step = prog.init_random(jax.random.key(0), 0), prog.step_fn
        batches = [jax.device_put(batch(i, 0)) for i in range(4)]
    else:
        # S models vmapped through one step (tried for the studies' arms x seeds; slower per token
        # than one model on XLA:CPU, see RESULTS.md, so the library does not use it)
        states = [init_state(init_params(model_cfg, jax.random.key(s)), tx, s) for s in range(seeds)]
        state = jax.tree.map(lambda *xs: np.stack(xs), *states)
        step = jax.jit(jax.vmap(make_train_step(model_cfg, tx, schedule, **kw)), **jit_kw)
        batches = [jax.device_put({k: np.stack([batch(i, s)[k] for s in range(seeds)]) for k in batch(i, 0)})
                   for i in range(4)]
    t = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    box = {"state": state, "i": 0}

    def one():
        box["i"] += 1
        box["state"], m = step(box["state"], batches[box["i"] % 4])
        m["loss"].block_until_ready()

    return one, compile_s


def setup_torch(train_cfg, model_cfg, batch_size: int, seq_len: int):
    """One timed PyTorch eager step (closure) of the same architecture, batch and optimizer."""
    import numpy as np
    import torch
    import transformers

    from bshadow_jax.models import config_to_hf_dict
    from bshadow_jax.data.synthetic import synthetic_batch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf = config_to_hf_dict(model_cfg)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_cfg).float().train()
    o = train_cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    batches = []
    for i in range(4):
        b = synthetic_batch(i, vocab_size=model_cfg.vocab_size, seq_len=seq_len, batch_size=batch_size, seed=0)
        batches.append({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()})
    box = {"i": 0}

    def one():
        box["i"] += 1
        b = batches[box["i"] % 4]
        logits = model(input_ids=b["inputs"].long(), position_ids=b["positions"].long()).logits
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["targets"].long().flatten(), reduction="none")
        loss = (ce * b["loss_mask"].flatten()).sum() / b["loss_mask"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()

    return one


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    ap.add_argument("--steps", type=int, default=10, help="timed steps per system and round (median)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (every system once per round)")
    ap.add_argument("--batch-size", type=int, default=0, help="default: the config's train.batch_size")
    ap.add_argument("--seq-len", type=int, default=0, help="default: the config's train.seq_len")
    ap.add_argument("--vocab-size", type=int, default=1024, help="used when the config says model.vocab_size: 0")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--seeds", default="1", help="comma-separated seed counts vmapped through one JAX step "
                    "(the studies train arms x seeds small models); tokens/s counts every seed's tokens")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="tuned: bshadow_jax.allocator's glibc settings, as the CLI applies them (for both systems, "
                         "one process); default: glibc's defaults")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    if args.malloc == "tuned":
        from bshadow_jax.allocator import tune_glibc_malloc

        print(f"glibc malloc settings applied: {tune_glibc_malloc()}")

    import jax

    from bshadow_jax.models import flops_per_token
    from bshadow_jax.training.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    model_cfg = cfg.llama_config(args.vocab_size)
    B = args.batch_size or cfg.train.batch_size
    T = args.seq_len or cfg.train.seq_len
    flops_tok, n_matmul = flops_per_token(model_cfg, T)
    print(f"model: {args.config} layers={model_cfg.num_hidden_layers} width={model_cfg.hidden_size} "
          f"ffn={model_cfg.intermediate_size} vocab={model_cfg.vocab_size} matmul params={n_matmul / 1e6:.2f}M; "
          f"batch {B}x{T}; compute {cfg.train.compute_dtype}; devices {jax.device_count()} ({jax.devices()[0].platform}); "
          f"cpu cores {os.cpu_count()}")

    tok = B * T
    seed_counts = [int(x) for x in args.seeds.split(",") if x.strip()]
    jax_steps = {S: setup_jax(cfg, model_cfg, B, T, seeds=S) for S in seed_counts}
    torch_step = None if args.no_torch else setup_torch(cfg, model_cfg, B, T)
    # Interleaved rounds: every system is timed once per round, back to back, so a ratio compares
    # the same minutes of a shared machine (its speed drifts by 2x over a few minutes here).
    rounds = []
    for r in range(args.rounds):
        row = {"roof": matmul_roofline()}
        for S, (one, _) in jax_steps.items():
            row[S] = _median_time(one, warmup=2, reps=args.steps)
        if torch_step is not None:
            row["torch"] = _median_time(torch_step, warmup=2, reps=args.steps)
        rounds.append(row)
        print(f"round {r + 1}/{args.rounds}: roofline {row['roof'] / 1e9:.1f} GFLOP/s; "
              + "; ".join(f"jax x{S} {row[S] * 1e3:.1f} ms" for S in seed_counts)
              + (f"; torch {row['torch'] * 1e3:.1f} ms" if torch_step is not None else ""), flush=True)
    med = statistics.median
    print(f"roofline: jitted 1024^3 float32 matmul, median of rounds {med(r['roof'] for r in rounds) / 1e9:.1f} GFLOP/s "
          f"(range {min(r['roof'] for r in rounds) / 1e9:.1f}-{max(r['roof'] for r in rounds) / 1e9:.1f})")
    for S, (_, compile_s) in jax_steps.items():
        tps = [S * tok / r[S] for r in rounds]
        mfu = [S * tok / r[S] * flops_tok / r["roof"] for r in rounds]
        print(f"jax x{S}:   step {med(r[S] for r in rounds) * 1e3:.1f} ms, {med(tps):,.0f} tokens/s "
              f"({S} model{'s' if S > 1 else ''}), MFU {med(mfu):.1%} (per-round median; range "
              f"{min(mfu):.1%}-{max(mfu):.1%}; compile {compile_s:.1f} s)")
    if torch_step is not None:
        ttps = [tok / r["torch"] for r in rounds]
        tmfu = [tok / r["torch"] * flops_tok / r["roof"] for r in rounds]
        print(f"torch:    step {med(r['torch'] for r in rounds) * 1e3:.1f} ms, {med(ttps):,.0f} tokens/s, MFU {med(tmfu):.1%} "
              f"(eager, transformers LlamaForCausalLM + AdamW, one model)")
        for S in seed_counts:
            ratios = [S * r["torch"] / r[S] for r in rounds]
            print(f"ratio x{S}: jax/torch tokens/s = {med(ratios):.2f}x median of {len(rounds)} rounds "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f}; goal >= 1.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
