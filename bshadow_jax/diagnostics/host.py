"""The CPU ("host" eig backend) variants of both methods: LAPACK on the host in a thread pool,
only the metric math jitted.

* exact ("svd"): SciPy's gesdd of W_base, W_tuned and the delta, then exact.exact_metrics.
  XLA:CPU's SVD custom call runs about 2x slower than SciPy's gesdd here, and batched LAPACK
  calls inside one XLA computation can deadlock its 2-thread pool (seen in the studies).
* partial ("gram"): only what the metrics use, with the GIL-free LAPACK of
  diagnostics/lapack.py: every singular value of the delta from one float64 Gram (exact to
  ~1e-8 sigma_1, so never guarded), its top-K vectors from the same tridiagonalisation, the
  top-max(10, K) tuned and top-HOST_BASE_VECTORS base vectors from partial eigh of float32 Grams;
  intruder tests those base vectors cannot decide, and pairs whose top-K base or tuned vectors
  the float32 Gram cannot resolve (kernels.vectors_unresolved), are redone exactly.

Values only (no vectors): SciPy's svdvals of the delta (exact) or every singular value from
its float64 Gram (gram64_singles).
"""
from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bshadow_jax.diagnostics import exact, gram, lapack, registry
from bshadow_jax.diagnostics import mesh as meshlib
from bshadow_jax.diagnostics.kernels import PairColumns, SingleColumns, intruders, matrix_user_metrics, sizes

HOST_BASE_VECTORS = 32  # base left vectors searched for each tuned top-10 vector; undecided -> exact
GRAM64_VEC_FLOOR = 1e-6  # sigma / sigma_1 below this: direction undefined in a float64 Gram
_BLOCK_BYTES = 32 * 2**20  # float64 working copies are made this many bytes at a time


# ------------------------------------------------------------------------------------------
# thread pool
# ------------------------------------------------------------------------------------------

_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    return _POOL


def host_map(fn, items) -> list:
    """fn over items (matrices, tasks) in the process-wide thread pool, results in order.

    The cores are split between workers and BLAS threads (one each when there are at least as
    many items as cores: LAPACK's reductions scale better across matrices than within one).
    """
    cores = max(1, os.cpu_count() or 1)
    try:
        from threadpoolctl import threadpool_limits
        ctx = threadpool_limits(max(1, cores // max(1, len(items))))
    except ImportError:  # pragma: no cover
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        return list(_pool().map(fn, items))


# ------------------------------------------------------------------------------------------
# exact method
# ------------------------------------------------------------------------------------------

def _svd(w):
    """LAPACK gesdd through SciPy (gesvd if it does not converge)."""
    import scipy.linalg

    try:
        return scipy.linalg.svd(w, full_matrices=False, check_finite=False)
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(w, full_matrices=False, check_finite=False, lapack_driver="gesvd")


def _base_svd(b):
    u, s, _ = _svd(np.asarray(b, np.float32))
    return u, s


def _pair_decompositions(pair, topk: int, base_us=None):
    """The arguments of exact.exact_metrics for one (base, tuned) pair, from three host SVDs (two
    when the base's U, sigma are given)."""
    b, t = (np.asarray(x, np.float32) for x in pair)
    d = t - b
    k, K, _ = sizes(b.shape, topk)
    J = exact.tuned_vectors(k, topk)
    ub, sb = _base_svd(b) if base_us is None else base_us
    ut, st, _ = _svd(t)
    ud, sd, _ = _svd(d)
    return b, d, ub, sb, ut[:, :J], st[:J], ud[:, :K], sd


def exact_pair_metrics(base_BxMxN, tuned_BxMxN, topk: int, base_cache: dict | None = None) -> exact.ExactPairMetrics:
    """The exact method on CPU: SciPy's LAPACK for the SVDs, the same jitted, vmapped metrics.

    SciPy's wrapper holds the GIL, so the pool runs these SVDs one at a time (numpy's releases it
    but ran gesdd 1.7x slower here, a net loss); the partial path calls LAPACK GIL-free (lapack.py).

    Args:
        base_BxMxN, tuned_BxMxN: host stacks of equal shape.
        topk: K of base_overlap.
        base_cache: a dict shared by the calls on one base stack with several tuned stacks: the
            base's SVDs are computed on the first call and reused (one base, many fine-tunes).

    Returns:
        ExactPairMetrics stacked over the B pairs, host numpy.
    """
    pairs = list(zip(base_BxMxN, tuned_BxMxN))
    if base_cache is None:
        decs = host_map(functools.partial(_pair_decompositions, topk=topk), pairs)
    else:
        if "exact" not in base_cache:
            base_cache["exact"] = host_map(_base_svd, list(base_BxMxN))
        decs = host_map(lambda job: _pair_decompositions(job[0], topk, job[1]), list(zip(pairs, base_cache["exact"])))
    stacked = [np.stack(parts) for parts in zip(*decs)]
    return jax.device_get(exact.jitted_exact_metrics(topk, registry.cache_key())(*stacked))


def exact_pairs(base_BxMxN, tuned_BxMxN, *, topk: int, base_cache: dict | None = None) -> PairColumns:
    """PairColumns of exact_pair_metrics."""
    return exact.columns(exact_pair_metrics(base_BxMxN, tuned_BxMxN, topk, base_cache), base_BxMxN.shape[0])


def _svdvals(w):
    import scipy.linalg

    return scipy.linalg.svdvals(np.asarray(w, np.float32), check_finite=False).astype(np.float64)


@functools.lru_cache(maxsize=64)
def _jitted_matrix_metrics(mesh, reg_key):
    del reg_key  # part of the cache key only: a new registered metric means a new function
    return meshlib.over_stack(lambda w: matrix_user_metrics(w.astype(jnp.float32)), mesh,
                              sequential=meshlib.on_cpu(mesh))


def exact_singles(w_BxMxN, *, mesh, pad_to: int) -> SingleColumns:
    """Exact singular values (SciPy, in the pool) and registered matrix metrics (jitted) of a stack.

    Args:
        w_BxMxN: host stack.
        mesh: mesh the matrix metrics are sharded over, or None.
        pad_to: pad the stack to at least this length for the jitted part.

    Returns:
        SingleColumns of the B matrices.
    """
    B = w_BxMxN.shape[0]
    user = {}
    if registry.registered_metrics("matrix"):
        Bp = meshlib.padded_size(max(B, pad_to), mesh)
        out = jax.device_get(_jitted_matrix_metrics(mesh, registry.cache_key())(meshlib.put_padded(w_BxMxN, Bp, mesh)))
        user = {name: np.asarray(v)[:B] for name, v in out.items()}
    return SingleColumns(user=user, sv=np.stack(host_map(_svdvals, list(w_BxMxN))))


# ------------------------------------------------------------------------------------------
# partial (Gram) method
# ------------------------------------------------------------------------------------------

def row_blocks(w) -> list[slice]:
    """Row slices of `w` whose float64 copies stay under _BLOCK_BYTES."""
    rows = max(1, _BLOCK_BYTES // (8 * max(1, w.shape[1])))
    return [slice(i, min(w.shape[0], i + rows)) for i in range(0, w.shape[0], rows)]


def _gram64(w):
    """float64 Gram on the smaller side, accumulated over blocks of the long side: a full float64
    copy of a 32000 x 1024 embedding delta alone would be a fifth of its checkpoint."""
    tall = w if w.shape[0] > w.shape[1] else w.T  # m <= n: W W^T, the left side, as gram_smaller
    g = np.zeros((tall.shape[1], tall.shape[1]), np.float64)
    for rows in row_blocks(tall):
        blk = tall[rows].astype(np.float64)
        g += blk.T @ blk
    return g


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


def _eigvalsh_desc(g):
    lam = np.linalg.eigvalsh(np.asarray(g, np.float64))
    return lam[::-1]


def _gram64_sv(w):
    """Singular values from a float64 Gram (host): exact to ~1e-8 sigma_1, cheaper than gesdd."""
    return np.sqrt(np.maximum(np.linalg.eigvalsh(_gram64(np.asarray(w, np.float32)))[::-1], 0.0)) + 0.0


def gram64_singles(w_BxMxN, *, mesh, pad_to: int) -> SingleColumns:
    """Every singular value of a stack from float64 Grams on the host (exact to ~1e-8 sigma_1,
    as the partial path's delta values: never guarded) and registered matrix metrics (jitted).

    Args:
        w_BxMxN: host stack.
        mesh: mesh the matrix metrics are sharded over, or None.
        pad_to: pad the stack to at least this length for the jitted part.

    Returns:
        SingleColumns of the B matrices.
    """
    B = w_BxMxN.shape[0]
    user = {}
    if registry.registered_metrics("matrix"):
        Bp = meshlib.padded_size(max(B, pad_to), mesh)
        out = jax.device_get(_jitted_matrix_metrics(mesh, registry.cache_key())(meshlib.put_padded(w_BxMxN, Bp, mesh)))
        user = {name: np.asarray(v)[:B] for name, v in out.items()}
    return SingleColumns(user=user, sv=np.stack(host_map(_gram64_sv, list(w_BxMxN))))


def gram_singles(w_BxMxN, *, mesh, pad_to: int) -> SingleColumns:
    """Singular values of a stack of single matrices from their float32 Grams (jitted) and host
    eigvalsh; guarded ones from float64 Grams on the host.

    Args:
        w_BxMxN: host stack.
        mesh: mesh the Grams are sharded over, or None.
        pad_to: pad the stack to at least this length for the jitted part.

    Returns:
        SingleColumns of the B matrices.
    """
    B, m, n = w_BxMxN.shape
    grams, user = gram.single_grams(w_BxMxN, mesh=mesh, pad_to=pad_to)
    lam = np.stack(host_map(_eigvalsh_desc, list(grams)))
    sv, ok = gram.sv_from_eigs(lam, max(m, n))
    redo = np.nonzero(~ok)[0]
    if redo.size:
        sv[redo] = np.stack(host_map(_gram64_sv, list(w_BxMxN[redo].astype(np.float32))))
    return SingleColumns(user=user, sv=sv, redo_sv=~ok)
