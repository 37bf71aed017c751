"""The Gram method on CPU ("partial" host path): only what the pair metrics use, with the GIL-free
LAPACK of diagnostics/lapack.py, in the worker threads of diagnostics/host.py.

Every singular value of the delta and its top-K vectors come from one float64 Gram (exact to
~1e-8 sigma_1, so never guarded); the top-max(10, K) tuned and top-HOST_BASE_VECTORS base vectors
from partial eigh of float32 Grams. Intruder tests those base vectors cannot decide, and pairs
whose top-K base or tuned vectors a float32 Gram cannot resolve, are redone exactly (host.py).
With one base and several fine-tunes, the base's factors are computed once per chunk (base_cache).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bshadow_jax.diagnostics import exact, gram, lapack, registry
from bshadow_jax.diagnostics.host import (GRAM64_VEC_FLOOR, HOST_BASE_VECTORS, _gram64, exact_pair_metrics, host_map,
                                         row_blocks)
from bshadow_jax.diagnostics.kernels import PairColumns, intruders, matrix_user_metrics, sizes


def _left_from_right(w, v_NxK, sv_K, floor: float):
    """U = W V / sigma for a tall W (its Gram gave V), in V's dtype, a block of rows at a time;
    vectors of numerically zero sigma are zeroed (arbitrary anyway)."""
    ok = sv_K > sv_K[0] * floor
    u = np.concatenate([np.asarray(w[rows], v_NxK.dtype) @ v_NxK for rows in row_blocks(w)])
    u /= np.where(ok, sv_K, 1.0)
    u[:, ~ok] = 0.0
    return u


def _left_from_gram(w, g, n_vec: int, floor: float):
    """(top n_vec left singular vectors, their singular values) from syevr on the smaller Gram g.

    Only the wanted eigenpairs are computed (LAPACK's MRRR after one tridiagonalisation, with the
    GIL released: see diagnostics/lapack.py), several times cheaper than a full SVD with vectors.
    For a tall matrix the Gram gives V and U = W V / sigma; vectors of numerically zero sigma are
    zeroed (arbitrary).
    """
    lam, vec = lapack.top_eigh(g, n_vec)
    sv = np.sqrt(np.maximum(lam, 0.0))
    if w.shape[0] > w.shape[1]:
        vec = _left_from_right(w, vec, sv, floor)
    return vec.astype(np.float32), sv.astype(np.float32)


def _partial_sizes(shape, topk: int) -> tuple[int, int, int, int]:
    """sizes() and R, the base vectors the partial path computes."""
    k, K, T = sizes(shape, topk)
    return k, K, T, min(k, max(HOST_BASE_VECTORS, K))


def _top_left_task(w, n_vec: int):
    """Top n_vec left vectors and values of W_base or W_tuned (float32 Gram)."""
    w = np.asarray(w, np.float32)
    return _left_from_gram(w, gram.gram_smaller(w), n_vec, gram.GRAM_VEC_FLOOR)


def _base_task(b, n_vec: int):
    """_top_left_task of W_base, and ||W_base||_F (accumulated in float64, a block at a time)."""
    u, s = _top_left_task(b, n_vec)
    b = np.asarray(b, np.float32)
    return u, s, np.float32(np.sqrt(sum(np.sum(np.square(b[rows], dtype=np.float64)) for rows in row_blocks(b))))


def _delta_task(b, t, n_vec: int):
    """Every singular value of the delta and its top n_vec left vectors from one float64 Gram
    (values exact to ~1e-8 sigma_1, so never guarded as the float32 Gram path is)."""
    d = np.asarray(t, np.float32) - np.asarray(b, np.float32)
    lam, vec = lapack.eigvalsh_and_top(_gram64(d), n_vec)
    sd = np.sqrt(np.maximum(lam, 0.0)) + 0.0  # no -0.0
    if d.shape[0] > d.shape[1]:
        vec = _left_from_right(d, vec, sd[:n_vec], GRAM64_VEC_FLOOR)
    return vec.astype(np.float32), sd.astype(np.float32)


class PartialFactors(NamedTuple):
    """What the pair metrics need from the partial decompositions, stacked over B pairs (float32).

    Fields:
        base_fro: ||W_base||_F [B].
        ub_BxMxR, sb_BxR: top-R left vectors and values of W_base.
        ut_BxMxT, st_BxT: top-max(T, K) left vectors and values of W_tuned.
        ud_BxMxK, sd_BxK: top-K left vectors and every singular value (k of them) of the delta.
    """
    base_fro: np.ndarray
    ub_BxMxR: np.ndarray
    sb_BxR: np.ndarray
    ut_BxMxT: np.ndarray
    st_BxT: np.ndarray
    ud_BxMxK: np.ndarray
    sd_BxK: np.ndarray


def _partial_decompositions(base_BxMxN, tuned_BxMxN, topk: int, base_cache: dict | None = None) -> PartialFactors:
    """What the pair metrics need, and no more, as three independent tasks per pair (delta,
    base, tuned) so that even a one-pair chunk (an embedding) keeps every core busy. With a
    base_cache that already holds this stack's base factors, the base tasks are not run again."""
    B = len(base_BxMxN)
    k, K, _, R = _partial_sizes(base_BxMxN.shape[1:], topk)
    T = exact.tuned_vectors(k, topk)
    cached = None if base_cache is None else base_cache.get(("partial", R))
    tasks = []
    for i in range(B):  # the float64 delta, the longest, first
        tasks += [functools.partial(_delta_task, base_BxMxN[i], tuned_BxMxN[i], K),
                  functools.partial(_top_left_task, tuned_BxMxN[i], T)]
        if cached is None:
            tasks.append(functools.partial(_base_task, base_BxMxN[i], R))
    res = host_map(lambda task: task(), tasks)
    step = 2 if cached is not None else 3
    delta, tuned = res[0::step], res[1::step]
    base = cached if cached is not None else res[2::3]
    if base_cache is not None:
        base_cache[("partial", R)] = base
    return PartialFactors(np.stack([r[2] for r in base]), np.stack([r[0] for r in base]), np.stack([r[1] for r in base]),
                          np.stack([r[0] for r in tuned]), np.stack([r[1] for r in tuned]),
                          np.stack([r[0] for r in delta]), np.stack([r[1] for r in delta]))


class PartialPairMetrics(NamedTuple):
    """Pair metrics from PartialFactors (stacked: [B] each).

    Fields:
        decided: the intruder test was decided by the top-R base vectors.
        base_fro, intruder_count: as in kernels.PairColumns.
        cos_bd, cos_bt, sb, sb1, st, st1: as in gram.GramPairMetrics.
    """
    decided: jax.Array
    base_fro: jax.Array
    intruder_count: jax.Array
    cos_bd: jax.Array
    cos_bt: jax.Array
    sb: jax.Array
    sb1: jax.Array
    st: jax.Array
    st1: jax.Array


def _partial_metrics(base_fro, ub_MxR, sb_R, ut_MxT, st_T, ud_MxK, sd, topk: int, complete: bool):
    k = sd.shape[0]
    _, K, T = sizes((k, k), topk)
    count, decided = intruders(ut_MxT[:, :T], st_T[:T], ub_MxR, sb_R, sb_R[0], complete=complete,
                               rel_floor=gram.GRAM_VEC_FLOOR)
    return PartialPairMetrics(
        decided=decided, base_fro=base_fro, intruder_count=count,
        cos_bd=ub_MxR[:, :K].T @ ud_MxK[:, :K], cos_bt=ub_MxR[:, :K].T @ ut_MxT[:, :K],
        sb=sb_R[:K], sb1=sb_R[0], st=st_T[:K], st1=st_T[0])


@functools.lru_cache(maxsize=64)
def _jitted_partial_metrics(topk: int, complete: bool):
    return jax.jit(jax.vmap(functools.partial(_partial_metrics, topk=topk, complete=complete)))


@functools.lru_cache(maxsize=64)
def _jitted_delta_matrix_metrics(reg_key):
    del reg_key

    def one(b, t):
        return matrix_user_metrics(t.astype(jnp.float32) - b.astype(jnp.float32))

    return jax.jit(jax.vmap(one))


def partial_pairs(base_BxMxN, tuned_BxMxN, *, topk: int, base_cache: dict | None = None) -> PairColumns:
    """The Gram method on CPU: partial host eigendecompositions, the same jitted, vmapped metrics.

    Only the small factors cross back from the worker threads (no stacked copies of the
    matrices). A tuned vector whose intruder test the top base vectors cannot decide (its
    largest cosine within INTRUDER_MARGIN of the threshold, or too much of it outside those
    vectors) is recomputed with full SVDs; redo_intruders marks those pairs.

    Args:
        base_BxMxN, tuned_BxMxN: host stacks of equal shape.
        topk: K of base_overlap and the delta's top-k metrics.
        base_cache: shared by the calls on one base stack with several tuned stacks; the base's
            factors are computed once (exact_pair_metrics).

    Returns:
        PairColumns of the B pairs (redo_sv all False: float64 Gram values need no guard).
    """
    B = len(base_BxMxN)
    factors = _partial_decompositions(base_BxMxN, tuned_BxMxN, topk, base_cache)
    k, _, _, R = _partial_sizes(base_BxMxN.shape[1:], topk)
    out = jax.device_get(_jitted_partial_metrics(topk, R == k)(*factors))
    user = {}
    if registry.registered_metrics("matrix"):
        user = jax.device_get(_jitted_delta_matrix_metrics(registry.cache_key())(base_BxMxN, tuned_BxMxN))
    sv = np.asarray(factors.sd_BxK, np.float64)

    def redo_exact(b_, t_):
        return exact_pair_metrics(b_, t_, topk)

    # the delta's values come from a float64 Gram (exact) and its vectors are resolved down to
    # GRAM64_VEC_FLOOR < DEFINED_REL: only base and tuned vectors can be in doubt
    ov, rot, redo_vec, (vec_rows, ex) = gram.finish_vectors(out, sv, None, base_BxMxN, tuned_BxMxN, redo_exact,
                                                            floor=gram.GRAM_VEC_FLOOR, delta_floor=GRAM64_VEC_FLOOR)
    count = np.array(out.intruder_count)
    if ex is not None:
        count[vec_rows] = ex.intruder_count
    undecided = np.nonzero(~np.asarray(out.decided) & ~redo_vec)[0]
    if undecided.size:
        count[undecided] = exact_pair_metrics(base_BxMxN[undecided], tuned_BxMxN[undecided], topk).intruder_count
    redo_intruders = np.zeros(B, bool)
    redo_intruders[undecided] = True
    return PairColumns(base_fro=np.asarray(out.base_fro), base_overlap=ov, subspace_rotation=rot,
                       intruder_count=count, sv=sv, user={name: np.asarray(v) for name, v in user.items()},
                       redo_sv=np.zeros(B, bool), redo_intruders=redo_intruders, redo_vectors=redo_vec)
