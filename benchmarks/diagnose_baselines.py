#!/usr/bin/env python
"""The baselines `benchmarks/diagnose_speed.py` times against `bshadow diagnose`, each run as its own process:

  python benchmarks/diagnose_baselines.py scipy BASE TUNED OUT.json   # a plain SciPy svdvals loop
  python benchmarks/diagnose_baselines.py ww BASE TUNED OUT.json      # WeightWatcher with base_model=

Written here, independently of bshadow_jax, the way a user would write them.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np


def _scipy_metrics(sv: np.ndarray) -> dict:
    sv = sv.astype(np.float64)
    s1, s2 = float(sv.sum()), float((sv * sv).sum())
    p = sv / s1 if s1 > 0 else sv
    p = p[p > 0]
    return {
        "spectral_norm": float(sv[0]) if sv.size else 0.0,
        "fro": math.sqrt(s2),
        "nuclear_norm": s1,
        "stable_rank": s2 / float(sv[0]) ** 2 if s2 > 0 else 0.0,
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())) if s1 > 0 else 0.0,
    }


def weight_map(folder) -> dict[str, str]:
    """Tensor name -> file of a checkpoint folder (sharded with an index, or one model.safetensors)."""
    from safetensors import safe_open

    idx = Path(folder) / "model.safetensors.index.json"
    if idx.exists():
        return json.loads(idx.read_text())["weight_map"]
    with safe_open(str(Path(folder) / "model.safetensors"), "np") as f:
        return {k: "model.safetensors" for k in f.keys()}


def get_tensor(folder, fname: str, name: str) -> np.ndarray:
    from safetensors import safe_open

    # open per tensor: only this tensor's pages are mapped, so RSS stays at a few tensors
    with safe_open(str(Path(folder) / fname), "np") as f:
        return f.get_tensor(name)


def baseline_scipy(base: str, tuned: str, out_json: str) -> None:
    """What a user would write: safe_open both checkpoints, svdvals of each float32 delta."""
    import scipy.linalg

    bmap, tmap = weight_map(base), weight_map(tuned)
    results, spectra = {}, {}
    for name in bmap:
        if name not in tmap:
            continue
        b = get_tensor(base, bmap[name], name)
        if b.ndim != 2:
            continue
        t = get_tensor(tuned, tmap[name], name)
        d = np.subtract(t, b, dtype=np.float32)
        spectra[name] = scipy.linalg.svdvals(d)
        results[name] = _scipy_metrics(spectra[name])
    Path(out_json).write_text(json.dumps(results))
    # singular values too (for the WeightWatcher alpha cross-check), in a cheap binary format
    np.savez(str(Path(out_json).with_suffix(".npz")), **{n.replace(".", "__"): v for n, v in spectra.items()})


def baseline_ww(base: str, tuned: str, out_json: str) -> None:
    """WeightWatcher with base_model=: transformers loads both models, WW analyses the deltas."""
    import logging

    import torch
    import weightwatcher as ww
    from transformers import LlamaForCausalLM

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    base_m = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    tuned_m = LlamaForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    details = ww.WeightWatcher(model=tuned_m, base_model=base_m).analyze()
    results = {}
    for row in details.to_dict("records"):
        results[str(row.get("longname") or row.get("name")) + ".weight"] = {
            # WW's ESD is of ΔWᵀΔW: spectral_norm = σ1², norm = Σσ² = ‖ΔW‖F²
            "spectral_norm": math.sqrt(float(row["spectral_norm"])),
            "fro": math.sqrt(float(row["norm"])),
            "alpha": float(row["alpha"]),
        }
    Path(out_json).write_text(json.dumps(results))




BASELINES = {"scipy": baseline_scipy, "ww": baseline_ww}

if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in BASELINES:
        sys.exit(f"usage: {sys.argv[0]} scipy|ww BASE TUNED OUT.json")
    BASELINES[sys.argv[1]](*sys.argv[2:])
