"""Per-matrix metric pieces shared by every method (jnp; vmapped and jitted by the callers),
and PairColumns/SingleColumns, the typed results each method hands back to diagnostics/stacks.py.

  base_overlap    sum of squared cosines between the top-K left singular vectors of W_base and
                  of the delta, over K
  intruder_count  tuned top-N_INTRUDER left vectors whose largest |cosine| with any base left
                  vector is below INTRUDER_THRESHOLD (Shuttleworth et al. 2024)
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from bshadow_jax.diagnostics import registry

N_INTRUDER = 10  # Shuttleworth et al. 2024: top-10 left singular vectors of W_tuned
INTRUDER_THRESHOLD = 0.5
INTRUDER_MARGIN = 1e-3


class PairColumns(NamedTuple):
    """One method's results over a stack of B (base, tuned) pairs, as host numpy arrays.

    Fields (length B unless noted):
        base_fro: ||W_base||_F.
        base_overlap: see the module docstring.
        intruder_count: see the module docstring (float32, whole numbers).
        sv: [B, k] singular values of the delta, descending, float64.
        user: registered "matrix" metrics of the delta, by metric name.
        redo_sv: bool; the delta's singular values were recomputed exactly (Gram guard).
        redo_intruders: bool; the intruder test was redone with full SVDs.
    """
    base_fro: np.ndarray
    base_overlap: np.ndarray
    intruder_count: np.ndarray
    sv: np.ndarray
    user: dict
    redo_sv: np.ndarray
    redo_intruders: np.ndarray


class SingleColumns(NamedTuple):
    """Results over a stack of B single matrices (host numpy).

    Fields:
        user: registered "matrix" metrics, by name, [B] each.
        sv: [B, k] singular values, descending, float64.
    """
    user: dict
    sv: np.ndarray


def fro(w):
    """Frobenius norm."""
    return jnp.sqrt(jnp.sum(w * w))


def sizes(shape, topk: int) -> tuple[int, int, int]:
    """k = min(m, n), K (top-k vectors of base and delta) and T (tuned vectors of the intruder test)."""
    k = min(shape)
    return k, max(1, min(topk, k)), min(N_INTRUDER, k)


def pair_setup(b, t, topk: int):
    """float32 base, tuned and delta, followed by the sizes() of the pair."""
    b = b.astype(jnp.float32)
    t = t.astype(jnp.float32)
    return (b, t, t - b) + sizes(b.shape, topk)


def valid_vectors(s, ref, rel_floor: float = 0.0):
    """Mask of the singular values whose vectors are defined.

    Vectors of (numerically) zero singular values are arbitrary: they never count. A float32
    Gram cannot tell sigma below ~sqrt(GRAM_REL_ERR) * sigma_1 from zero (rel_floor).
    """
    k = s.shape[-1]
    return s > jnp.maximum(ref, 0.0) * max(k * 1e-6, rel_floor) + jnp.finfo(s.dtype).tiny


def overlap(ub_MxK, sb_K, ud_MxK, sd_K, K: int, rel_floor: float = 0.0, rel_floor_d: float | None = None):
    """base_overlap from the top-K left vectors and values of W_base and of the delta."""
    # directions of (numerically) zero singular values are arbitrary: a rank-2 delta has only
    # two defined directions, so the others contribute nothing (still divided by K)
    vb = valid_vectors(sb_K[:K], sb_K[0], rel_floor)
    vd = valid_vectors(sd_K[:K], sd_K[0], rel_floor if rel_floor_d is None else rel_floor_d)
    c = ub_MxK[:, :K].T @ ud_MxK[:, :K]
    c = jnp.where(vb[:, None] & vd[None, :], c, 0.0)
    val = jnp.sum(c * c) / K
    zero = ~(sd_K[0] > 0) | ~(sb_K[0] > 0)
    return jnp.where(zero, 0.0, val)


def intruders(ut_MxT, st_T, ub_MxR, sb_R, sb_max, *, complete: bool, rel_floor: float = 0.0):
    """(count, decided) from tuned top-T and base top-R left vectors.

    With complete=False (R < k base vectors) a tuned vector is decided when its largest cosine
    is clear of the threshold by INTRUDER_MARGIN, or when too little of it lies outside those R
    vectors to reach the threshold there; `decided` is True when every one is.
    """
    vb_R = valid_vectors(sb_R, sb_max, rel_floor)
    vt_T = valid_vectors(st_T, st_T[0], rel_floor)
    c_TxR = jnp.where(vb_R[None, :], ut_MxT.T @ ub_MxR, 0.0)
    maxc_T = jnp.max(jnp.abs(c_TxR), axis=1)
    is_intr_T = (maxc_T < INTRUDER_THRESHOLD) & vt_T
    count = jnp.sum(is_intr_T).astype(jnp.float32)
    if complete:
        return count, jnp.array(True)
    resid_T = 1.0 - jnp.sum(c_TxR * c_TxR, axis=1)
    lo = INTRUDER_THRESHOLD - INTRUDER_MARGIN
    sure_T = (maxc_T >= INTRUDER_THRESHOLD + INTRUDER_MARGIN) | ((maxc_T < lo) & (resid_T < lo * lo)) | ~vt_T
    return count, jnp.all(sure_T)


def matrix_user_metrics(w) -> dict:
    """Registered "matrix" metrics of one matrix: {name: float32 scalar}."""
    return {m.name: jnp.asarray(m.fn(w), jnp.float32) for m in registry.registered_metrics("matrix")}


def sv_user_metrics(sv_K) -> dict:
    """Registered "singular_values" metrics of one spectrum: {name: float32 scalar}."""
    return {m.name: jnp.asarray(m.fn(sv_K), jnp.float32) for m in registry.registered_metrics("singular_values")}
