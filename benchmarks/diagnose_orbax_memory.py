"""Peak memory of `bshadow diagnose` on two bshadow run folders (orbax checkpoints), read tensor by tensor.

  python benchmarks/diagnose_orbax_memory.py [--layers 8] [--workdir /tmp/orbax_bench] [--keep]

Writes a base and a tuned run folder (config.yaml + checkpoints/1/params, the same Llama shapes
and deltas as diagnose_speed.py) in a child process, then times two children and reads each
one's own peak RSS (os.wait4):
  * ours      `bshadow diagnose BASE TUNED --out X` (OrbaxSource: one partial restore per tensor)
  * whole     both params items restored whole (`formats.orbax.load_params_numpy`), as the
              orbax source did before it streamed: the floor of that design
and prints each peak against one checkpoint's size (the goal: below one checkpoint).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import diagnose_speed as ds  # noqa: E402


def model_section(layers: int) -> dict:
    c = ds.hf_config(layers)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "max_position_embeddings")
    return {k: c[k] for k in keys}


def generate(root: Path, layers: int) -> None:
    """root/base and root/tuned run folders (reused when complete for this shape)."""
    import orbax.checkpoint as ocp
    import yaml

    from bshadow_jax.models.llama import unflatten_params

    stamp = root / "COMPLETE.json"
    want = {"layers": layers, "model": model_section(layers), "rank": ds.RANK, "noise": ds.NOISE, "v": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    trees = {"base": {}, "tuned": {}}
    for name, shape in ds.tensor_plan(layers):
        trees["base"][name], trees["tuned"][name] = ds._tensors(name, shape, layers)
    ckptr = ocp.StandardCheckpointer()
    for side, flat in trees.items():
        run = root / side
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"model": model_section(layers)}))
        ckptr.save((run / "checkpoints" / "1" / "params").absolute(), unflatten_params(flat))
        ckptr.wait_until_finished()
    stamp.write_text(json.dumps(want))
    print(f"generated {layers}-layer run folders in {time.perf_counter() - t0:.1f}s -> {root}", file=sys.stderr)


def whole_load(base: str, tuned: str) -> None:
    import jax

    from bshadow_jax.formats.orbax import load_params_numpy, resolve_step_dir

    trees = [load_params_numpy(resolve_step_dir(p)[0]) for p in (base, tuned)]
    print(sum(x.nbytes for t in trees for x in jax.tree.leaves(t)))


def params_bytes(run: Path) -> int:
    return sum(p.stat().st_size for p in (run / "checkpoints" / "1" / "params").rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/orbax_bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated run folders for the next run")
    args = ap.parse_args(argv)

    root = Path(args.workdir) / f"L{args.layers}"
    subprocess.run([sys.executable, os.path.abspath(__file__), "_generate", str(root), str(args.layers)], check=True)
    base, tuned = root / "base", root / "tuned"
    ckpt = params_bytes(base)
    exe = shutil.which("bshadow") or str(Path(sys.executable).with_name("bshadow"))
    out = root / "out_ours"
    shutil.rmtree(out, ignore_errors=True)
    cmds = {
        "ours": [exe, "diagnose", str(base), str(tuned), "--out", str(out)],
        "whole": [sys.executable, os.path.abspath(__file__), "_whole", str(base), str(tuned)],
    }
    print(f"{args.layers} layers, {len(ds.tensor_plan(args.layers))} tensors, params item {ckpt / 1e9:.3f} GB per side")
    print(f"{'reader':8s} {'wall s':>8s} {'peak GB':>8s} {'peak/ckpt':>10s}")
    for tool, cmd in cmds.items():
        r = ds.run_timed(cmd, root / f"log_{tool}.txt")
        if r["rc"] != 0:
            print(f"{tool}: exit {r['rc']}; see {root / f'log_{tool}.txt'}")
            return 1
        print(f"{tool:8s} {r['wall_s']:8.1f} {r['peak_rss_bytes'] / 1e9:8.2f} {r['peak_rss_bytes'] / ckpt:10.2f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        generate(Path(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_whole":
        whole_load(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
