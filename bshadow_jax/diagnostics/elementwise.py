"""The elementwise pair metrics on the host: base_fro, cosine, update_sparsity, update_sparsity_bf16.

The same definitions as kernels.elementwise (the device path), computed a block of rows at a time in
the worker threads, so that no stacked temporary of the chunk (differences, masks, bf16 casts, padded
device copies) is ever resident: on CPU these four numbers cost a few passes over memory, not copies.
"""
from __future__ import annotations

import math

import numpy as np

from bshadow_jax.diagnostics.host import host_map, row_blocks


def _sq(x) -> float:
    return float(np.einsum("ij,ij->", x, x, dtype=np.float64))  # float64 accumulation, no float64 copy


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """The bfloat16 rounding (to nearest, ties to even) of finite float32 values, as its 16 bits."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


def cosine_from_norms(nb: float, nt: float, nd2: float) -> float:
    """cos(b, t) from |b|, |t| and |t - b|^2: 1 - (|t - b|^2 - (|b| - |t|)^2) / (2 |b| |t|), so that small
    updates keep their digits (exactly 1 for identical weights); 1 when both are zero, 0 when one is."""
    if nb > 0 and nt > 0:
        return min(1.0, max(-1.0, 1.0 - (nd2 - (nb - nt) ** 2) / (2.0 * nb * nt)))
    return 1.0 if nb == nt else 0.0


def _one(pair) -> tuple[float, float, float, float]:
    b, t = (np.asarray(x, np.float32) for x in pair)
    nb2 = nt2 = nd2 = 0.0
    same = same16 = 0
    for rows in row_blocks(b):
        bb, tt = b[rows], t[rows]
        nb2 += _sq(bb)
        nt2 += _sq(tt)
        dd = tt - bb  # the float32 delta, as the metrics of the delta see it
        nd2 += _sq(dd)
        same += int(np.count_nonzero(dd == 0))
        same16 += int(np.count_nonzero(bf16_bits(tt) == bf16_bits(bb)))
    nb, nt = math.sqrt(nb2), math.sqrt(nt2)
    cos = cosine_from_norms(nb, nt, nd2)
    n = b.size
    return nb, cos, (same / n) if n else 1.0, (same16 / n) if n else 1.0


def host_elementwise(base_BxMxN, tuned_BxMxN) -> dict:
    """{base_fro, cosine, update_sparsity, update_sparsity_bf16: numpy [B]} of a stack of pairs.

    update_sparsity counts entries whose float32 difference is exactly 0 (t == b but for -0/+0 and
    NaN, which the readers never pass on: non-finite matrices are skipped before this).
    """
    out = np.array(host_map(_one, list(zip(base_BxMxN, tuned_BxMxN))), np.float64).reshape(-1, 4)
    names = ("base_fro", "cosine", "update_sparsity", "update_sparsity_bf16")
    return {n: out[:, i].astype(np.float32) for i, n in enumerate(names)}
