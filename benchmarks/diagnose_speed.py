#!/usr/bin/env python
"""Whole-process speed and peak memory of `bshadow diagnose` against what a user would otherwise run.

Generates a Llama-shaped base/tuned pair as Hugging Face folders (config.json, sharded
safetensors + model.safetensors.index.json), then times, each as its own process:

  ours     `bshadow diagnose BASE TUNED --out X`
  scipy    a plain SciPy loop: safe_open tensor by tensor, scipy.linalg.svdvals of the float32
           delta of every 2-D tensor, a few metrics per matrix (the script a user would write)
  ww       WeightWatcher 0.7.x: both folders loaded with transformers' LlamaForCausalLM
           (float32), then WeightWatcher(model=tuned, base_model=base).analyze() with defaults

Reports per tool the median / min / max wall time over --repeats, the peak resident memory
of the process (ru_maxrss from os.wait4 of that child) against one checkpoint's size, the
speedups of ours, and whether the results agree (delta spectral norm, Frobenius norm,
effective rank per matrix against the SciPy loop; base_overlap and intruder_count of the strongest delta
of every shape against float64 numpy SVDs). A depth sweep (--sweep) shows how time and
memory grow with the number of layers.

Model shape (per side, float32), --layers N (default 24):
  vocab 32000, hidden 1024, 16 heads x 64, 4 KV heads (GQA), FFN 2816, untied lm_head
  per layer: q_proj, o_proj [1024, 1024]; k_proj, v_proj [256, 1024];
             gate_proj, up_proj [2816, 1024]; down_proj [1024, 2816]; 2 RMSNorm vectors
  model.embed_tokens, lm_head [32000, 1024]; model.norm [1024]
  24 layers: 7*24 + 2 = 170 matrices, 336,093,184 parameters = 1.344 GB per side.
The tuned side is base + a rank-16 delta of per-module scale (MLP of the middle third of the
layers strongest, a "benchmark-shaped" footprint) + 1e-4 dense noise, so every delta has a
full-rank spectrum.

  python benchmarks/diagnose_speed.py                       # 24 layers, 3 repeats, sweep 4,8,16,24
  python benchmarks/diagnose_speed.py --layers 2 --repeats 1 --sweep "" --tools scipy,ww
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from diagnose_checks import agreement, load_results, vector_metric_check  # beside this script
from llama_pair import delta_scale, pair_plan  # beside this script; shared with gpu_bench.py

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 32000, 1024, 16, 4, 64, 2816
RANK, NOISE = 16, 1e-4
SHARD_BYTES = 500 * 2**20
ALL_TOOLS = ("ours", "ours_values", "scipy", "ww", "modeldelta")


# ------------------------------------------------------------------------------------------
# checkpoint generation
# ------------------------------------------------------------------------------------------

def hf_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def tensor_plan(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    assert HEADS * HEAD_DIM == HIDDEN  # llama_pair derives the head size from the width
    return pair_plan({"hidden": HIDDEN, "ffn": FFN, "vocab": VOCAB, "layers": layers, "heads": HEADS,
                      "kv_heads": KV_HEADS})


def _tensors(name: str, shape: tuple[int, ...], layers: int, variant: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(base, tuned) of one tensor; variant k > 0 is another fine-tune of the same base (its own delta)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if len(shape) == 1:
        base = np.ones(shape, np.float32)
        if variant:
            rng = np.random.default_rng(zlib.crc32(f"{name}#{variant}".encode()))
        return base, base + np.float32(1e-3) * rng.standard_normal(shape, dtype=np.float32)
    base = rng.standard_normal(shape, dtype=np.float32)
    base *= np.float32(0.02)
    if variant:
        rng = np.random.default_rng(zlib.crc32(f"{name}#{variant}".encode()))
    a = rng.standard_normal((shape[0], RANK), dtype=np.float32)
    b = rng.standard_normal((RANK, shape[1]), dtype=np.float32)
    tuned = (a @ b) * np.float32(delta_scale(name, layers) / math.sqrt(RANK * shape[1]))
    tuned += np.float32(NOISE) * rng.standard_normal(shape, dtype=np.float32)
    tuned += base
    return base, tuned


def generate_pair(root: Path, layers: int, extra: int = 0) -> tuple[Path, Path]:
    """Write root/base and root/tuned, and `extra` more fine-tunes of the same base as root/tuned2, ...
    (reused when a complete set of this shape is there)."""
    from safetensors.numpy import save_file

    base_dir, tuned_dir = root / "base", root / "tuned"
    extra_dirs = [root / f"tuned{k + 2}" for k in range(extra)]
    stamp = root / "COMPLETE.json"
    want = {"layers": layers, "config": hf_config(layers), "rank": RANK, "noise": NOISE, "v": 1, "extra": extra}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return base_dir, tuned_dir
    shutil.rmtree(root, ignore_errors=True)
    plan = tensor_plan(layers)
    shards, cur, size = [], [], 0
    for name, shape in plan:
        nbytes = 4 * math.prod(shape)
        if cur and size + nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += nbytes
    shards.append(cur)
    total = sum(4 * math.prod(s) for _, s in plan)
    for d in (base_dir, tuned_dir, *extra_dirs):
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(hf_config(layers), indent=2))
    weight_map = {}
    t0 = time.perf_counter()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        b, t = {}, {}
        for name, shape in shard:
            b[name], t[name] = _tensors(name, shape, layers)
            weight_map[name] = fname
        save_file(b, str(base_dir / fname), metadata={"format": "pt"})
        save_file(t, str(tuned_dir / fname), metadata={"format": "pt"})
        for k, d in enumerate(extra_dirs):
            save_file({name: _tensors(name, shape, layers, k + 1)[1] for name, shape in shard}, str(d / fname),
                      metadata={"format": "pt"})
        del b, t
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for d in (base_dir, tuned_dir, *extra_dirs):
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    stamp.write_text(json.dumps(want))
    print(f"generated {layers}-layer pair in {time.perf_counter() - t0:.1f}s: {len(plan)} tensors, "
          f"{total / 1e9:.3f} GB per side, {len(shards)} shards -> {root}", file=sys.stderr)
    return base_dir, tuned_dir


def generate_pair_in_child(root: Path, layers: int, tiny: bool, extra: int = 0) -> tuple[Path, Path]:
    """generate_pair in a child process: Linux keeps a process's peak RSS across fork+exec, so
    children timed later would inherit the peak of a parent that had held the generated tensors."""
    cmd = [sys.executable, os.path.abspath(__file__), "_generate", str(root), str(layers), str(extra)]
    subprocess.run(cmd + (["tiny"] if tiny else []), check=True)
    return root / "base", root / "tuned"


def measure_many(base: Path, tuned: list[Path], work: Path, repeats: int) -> dict:
    """One `bshadow diagnose BASE T1 .. TN` process against N single-pair processes, interleaved."""
    exe = shutil.which("bshadow") or str(Path(sys.executable).with_name("bshadow"))
    many, separate = [], []
    for r in range(repeats):
        shutil.rmtree(work / "out_many", ignore_errors=True)
        m = run_timed([exe, "diagnose", str(base), *map(str, tuned), "--out", str(work / "out_many")],
                      work / "log_many.txt")
        parts = []
        for i, t in enumerate(tuned):
            shutil.rmtree(work / f"out_sep{i}", ignore_errors=True)
            parts.append(run_timed([exe, "diagnose", str(base), str(t), "--out", str(work / f"out_sep{i}")],
                                   work / f"log_sep{i}.txt"))
        if m["rc"] or any(p["rc"] for p in parts):
            return {"failed": True, "rc": [m["rc"]] + [p["rc"] for p in parts]}
        many.append(m)
        separate.append({"wall_s": sum(p["wall_s"] for p in parts),
                         "peak_rss_bytes": max(p["peak_rss_bytes"] for p in parts)})
        print(f"  repeat {r + 1}/{repeats} one base vs {len(tuned)}: {m['wall_s']:.2f} s in one process, "
              f"{separate[-1]['wall_s']:.2f} s as {len(tuned)} processes", file=sys.stderr, flush=True)
    one = statistics.median(m["wall_s"] for m in many)
    sep = statistics.median(s["wall_s"] for s in separate)
    return {"tuned": len(tuned), "one_process_median_s": one, "separate_median_s": sep, "ratio": one / sep,
            "one_process_peak_rss_bytes": max(m["peak_rss_bytes"] for m in many),
            "separate_peak_rss_bytes": max(s["peak_rss_bytes"] for s in separate)}


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------

def run_timed(cmd: list[str], log: Path) -> dict:
    """Wall time and peak RSS of one child process (os.wait4 gives that child's own rusage)."""
    load0 = os.getloadavg()[0]
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss_bytes": ru.ru_maxrss * 1024, "rc": p.returncode,
            "load_before": load0, "cpu_s": ru.ru_utime + ru.ru_stime}


def tool_cmd(tool: str, base: Path, tuned: Path, work: Path) -> tuple[list[str], Path]:
    out = work / f"out_{tool}"
    shutil.rmtree(out, ignore_errors=True)
    if out.with_suffix(".json").exists():
        out.with_suffix(".json").unlink()
    if tool in ("ours", "ours_values"):
        exe = shutil.which("bshadow") or str(Path(sys.executable).with_name("bshadow"))
        values = ["--metrics", "values"] if tool == "ours_values" else []
        return [exe, "diagnose", str(base), str(tuned), "--out", str(out), *values], out
    res = out.with_suffix(".json")
    if tool == "modeldelta":  # its own command line, as a user runs it (local folders: no hub access)
        return [sys.executable, "-m", "modeldelta", str(base), str(tuned), "-o", str(res), "-q"], res
    script = Path(__file__).with_name("diagnose_baselines.py")
    return [sys.executable, str(script), tool, str(base), str(tuned), str(res)], res


def measure(tools, base, tuned, work: Path, repeats: int) -> dict:
    runs = {t: [] for t in tools}
    outputs = {}
    for r in range(repeats):
        for tool in tools:  # interleaved, so drift in machine load hits every tool alike
            cmd, out = tool_cmd(tool, base, tuned, work)
            m = run_timed(cmd, work / f"log_{tool}.txt")
            if m["rc"] != 0:
                tail = (work / f"log_{tool}.txt").read_text(errors="replace")[-2000:]
                print(f"[{tool}] exit {m['rc']}:\n{tail}", file=sys.stderr)
                runs[tool].append(m)
                continue
            runs[tool].append(m)
            outputs[tool] = load_results(tool, out)
            print(f"  repeat {r + 1}/{repeats} {tool:6s} {m['wall_s']:7.2f} s  peak {m['peak_rss_bytes'] / 1e9:5.2f} GB"
                  f"  (load {m['load_before']:.1f})", file=sys.stderr, flush=True)
    summary = {}
    for tool, ms in runs.items():
        ok = [m for m in ms if m["rc"] == 0]
        if not ok:
            summary[tool] = {"failed": True, "rc": [m["rc"] for m in ms]}
            continue
        walls = [m["wall_s"] for m in ok]
        summary[tool] = {
            "median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls), "runs": len(ok),
            "peak_rss_bytes": max(m["peak_rss_bytes"] for m in ok),
            "cpu_s_median": statistics.median(m["cpu_s"] for m in ok),
            "load_before": [round(m["load_before"], 2) for m in ms],
        }
    agree = {}
    if "scipy" in outputs and "ww" in outputs:
        # WW's alpha of each delta against ours (powerlaw.ww_metrics) on the SciPy singular values
        from bshadow_jax.diagnostics.powerlaw import ww_metrics_from_sv

        sv = np.load(str((work / "out_scipy.npz")))
        for n in outputs["scipy"]:
            key = n.replace(".", "__")
            if key in sv.files:
                outputs["scipy"][n]["alpha"] = ww_metrics_from_sv(sv[key])["alpha"]
        a = agreement(outputs["scipy"], outputs["ww"], ("alpha",))
        agree["ww_alpha"] = {k: v for k, v in a.items() if k.startswith("max_rel")}
    if "scipy" in outputs:
        for tool in ("ours", "ours_values", "ww", "modeldelta"):
            if tool in outputs:
                agree[tool] = agreement(outputs["scipy"], outputs[tool],
                                        ("spectral_norm", "fro") if tool == "ww"
                                        else ("spectral_norm", "fro", "effective_rank"))
    if "ours" in outputs:
        agree["ours_vectors"] = vector_metric_check(base, tuned, work / "out_ours")
    return {"tools": summary, "agreement": agree}


def fmt_table(res: dict, ckpt: int) -> str:
    lines = [f"{'tool':14s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'peak GB':>8s} {'peak/ckpt':>9s} "
             f"{'ours is x faster':>16s}"]
    ours = res["tools"].get("ours", {}).get("median_s")
    names = {"ours": "bshadow", "ours_values": "bshadow values", "scipy": "scipy loop", "ww": "weightwatcher",
             "modeldelta": "modeldelta",
             "ww_alpha": "powerlaw.ww_metrics alpha (float32 SciPy σ) vs weightwatcher alpha",
             "ours_vectors": "bshadow base_overlap/intruder_count vs float64 numpy SVDs (strongest delta per shape)"}
    for tool, s in res["tools"].items():
        if s.get("failed"):
            lines.append(f"{names[tool]:14s} FAILED rc={s['rc']}")
            continue
        speed = f"{s['median_s'] / ours:16.2f}" if ours and tool != "ours" else f"{'':16s}"
        lines.append(f"{names[tool]:14s} {s['median_s']:9.2f} {s['min_s']:7.2f} {s['max_s']:7.2f} "
                     f"{s['peak_rss_bytes'] / 1e9:8.2f} {s['peak_rss_bytes'] / ckpt:9.2f} {speed}")
    for tool, a in res["agreement"].items():
        lines.append(f"agreement {names[tool]}" + ("" if tool in ("ww_alpha", "ours_vectors") else " vs scipy") + ": " + ", ".join(
            f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in a.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", default="4,8,16,24", help="comma-separated depths for the sweep ('' to skip)")
    ap.add_argument("--sweep-tools", default="ours,scipy", help="tools timed in the sweep")
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--tools", default="ours,scipy,ww", help="subset of ours,scipy,ww,modeldelta")
    ap.add_argument("--workdir", help="where the pairs are generated (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the generated pairs")
    ap.add_argument("--json", help="write all numbers to this JSON file")
    ap.add_argument("--many", type=int, default=0, metavar="N",
                    help="also time one base against N fine-tunes in one process, against N separate runs")
    ap.add_argument("--tiny", action="store_true",
                    help="smoke test of the script itself: vocab 512, hidden 128, FFN 352 (not a benchmark)")
    args = ap.parse_args(argv)
    if args.tiny:
        global VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN
        VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 512, 128, 4, 2, 32, 352

    tools = [t for t in args.tools.split(",") if t]
    bad = set(tools) - set(ALL_TOOLS)
    if bad:
        ap.error(f"unknown tools {sorted(bad)}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bshadow_diag_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, {platform.platform()}",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "shape": {"vocab": VOCAB, "hidden": HIDDEN, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "ffn": FFN, "delta_rank": RANK, "noise": NOISE},
    }
    try:
        base, tuned = generate_pair_in_child(work / f"L{args.layers}", args.layers, args.tiny,
                                             extra=max(0, args.many - 1))
        ckpt = checkpoint_bytes(base)
        n_mat = sum(1 for _, s in tensor_plan(args.layers) if len(s) == 2)
        print(f"main: {args.layers} layers, {n_mat} matrices, checkpoint {ckpt / 1e9:.3f} GB per side, "
              f"{args.repeats} repeats", file=sys.stderr)
        main_res = measure(tools, base, tuned, work, args.repeats)
        main_res.update(layers=args.layers, matrices=n_mat, checkpoint_bytes=ckpt)
        report["main"] = main_res
        print(f"\n== {args.layers} layers, {n_mat} matrices, {ckpt / 1e9:.3f} GB per side, "
              f"median of {args.repeats} ==")
        print(fmt_table(main_res, ckpt), flush=True)
        if args.many > 1:
            all_tuned = [tuned] + [tuned.parent / f"tuned{k + 2}" for k in range(args.many - 1)]
            report["many"] = mr = measure_many(base, all_tuned, work, args.repeats)
            if not mr.get("failed"):
                print(f"one base vs {mr['tuned']} fine-tunes: {mr['one_process_median_s']:.2f} s in one process, "
                      f"{mr['separate_median_s']:.2f} s as {mr['tuned']} runs (ratio {mr['ratio']:.2f}); peak "
                      f"{mr['one_process_peak_rss_bytes'] / 1e9:.2f} GB vs {mr['separate_peak_rss_bytes'] / 1e9:.2f} GB")

        depths = [int(x) for x in args.sweep.split(",") if x.strip()]
        sweep_tools = [t for t in args.sweep_tools.split(",") if t]
        sweep = []
        for L in depths:
            if L == args.layers and set(sweep_tools) <= set(tools):
                res = main_res
            else:
                b, t = generate_pair_in_child(work / f"L{L}", L, args.tiny)
                res = measure(sweep_tools, b, t, work, args.sweep_repeats)
                res.update(layers=L, checkpoint_bytes=checkpoint_bytes(b))
                if not args.keep:
                    shutil.rmtree(work / f"L{L}", ignore_errors=True)
            sweep.append(res)
        if sweep:
            report["sweep"] = sweep
            print("\n== depth sweep ==")
            hdr = f"{'layers':>6s} {'ckpt GB':>8s}"
            for tl in sweep_tools:
                hdr += f" {tl + ' s':>10s} {tl + ' GB':>10s}"
            print(hdr)
            for res in sweep:
                line = f"{res['layers']:6d} {res['checkpoint_bytes'] / 1e9:8.3f}"
                for tl in sweep_tools:
                    s = res["tools"].get(tl, {})
                    line += (f" {s['median_s']:10.2f} {s['peak_rss_bytes'] / 1e9:10.2f}" if "median_s" in s
                             else f" {'-':>10s} {'-':>10s}")
                print(line)
            for tl in sweep_tools:
                pts = [(r["layers"], r["tools"][tl]["median_s"]) for r in sweep if "median_s" in r["tools"].get(tl, {})]
                if len(pts) >= 2:
                    x, y = np.array(pts, dtype=float).T
                    slope, icpt = np.polyfit(x, y, 1)
                    r2 = 1 - np.sum((y - (slope * x + icpt)) ** 2) / max(np.sum((y - y.mean()) ** 2), 1e-12)
                    print(f"{tl}: time ≈ {icpt:.2f} s + {slope:.3f} s/layer (R² = {r2:.3f})")
                    report.setdefault("sweep_fit", {})[tl] = {"intercept_s": icpt, "s_per_layer": slope, "r2": r2}
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=float))
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.keep:
            for d in work.glob("L*"):
                shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "_generate":
        if sys.argv[5:] == ["tiny"]:
            VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 512, 128, 4, 2, 32, 352
        generate_pair(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        sys.exit(0)
    sys.exit(main())
