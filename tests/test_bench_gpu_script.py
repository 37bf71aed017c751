"""Smoke test of the prepared accelerator benchmark (benchmarks/gpu_bench.py) at toy sizes on the CPU.

The script is meant to run once on an H200; here it runs its --tiny mode in a fresh process (one CPU
device, like the one-GPU machine) and the test checks that every section produced finite, positive
numbers that hang together (tokens/s = tokens per step / step time, MFU = achieved / peak, the
diagnose check against scipy agrees), and that the summary files exist.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT")}  # one device, like the H200
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_bench.json").read_text()), proc.stdout


def test_tiny_run_writes_json_and_markdown(tiny_run):
    out, res, stdout = tiny_run
    assert res["tiny"] is True and res["errors"] == {}
    assert res["machine"]["platform"] == "cpu" and res["machine"]["device_count"] == 1
    md = (out / "gpu_bench.md").read_text()
    for label in ("SmolLM2-135M", "Llama-3.2-1B", "7B-shaped pair", "Goals"):
        assert label in md
    assert "diagnose_7b:" in stdout and "train_1b:" in stdout and "eval_135m:" in stdout
    ev = res["eval_135m"]
    assert ev["logp_finite"] and ev["tokens_per_s"] > 0
    assert math.isclose(ev["tokens_per_s"], ev["rows"] * ev["seq_len"] / ev["call_s_median"], rel_tol=1e-9)
    assert "tokens scored/s" in md
    # tiny shapes prove nothing about the goals: they stay unjudged
    assert res["goals"] == {"mfu_1b_ge_40pct": None, "diagnose_7b_lt_60s": None}


def test_tiny_training_numbers(tiny_run):
    _, res, _ = tiny_run
    roof = res["roofline"]
    assert _positive(roof["tflops"]) and roof["dtype"] == "bfloat16"
    for key in ("train_135m", "train_1b"):
        t = res[key]
        for k in ("tokens_per_s", "achieved_tflops", "mfu_spec", "mfu_roofline", "flops_per_token",
                  "step_s_median", "step_s_pipelined", "tokens_per_s_pipelined", "first_step_s", "params_total", "params_matmul", "tokens_per_step"):
            assert _positive(t[k]), (key, k, t[k])
        assert t["compute_dtype"] == "bfloat16" and t["loss_finite"]
        assert t["step_source"].startswith("bshadow_jax.training")
        assert t["tokens_per_step"] == t["batch"] * t["seq_len"]
        assert math.isclose(t["tokens_per_s"], t["tokens_per_step"] / t["step_s_median"], rel_tol=1e-9)
        assert math.isclose(t["mfu_spec"], t["achieved_tflops"] / t["peak_tflops_spec"], rel_tol=1e-9)
        assert math.isclose(t["mfu_roofline"], t["achieved_tflops"] / roof["tflops"], rel_tol=1e-9)
        # 6 N + attention: at least 6 x the matmul parameters, which are fewer than all parameters (tied)
        assert t["flops_per_token"] > 6 * t["params_matmul"]
        assert len(t["step_s_all"]) == res["args"]["steps"]
        # uniform random tokens: the loss starts near ln(vocab)
        assert abs(t["loss_first"] - math.log(t["model"]["vocab_size"])) < 0.5


def test_tiny_diagnose_numbers(tiny_run):
    _, res, _ = tiny_run
    d = res["diagnose_7b"]
    dims = d["dims"]
    # 7 matrices per layer + embedding + untied LM head (Llama-2-7B: 32 * 7 + 2 = 226)
    assert d["matrices"] == 7 * dims["layers"] + 2
    # the 1-D norms are measured in vectors.csv, no longer skipped
    assert d["skipped"] == 0 and d["vectors"] == 2 * dims["layers"] + 1
    for k in ("diagnose_s", "generate_s", "matrices_per_s", "bytes_per_side", "params_per_side"):
        assert _positive(d[k]), (k, d[k])
    assert d["metrics_finite"]
    chk = d["check"]
    assert len(chk["matrices"]) == res["args"]["diag_check"] > 0
    assert set(chk["max_rel_err"]) >= {"delta_spectral_norm", "delta_fro", "delta_effective_rank"}
    assert max(chk["max_rel_err"].values()) < 1e-4
