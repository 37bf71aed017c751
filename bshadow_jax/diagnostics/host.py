"""The CPU ("host" eig backend) variants of both methods: LAPACK on the host in a thread pool,
only the metric math jitted.

* exact ("svd"): SciPy's gesdd of W_base, W_tuned and the delta, then exact.exact_metrics.
  XLA:CPU's SVD custom call runs about 2x slower than SciPy's gesdd here, and batched LAPACK
  calls inside one XLA computation can deadlock its 2-thread pool (seen in the studies).
* partial ("gram"): diagnostics/host_partial.py, on this module's thread pool and exact redo.

Values only (no vectors): SciPy's svdvals of the delta (exact) or every singular value from
its float64 Gram (gram64_singles).
"""
from __future__ import annotations

import concurrent.futures
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from bshadow_jax.diagnostics import exact, gram, registry
from bshadow_jax.diagnostics import mesh as meshlib
from bshadow_jax.diagnostics.kernels import PairColumns, SingleColumns, matrix_user_metrics, sizes

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
    return _host_singles(w_BxMxN, _svdvals, mesh=mesh, pad_to=pad_to)


def _host_singles(w_BxMxN, sv_fn, *, mesh, pad_to: int) -> SingleColumns:
    """Singular values by `sv_fn` per matrix in the pool, and registered matrix metrics (jitted)."""
    B = w_BxMxN.shape[0]
    user = {}
    if registry.registered_metrics("matrix"):
        Bp = meshlib.padded_size(max(B, pad_to), mesh)
        out = jax.device_get(_jitted_matrix_metrics(mesh, registry.cache_key())(meshlib.put_padded(w_BxMxN, Bp, mesh)))
        user = {name: np.asarray(v)[:B] for name, v in out.items()}
    return SingleColumns(user=user, sv=np.stack(host_map(sv_fn, list(w_BxMxN))))


# ------------------------------------------------------------------------------------------
# float64 Grams (the partial method's delta, in host_partial.py, and the values-only paths)
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
    return _host_singles(w_BxMxN, _gram64_sv, mesh=mesh, pad_to=pad_to)


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
