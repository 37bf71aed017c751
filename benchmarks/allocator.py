"""glibc malloc settings (bshadow_jax.allocator) against glibc's defaults, on the CPU study's train step.

  python benchmarks/allocator.py [--rounds 3] [--steps 40]

Each round runs two fresh processes back to back, one with BSHADOW_MALLOC=default and one with the
settings the CLI applies, and each times `--steps` steps of the CPU study's fine-tune (the
configs/regimes_cpu.yaml model, batch 16 x 128, AdamW) after a compiling one. Printed per process:
median step time, page faults and kernel (system) CPU time per step, and the loss after the last step
(the settings must not change any value). Last line: the median over rounds of default / tuned step
time. Run it on an otherwise idle machine; the machines drift, so compare within a round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, statistics, sys, time
sys.path.insert(0, sys.argv[2])
from bshadow_jax.allocator import tune_glibc_malloc
applied = tune_glibc_malloc()
import jax
from bshadow_jax.studies.spec import load_study_config
from bshadow_jax.training import mesh as mesh_lib
from bshadow_jax.training.compiled import compile_train_step
from bshadow_jax.data.pipeline import BATCH_KEYS
cfg = load_study_config(sys.argv[2] + "/configs/regimes_cpu.yaml")
tc = cfg.arm_config(cfg.active_arms()[0], 0)
model_cfg = tc.llama_config(1024)
mesh = mesh_lib.make_mesh(tc.mesh, batch_size=tc.train.batch_size, grad_accum=1)
prog = compile_train_step(model_cfg, tc.optim, steps=tc.train.steps, mesh=mesh)
state = prog.init_random(jax.random.key(0), 0)
from bshadow_jax.data.synthetic import synthetic_batch
batch = synthetic_batch(0, vocab_size=1024, seq_len=tc.train.seq_len, batch_size=tc.train.batch_size, seed=0)
batch = {k: batch[k] for k in BATCH_KEYS}
state, m = prog.step_fn(state, batch); jax.block_until_ready(m)
r0 = resource.getrusage(resource.RUSAGE_SELF)
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    state, m = prog.step_fn(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
r1 = resource.getrusage(resource.RUSAGE_SELF)
n = len(times)
print(json.dumps({"applied": applied, "step_s": statistics.median(times), "faults_per_step": (r1.ru_minflt - r0.ru_minflt) / n,
                  "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / n, "loss": float(m["loss"])}))
"""


def run(mode: str, steps: int) -> dict:
    env = dict(os.environ, BSHADOW_MALLOC=mode, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(steps), str(ROOT)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    ratios = []
    for r in range(args.rounds):
        res = {mode: run(mode, args.steps) for mode in ("default", "tuned")}
        for mode, x in res.items():
            print(f"round {r} {mode:8s} applied={x['applied']!s:5s} step {x['step_s'] * 1e3:6.1f} ms  "
                  f"faults/step {x['faults_per_step']:8.0f}  sys/step {x['sys_s_per_step'] * 1e3:5.1f} ms  "
                  f"loss {x['loss']:.6f}", flush=True)
        if res["default"]["loss"] != res["tuned"]["loss"]:
            print("warning: the losses differ", flush=True)
        ratios.append(res["default"]["step_s"] / res["tuned"]["step_s"])
    print(f"median over {args.rounds} rounds: default / tuned step time = {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
