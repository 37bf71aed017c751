"""One short accelerator run: bf16 training MFU (135M and ~1B Llama), diagnose time for a 7B-shaped pair, eval throughput.

  bash benchmarks/gpu.sh                                  # on the H200 machine (setup notes in gpu.sh)
  python benchmarks/gpu_bench.py --out DIR [--time-limit 480] [--sections roofline,train_135m,train_1b,diagnose_7b]
  python benchmarks/gpu_bench.py --tiny --out DIR         # toy shapes: the whole script on a CPU in seconds

Sections (each result is written to DIR/gpu_bench.json and DIR/gpu_bench.md as soon as it exists, so a run
killed by its wall limit keeps what it measured):

* roofline: a jitted bf16 8192^3 matmul in this process (2 n^3 FLOPs; median of rounds of 10 async dispatches).
* train_135m / train_1b: the library's own jitted training step (bshadow_jax.training: TrainConfig ->
  training.compiled.compile_train_step, i.e. the sharded init and the donated train_step that `bshadow train` runs), AdamW with
  clipping, float32 master weights, compute_dtype bfloat16, random weights, random tokens, seq 2048.
  Shapes: SmolLM2-135M (30 x 576, FFN 1536, 9/3 heads, vocab 49152, tied) and a Llama-3.2-1B-like model
  (16 x 2048, FFN 8192, 32/8 heads, vocab 128256, tied, llama3 RoPE). The first step (compile) and the
  warm-up steps are excluded; the median of the timed steps is reported. Default batches (135M: 4, 1B: 2
  sequences of 2048) come from XLA's compiled memory analysis of this very step (on the CPU backend: 67 GB
  and 71 GB of temporaries, linear in the batch, almost all of it the attention's materialised B x H x T x T
  float32 scores), sized to the H200's ~128 GB usable. A batch that still runs out of device memory is
  halved and retried (the JSON says so).
  Model FLOPs per token = 6 * N_matmul + 12 * L * (H * hd) * T (forward + backward; N_matmul counts every
  matmul weight including the LM head but not the embedding gather; attention over the full T x T square,
  PaLM's MFU definition). MFU is quoted against the H200 dense bf16 spec (989 TFLOP/s) and against the
  measured roofline.
* diagnose_7b: a Llama-2-7B-shaped pair (32 layers, width 4096, FFN 11008, 32 heads, vocab 32000, untied:
  226 matrices) made on the device (base ~ N(0, 0.02); tuned = base + rank-16 delta of per-module scale
  + 1e-4 dense noise, the recipe of benchmarks/diagnose_speed.py), then
  bshadow_jax.diagnostics.diagnose(base, tuned) timed to the full DiagnoseResult (compiles included: a
  user's cold call), inside jax.default_matmul_precision("highest") unless --diag-matmul-precision says
  otherwise (jax's default float32 matmul on Hopper is TF32, too coarse for a Gram's eigenvalues). A few
  matrices are checked against scipy's svdvals of the host float32 delta.

* eval_135m: the evaluation's jitted log-prob function (evals.scoring.model_logprob_fn: forward, log-softmax,
  gather of the target and option ids, argmax; numpy out) on --eval-rows packed rows of --seq-len random
  tokens, SmolLM2-135M shape, random weights; tokens scored per second (median of the timed calls).

Goals (issue 6, H200): >= 40% MFU at 1B; 7B pair diagnosed in < 60 s. Printed next to the results.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpu_sections import bench_diagnose, bench_eval, bench_train, log, machine_info, matmul_roofline  # noqa: E402  (beside this script)

H200_BF16_PEAK_TFLOPS = 989.0  # dense bf16, SXM datasheet (same tensor-core rate as the H100)
GOAL_MFU_1B = 0.40
GOAL_DIAG_7B_S = 60.0
# run in this order: the goal sections first, so a run cut by its wall limit keeps them
SECTIONS = ("roofline", "train_1b", "diagnose_7b", "train_135m", "eval_135m")

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    max_position_embeddings=8192,
)
LLAMA32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    max_position_embeddings=131072,
)
LLAMA2_7B = dict(layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000)

# --tiny: the same code paths at toy sizes (CPU smoke test). Both "models" share one shape, so the second
# reuses the first's compiled step, and every matrix of the pair is square 64 x 64: one compile each.
TINY_MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
TINY_PAIR = dict(layers=1, hidden=64, ffn=64, heads=4, kv_heads=4, vocab=64)

# smallest remaining wall time worth starting a section with (seconds; compile included)
MIN_SECONDS = {"roofline": 10, "train_135m": 60, "train_1b": 90, "diagnose_7b": 60, "eval_135m": 30}


# ----------------------------------------------------------------------------------- report


def _fmt(x, spec: str = ".3g", pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return f"{x:.1%}" if pct else format(x, spec)


def goals(results: dict) -> dict:
    t1b = results.get("train_1b") or {}
    d7 = results.get("diagnose_7b") or {}
    tiny = results.get("tiny", False)
    return {
        "mfu_1b_ge_40pct": None if tiny or "mfu_spec" not in t1b else bool(t1b["mfu_spec"] >= GOAL_MFU_1B),
        "diagnose_7b_lt_60s": None if tiny or "diagnose_s" not in d7 else bool(d7["diagnose_s"] < GOAL_DIAG_7B_S),
    }


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    lines = [
        f"# gpu_bench {'(--tiny, toy shapes: not a measurement)' if results.get('tiny') else ''}".rstrip(),
        "",
        f"{results.get('date_utc', '')} UTC; {m.get('device_kind', '?')} x{m.get('device_count', '?')} "
        f"({m.get('platform', '?')}), jax {m.get('jax_version', '?')}, {m.get('cpu_count', '?')} CPU cores",
        "",
    ]
    r = results.get("roofline") or {}
    if "tflops" in r:
        lines += [f"Roofline: jitted {r['n']}^3 {r['dtype']} matmul {r['tflops']:.1f} TFLOP/s "
                  f"(spec dense bf16 peak {results.get('peak_tflops_spec')} TFLOP/s).", ""]
    lines += ["| training (bf16 compute, f32 master) | batch x seq | step (ms, median) | tokens/s | TFLOP/s | "
              "MFU vs spec | MFU vs roofline | goal |",
              "|---|---|---|---|---|---|---|---|"]
    for key, label, goal in (("train_135m", "SmolLM2-135M shape", ""), ("train_1b", "Llama-3.2-1B-like", ">= 40% MFU")):
        t = results.get(key) or {}
        if "tokens_per_s" in t:
            lines.append(f"| {label} ({t['params_total'] / 1e6:.0f}M params) | {t['batch']} x {t['seq_len']} | "
                         f"{t['step_s_median'] * 1e3:.1f} | {t['tokens_per_s']:,.0f} | {t['achieved_tflops']:.1f} | "
                         f"{_fmt(t['mfu_spec'], pct=True)} | {_fmt(t.get('mfu_roofline'), pct=True)} | {goal} |")
        else:
            lines.append(f"| {label} | | | | | | | {goal} {t.get('error', t.get('skipped', 'not run'))} |")
    d = results.get("diagnose_7b") or {}
    lines += ["", "| diagnose | matrices | storage | generate (s) | diagnose (s) | matrices/s | check max rel err | goal |",
              "|---|---|---|---|---|---|---|---|"]
    if "diagnose_s" in d:
        errs = (d.get("check") or {}).get("max_rel_err") or {}
        err = max(errs.values()) if errs else None
        lines.append(f"| Llama-2-7B-shaped pair, made on device | {d['matrices']} | {d['storage_dtype']} | "
                     f"{d['generate_s']:.1f} | {d['diagnose_s']:.1f} | {_fmt(d['matrices_per_s'])} | "
                     f"{_fmt(err, '.1e')} | < 60 s |")
    else:
        lines.append(f"| Llama-2-7B-shaped pair | | | | | | | < 60 s {d.get('error', d.get('skipped', 'not run'))} |")
    e = results.get("eval_135m") or {}
    lines += ["", "| eval (option log-likelihood scoring) | rows x seq | call (ms, median) | tokens scored/s |",
              "|---|---|---|---|"]
    if "tokens_per_s" in e:
        lines.append(f"| SmolLM2-135M shape, {e['compute_dtype']} | {e['rows']} x {e['seq_len']} | "
                     f"{e['call_s_median'] * 1e3:.1f} | {e['tokens_per_s']:,.0f} |")
    else:
        lines.append(f"| SmolLM2-135M shape | | | {e.get('error', e.get('skipped', 'not run'))} |")
    g = results.get("goals", {})
    lines += ["", f"Goals: MFU >= 40% at 1B: {g.get('mfu_1b_ge_40pct')}; 7B pair < 60 s: "
                  f"{g.get('diagnose_7b_lt_60s')} (None = not measured)."]
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in results["errors"].items())]
    lines.append(f"\nWall time of the whole script: {results.get('elapsed_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def save(results: dict, out: Path) -> None:
    from bshadow_jax.fileio import atomic_write_json, atomic_write_text

    results["goals"] = goals(results)
    atomic_write_json(out / "gpu_bench.json", results)
    atomic_write_text(out / "gpu_bench.md", markdown(results))


# ----------------------------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "gpu_out"),
                    help="folder for gpu_bench.json and gpu_bench.md (default: $OUT, else benchmarks/gpu_out)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (CPU smoke test)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list out of {','.join(SECTIONS)}")
    ap.add_argument("--time-limit", type=float, default=480.0,
                    help="wall seconds for the whole script: sections that cannot start in time are skipped")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-135m", type=int, default=4, help="sequences per step (halved on out-of-memory)")
    ap.add_argument("--batch-1b", type=int, default=2, help="sequences per step (halved on out-of-memory)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the compiling first step")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--remat", default="none", choices=("none", "dots", "full"),
                    help="train.remat of both training sections (activation memory for a larger batch)")
    ap.add_argument("--eval-rows", type=int, default=32, help="packed rows per scoring call (eval_135m)")
    ap.add_argument("--roofline-n", type=int, default=8192)
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS,
                    help="spec peak the MFU is quoted against (H200 dense bf16: 989)")
    ap.add_argument("--diag-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="storage dtype of the generated pair (diagnose upcasts to float32 per stack)")
    ap.add_argument("--diag-budget-mb", type=float, default=4096.0, help="diagnose(budget_mb=...): stack size")
    ap.add_argument("--diag-matmul-precision", default="highest",
                    choices=("default", "highest", "float32", "tensorfloat32"),
                    help="jax.default_matmul_precision around diagnose. 'highest' (the default) keeps float32 "
                         "Grams float32 on GPUs, where jax's own default rounds float32 dot inputs to TF32; "
                         "'default' times the library exactly as it is")
    ap.add_argument("--diag-check", type=int, default=2, help="matrices checked against scipy svdvals (0-3)")
    args = ap.parse_args(argv)
    bad = [s for s in args.sections.split(",") if s and s not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {bad}; choose from {list(SECTIONS)}")
    if args.tiny:
        args.seq_len = min(args.seq_len, 64)
        args.batch_135m = args.batch_1b = 8
        args.eval_rows = min(args.eval_rows, 8)
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
        args.roofline_n = min(args.roofline_n, 256)
        args.diag_budget_mb = min(args.diag_budget_mb, 64.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import jax

    sections = [s for s in args.sections.split(",") if s]
    results: dict = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "tiny": bool(args.tiny),
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
        "args": vars(args),
        "machine": machine_info(),
        "peak_tflops_spec": args.peak_tflops,
        "goals_wanted": {"mfu_1b": GOAL_MFU_1B, "diagnose_7b_s": GOAL_DIAG_7B_S},
        "errors": {},
    }
    log(f"devices: {jax.devices()}; sections {sections}; time limit {args.time_limit:.0f} s; out {out}")
    save(results, out)

    def remaining() -> float:
        return args.time_limit - (time.perf_counter() - t_start)

    def run_section(name: str, fn) -> None:
        if name not in sections:
            return
        need = 0 if args.tiny else MIN_SECONDS[name]
        if remaining() < need:
            results[name] = {"skipped": f"time limit ({remaining():.0f} s left, {need} s needed)"}
            log(f"{name}: skipped, {remaining():.0f} s left")
        else:
            t = time.perf_counter()
            try:
                results[name] = fn()
                results[name]["section_s"] = time.perf_counter() - t
            except Exception as e:  # one section failing must not lose the others
                traceback.print_exc()
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                results[name] = {"error": msg, "section_s": time.perf_counter() - t}
                results["errors"][name] = msg
            gc.collect()
        results["elapsed_s"] = time.perf_counter() - t_start
        save(results, out)

    run_section("roofline", lambda: matmul_roofline(args.roofline_n))
    roof = (results.get("roofline") or {}).get("tflops")
    if roof:
        log(f"roofline: {roof:.1f} TFLOP/s ({args.roofline_n}^3 bf16 matmul); spec peak {args.peak_tflops}")

    def train_section(name: str) -> None:
        model, batch = {"train_135m": (TINY_MODEL if args.tiny else SMOLLM2_135M, args.batch_135m),
                        "train_1b": (TINY_MODEL if args.tiny else LLAMA32_1B, args.batch_1b)}[name]
        run_section(name, lambda: bench_train(
            model, batch=batch, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup,
            compute_dtype=args.compute_dtype, roofline_tflops=roof, peak_tflops=args.peak_tflops,
            remat=args.remat))
        t = results.get(name) or {}
        if "tokens_per_s" in t:
            goal = f" (goal >= {GOAL_MFU_1B:.0%})" if name == "train_1b" else ""
            log(f"{name}: {t['params_total'] / 1e6:.1f}M params, batch {t['batch']}x{t['seq_len']}, step "
                f"{t['step_s_median'] * 1e3:.1f} ms, {t['tokens_per_s']:,.0f} tokens/s, {t['achieved_tflops']:.1f} "
                f"TFLOP/s, MFU {t['mfu_spec']:.1%} of spec{goal}, {_fmt(t['mfu_roofline'], pct=True)} of roofline "
                f"(first step {t['first_step_s']:.1f} s, loss {t['loss_first']:.3f} -> {t['loss_last']:.3f})")

    def diagnose_section() -> None:
        run_section("diagnose_7b", lambda: bench_diagnose(
            TINY_PAIR if args.tiny else LLAMA2_7B, dtype_name=args.diag_dtype, budget_mb=args.diag_budget_mb,
            precision=args.diag_matmul_precision, check=args.diag_check))
        d = results.get("diagnose_7b") or {}
        if "diagnose_s" in d:
            log(f"diagnose_7b: {d['matrices']} matrices in {d['diagnose_s']:.1f} s (goal < {GOAL_DIAG_7B_S:.0f} s), "
                f"generation {d['generate_s']:.1f} s, recomputed exactly {d['recomputed_exact']}, "
                f"check max rel err {json.dumps(d['check'].get('max_rel_err'))}")

    def eval_section() -> None:
        run_section("eval_135m", lambda: bench_eval(
            TINY_MODEL if args.tiny else SMOLLM2_135M, rows=args.eval_rows, seq_len=args.seq_len,
            steps=args.steps, compute_dtype=args.compute_dtype))
        e = results.get("eval_135m") or {}
        if "tokens_per_s" in e:
            log(f"eval_135m: {e['rows']}x{e['seq_len']} tokens scored per call in {e['call_s_median'] * 1e3:.1f} ms: "
                f"{e['tokens_per_s']:,.0f} tokens/s (first call {e['first_call_s']:.1f} s)")

    for name in SECTIONS[1:]:
        if name == "diagnose_7b":
            diagnose_section()
        elif name == "eval_135m":
            eval_section()
        else:
            train_section(name)

    results["elapsed_s"] = time.perf_counter() - t_start
    save(results, out)
    log(f"goals: {results['goals']}; wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    print(markdown(results))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
