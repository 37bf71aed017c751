"""Singular-value metrics: known answers and an independent NumPy implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bshadow_jax.diagnostics import spectral_metrics
from bshadow_jax.diagnostics.spectral import SV_METRICS, spectral_metrics_stack


def ref_metrics(sv, topk=8):
    """Straight from docs/metrics.md, in float64, written independently of the library."""
    s = np.sort(np.abs(np.asarray(sv, np.float64)))[::-1]
    k = len(s)
    S1, S2 = s.sum(), (s**2).sum()
    if S2 == 0:
        return {m: 0.0 for m in SV_METRICS}
    p = s / S1
    p = p[p > 0]
    q = s**2 / S2
    q = q[q > 0]
    cum = np.cumsum(s**2)
    return {
        "fro": np.sqrt(S2),
        "spectral_norm": s[0],
        "nuclear_norm": S1,
        "stable_rank": S2 / s[0] ** 2,
        "effective_rank": np.exp(-np.sum(p * np.log(p))),
        "spectral_entropy": -np.sum(q * np.log(q)) / np.log(k) if k > 1 else 0.0,
        "energy_rank_90": int(np.argmax(cum >= 0.90 * S2)) + 1,
        "energy_rank_99": int(np.argmax(cum >= 0.99 * S2)) + 1,
        "topk_energy": cum[min(topk, k) - 1] / S2,
    }


def _np(d):
    return {k: float(v) for k, v in d.items()}


def test_zero_matrix_all_zero():
    m = _np(spectral_metrics(np.zeros(7, np.float32)))
    assert set(m) == set(SV_METRICS)
    assert all(v == 0.0 for v in m.values()), m


def test_identity():
    n = 6
    m = _np(spectral_metrics(np.linalg.svd(np.eye(n, dtype=np.float32), compute_uv=False)))
    assert m["effective_rank"] == pytest.approx(n, rel=1e-5)
    assert m["stable_rank"] == pytest.approx(n, rel=1e-5)
    assert m["spectral_entropy"] == pytest.approx(1.0, rel=1e-5)
    assert m["energy_rank_90"] == 6 and m["energy_rank_99"] == 6
    assert m["topk_energy"] == pytest.approx(1.0)
    assert m["fro"] == pytest.approx(np.sqrt(n), rel=1e-6)
    assert m["nuclear_norm"] == pytest.approx(n, rel=1e-6)


def test_rank_one():
    rng = np.random.default_rng(1)
    a = np.outer(rng.standard_normal(9), rng.standard_normal(5)).astype(np.float32)
    m = _np(spectral_metrics(np.linalg.svd(a.astype(np.float64), compute_uv=False)))
    assert m["effective_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["stable_rank"] == pytest.approx(1.0, abs=1e-6)
    assert m["spectral_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert m["energy_rank_90"] == 1 and m["energy_rank_99"] == 1
    assert m["spectral_norm"] == pytest.approx(np.linalg.norm(a, 2), rel=1e-5)


def test_planted_rank3_delta():
    rng = np.random.default_rng(2)
    d = rng.standard_normal((40, 3)) @ np.diag([5.0, 3.0, 1.0]) @ rng.standard_normal((3, 30))
    m = _np(spectral_metrics(np.linalg.svd(d, compute_uv=False)))
    assert m["effective_rank"] < 3
    assert m["energy_rank_90"] <= 3
    assert m["energy_rank_99"] <= 3


def test_planted_spectrum():
    sv = np.array([4.0, 2.0, 1.0, 1.0, 0.0, 0.0])
    m = _np(spectral_metrics(sv, topk=2))
    S2 = 16 + 4 + 1 + 1
    assert m["stable_rank"] == pytest.approx(S2 / 16)
    assert m["topk_energy"] == pytest.approx(20 / S2)
    assert m["energy_rank_90"] == 2  # 0.9 * 22 = 19.8 <= 16 + 4
    assert m["energy_rank_99"] == 4  # 0.99 * 22 = 21.78 > 21
    ref = ref_metrics(sv, topk=2)
    for k in SV_METRICS:
        assert m[k] == pytest.approx(ref[k], rel=1e-6, abs=1e-7), k


@pytest.mark.parametrize("shape", [(13, 7), (7, 13), (32, 32), (1, 9)])
def test_against_numpy_reference(shape):
    rng = np.random.default_rng(hash(shape) % 2**31)
    for topk in (1, 3, 8):
        a = rng.standard_normal(shape) * rng.gamma(1.0, size=(1, shape[1]))
        sv = np.linalg.svd(a, compute_uv=False)
        got = _np(spectral_metrics(sv.astype(np.float32), topk=topk))
        ref = ref_metrics(sv, topk=topk)
        for k in SV_METRICS:
            assert got[k] == pytest.approx(ref[k], rel=2e-5, abs=1e-6), (k, shape, topk)


def test_jit_vmap_equals_single():
    rng = np.random.default_rng(3)
    sv = np.abs(rng.standard_normal((5, 11))).astype(np.float32)
    sv[2] = 0.0
    stacked = jax.jit(lambda s: spectral_metrics_stack(s, topk=4))(sv)
    for i in range(5):
        one = spectral_metrics(sv[i], topk=4)
        for k in SV_METRICS:
            np.testing.assert_allclose(stacked[k][i], one[k], rtol=1e-6, atol=1e-7)


def test_no_nan_gradients_at_zero():
    sv = jnp.array([3.0, 1.0, 0.0, 0.0])

    def f(s):
        m = spectral_metrics(s)
        return m["effective_rank"] + m["spectral_entropy"] + m["stable_rank"] + m["topk_energy"]

    g = jax.grad(f)(sv)
    assert np.all(np.isfinite(np.asarray(g)))
    g0 = jax.grad(f)(jnp.zeros(4))
    assert np.all(np.isfinite(np.asarray(g0)))
