"""The Gram method on the device (method "gram" with the "jax" eig backend).

eigh of the float32 Gram on the smaller side of W_base, W_tuned and the delta gives singular
values and left singular vectors (for a tall [out, in] matrix, U = W V / sigma). Vectors are as
accurate as the exact path's wherever they are well defined (separated singular values). The
delta's small singular values are guarded: a float32 Gram resolves eigenvalues only down to
about GRAM_REL_ERR * lambda_max, so when the bound on the resulting S1 error
(sum of min(sqrt(d), d / sigma_i)) exceeds SMALL_SV_TOL * S1 the singular values are
recomputed by an exact SVD. Low-rank deltas always take that route. The same floor limits the
vectors: a top-K singular value below GRAM_VEC_FLOOR * sigma_1 may still be defined (above
kernels.DEFINED_REL * sigma_1) with an inaccurate vector, so such pairs (kernels.vectors_unresolved)
get base_overlap, subspace_rotation and intruder_count from exact SVDs instead.

The host variant (diagnostics/host.py) shares gram_smaller, the guard (sv_from_eigs) and the
jitted Gram of single matrices.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bshadow_jax.diagnostics import exact, registry
from bshadow_jax.diagnostics import mesh as meshlib
from bshadow_jax.diagnostics.kernels import (PairColumns, SingleColumns, fro, intruders, matrix_user_metrics,
                                             pair_setup, subspace_from_cosines, valid_vectors, vectors_unresolved)

GRAM_REL_ERR = 2e-6  # calibrated bound of |lambda_hat - lambda| / lambda_max for float32 Grams (x10 safety)
GRAM_VEC_FLOOR = math.sqrt(GRAM_REL_ERR)  # sigma / sigma_1 below this: direction undefined in a float32 Gram
SMALL_SV_TOL = 1e-4  # accepted bound on the relative S1 error from unresolved small values


class GramPairMetrics(NamedTuple):
    """Gram-path metrics of one pair (stacked: one leading axis more).

    Fields:
        lam: eigenvalues of the delta's float32 Gram, ascending (as eigvalsh returns them).
        user: registered "matrix" metrics of the delta, by name.
        base_fro, intruder_count: as in kernels.PairColumns.
        cos_bd, cos_bt: [K, K] cosines U_base^T U_delta and U_base^T U_tuned (top-K left vectors).
        sb, st: top-K singular values of W_base and W_tuned; sb1, st1: their sigma_1.
    """
    lam: jax.Array
    user: dict
    base_fro: jax.Array
    intruder_count: jax.Array
    cos_bd: jax.Array
    cos_bt: jax.Array
    sb: jax.Array
    sb1: jax.Array
    st: jax.Array
    st1: jax.Array


def gram_smaller(w):
    """The Gram on the smaller side (W W^T when m <= n, whose eigenvectors are U); numpy or jax."""
    m, n = w.shape
    return w @ w.T if m <= n else w.T @ w


def gram_left(w_MxN, n_vec: int):
    """(top n_vec left singular vectors, all singular values, Gram eigenvalues descending) from
    eigh of the smaller Gram.

    [out, in] with out <= in: eigenvectors of W W^T are U. Otherwise eigh(W^T W) gives V and
    U = W V / sigma (vectors of numerically zero sigma are zeroed: they are arbitrary anyway).
    """
    m, n = w_MxN.shape
    if m <= n:
        lam, vecs = jnp.linalg.eigh(w_MxN @ w_MxN.T)
        lam, vecs = lam[::-1], vecs[:, ::-1]
        sv = jnp.sqrt(jnp.maximum(lam, 0.0))
        return vecs[:, :n_vec], sv, lam
    lam, vecs = jnp.linalg.eigh(w_MxN.T @ w_MxN)
    lam, vecs = lam[::-1], vecs[:, ::-1]
    sv = jnp.sqrt(jnp.maximum(lam, 0.0))
    ok = valid_vectors(sv[:n_vec], sv[0], GRAM_VEC_FLOOR)
    u = (w_MxN @ vecs[:, :n_vec]) / jnp.where(ok, sv[:n_vec], 1.0)
    return jnp.where(ok[None, :], u, 0.0), sv, lam


def sv_from_eigs(lam_BxK, inner_dim: int):
    """Singular values from the eigenvalues of float32 Grams, and whether they can be trusted.

    Args:
        lam_BxK: Gram eigenvalues, descending, one row per matrix.
        inner_dim: max(m, n) of the matrices (unused by the bound; kept for callers).

    Returns:
        (sv float64 [B, K], ok bool [B]): ok is False where the bound on the S1 error from
        eigenvalues below the float32 Gram's resolution exceeds SMALL_SV_TOL * S1.
    """
    lam = np.maximum(np.asarray(lam_BxK, np.float64), 0.0) + 0.0  # no -0.0
    sv = np.sqrt(lam)
    delta = GRAM_REL_ERR * lam[:, :1]
    err = np.minimum(np.sqrt(delta), delta / np.maximum(sv, 1e-300))
    S1 = sv.sum(axis=1)
    ok = (err.sum(axis=1) <= SMALL_SV_TOL * S1) | ~(S1 > 0)
    return sv, ok


def _gram_pair_one(b, t, topk: int) -> GramPairMetrics:
    b, t, d, k, K, T = pair_setup(b, t, topk)
    ub, sb, _ = gram_left(b, k)
    ut, st, _ = gram_left(t, max(T, K))
    ud, sd, lam_d = gram_left(d, K)
    count, _ = intruders(ut[:, :T], st[:T], ub, sb, sb[0], complete=True, rel_floor=GRAM_VEC_FLOOR)
    return GramPairMetrics(lam=lam_d[::-1], user=matrix_user_metrics(d), base_fro=fro(b), intruder_count=count,
                           cos_bd=ub[:, :K].T @ ud[:, :K], cos_bt=ub[:, :K].T @ ut[:, :K],
                           sb=sb[:K], sb1=sb[0], st=st[:K], st1=st[0])


def finish_vectors(out, sv, redo_sv, base_BxMxN, tuned_BxMxN, redo_exact, *, floor: float, delta_floor: float):
    """base_overlap and subspace_rotation from Gram-path cosines and values, the unresolved pairs
    (kernels.vectors_unresolved) redone exactly.

    Args:
        out: the path's stacked metrics with cos_bd, cos_bt, sb, sb1, st, st1 (first B rows used).
        sv: [B, k] singular values of the deltas (exact where redo_sv).
        redo_sv: [B] bool, or None for values that are always exact.
        base_BxMxN, tuned_BxMxN: the host stacks (for the exact redo).
        redo_exact: f(base, tuned) -> metrics with base_overlap, subspace_rotation, intruder_count.
        floor: resolution of the base and tuned vectors (relative to sigma_1).
        delta_floor: resolution of the delta's vectors.

    Returns:
        (base_overlap, subspace_rotation, redo_vectors [B] bool, exact metrics of the redone
        pairs or None).
    """
    B = sv.shape[0]
    K = np.asarray(out.sb).shape[1]
    sb, sb1 = np.asarray(out.sb)[:B], np.asarray(out.sb1)[:B]
    st, st1 = np.asarray(out.st)[:B], np.asarray(out.st1)[:B]
    sd = sv[:, :K]
    exact_d = np.ones(B, bool) if redo_sv is None else redo_sv
    doubt = vectors_unresolved(sb, sb1, floor, exact_values=False) | vectors_unresolved(st, st1, floor, exact_values=False)
    doubt |= np.where(exact_d, vectors_unresolved(sd, sv[:, 0], delta_floor, exact_values=True),
                      vectors_unresolved(sd, sv[:, 0], delta_floor, exact_values=False))
    ov, rot = subspace_from_cosines(np.asarray(out.cos_bd)[:B], np.asarray(out.cos_bt)[:B], sb, sb1,
                                    sd.astype(np.float32), sv[:, 0].astype(np.float32), st, st1)
    ov, rot = np.array(ov), np.array(rot)
    redo = np.nonzero(doubt)[0]
    ex = None
    if redo.size:
        ex = redo_exact(base_BxMxN[redo], tuned_BxMxN[redo])
        ov[redo] = np.asarray(ex.base_overlap)[:redo.size]
        rot[redo] = np.asarray(ex.subspace_rotation)[:redo.size]
    return ov, rot, doubt, (redo, ex)


@functools.lru_cache(maxsize=64)
def _jitted_pairs(topk: int, mesh, reg_key):
    del reg_key  # part of the cache key only: a new registered metric means a new function
    return meshlib.over_stack(lambda b, t: _gram_pair_one(b, t, topk), mesh, sequential=meshlib.on_cpu(mesh))


def device_pairs(base_BxMxN, tuned_BxMxN, *, topk: int, mesh, pad_to: int) -> PairColumns:
    """The Gram method on the device for a stack of pairs, guarded deltas redone by exact SVDs.

    Every tuned and base vector comes from a full eigh here, so the intruder test is always
    decided (redo_intruders is all False).

    Args:
        base_BxMxN, tuned_BxMxN: host stacks of equal shape.
        topk: K of base_overlap and the delta's top-k metrics.
        mesh: mesh to shard the stack over, or None.
        pad_to: pad the stack to at least this length.

    Returns:
        PairColumns of the B pairs.
    """
    B, m, n = base_BxMxN.shape
    Bp = meshlib.padded_size(max(B, pad_to), mesh)
    b, t = meshlib.put_padded(base_BxMxN, Bp, mesh), meshlib.put_padded(tuned_BxMxN, Bp, mesh)
    out = jax.device_get(_jitted_pairs(topk, mesh, registry.cache_key())(b, t))
    lam = np.asarray(out.lam, np.float64)[:B, ::-1]
    sv, ok = sv_from_eigs(lam, max(m, n))
    redo = np.nonzero(~ok)[0]
    if redo.size:
        d = tuned_BxMxN[redo].astype(np.float32) - base_BxMxN[redo].astype(np.float32)
        sv[redo] = exact.svdvals(d, mesh)
    redo_sv = np.zeros(B, bool)
    redo_sv[redo] = True

    def redo_exact(b_, t_):
        return exact.device_pairs(b_, t_, topk=topk, mesh=mesh, pad_to=0)

    ov, rot, redo_vec, (vec_rows, ex) = finish_vectors(out, sv, redo_sv, base_BxMxN, tuned_BxMxN, redo_exact,
                                                       floor=GRAM_VEC_FLOOR, delta_floor=GRAM_VEC_FLOOR)
    count = np.array(out.intruder_count)[:B]
    if ex is not None:  # the exact pairs' intruder tests come for free
        count[vec_rows] = ex.intruder_count
    return PairColumns(base_fro=np.asarray(out.base_fro)[:B], base_overlap=ov, subspace_rotation=rot,
                       intruder_count=count, sv=sv, user={name: np.asarray(v)[:B] for name, v in out.user.items()},
                       redo_sv=redo_sv, redo_intruders=np.zeros(B, bool), redo_vectors=redo_vec)


def _single_eigs_one(w):
    w = w.astype(jnp.float32)
    return jnp.linalg.eigvalsh(gram_smaller(w)), matrix_user_metrics(w)


def _single_gram_one(w):
    w = w.astype(jnp.float32)
    return gram_smaller(w), matrix_user_metrics(w)


@functools.lru_cache(maxsize=64)
def _jitted_singles(what: str, mesh, reg_key):
    del reg_key
    fn = {"eigs": _single_eigs_one, "gram": _single_gram_one}[what]
    return meshlib.over_stack(fn, mesh, sequential=meshlib.on_cpu(mesh))


def single_grams(w_BxMxN, *, mesh, pad_to: int) -> tuple[np.ndarray, dict]:
    """float32 Grams on the smaller side and registered matrix metrics of a stack, on the device.

    Args:
        w_BxMxN: host stack.
        mesh: mesh to shard the stack over, or None.
        pad_to: pad the stack to at least this length.

    Returns:
        (Grams [B, k, k], {metric name: [B]}), host numpy.
    """
    B = w_BxMxN.shape[0]
    Bp = meshlib.padded_size(max(B, pad_to), mesh)
    f = _jitted_singles("gram", mesh, registry.cache_key())
    g, user = jax.device_get(f(meshlib.put_padded(w_BxMxN, Bp, mesh)))
    return np.asarray(g)[:B], {name: np.asarray(v)[:B] for name, v in user.items()}


def device_singles(w_BxMxN, *, mesh, pad_to: int) -> SingleColumns:
    """Singular values (float32 Gram eigvalsh, guarded ones by exact SVDs) and registered matrix
    metrics of a stack of single matrices, on the device.

    Args:
        w_BxMxN: host stack.
        mesh: mesh to shard the stack over, or None.
        pad_to: pad the stack to at least this length.

    Returns:
        SingleColumns of the B matrices.
    """
    B, m, n = w_BxMxN.shape
    Bp = meshlib.padded_size(max(B, pad_to), mesh)
    f = _jitted_singles("eigs", mesh, registry.cache_key())
    lam, user = jax.device_get(f(meshlib.put_padded(w_BxMxN, Bp, mesh)))
    sv, ok = sv_from_eigs(np.asarray(lam, np.float64)[:B, ::-1], max(m, n))
    redo = np.nonzero(~ok)[0]
    if redo.size:
        sv[redo] = exact.svdvals(w_BxMxN[redo].astype(np.float32), mesh)
    return SingleColumns(user={name: np.asarray(v)[:B] for name, v in user.items()}, sv=sv, redo_sv=~ok)
