"""The exact method on the device: jnp.linalg.svd of W_base, W_tuned and the delta, every
metric straight from its definition. The reference the Gram paths are tested against; the
host (CPU) variant in diagnostics/host.py computes the same metrics from SciPy's SVDs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bshadow_jax.diagnostics import mesh as meshlib
from bshadow_jax.diagnostics import registry
from bshadow_jax.diagnostics.kernels import (PairColumns, SingleColumns, fro, intruders, matrix_user_metrics,
                                             pair_setup, sizes, subspace_metrics)


class ExactPairMetrics(NamedTuple):
    """Exact pair metrics of one pair (or, stacked, of a stack: one leading axis more).

    Fields:
        user: registered "matrix" metrics of the delta, by name.
        base_fro: ||W_base||_F.
        base_overlap: top-K overlap of base and delta left singular vectors.
        subspace_rotation: how far the top-K left subspace of the weights turned.
        intruder_count: intruders among the tuned top-10 left vectors.
        sv: every singular value of the delta, descending.
    """
    user: dict
    base_fro: jax.Array
    base_overlap: jax.Array
    subspace_rotation: jax.Array
    intruder_count: jax.Array
    sv: jax.Array


def tuned_vectors(k: int, topk: int) -> int:
    """How many top left vectors of W_tuned the pair metrics use: T (intruders) and K (rotation)."""
    _, K, T = sizes((k, k), topk)
    return max(T, K)


def exact_metrics(b, d, ub, sb, ut_MxT, st_T, ud_MxK, sd, topk: int) -> ExactPairMetrics:
    """Every exact pair metric from the three decompositions (however they were computed).

    Args:
        b, d: float32 W_base and delta.
        ub, sb: every left singular vector and value of W_base.
        ut_MxT, st_T: top-max(T, K) left vectors and values of W_tuned (tuned_vectors).
        ud_MxK, sd: top-K left vectors and every singular value of the delta.
        topk: K before clipping to the matrix size.

    Returns:
        ExactPairMetrics of the pair.
    """
    _, K, T = sizes(b.shape, topk)
    count, _ = intruders(ut_MxT[:, :T], st_T[:T], ub, sb, sb[0], complete=True)
    ov, rot = subspace_metrics(ub, sb, ud_MxK, sd, ut_MxT, st_T, K)
    return ExactPairMetrics(user=matrix_user_metrics(d), base_fro=fro(b), base_overlap=ov, subspace_rotation=rot,
                            intruder_count=count, sv=sd)


def _exact_pair_one(b, t, topk: int) -> ExactPairMetrics:
    b, t, d, k, K, T = pair_setup(b, t, topk)
    J = tuned_vectors(k, topk)
    ub, sb, _ = jnp.linalg.svd(b, full_matrices=False)
    ut, st, _ = jnp.linalg.svd(t, full_matrices=False)
    ud, sd, _ = jnp.linalg.svd(d, full_matrices=False)
    return exact_metrics(b, d, ub, sb, ut[:, :J], st[:J], ud[:, :K], sd, topk)


@functools.lru_cache(maxsize=64)
def jitted_exact_metrics(topk: int, reg_key):
    """exact_metrics jitted and vmapped over stacked decompositions (the host exact path's metric math)."""
    del reg_key  # part of the cache key only: a new registered metric means a new function
    return jax.jit(jax.vmap(functools.partial(exact_metrics, topk=topk)))


def columns(out: ExactPairMetrics, B: int) -> PairColumns:
    """PairColumns of the first B pairs of stacked exact metrics (nothing is ever redone)."""
    return PairColumns(base_fro=np.asarray(out.base_fro)[:B], base_overlap=np.asarray(out.base_overlap)[:B],
                       subspace_rotation=np.asarray(out.subspace_rotation)[:B],
                       intruder_count=np.asarray(out.intruder_count)[:B], sv=np.asarray(out.sv, np.float64)[:B],
                       user={name: np.asarray(v)[:B] for name, v in out.user.items()},
                       redo_sv=np.zeros(B, bool), redo_intruders=np.zeros(B, bool), redo_vectors=np.zeros(B, bool))


@functools.lru_cache(maxsize=64)
def _jitted_pairs(topk: int, mesh, reg_key):
    del reg_key
    return meshlib.over_stack(lambda b, t: _exact_pair_one(b, t, topk), mesh, sequential=meshlib.on_cpu(mesh))


def device_pairs(base_BxMxN, tuned_BxMxN, *, topk: int, mesh, pad_to: int) -> PairColumns:
    """The exact method on the device for a stack of pairs.

    Args:
        base_BxMxN, tuned_BxMxN: host stacks of equal shape.
        topk: K of base_overlap and the delta's top-k metrics.
        mesh: mesh to shard the stack over, or None.
        pad_to: pad the stack to at least this length (one compile per shape across chunks).

    Returns:
        PairColumns of the B pairs.
    """
    B = base_BxMxN.shape[0]
    Bp = meshlib.padded_size(max(B, pad_to), mesh)
    b, t = meshlib.put_padded(base_BxMxN, Bp, mesh), meshlib.put_padded(tuned_BxMxN, Bp, mesh)
    return columns(jax.device_get(_jitted_pairs(topk, mesh, registry.cache_key())(b, t)), B)


def _single_one(w) -> tuple[dict, jax.Array]:
    w = w.astype(jnp.float32)
    sv = jnp.linalg.svd(w, compute_uv=False)
    return matrix_user_metrics(w), sv


@functools.lru_cache(maxsize=64)
def _jitted_singles(mesh, reg_key):
    del reg_key
    return meshlib.over_stack(_single_one, mesh, sequential=meshlib.on_cpu(mesh))


def device_singles(w_BxMxN, *, mesh, pad_to: int) -> SingleColumns:
    """Exact singular values and registered matrix metrics of a stack of single matrices (device).

    Args:
        w_BxMxN: host stack.
        mesh: mesh to shard the stack over, or None.
        pad_to: pad the stack to at least this length.

    Returns:
        SingleColumns of the B matrices.
    """
    B = w_BxMxN.shape[0]
    Bp = meshlib.padded_size(max(B, pad_to), mesh)
    user, sv = jax.device_get(_jitted_singles(mesh, registry.cache_key())(meshlib.put_padded(w_BxMxN, Bp, mesh)))
    return SingleColumns(user={name: np.asarray(v)[:B] for name, v in user.items()}, sv=np.asarray(sv, np.float64)[:B])


@functools.lru_cache(maxsize=64)
def _jitted_svdvals(mesh):
    return meshlib.over_stack(lambda w: jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False), mesh,
                              sequential=meshlib.on_cpu(mesh))


def svdvals(w_BxMxN, mesh) -> np.ndarray:
    """Exact singular values of a host stack on the device, float64 [B, k] (descending)."""
    B = w_BxMxN.shape[0]
    Bp = meshlib.padded_size(B, mesh)
    return np.asarray(jax.device_get(_jitted_svdvals(mesh)(meshlib.put_padded(w_BxMxN, Bp, mesh))), np.float64)[:B]
