"""Pure metrics of a singular-value vector (docs/metrics.md#spectral-metrics).

Every function takes the singular values of one m x n matrix (any order, length k = min(m, n))
and is jittable and vmappable over leading axes. Zero matrices give 0 for every norm and every
rank-like metric; 0 * ln 0 is taken as 0 without producing NaN values or NaN gradients (the
`where` guards feed safe operands to log/divide on the masked branches).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SV_METRICS = (
    "fro",
    "spectral_norm",
    "nuclear_norm",
    "stable_rank",
    "effective_rank",
    "spectral_entropy",
    "energy_rank_90",
    "energy_rank_99",
    "topk_energy",
)


def _xlogx(x):
    """x ln x with 0 ln 0 = 0 (finite value and gradient at 0)."""
    pos = x > 0
    return jnp.where(pos, x * jnp.log(jnp.where(pos, x, 1.0)), 0.0)


def _sorted_desc(sv_K):
    sv_K = jnp.abs(jnp.asarray(sv_K))
    if not jnp.issubdtype(sv_K.dtype, jnp.floating):
        sv_K = sv_K.astype(jnp.float32)
    return jnp.flip(jnp.sort(sv_K, axis=-1), axis=-1)


def _energy_rank(cum_K, total, frac):
    # smallest r with cum[r-1] >= frac * total; cum is normalised by its own last entry so
    # rounding in the running sum cannot push r past k
    k = cum_K.shape[-1]
    below = jnp.sum(cum_K < frac * total, axis=-1)
    return jnp.minimum(below + 1, k).astype(cum_K.dtype)


def spectral_metrics(sv, *, topk: int = 8, shape=None) -> dict:
    """Every documented metric (docs/metrics.md) of one singular-value vector, as a dict of scalars.

    `sv` is the singular values (length k = min(m, n)) of one matrix; `shape` (m, n), when
    given, fixes k for the spectral-entropy normaliser ln k (otherwise k = len(sv)).
    Leading axes are not supported directly: use jax.vmap (the function is vmappable).
    """
    sv_K = _sorted_desc(sv)
    if sv_K.ndim != 1:
        raise ValueError(f"spectral_metrics expects a 1-D singular-value vector, got shape {sv_K.shape}")
    k = int(min(shape)) if shape is not None else sv_K.shape[-1]
    dt = sv_K.dtype
    s1 = sv_K[0] if sv_K.shape[0] else jnp.zeros((), dt)
    e_K = sv_K * sv_K
    cum_K = jnp.cumsum(e_K)
    S1 = jnp.sum(sv_K)
    S2 = cum_K[-1] if sv_K.shape[0] else jnp.zeros((), dt)
    zero = ~(S2 > 0)  # also catches an empty vector
    safe_S1 = jnp.where(zero, 1.0, S1)
    safe_S2 = jnp.where(zero, 1.0, S2)
    safe_s1 = jnp.where(zero, 1.0, s1)

    p_K = sv_K / safe_S1
    effective_rank = jnp.where(zero, 0.0, jnp.exp(-jnp.sum(_xlogx(p_K))))
    q_K = e_K / safe_S2
    if k > 1:
        spectral_entropy = jnp.where(zero, 0.0, -jnp.sum(_xlogx(q_K)) / jnp.log(float(k)))
    else:  # ln 1 = 0: a 1 x n matrix has a single direction, entropy 0 by convention
        spectral_entropy = jnp.zeros((), dt)
    stable_rank = jnp.where(zero, 0.0, S2 / (safe_s1 * safe_s1))
    kk = max(1, min(int(topk), sv_K.shape[0]))
    topk_energy = jnp.where(zero, 0.0, cum_K[kk - 1] / safe_S2)
    er90 = jnp.where(zero, 0.0, _energy_rank(cum_K, S2, 0.90))
    er99 = jnp.where(zero, 0.0, _energy_rank(cum_K, S2, 0.99))
    out = {
        "fro": jnp.sqrt(S2),
        "spectral_norm": s1,
        "nuclear_norm": S1,
        "stable_rank": stable_rank,
        "effective_rank": effective_rank,
        "spectral_entropy": spectral_entropy,
        "energy_rank_90": er90,
        "energy_rank_99": er99,
        "topk_energy": topk_energy,
    }
    return {name: jnp.asarray(v, dt) for name, v in out.items()}


def spectral_metrics_stack(sv_BxK, *, topk: int = 8, shape=None) -> dict:
    """spectral_metrics vmapped over a leading stack axis."""
    return jax.vmap(lambda s: spectral_metrics(s, topk=topk, shape=shape))(sv_BxK)
