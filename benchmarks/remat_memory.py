"""Activation memory and step time of `train.remat` (none / dots / full), against no remat in the same run.

  python benchmarks/remat_memory.py [--shapes smoke,smollm2_135m,llama_1b] [--rounds 5] [--steps 10]

Memory: the library's train step (`training.compiled.compile_train_step`: AdamW, clipping, donated state) is compiled
ahead of time from abstract shapes (no weights are made), and XLA's own buffer plan gives the bytes
of temporaries (`compiled.memory_analysis().temp_size_in_bytes`). This is deterministic. On CPU, the
plan depends on the scheduler: a remat step is compiled with the memory-optimised one
(`step.remat_compiler_options`), so "none" is shown under both schedulers.
Accelerator-sized shapes (SmolLM2-135M at 4 x 2048, a Llama-3.2-1B-like model at 2 x 2048, bf16
compute) are compiled for the CPU backend: their plans show the trend, not a GPU's exact bytes.
Time: the default CPU model (configs/smoke.yaml, 16 x 128, float32), every policy timed once per
round, interleaved; medians and the per-round ratio to "none".
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

POLICIES = ("none", "dots", "full")


def shapes() -> dict:
    from gpu_bench import LLAMA32_1B, SMOLLM2_135M

    return {
        "smoke": (None, 16, 128, "float32"),
        "smollm2_135m": (SMOLLM2_135M, 4, 2048, "bfloat16"),
        "llama_1b": (LLAMA32_1B, 2, 2048, "bfloat16"),
    }


def train_config(model: dict | None, batch: int, seq_len: int, dtype: str, remat: str):
    from bshadow_jax.training.config import load_train_config, train_config_from_dict

    if model is None:
        over = [f"train.batch_size={batch}", f"train.seq_len={seq_len}", f"train.remat={remat}"]
        return load_train_config(str(HERE.parent / "configs" / "smoke.yaml"), over)
    return train_config_from_dict({
        "seed": 0, "model": model, "optim": {"name": "adamw"},
        "train": {"steps": 1000, "batch_size": batch, "seq_len": seq_len, "compute_dtype": dtype, "remat": remat},
    })


def planned_temp_bytes(cfg, model_cfg, scheduler_options: dict | None = None) -> int:
    """XLA's temporaries for one train step, compiled from abstract shapes."""
    import jax
    import jax.numpy as jnp

    from bshadow_jax.data.pipeline import BATCH_KEYS
    from bshadow_jax.training import mesh as mesh_lib
    from bshadow_jax.training.compiled import compile_train_step

    tc = cfg.train
    mesh = mesh_lib.make_mesh(cfg.mesh, batch_size=tc.batch_size, grad_accum=tc.grad_accum)
    compiled = compile_train_step(model_cfg, cfg.optim, steps=tc.steps, mesh=mesh, compute_dtype=tc.compute_dtype,
                                  grad_accum=tc.grad_accum, remat=tc.remat)
    batch = {k: jax.ShapeDtypeStruct((tc.batch_size, tc.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in BATCH_KEYS}
    lowered = compiled.step_fn.lower(compiled.abstract, batch)
    exe = lowered.compile(scheduler_options) if scheduler_options is not None else lowered.compile()
    return int(exe.memory_analysis().temp_size_in_bytes)


def memory_table(names: list[str]) -> None:
    from bshadow_jax.training.step import remat_compiler_options

    print(f"{'shape':14s} {'batch x seq':>12s} {'dtype':>9s} {'none (default sched.)':>22s} "
          f"{'none (memory sched.)':>21s} {'dots':>9s} {'full':>9s}   GB of temporaries")
    for name in names:
        model, B, T, dtype = shapes()[name]
        row = []
        for remat, opts in (("none", None), ("none", remat_compiler_options("dots", "cpu"))) + tuple(
                (p, None) for p in POLICIES[1:]):
            cfg = train_config(model, B, T, dtype, remat)
            t = time.perf_counter()
            row.append(planned_temp_bytes(cfg, cfg.llama_config(1024), opts))
            print(f"  [{name} remat={remat}{' memory sched.' if opts else ''}: compiled in "
                  f"{time.perf_counter() - t:.1f} s]", file=sys.stderr, flush=True)
        print(f"{name:14s} {f'{B} x {T}':>12s} {dtype:>9s} {row[0] / 1e9:22.3f} {row[1] / 1e9:21.3f} "
              f"{row[2] / 1e9:9.3f} {row[3] / 1e9:9.3f}   (full / none: {row[3] / row[0]:.2f})", flush=True)


def time_table(rounds: int, steps: int) -> None:
    import jax

    from bshadow_jax.data.synthetic import synthetic_batch
    from bshadow_jax.training import mesh as mesh_lib
    from bshadow_jax.training.compiled import compile_train_step

    runs = {}
    for remat in POLICIES:
        cfg = train_config(None, 16, 128, "float32", remat)
        model_cfg = cfg.llama_config(1024)
        mesh = mesh_lib.make_mesh(cfg.mesh, batch_size=16)
        c = compile_train_step(model_cfg, cfg.optim, steps=cfg.train.steps, mesh=mesh, remat=remat)
        state = c.init_random(jax.random.key(0), 0)
        batches = [jax.device_put(synthetic_batch(i, vocab_size=1024, seq_len=128, batch_size=16, seed=0))
                   for i in range(4)]
        runs[remat] = {"step": c.step_fn, "state": state, "batches": batches}
    per_round = {p: [] for p in POLICIES}
    for r in range(rounds):
        for remat, run in runs.items():
            times = []
            for i in range(steps + 2):
                t = time.perf_counter()
                run["state"], m = run["step"](run["state"], run["batches"][i % 4])
                m["loss"].block_until_ready()
                if i >= 2:
                    times.append(time.perf_counter() - t)
            per_round[remat].append(statistics.median(times))
        print(f"round {r + 1}/{rounds}: " + "; ".join(f"{p} {per_round[p][-1] * 1e3:.1f} ms" for p in POLICIES),
              flush=True)
    for p in POLICIES:
        ratios = [a / b for a, b in zip(per_round[p], per_round["none"])]
        print(f"{p:5s} step {statistics.median(per_round[p]) * 1e3:.1f} ms; time / none {statistics.median(ratios):.2f} "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smoke,smollm2_135m,llama_1b", help=f"of {','.join(shapes())}")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds on the default CPU model (0: skip)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per policy and round")
    args = ap.parse_args(argv)
    names = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(names) - set(shapes()))
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {sorted(shapes())}")
    memory_table(names)
    if args.rounds:
        time_table(args.rounds, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
