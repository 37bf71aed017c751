"""Reading each tool's results and checking that they agree, for benchmarks/diagnose_speed.py.

Agreement is measured against the plain SciPy loop on the metrics that overlap, and the vector
metrics (base_overlap, intruder_count) of bshadow against float64 NumPy SVDs written here from the
definitions in docs/metrics.md.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from diagnose_baselines import get_tensor, weight_map  # beside this script


def load_results(tool: str, path: Path) -> dict:
    if tool in ("ours", "ours_values"):
        with open(path / "metrics.csv", newline="") as f:
            return {r["name"]: {"spectral_norm": float(r["delta_spectral_norm"]), "fro": float(r["delta_fro"]),
                                "effective_rank": float(r["delta_effective_rank"])} for r in csv.DictReader(f)}
    if tool == "modeldelta":
        # modeldelta 0.4.4 reports every tensor of >= 1000 entries; for min(m, n) > 8192 its singular values
        # (and so its effective rank) are the top-k of a randomized range finder, not the full spectrum
        mods = json.loads(path.read_text())["modules"]
        return {m["name"]: {"fro": m["frob_norm"], "cosine": m["cosine_sim"], "sparsity_1e-5": m["sparsity"],
                            **({"spectral_norm": m["top_singular_values"][0], "effective_rank": m["effective_rank"]}
                               if m.get("has_svd") else {})} for m in mods}
    return json.loads(path.read_text())


def agreement(ref: dict, other: dict, keys=("spectral_norm", "fro", "effective_rank")) -> dict:
    common = sorted(set(ref) & set(other))
    out = {"matrices_ref": len(ref), "matrices_other": len(other), "common": len(common)}
    for k in keys:
        rel = [abs(other[n][k] - ref[n][k]) / max(abs(ref[n][k]), 1e-30) for n in common
               if k in other[n] and k in ref[n]]
        if rel:
            out[f"max_rel_{k}"] = max(rel)
    return out


def vector_metric_check(base: Path, tuned: Path, ours_out: Path, topk: int = 8, max_dim: int = 8192) -> dict:
    """base_overlap and intruder_count of bshadow against float64 numpy SVDs written here from docs/metrics.md's
    definitions, on the strongest delta (largest delta_fro) of every matrix shape up to max_dim rows
    and columns (the singular values are checked against the SciPy loop; these need vectors)."""
    with open(ours_out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pick: dict[tuple, dict] = {}
    for r in rows:
        shape = (int(r["rows"]), int(r["cols"]))
        if max(shape) <= max_dim and (shape not in pick or float(r["delta_fro"]) > float(pick[shape]["delta_fro"])):
            pick[shape] = r
    worst_overlap, mismatches, names = 0.0, [], []
    bmap, tmap = weight_map(base), weight_map(tuned)
    for shape, r in pick.items():
        b32, t32 = get_tensor(base, bmap[r["name"]], r["name"]), get_tensor(tuned, tmap[r["name"]], r["name"])
        b, t, d = b32.astype(np.float64), t32.astype(np.float64), (t32 - b32).astype(np.float64)  # float32 delta, as bshadow
        ub, sb, _ = np.linalg.svd(b, full_matrices=False)
        ut, _, _ = np.linalg.svd(t, full_matrices=False)
        ud, sd, _ = np.linalg.svd(d, full_matrices=False)
        K, T = min(topk, min(shape)), min(10, min(shape))
        kb, kd = int(np.sum(sb[:K] > 1e-4 * sb[0])), int(np.sum(sd[:K] > 1e-4 * sd[0]))  # defined vectors
        n_def = min(kb, kd)  # r of the definition
        overlap = float(np.sum((ub[:, :kb].T @ ud[:, :kd]) ** 2) / n_def) if n_def else 0.0
        intruders = int(np.sum(np.max(np.abs(ut[:, :T].T @ ub), axis=1) < 0.5))
        worst_overlap = max(worst_overlap, abs(overlap - float(r["base_overlap"])))
        if intruders != int(float(r["intruder_count"])):
            mismatches.append(f"{r['name']}: {r['intruder_count']} vs {intruders}")
        names.append(r["name"])
    return {"matrices": len(names), "max_abs_base_overlap": worst_overlap,
            "intruder_count_mismatches": len(mismatches), "mismatched": mismatches}
