"""Metrics of stacks of same-shape matrices: the entry points of the diagnostics engine.

Same-shape matrices are stacked (B x m x n) and each stack goes through jitted, vmapped
functions, sharded along the stack axis over a device mesh (diagnostics/mesh.py). Methods:

* "svd" (exact): diagnostics/exact.py on accelerators, diagnostics/host.py (SciPy's SVDs) on CPU.
* "gram": diagnostics/gram.py (eigh of float32 Grams, guarded small singular values) on
  accelerators, diagnostics/host.py (partial host eigendecompositions) on CPU.
* "auto": "svd" for k <= SMALL_K_EXACT, else "gram".

The eig backend picks the variant: "host" (CPU LAPACK), "jax" (XLA), or "auto" (host when
every device of the mesh is a CPU).

metrics="values" computes only the delta's singular values (the single-matrix paths on the
delta: no decomposition of W_base or W_tuned) and the elementwise metrics; base_overlap,
subspace_rotation and intruder_count are NaN.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from bshadow_jax.diagnostics import exact, gram, host, host_partial, registry
from bshadow_jax.diagnostics import mesh as meshlib
from bshadow_jax.diagnostics.elementwise import host_elementwise
from bshadow_jax.diagnostics.kernels import PairColumns, SingleColumns, elementwise, sv_user_metrics
from bshadow_jax.diagnostics.spectral import spectral_metrics

SMALL_K_EXACT = 128  # method="auto": exact SVDs below this k (cheaper to compile and to run)
METRICS_MODES = ("all", "values")
VECTOR_COLUMNS = ("base_overlap", "subspace_rotation", "intruder_count")  # left empty by metrics="values"


@dataclasses.dataclass(frozen=True)
class PairStackResult:
    """Metrics of a stack of B (base, tuned) pairs; `res[name]` is `res.columns[name]`.

    Fields:
        columns: metric name -> [B] numpy array: base_fro, delta_fro, rel_delta, delta_<singular
            value metric> (spectral.SV_METRICS and registered ones), base_overlap,
            intruder_count, subspace_rotation, cosine, update_sparsity, update_sparsity_bf16,
            delta_<registered matrix metric>.
        sv: [B, k] singular values of each delta, descending, float64.
        redo_sv: [B] bool, singular values recomputed exactly (float32 Gram guard).
        redo_intruders: [B] bool, intruder test redone with full SVDs.
        redo_vectors: [B] bool, pair redone with full SVDs (top-K vectors a float32 Gram could
            not resolve).
    """
    columns: dict
    sv: np.ndarray
    redo_sv: np.ndarray
    redo_intruders: np.ndarray
    redo_vectors: np.ndarray | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns


@dataclasses.dataclass(frozen=True)
class SingleStackResult:
    """Metrics of a stack of B single matrices; `res[name]` is `res.columns[name]`.

    Fields:
        columns: metric name -> [B] numpy array: the singular value metrics (spectral.SV_METRICS
            and registered ones) and the registered matrix metrics.
        sv: [B, k] singular values, descending, float64.
    """
    columns: dict
    sv: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: object) -> bool:
        return name in self.columns


def resolve_method(method: str, k: int, mesh=None) -> str:
    """The method a stack of matrices with min(m, n) = k runs.

    Args:
        method: "auto", "svd" or "gram".
        k: min(m, n) of the stack's matrices.
        mesh: unused (kept for callers).

    Returns:
        "svd" or "gram".
    """
    # above SMALL_K_EXACT the Gram path everywhere: on accelerators XLA's eigh of the Gram, on
    # CPU partial host eigendecompositions (host_partial.partial_pairs; 3-8x faster than three SVDs)
    if method == "auto":
        return "svd" if k <= SMALL_K_EXACT else "gram"
    if method not in ("svd", "gram"):
        raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
    return method


def use_host(eig_backend: str, mesh) -> bool:
    """Whether eig_backend ("host", "jax" or "auto") means the host LAPACK variants."""
    if eig_backend == "host":
        return True
    if eig_backend == "jax":
        return False
    return meshlib.on_cpu(mesh)


@functools.lru_cache(maxsize=64)
def _jitted_sv_metrics(topk: int, k: int, reg_key, mesh):
    del reg_key  # part of the cache key only: a new registered metric means a new function

    def one(sv):
        out = spectral_metrics(sv, topk=topk)
        out.update(sv_user_metrics(sv))
        return out

    f = jax.vmap(one)
    sh = meshlib.stack_sharding(mesh)
    if sh is None:
        return jax.jit(f)
    return jax.jit(f, in_shardings=sh, out_shardings=sh)


def sv_metrics(sv_BxK, *, topk: int = 8, mesh=None) -> dict:
    """spectral_metrics (+ registered singular-value metrics) over a stack of spectra.

    Args:
        sv_BxK: singular values, descending, one row per matrix.
        topk: K of the top-k metrics.
        mesh: mesh to shard the stack over, or None.

    Returns:
        {metric name: numpy [B]}.
    """
    sv_BxK = np.asarray(sv_BxK, np.float32)
    B, k = sv_BxK.shape
    Bp = meshlib.padded_size(B, mesh)
    f = _jitted_sv_metrics(topk, k, registry.cache_key(), mesh)
    out = jax.device_get(f(meshlib.put_padded(sv_BxK, Bp, mesh)))
    return {name: np.asarray(v)[:B] for name, v in out.items()}


@functools.lru_cache(maxsize=64)
def _jitted_elementwise(mesh):
    return meshlib.over_stack(elementwise, mesh, sequential=False)


def elementwise_metrics(base_BxMxN, tuned_BxMxN, *, mesh=None, pad_to: int = 0) -> dict:
    """kernels.elementwise over a stack of pairs: {base_fro, cosine, update_sparsity,
    update_sparsity_bf16: numpy [B]}, on the float32 values the sources returned."""
    B = base_BxMxN.shape[0]
    Bp = meshlib.padded_size(max(B, pad_to), mesh)
    f = _jitted_elementwise(mesh)
    out = jax.device_get(f(meshlib.put_padded(np.asarray(base_BxMxN, np.float32), Bp, mesh),
                           meshlib.put_padded(np.asarray(tuned_BxMxN, np.float32), Bp, mesh)))
    names = ("base_fro", "cosine", "update_sparsity", "update_sparsity_bf16")
    return {n: np.asarray(v)[:B] for n, v in zip(names, out)}


def _values_pairs(base_BxMxN, tuned_BxMxN, *, method: str, on_host: bool, mesh, pad_to: int) -> SingleColumns:
    """The delta's singular values (and registered matrix metrics) without any vector."""
    d = tuned_BxMxN.astype(np.float32) - base_BxMxN.astype(np.float32)
    if method == "svd" and on_host:
        return host.exact_singles(d, mesh=mesh, pad_to=pad_to)
    if method == "gram" and on_host:  # float64 Gram values, as the partial path's delta
        return host.gram64_singles(d, mesh=mesh, pad_to=pad_to)
    if method == "svd":
        return exact.device_singles(d, mesh=mesh, pad_to=pad_to)
    return gram.device_singles(d, mesh=mesh, pad_to=pad_to)


def pair_stack(base_BxMxN, tuned_BxMxN, *, topk: int = 8, method: str = "auto", mesh=None,
               eig_backend: str = "auto", pad_to: int = 0, metrics: str = "all",
               base_cache: dict | None = None) -> PairStackResult:
    """Metrics of the fine-tuning deltas of a stack of (base, tuned) pairs.

    Args:
        base_BxMxN, tuned_BxMxN: stacks of equal shape (any float dtype; computed in float32).
        topk: K of base_overlap and of the delta's top-k metrics.
        method: "auto", "svd" or "gram" (resolve_method).
        mesh: mesh to shard the stack over, or None.
        eig_backend: "auto", "host" or "jax" (use_host).
        pad_to: pad device stacks to at least this length (one compile per shape across chunks).
        metrics: "all", or "values" (no vectors: VECTOR_COLUMNS are NaN).
        base_cache: one dict per base stack when the same base stack is paired with several tuned
            stacks: the host paths decompose the base once and reuse it (the device paths, whose
            per-pair kernels are fused, recompute it).

    Returns:
        PairStackResult of the B pairs.
    """
    if metrics not in METRICS_MODES:
        raise ValueError(f"metrics must be 'all' or 'values', got {metrics!r}")
    base_BxMxN = np.asarray(base_BxMxN)
    tuned_BxMxN = np.asarray(tuned_BxMxN)
    B, m, n = base_BxMxN.shape
    k = min(m, n)
    method = resolve_method(method, k, mesh)
    on_host = use_host(eig_backend, mesh)
    el = (host_elementwise(base_BxMxN, tuned_BxMxN) if on_host
          else elementwise_metrics(base_BxMxN, tuned_BxMxN, mesh=mesh, pad_to=pad_to))
    if metrics == "values":
        sc = _values_pairs(base_BxMxN, tuned_BxMxN, method=method, on_host=on_host, mesh=mesh, pad_to=pad_to)
        nan = np.full(B, np.nan, np.float32)
        no = np.zeros(B, bool)
        pc = PairColumns(base_fro=el["base_fro"], base_overlap=nan, subspace_rotation=nan, intruder_count=nan,
                         sv=sc.sv, user=sc.user, redo_sv=no if sc.redo_sv is None else np.asarray(sc.redo_sv)[:B],
                         redo_intruders=no, redo_vectors=no)
    elif method == "svd" and on_host:
        pc = host.exact_pairs(base_BxMxN, tuned_BxMxN, topk=topk, base_cache=base_cache)
    elif method == "gram" and on_host:
        pc = host_partial.partial_pairs(base_BxMxN, tuned_BxMxN, topk=topk, base_cache=base_cache)
    elif method == "svd":
        pc = exact.device_pairs(base_BxMxN, tuned_BxMxN, topk=topk, mesh=mesh, pad_to=pad_to)
    else:
        pc = gram.device_pairs(base_BxMxN, tuned_BxMxN, topk=topk, mesh=mesh, pad_to=pad_to)
    svm = sv_metrics(pc.sv, topk=topk, mesh=mesh)
    cols = {"base_fro": pc.base_fro, "base_overlap": pc.base_overlap, "intruder_count": pc.intruder_count,
            "subspace_rotation": pc.subspace_rotation}
    cols.update({c: el[c] for c in ("cosine", "update_sparsity", "update_sparsity_bf16")})
    cols.update({f"delta_{k_}": v for k_, v in svm.items()})
    with np.errstate(divide="ignore", invalid="ignore"):
        bf = pc.base_fro.astype(np.float64)
        df = svm["fro"].astype(np.float64)
        cols["rel_delta"] = np.where(bf > 0, df / np.where(bf > 0, bf, 1.0), np.where(df > 0, np.inf, 0.0))
    cols.update({f"delta_{k_}": v for k_, v in pc.user.items()})
    return PairStackResult(columns=cols, sv=pc.sv[:, :k], redo_sv=pc.redo_sv, redo_intruders=pc.redo_intruders,
                           redo_vectors=pc.redo_vectors)


def single_stack(w_BxMxN, *, topk: int = 8, method: str = "auto", mesh=None, eig_backend: str = "auto",
                 pad_to: int = 0) -> SingleStackResult:
    """Metrics of a stack of single matrices (the spectrum command).

    Args:
        w_BxMxN: stack of matrices (any float dtype; computed in float32).
        topk: K of the top-k metrics.
        method: "auto", "svd" or "gram" (resolve_method).
        mesh: mesh to shard the stack over, or None.
        eig_backend: "auto", "host" or "jax" (use_host).
        pad_to: pad device stacks to at least this length.

    Returns:
        SingleStackResult of the B matrices.
    """
    w_BxMxN = np.asarray(w_BxMxN)
    B, m, n = w_BxMxN.shape
    method = resolve_method(method, min(m, n), mesh)
    on_host = use_host(eig_backend, mesh)
    sc: SingleColumns
    if method == "svd" and on_host:
        sc = host.exact_singles(w_BxMxN, mesh=mesh, pad_to=pad_to)
    elif method == "gram" and on_host:
        sc = host.gram_singles(w_BxMxN, mesh=mesh, pad_to=pad_to)
    elif method == "svd":
        sc = exact.device_singles(w_BxMxN, mesh=mesh, pad_to=pad_to)
    else:
        sc = gram.device_singles(w_BxMxN, mesh=mesh, pad_to=pad_to)
    cols = dict(sc.user)
    cols.update(sv_metrics(sc.sv, topk=topk, mesh=mesh))
    return SingleStackResult(columns=cols, sv=sc.sv)
