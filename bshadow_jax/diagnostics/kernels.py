"""Per-matrix metric pieces shared by every method (jnp; vmapped and jitted by the callers),
and PairColumns/SingleColumns, the typed results each method hands back to diagnostics/stacks.py.

  base_overlap       mean squared cosine of the r principal angles between the top-K left
                     singular subspaces of W_base and of the delta, over their defined vectors
  subspace_rotation  1 - the same between W_base and W_tuned
  intruder_count     tuned top-N_INTRUDER left vectors whose largest |cosine| with any base left
                     vector is below INTRUDER_THRESHOLD (Shuttleworth et al. 2024)
  elementwise        base_fro, cosine, update_sparsity, update_sparsity_bf16 of the entries

A vector is defined when sigma_i > DEFINED_REL * sigma_1 (docs/metrics.md#defined-singular-vectors).
Paths whose vectors come from float32 Grams cannot resolve sigma below about GRAM_VEC_FLOOR *
sigma_1; vectors_unresolved() flags the pairs whose top-K then needs an exact recomputation.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from bshadow_jax.diagnostics import registry

N_INTRUDER = 10  # Shuttleworth et al. 2024: top-10 left singular vectors of W_tuned
INTRUDER_THRESHOLD = 0.5
INTRUDER_MARGIN = 1e-3
DEFINED_REL = 1e-4  # sigma_i <= DEFINED_REL * sigma_1: numerically zero, its vector arbitrary


class PairColumns(NamedTuple):
    """One method's results over a stack of B (base, tuned) pairs, as host numpy arrays.

    Fields (length B unless noted):
        base_fro: ||W_base||_F.
        base_overlap, subspace_rotation: see the module docstring.
        intruder_count: see the module docstring (float32, whole numbers).
        sv: [B, k] singular values of the delta, descending, float64.
        user: registered "matrix" metrics of the delta, by metric name.
        redo_sv: bool; the delta's singular values were recomputed exactly (Gram guard).
        redo_intruders: bool; the intruder test was redone with full SVDs.
        redo_vectors: bool; the pair was recomputed with full SVDs because a float32 Gram could
            not resolve whether some top-K vector is defined (vectors_unresolved).
    """
    base_fro: np.ndarray
    base_overlap: np.ndarray
    subspace_rotation: np.ndarray
    intruder_count: np.ndarray
    sv: np.ndarray
    user: dict
    redo_sv: np.ndarray
    redo_intruders: np.ndarray
    redo_vectors: np.ndarray


class SingleColumns(NamedTuple):
    """Results over a stack of B single matrices (host numpy).

    Fields:
        user: registered "matrix" metrics, by name, [B] each.
        sv: [B, k] singular values, descending, float64.
        redo_sv: [B] bool, values recomputed exactly (float32 Gram guard), or None.
    """
    user: dict
    sv: np.ndarray
    redo_sv: np.ndarray | None = None


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
    """Mask of the singular values whose vectors are defined: s > max(DEFINED_REL, rel_floor) * ref.

    Vectors of (numerically) zero singular values are arbitrary: they never count. A float32
    Gram cannot tell sigma below ~sqrt(GRAM_REL_ERR) * sigma_1 from zero (rel_floor).
    """
    return s > jnp.maximum(ref, 0.0) * max(DEFINED_REL, rel_floor) + jnp.finfo(s.dtype).tiny


def mean_sq_cosine(c_KxK, va_K, vb_K):
    """(||A^T B||_F^2 / r, r) over the defined columns of two sets of orthonormal vectors, from
    their cosines c = A^T B: the mean squared cosine of the r = min(#va, #vb) principal angles
    between the two spans (0 when r = 0). Works on [..., K, K] stacks (jnp or numpy inputs)."""
    c = jnp.where(va_K[..., :, None] & vb_K[..., None, :], c_KxK, 0.0)
    r = jnp.minimum(jnp.sum(va_K, axis=-1), jnp.sum(vb_K, axis=-1))
    val = jnp.sum(c * c, axis=(-2, -1)) / jnp.maximum(r, 1).astype(c.dtype)
    return jnp.where(r > 0, val, 0.0), r


def subspace_metrics(ub_MxK, sb_K, ud_MxK, sd_K, ut_MxK, st_K, K: int):
    """(base_overlap, subspace_rotation) from the top-K left vectors and values of W_base, the
    delta and W_tuned, whose vectors are exact (or resolved: see vectors_unresolved)."""
    return subspace_from_cosines(ub_MxK[:, :K].T @ ud_MxK[:, :K], ub_MxK[:, :K].T @ ut_MxK[:, :K],
                                 sb_K[:K], sb_K[0], sd_K[:K], sd_K[0], st_K[:K], st_K[0])


def subspace_from_cosines(c_bd, c_bt, sb_K, sb1, sd_K, sd1, st_K, st1):
    """(base_overlap, subspace_rotation) from the cosine matrices U_base^T U_delta and
    U_base^T U_tuned and the top-K singular values (and sigma_1) of each side; any leading axes."""
    vb = valid_vectors(sb_K, jnp.asarray(sb1)[..., None])
    vd = valid_vectors(sd_K, jnp.asarray(sd1)[..., None])
    vt = valid_vectors(st_K, jnp.asarray(st1)[..., None])
    overlap_, _ = mean_sq_cosine(c_bd, vb, vd)
    kept, r = mean_sq_cosine(c_bt, vb, vt)
    return overlap_, jnp.where(r > 0, jnp.clip(1.0 - kept, 0.0, 1.0), 0.0)


def vectors_unresolved(s_BxK, s1_B, floor: float, *, exact_values: bool) -> np.ndarray:
    """[B] bool: some top-K vector computed from a Gram resolved down to floor * sigma_1 may be
    defined (sigma_i > DEFINED_REL * sigma_1) but inaccurate.

    exact_values: the singular values are exact (then only those strictly between the two
    thresholds are in doubt); else they are the Gram's own estimates, which cannot tell sigma
    below floor * sigma_1 from zero, so any such value is in doubt. A zero matrix is resolved.
    """
    s = np.asarray(s_BxK, np.float64)
    s1 = np.asarray(s1_B, np.float64)[:, None]
    low = s <= floor * s1
    if exact_values:
        low &= s > DEFINED_REL * s1
    return np.any(low, axis=1) & (s1[:, 0] > 0)


def elementwise(b, t):
    """(base_fro, cosine, update_sparsity, update_sparsity_bf16) of one pair of float32 matrices.

    cosine = <b, t> / (|b| |t|), written as 1 - (|t - b|^2 - (|b| - |t|)^2) / (2 |b| |t|) so that
    small updates keep their digits (exactly 1 for identical weights); 1 when both are zero, 0
    when only one is. The sums are taken per row, then over rows.
    """
    def sq(x):
        return jnp.sum(jnp.sum(x * x, axis=-1))

    b = b.astype(jnp.float32)
    t = t.astype(jnp.float32)
    nb, nt = jnp.sqrt(sq(b)), jnp.sqrt(sq(t))
    both = (nb > 0) & (nt > 0)
    den = jnp.where(both, 2.0 * nb * nt, 1.0)
    cos = jnp.clip(1.0 - (sq(t - b) - (nb - nt) ** 2) / den, -1.0, 1.0)
    cos = jnp.where(both, cos, jnp.where((nb > 0) | (nt > 0), 0.0, 1.0))
    same = jnp.mean((t == b).astype(jnp.float32))
    same16 = jnp.mean((t.astype(jnp.bfloat16) == b.astype(jnp.bfloat16)).astype(jnp.float32))
    return nb, cos, same, same16


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
