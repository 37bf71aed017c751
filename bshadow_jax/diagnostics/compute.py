"""Stacked, jitted, vmapped and sharded metric computation.

Same-shape matrices are stacked (B x m x n) and each stack goes through one jitted, vmapped
function, sharded along the stack axis over a device mesh (pad to a multiple of the device
count, drop the padding afterwards). Two methods:

* "svd" (exact): jnp.linalg.svd of W_base, W_tuned and the delta; every metric straight
  from its definition. The reference the fast path is tested against.
* "gram" (default for k > SMALL_K_EXACT): eigh of the float32 Gram on the smaller side of
  W_base, W_tuned and the delta gives singular values and left singular vectors (for a tall
  [out, in] matrix, U = W V / sigma). Vectors are as accurate as the exact path's wherever
  they are well defined (separated singular values). The delta's small singular values are
  guarded: a float32 Gram resolves eigenvalues only down to about GRAM_REL_ERR * lambda_max,
  so when the bound on the resulting S1 error (sum of min(sqrt(d), d / sigma_i)) exceeds
  SMALL_SV_TOL * S1 the singular values are recomputed from a float64 Gram on the host
  (CPU) or by an exact SVD (accelerators). Low-rank deltas always take that route.
  On CPU (host eig backend) the Gram path computes only what the metrics use, with host
  LAPACK in a thread pool (_host_partial_pairs): every singular value of the delta from one
  float64 Gram (exact to ~1e-8 sigma_1, so never guarded), its top-K vectors from the same
  tridiagonalisation, the top-10 tuned and top-HOST_BASE_VECTORS base vectors from partial
  eigh of float32 Grams; intruder tests those base vectors cannot decide are redone exactly.
* "auto": "svd" for k <= SMALL_K_EXACT, else "gram".

On CPU the per-matrix function runs under lax.map inside shard_map (see _over_stack).
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from bshadow_jax.diagnostics import lapack, registry
from bshadow_jax.diagnostics.spectral import SV_METRICS, spectral_metrics

N_INTRUDER = 10  # Shuttleworth et al. 2024: top-10 left singular vectors of W_tuned
INTRUDER_THRESHOLD = 0.5
INTRUDER_MARGIN = 1e-3
GRAM_REL_ERR = 2e-6  # calibrated bound of |lambda_hat - lambda| / lambda_max for float32 Grams (x10 safety)
GRAM_VEC_FLOOR = math.sqrt(GRAM_REL_ERR)  # sigma / sigma_1 below this: direction undefined in a float32 Gram
SMALL_SV_TOL = 1e-4  # accepted bound on the relative S1 error from unresolved small values

SMALL_K_EXACT = 128  # method="auto": exact SVDs below this k (cheaper to compile and to run)

PAIR_SCALARS = ("base_fro", "delta_fro", "rel_delta", "base_overlap", "intruder_count")


def default_mesh(mesh=None):
    """The given mesh, else a 1-D mesh over all local devices when there are several, else None."""
    if mesh is not None:
        return mesh
    devs = jax.local_devices()
    if len(devs) <= 1:
        return None
    return jax.sharding.Mesh(np.array(devs), ("stack",))


def mesh_size(mesh) -> int:
    return 1 if mesh is None else int(np.prod(list(mesh.shape.values())))


def _stack_sharding(mesh):
    if mesh is None:
        return None
    P = jax.sharding.PartitionSpec
    return jax.sharding.NamedSharding(mesh, P(tuple(mesh.axis_names)))


def _on_cpu(mesh) -> bool:
    devs = mesh.devices.flat if mesh is not None else jax.local_devices()
    return all(d.platform == "cpu" for d in devs)


# ------------------------------------------------------------------------------------------
# per-matrix pieces (vmapped below)
# ------------------------------------------------------------------------------------------

def _fro(w):
    return jnp.sqrt(jnp.sum(w * w))


def _valid_vectors(s, ref, rel_floor: float = 0.0):
    # vectors of (numerically) zero singular values are arbitrary: they never count. A float32
    # Gram cannot tell sigma below ~sqrt(GRAM_REL_ERR) * sigma_1 from zero (rel_floor).
    k = s.shape[-1]
    return s > jnp.maximum(ref, 0.0) * max(k * 1e-6, rel_floor) + jnp.finfo(s.dtype).tiny


def _overlap(ub_MxK, sb_K, ud_MxK, sd_K, K: int, rel_floor: float = 0.0, rel_floor_d: float | None = None):
    # directions of (numerically) zero singular values are arbitrary: a rank-2 delta has only
    # two defined directions, so the others contribute nothing (still divided by K)
    vb = _valid_vectors(sb_K[:K], sb_K[0], rel_floor)
    vd = _valid_vectors(sd_K[:K], sd_K[0], rel_floor if rel_floor_d is None else rel_floor_d)
    c = ub_MxK[:, :K].T @ ud_MxK[:, :K]
    c = jnp.where(vb[:, None] & vd[None, :], c, 0.0)
    val = jnp.sum(c * c) / K
    zero = ~(sd_K[0] > 0) | ~(sb_K[0] > 0)
    return jnp.where(zero, 0.0, val)


def _intruders(ut_MxT, st_T, ub_MxR, sb_R, sb_max, *, complete: bool, rel_floor: float = 0.0):
    """(count, decided) from tuned top-T and base top-R left vectors."""
    vb_R = _valid_vectors(sb_R, sb_max, rel_floor)
    vt_T = _valid_vectors(st_T, st_T[0], rel_floor)
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


def _matrix_user_metrics(w):
    return {m.name: jnp.asarray(m.fn(w), jnp.float32) for m in registry.registered_metrics("matrix")}


def _sv_user_metrics(sv_K):
    return {m.name: jnp.asarray(m.fn(sv_K), jnp.float32) for m in registry.registered_metrics("singular_values")}


# ------------------------------------------------------------------------------------------
# exact method
# ------------------------------------------------------------------------------------------

def _sizes(shape, topk: int) -> tuple[int, int, int]:
    """k = min(m, n), K (top-k vectors of base and delta) and T (tuned vectors of the intruder test)."""
    k = min(shape)
    return k, max(1, min(topk, k)), min(N_INTRUDER, k)


def _pair_setup(b, t, topk: int):
    """float32 base, tuned and delta, with the _sizes of the pair."""
    b = b.astype(jnp.float32)
    t = t.astype(jnp.float32)
    return (b, t, t - b) + _sizes(b.shape, topk)


def _exact_pair_one(b, t, topk: int):
    b, t, d, k, K, T = _pair_setup(b, t, topk)
    ub, sb, _ = jnp.linalg.svd(b, full_matrices=False)
    ut, st, _ = jnp.linalg.svd(t, full_matrices=False)
    ud, sd, _ = jnp.linalg.svd(d, full_matrices=False)
    return _exact_metrics(b, d, ub, sb, ut[:, :T], st[:T], ud[:, :K], sd, topk)


def _exact_metrics(b, d, ub, sb, ut_MxT, st_T, ud_MxK, sd, topk: int):
    """Every exact pair metric from the three decompositions (however they were computed)."""
    _, K, _ = _sizes(b.shape, topk)
    count, _ = _intruders(ut_MxT, st_T, ub, sb, sb[0], complete=True)
    out = {
        "base_fro": _fro(b),
        "base_overlap": _overlap(ub, sb, ud_MxK, sd, K),
        "intruder_count": count,
        "sv": sd,
    }
    out.update({f"_m_{k_}": v for k_, v in _matrix_user_metrics(d).items()})
    return out


def _host_svd(w):
    """LAPACK gesdd through SciPy (gesvd if it does not converge)."""
    import scipy.linalg

    try:
        return scipy.linalg.svd(w, full_matrices=False, check_finite=False)
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(w, full_matrices=False, check_finite=False, lapack_driver="gesvd")


def _host_pair_decompositions(pair, topk: int):
    b, t = (np.asarray(x, np.float32) for x in pair)
    d = t - b
    _, K, T = _sizes(b.shape, topk)
    ub, sb, _ = _host_svd(b)
    ut, st, _ = _host_svd(t)
    ud, sd, _ = _host_svd(d)
    return b, d, ub, sb, ut[:, :T], st[:T], ud[:, :K], sd


# ------------------------------------------------------------------------------------------
# CPU fast method: partial eigendecompositions on the host
# ------------------------------------------------------------------------------------------

HOST_BASE_VECTORS = 32  # base left vectors searched for each tuned top-10 vector; undecided -> exact
GRAM64_VEC_FLOOR = 1e-6  # sigma / sigma_1 below this: direction undefined in a float64 Gram


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


def _left_from_right(w, v_NxK, sv_K, floor: float):
    """U = W V / sigma for a tall W (its Gram gave V), in V's dtype, a block of rows at a time;
    vectors of numerically zero sigma are zeroed (arbitrary anyway)."""
    ok = sv_K > sv_K[0] * floor
    u = np.concatenate([np.asarray(w[rows], v_NxK.dtype) @ v_NxK for rows in _row_blocks(w)])
    u /= np.where(ok, sv_K, 1.0)
    u[:, ~ok] = 0.0
    return u


def _partial_sizes(shape, topk: int) -> tuple[int, int, int, int]:
    """_sizes and R, the base vectors the host partial path computes."""
    k, K, T = _sizes(shape, topk)
    return k, K, T, min(k, max(HOST_BASE_VECTORS, K))


def _top_left_task(w, n_vec: int):
    """Top n_vec left vectors and values of W_base or W_tuned (float32 Gram)."""
    w = np.asarray(w, np.float32)
    return _left_from_gram(w, _gram_smaller(w), n_vec, GRAM_VEC_FLOOR)


def _base_task(b, n_vec: int):
    """_top_left_task of W_base, and ||W_base||_F (accumulated in float64, a block at a time)."""
    u, s = _top_left_task(b, n_vec)
    b = np.asarray(b, np.float32)
    return u, s, np.float32(np.sqrt(sum(np.sum(np.square(b[rows], dtype=np.float64)) for rows in _row_blocks(b))))


def _delta_task(b, t, n_vec: int):
    """Every singular value of the delta and its top n_vec left vectors from one float64 Gram
    (values exact to ~1e-8 sigma_1, so never guarded as the float32 Gram path is)."""
    d = np.asarray(t, np.float32) - np.asarray(b, np.float32)
    lam, vec = lapack.eigvalsh_and_top(_gram64(d), n_vec)
    sd = np.sqrt(np.maximum(lam, 0.0)) + 0.0  # no -0.0
    if d.shape[0] > d.shape[1]:
        vec = _left_from_right(d, vec, sd[:n_vec], GRAM64_VEC_FLOOR)
    return vec.astype(np.float32), sd.astype(np.float32)


def _host_partial_decompositions(base_BxMxN, tuned_BxMxN, topk: int):
    """What the pair metrics need, and no more, as three independent tasks per pair (delta,
    base, tuned) so that even a one-pair chunk (an embedding) keeps every core busy:
    the delta's singular values and top-K vectors, the top-10 of W_tuned and the top
    HOST_BASE_VECTORS of W_base."""
    B = len(base_BxMxN)
    _, K, T, R = _partial_sizes(base_BxMxN.shape[1:], topk)
    tasks = []
    for i in range(B):  # the float64 delta, the longest, first
        tasks += [functools.partial(_delta_task, base_BxMxN[i], tuned_BxMxN[i], K),
                  functools.partial(_base_task, base_BxMxN[i], R),
                  functools.partial(_top_left_task, tuned_BxMxN[i], T)]
    res = _host_map(lambda task: task(), tasks)
    delta, base, tuned = res[0::3], res[1::3], res[2::3]
    return (np.stack([r[2] for r in base]), np.stack([r[0] for r in base]), np.stack([r[1] for r in base]),
            np.stack([r[0] for r in tuned]), np.stack([r[1] for r in tuned]),
            np.stack([r[0] for r in delta]), np.stack([r[1] for r in delta]))


_BLOCK_BYTES = 32 * 2**20  # float64 working copies are made this many bytes at a time


def _row_blocks(w):
    rows = max(1, _BLOCK_BYTES // (8 * max(1, w.shape[1])))
    return [slice(i, min(w.shape[0], i + rows)) for i in range(0, w.shape[0], rows)]


def _gram64(w):
    """float64 Gram on the smaller side, accumulated over blocks of the long side: a full float64
    copy of a 32000 x 1024 embedding delta alone would be a fifth of its checkpoint."""
    tall = w if w.shape[0] > w.shape[1] else w.T  # m <= n: W W^T, the left side, as _gram_smaller
    g = np.zeros((tall.shape[1], tall.shape[1]), np.float64)
    for rows in _row_blocks(tall):
        blk = tall[rows].astype(np.float64)
        g += blk.T @ blk
    return g


def _partial_metrics(base_fro, ub_MxR, sb_R, ut_MxT, st_T, ud_MxK, sd, topk: int, complete: bool):
    K = max(1, min(topk, ub_MxR.shape[0], sd.shape[0]))
    count, decided = _intruders(ut_MxT, st_T, ub_MxR, sb_R, sb_R[0], complete=complete, rel_floor=GRAM_VEC_FLOOR)
    return {
        "base_fro": base_fro,
        "base_overlap": _overlap(ub_MxR, sb_R, ud_MxK, sd, K, GRAM_VEC_FLOOR, GRAM64_VEC_FLOOR),
        "intruder_count": count,
        "_decided": decided,
    }


@functools.lru_cache(maxsize=64)
def _jitted_partial_metrics(topk: int, complete: bool):
    return jax.jit(jax.vmap(functools.partial(_partial_metrics, topk=topk, complete=complete)))


@functools.lru_cache(maxsize=64)
def _jitted_delta_matrix_metrics(reg_key):
    del reg_key
    def one(b, t):
        return {f"_m_{k_}": v for k_, v in _matrix_user_metrics(t.astype(jnp.float32) - b.astype(jnp.float32)).items()}

    return jax.jit(jax.vmap(one))


def _host_partial_pairs(base_BxMxN, tuned_BxMxN, topk: int) -> dict:
    """The fast method on CPU: partial host eigendecompositions, the same jitted, vmapped metrics.

    Only the small factors cross back from the worker threads (no stacked copies of the
    matrices). A tuned vector whose intruder test the top base vectors cannot decide (its
    largest cosine within INTRUDER_MARGIN of the threshold, or too much of it outside those
    vectors) is recomputed with full SVDs; "_redo_intruders" marks those pairs.
    """
    stacked = _host_partial_decompositions(base_BxMxN, tuned_BxMxN, topk)
    k, _, _, R = _partial_sizes(base_BxMxN.shape[1:], topk)
    out = dict(jax.device_get(_jitted_partial_metrics(topk, R == k)(*stacked)))
    if registry.registered_metrics("matrix"):
        out.update(jax.device_get(_jitted_delta_matrix_metrics(_registry_key())(base_BxMxN, tuned_BxMxN)))
    sv = np.asarray(stacked[-1], np.float64)
    undecided = np.nonzero(~np.asarray(out.pop("_decided")))[0]
    out["intruder_count"] = np.array(out["intruder_count"])
    if undecided.size:
        ex = _host_exact_pairs(base_BxMxN[undecided], tuned_BxMxN[undecided], topk)
        out["intruder_count"][undecided] = ex["intruder_count"]
    out["_redo_sv"] = np.zeros(len(base_BxMxN), bool)
    out["_redo_intruders"] = np.zeros(len(base_BxMxN), bool)
    out["_redo_intruders"][undecided] = True
    out["sv"] = sv
    return out


@functools.lru_cache(maxsize=64)
def _jitted_exact_metrics(topk: int, reg_key):
    del reg_key
    return jax.jit(jax.vmap(functools.partial(_exact_metrics, topk=topk)))


def _host_exact_pairs(base_BxMxN, tuned_BxMxN, topk: int) -> dict:
    """The exact method on CPU: SciPy's LAPACK for the SVDs, the same jitted, vmapped metrics.

    SciPy's wrapper holds the GIL, so the pool runs these SVDs one at a time (numpy's releases it
    but ran gesdd 1.7x slower here, a net loss); the fast path calls LAPACK GIL-free (lapack.py).
    XLA:CPU's SVD custom call runs about 2x slower than SciPy's gesdd here, and batched LAPACK
    calls inside one XLA computation can deadlock its 2-thread pool (seen in the studies); the
    decompositions run in a host thread pool instead and only the metric math is jitted.
    """
    decs = _host_map(functools.partial(_host_pair_decompositions, topk=topk), list(zip(base_BxMxN, tuned_BxMxN)))
    stacked = [np.stack(parts) for parts in zip(*decs)]
    return jax.device_get(_jitted_exact_metrics(topk, _registry_key())(*stacked))


# ------------------------------------------------------------------------------------------
# fast method, stage 1 (everything but the delta eigvalsh)
# ------------------------------------------------------------------------------------------

def _gram_smaller(w):
    """The Gram on the smaller side (W W^T when m <= n, whose eigenvectors are U); numpy or jax."""
    m, n = w.shape
    return w @ w.T if m <= n else w.T @ w


def _gram_left(w_MxN, n_vec: int):
    """(top n_vec left singular vectors, all singular values) from eigh of the smaller Gram.

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
    ok = _valid_vectors(sv[:n_vec], sv[0], GRAM_VEC_FLOOR)
    u = (w_MxN @ vecs[:, :n_vec]) / jnp.where(ok, sv[:n_vec], 1.0)
    return jnp.where(ok[None, :], u, 0.0), sv, lam


def _fast_pair_one(b, t, topk: int, host_eig: bool):
    del host_eig
    b, t, d, k, K, T = _pair_setup(b, t, topk)
    ub, sb, _ = _gram_left(b, k)
    ut, st, _ = _gram_left(t, T)
    ud, sd, lam_d = _gram_left(d, K)
    count, _ = _intruders(ut, st[:T], ub, sb, sb[0], complete=True, rel_floor=GRAM_VEC_FLOOR)
    out = {
        "base_fro": _fro(b),
        "base_overlap": _overlap(ub, sb, ud, sd, K, GRAM_VEC_FLOOR),
        "intruder_count": count,
        "_decided": jnp.array(True),
        "_lam": lam_d[::-1],  # ascending, as eigvalsh returns it
        "_exact_sv": jnp.zeros((0,), jnp.float32),
    }
    out.update({f"_m_{k_}": v for k_, v in _matrix_user_metrics(d).items()})
    return out


def _single_one(w, host_eig: bool, exact: bool):
    w = w.astype(jnp.float32)
    out = {}
    if exact:
        out["sv"] = jnp.linalg.svd(w, compute_uv=False)
    elif host_eig:
        out["_gram"] = _gram_smaller(w)
    else:
        out["_lam"] = jnp.linalg.eigvalsh(_gram_smaller(w))
    out.update({f"_m_{k_}": v for k_, v in _matrix_user_metrics(w).items()})
    return out


def _registry_key():
    return tuple((m.name, m.fn, m.kind) for m in registry.registered_metrics())


def _over_stack(fn, mesh, sequential: bool):
    """One jitted computation over the stack axis, sharded along it when a mesh is given.

    On CPU the per-matrix function runs under lax.map rather than vmap: XLA's CPU runtime
    spreads a batched LAPACK call (QR, SVD, eigh) over its intra-op pool and waits for it, and
    two such calls running concurrently on a 2-thread pool deadlock (seen with jax 0.10.2:
    vmapped QR of (8, 2048, 64) hangs, lax.map does not). Each device then maps over its own
    shard (shard_map), so the stack is still split over the mesh.
    """
    def per_shard(*xs):
        if sequential:
            return jax.lax.map(lambda a: fn(*a), xs)
        return jax.vmap(fn)(*xs)

    if mesh is None:
        return jax.jit(per_shard)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec))


@functools.lru_cache(maxsize=64)
def _jitted(kind: str, topk: int, host_eig: bool, mesh, reg_key):
    del reg_key  # part of the cache key only: a new registered metric means a new function
    if kind == "pair_exact":
        f = lambda b, t: _exact_pair_one(b, t, topk)  # noqa: E731
    elif kind == "pair_fast":
        f = lambda b, t: _fast_pair_one(b, t, topk, host_eig)  # noqa: E731
    elif kind == "single_exact":
        f = lambda w: _single_one(w, host_eig, True)  # noqa: E731
    elif kind == "single_fast":
        f = lambda w: _single_one(w, host_eig, False)  # noqa: E731
    elif kind == "exact_sv":
        f = lambda w: jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)  # noqa: E731
    else:
        raise ValueError(kind)
    return _over_stack(f, mesh, sequential=_on_cpu(mesh))


@functools.lru_cache(maxsize=64)
def _jitted_sv_metrics(topk: int, k: int, reg_key, mesh):
    del reg_key

    def one(sv):
        out = spectral_metrics(sv, topk=topk)
        out.update(_sv_user_metrics(sv))
        return out

    f = jax.vmap(one)
    sh = _stack_sharding(mesh)
    if sh is None:
        return jax.jit(f)
    return jax.jit(f, in_shardings=sh, out_shardings=sh)


# ------------------------------------------------------------------------------------------
# host helpers
# ------------------------------------------------------------------------------------------

_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool():
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    return _POOL


def _host_map(fn, mats):
    """fn over matrices in a thread pool; the cores are split between workers and BLAS threads
    (one each when there are at least as many matrices as cores: LAPACK's reductions scale
    better across matrices than within one)."""
    cores = max(1, os.cpu_count() or 1)
    try:
        from threadpoolctl import threadpool_limits
        ctx = threadpool_limits(max(1, cores // max(1, len(mats))))
    except ImportError:  # pragma: no cover
        import contextlib
        ctx = contextlib.nullcontext()
    with ctx:
        return list(_pool().map(fn, mats))


def _eigvalsh_desc(g):
    lam = np.linalg.eigvalsh(np.asarray(g, np.float64))
    return lam[::-1]


def _gram64_sv(w):
    """Singular values from a float64 Gram (host): exact to ~1e-8 sigma_1, cheaper than gesdd."""
    return np.sqrt(np.maximum(np.linalg.eigvalsh(_gram64(np.asarray(w, np.float32)))[::-1], 0.0)) + 0.0


def _svdvals(w):
    import scipy.linalg

    return scipy.linalg.svdvals(np.asarray(w, np.float32), check_finite=False).astype(np.float64)


def sv_from_eigs(lam_BxK, inner_dim: int):
    """(singular values, reliable mask) from Gram eigenvalues (descending) of float32 Grams."""
    lam = np.maximum(np.asarray(lam_BxK, np.float64), 0.0) + 0.0  # no -0.0
    sv = np.sqrt(lam)
    delta = GRAM_REL_ERR * lam[:, :1]
    err = np.minimum(np.sqrt(delta), delta / np.maximum(sv, 1e-300))
    S1 = sv.sum(axis=1)
    ok = (err.sum(axis=1) <= SMALL_SV_TOL * S1) | ~(S1 > 0)
    return sv, ok


def _pad(x_BxMxN, n_to: int):
    b = x_BxMxN.shape[0]
    if b == n_to:
        return x_BxMxN
    reps = np.repeat(x_BxMxN[:1], n_to - b, axis=0)  # copies, not zeros: no degenerate padding
    return np.concatenate([x_BxMxN, reps], axis=0)


def padded_size(b: int, mesh) -> int:
    nd = mesh_size(mesh)
    return int(math.ceil(b / nd) * nd)


def _put(x, mesh):
    sh = _stack_sharding(mesh)
    return jax.device_put(x) if sh is None else jax.device_put(x, sh)


# ------------------------------------------------------------------------------------------
# stack entry points
# ------------------------------------------------------------------------------------------

def resolve_method(method: str, k: int, mesh=None) -> str:
    # above SMALL_K_EXACT the Gram path everywhere: on accelerators XLA's eigh of the Gram, on
    # CPU partial host eigendecompositions (_host_partial_pairs; 3-8x faster than three SVDs)
    if method == "auto":
        return "svd" if k <= SMALL_K_EXACT else "gram"
    if method not in ("svd", "gram"):
        raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
    return method


def pair_stack(base_BxMxN, tuned_BxMxN, *, topk: int = 8, method: str = "auto", mesh=None,
               eig_backend: str = "auto", pad_to: int = 0) -> dict:
    """Metrics of a stack of (base, tuned) pairs: dict of [B] arrays plus "sv" [B, k] (delta)."""
    base_BxMxN = np.asarray(base_BxMxN)
    tuned_BxMxN = np.asarray(tuned_BxMxN)
    B, m, n = base_BxMxN.shape
    k = min(m, n)
    method = resolve_method(method, k, mesh)
    Bp = padded_size(max(B, pad_to), mesh)
    host_eig = _use_host(eig_backend, mesh)
    reg = _registry_key()
    if method == "svd" and host_eig:
        out = _host_exact_pairs(base_BxMxN, tuned_BxMxN, topk)
        sv = np.asarray(out.pop("sv"), np.float64)[:B]
    elif method == "gram" and host_eig:
        out = _host_partial_pairs(base_BxMxN, tuned_BxMxN, topk)
        sv = out.pop("sv")
    elif method == "svd":
        b, t = _put(_pad(base_BxMxN, Bp), mesh), _put(_pad(tuned_BxMxN, Bp), mesh)
        out = jax.device_get(_jitted("pair_exact", topk, host_eig, mesh, reg)(b, t))
        sv = np.asarray(out.pop("sv"), np.float64)[:B]
    elif method == "gram":
        b, t = _put(_pad(base_BxMxN, Bp), mesh), _put(_pad(tuned_BxMxN, Bp), mesh)
        out = jax.device_get(_jitted("pair_fast", topk, host_eig, mesh, reg)(b, t))
        lam = np.asarray(out.pop("_lam"), np.float64)[:B, ::-1]
        out.pop("_exact_sv")
        sv, ok = sv_from_eigs(lam, max(m, n))
        redo = np.nonzero(~ok)[0]
        if redo.size:
            d = tuned_BxMxN[redo].astype(np.float32) - base_BxMxN[redo].astype(np.float32)
            sv[redo] = _exact_svdvals(d, host_eig, mesh)
        undecided = np.nonzero(~np.asarray(out.pop("_decided"))[:B])[0]
        if undecided.size:
            ex = pair_stack(base_BxMxN[undecided], tuned_BxMxN[undecided], topk=topk, method="svd",
                            mesh=mesh, eig_backend=eig_backend)
            out["intruder_count"] = np.array(out["intruder_count"])
            out["intruder_count"][undecided] = ex["intruder_count"]
        out["_redo_sv"] = np.zeros(Bp, bool)
        out["_redo_sv"][redo] = True
        out["_redo_intruders"] = np.zeros(Bp, bool)
        out["_redo_intruders"][undecided] = True
    else:
        raise ValueError(f"method must be 'svd' or 'gram', got {method!r}")
    res = {name: np.asarray(v)[:B] for name, v in out.items()}
    svm = sv_metrics(sv, topk=topk, mesh=mesh)
    res.update({f"delta_{k_}": v for k_, v in svm.items()})
    with np.errstate(divide="ignore", invalid="ignore"):
        bf = res["base_fro"].astype(np.float64)
        df = svm["fro"].astype(np.float64)
        res["rel_delta"] = np.where(bf > 0, df / np.where(bf > 0, bf, 1.0), np.where(df > 0, np.inf, 0.0))
    res["sv"] = sv[:, :k]
    for key in list(res):
        if key.startswith("_m_"):
            res["delta_" + key[3:]] = res.pop(key)
    return res


def _exact_svdvals(d_BxMxN, host_eig: bool, mesh):
    if host_eig:
        return np.stack(_host_map(_gram64_sv, list(d_BxMxN)))
    B = d_BxMxN.shape[0]
    Bp = padded_size(B, mesh)
    f = _jitted("exact_sv", 0, host_eig, mesh, ())
    return np.asarray(jax.device_get(f(_put(_pad(d_BxMxN, Bp), mesh))), np.float64)[:B]


def _use_host(eig_backend: str, mesh) -> bool:
    if eig_backend == "host":
        return True
    if eig_backend == "jax":
        return False
    return _on_cpu(mesh)


def sv_metrics(sv_BxK, *, topk: int = 8, mesh=None) -> dict:
    """spectral_metrics (+ registered singular-value metrics) over a stack, as numpy [B]."""
    sv_BxK = np.asarray(sv_BxK, np.float32)
    B, k = sv_BxK.shape
    Bp = padded_size(B, mesh)
    f = _jitted_sv_metrics(topk, k, _registry_key(), mesh)
    out = jax.device_get(f(_put(_pad(sv_BxK, Bp), mesh)))
    return {name: np.asarray(v)[:B] for name, v in out.items()}


def single_stack(w_BxMxN, *, topk: int = 8, method: str = "auto", mesh=None, eig_backend: str = "auto",
                 pad_to: int = 0) -> dict:
    """Metrics of a stack of single matrices (spectrum command): dict of [B] plus "sv" [B, k]."""
    w_BxMxN = np.asarray(w_BxMxN)
    B, m, n = w_BxMxN.shape
    method = resolve_method(method, min(m, n), mesh)
    Bp = padded_size(max(B, pad_to), mesh)
    w = _put(_pad(w_BxMxN, Bp), mesh)
    host_eig = _use_host(eig_backend, mesh)
    reg = _registry_key()
    # on CPU the exact singular values come from SciPy's LAPACK on the host (see _host_exact_pairs);
    # the jitted part then only computes the Gram and the registered matrix metrics
    host_exact = method == "svd" and host_eig
    kind = "single_exact" if (method == "svd" and not host_exact) else "single_fast"
    out = jax.device_get(_jitted(kind, topk, host_eig, mesh, reg)(w))
    if host_exact:
        out.pop("_gram", None)
        sv = np.stack(_host_map(_svdvals, list(w_BxMxN)))
    elif method == "svd":
        sv = np.asarray(out.pop("sv"), np.float64)[:B]
    else:
        if host_eig:
            lam = np.stack(_host_map(_eigvalsh_desc, list(out.pop("_gram")[:B])))
        else:
            lam = np.asarray(out.pop("_lam"), np.float64)[:B, ::-1]
        sv, ok = sv_from_eigs(lam, max(m, n))
        redo = np.nonzero(~ok)[0]
        if redo.size:
            sv[redo] = _exact_svdvals(w_BxMxN[redo].astype(np.float32), host_eig, mesh)
    res = {name: np.asarray(v)[:B] for name, v in out.items()}
    for key in list(res):
        if key.startswith("_m_"):
            res[key[3:]] = res.pop(key)
    res.update(sv_metrics(sv, topk=topk, mesh=mesh))
    res["sv"] = sv
    return res
