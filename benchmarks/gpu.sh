#!/usr/bin/env bash
# One short accelerator benchmark run (issue 6, "On accelerators"): bf16 training MFU of a 135M and a ~1B
# Llama through the library's own train step, and the wall time of diagnose() on a 7B-shaped pair made on
# the device. Writes gpu_bench.json, gpu_bench.md and gpu_bench.log into $OUT (or the first argument, or
# benchmarks/gpu_out). About 8 minutes at most: the script skips sections it cannot start in time, saves
# each result as soon as it has it, and `timeout` stops it hard 60 s after its own limit.
#
# Setup
#   * A fresh H200 (or any CUDA) machine with network access, from the repository root:
#         python3 -m venv .venv && . .venv/bin/activate
#         pip install -e . "jax[cuda12]"          # or "jax[cuda13]" to match a CUDA 13 driver
#         bash benchmarks/gpu.sh /tmp/gpu_out
#   * This workplace's device machine (no network; its python3 already has jax + the CUDA 13 plugin, flax,
#     optax, orbax, scipy, pyyaml, tqdm): nothing to install, the package is used from the source tree
#     through PYTHONPATH. Through the device tool, from the repository root:
#         run(command="bash benchmarks/gpu.sh", timeout_s=600)
#     then copy the table of $OUT/gpu_bench.md into benchmarks/RESULTS.md with the date and the machine.
#
# Knobs (environment): PYTHON (interpreter, default python3), GPU_BENCH_TIME_LIMIT (seconds the script
# plans for, default 480), XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92: the 7B float32 pair takes 54 GB
# and the 1B step at batch 2 x 2048 about 86 GB,
# run one after the other). Extra arguments after the output folder go to
# gpu_bench.py (e.g. --sections train_1b --batch-1b 8; see `python3 benchmarks/gpu_bench.py --help`).
set -euo pipefail

cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/gpu_out}}"
[ $# -gt 0 ] && shift
mkdir -p "$out"
py="${PYTHON:-python3}"
limit="${GPU_BENCH_TIME_LIMIT:-480}"

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
unset XLA_FLAGS  # no simulated host devices from a test environment

log="$out/gpu_bench.log"
{
  echo "# $(date -u '+%Y-%m-%d %H:%M:%S') UTC  $(uname -n)  git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
      --format=csv,noheader || echo "no nvidia-smi"
  "$py" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} 2>&1 | tee "$log"

set +e
timeout --kill-after=10 "$((${limit%.*} + 60))" \
  "$py" benchmarks/gpu_bench.py --out "$out" --time-limit "$limit" "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 124 ] && echo "gpu.sh: stopped by the wall limit; $out/gpu_bench.json holds the finished sections" | tee -a "$log"
exit "$rc"
