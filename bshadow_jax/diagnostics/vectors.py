"""1-D tensors (norms, biases) of a diagnosed pair: one vectors.csv row each (docs/outputs.md#diagnose-output).

They are not matrices, so they have no spectrum, but they are part of the update: norms, cosine and
update sparsities, in float64 from the float32 tensors the sources return.
"""
from __future__ import annotations

import math

import numpy as np

from bshadow_jax.diagnostics import names
from bshadow_jax.diagnostics.elementwise import bf16_bits, cosine_from_norms


def _rel(num: float, den: float) -> float:
    """num / den; 0 when both are 0; +inf when only den is (rel_delta's rule)."""
    if den > 0:
        return num / den
    return math.inf if num > 0 else 0.0


def vector_row(name: str, b, t) -> dict:
    """One vectors.csv row: norms, cosine and sparsities of a 1-D tensor pair, in float64."""
    b32, t32 = np.asarray(b, np.float32).reshape(-1), np.asarray(t, np.float32).reshape(-1)
    b64, t64 = b32.astype(np.float64), t32.astype(np.float64)
    nb, nt, nd = (float(np.linalg.norm(x)) for x in (b64, t64, t64 - b64))
    cos = cosine_from_norms(nb, nt, nd * nd)
    p = names.parse_name(name)
    same16 = bf16_bits(t32) == bf16_bits(b32)  # the readers pass on finite values only
    return {"name": name, "component": p["component"], "layer": p["layer"], "module": p["module"],
            "size": int(b32.size), "base_norm": nb, "delta_norm": nd, "rel_delta": _rel(nd, nb), "cosine": cos,
            "update_sparsity": float(np.mean(t32 == b32)) if b32.size else 1.0,
            "update_sparsity_bf16": float(np.mean(same16)) if b32.size else 1.0}


def vector_rows(base_src, tuned_src, skipped: list[dict], rename) -> tuple[list[dict], list[dict]]:
    """vectors.csv rows for the 1-D tensors the plan skipped, and the skipped list without them.

    A 1-D base tensor with a tuned partner (after --rename) of the same shape gets a row and
    leaves `skipped`; without one it stays there as "missing in tuned" or "shape mismatch".
    """
    rules = names.parse_rename(rename)
    tuned_map: dict[str, str] = {}
    for tn in tuned_src.names():
        tuned_map.setdefault(names.apply_rename(tn, rules), tn)
    base_names = set(base_src.names())
    rows, keep = [], []
    for s in skipped:
        n = s["name"]
        bshape = tuple(base_src.shape(n)) if n in base_names else ()
        if len(bshape) != 1:
            keep.append(s)
            continue
        tn = tuned_map.get(n)
        tshape = None if tn is None else tuple(tuned_src.shape(tn))
        if tshape is None:
            keep.append({"name": n, "reason": "missing in tuned"})
        elif tshape != bshape:
            keep.append({"name": n, "reason": f"shape mismatch: base {list(bshape)} vs tuned {list(tshape)}"})
        else:
            b, t = base_src.read(n), tuned_src.read(tn)
            if not (np.isfinite(np.asarray(b, np.float32)).all() and np.isfinite(np.asarray(t, np.float32)).all()):
                keep.append({"name": n, "reason": "non-finite values (NaN/inf)"})
            else:
                rows.append(vector_row(n, b, t))
    return rows, keep
