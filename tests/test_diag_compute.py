"""Stacked metric engine: exact path vs an independent NumPy implementation, fast path vs exact,
vmapped stack vs one matrix at a time, 8 simulated devices vs one."""
import jax
import numpy as np
import pytest

from bshadow_jax.diagnostics import gram, host, stacks
from bshadow_jax.diagnostics import mesh as meshlib
from bshadow_jax.diagnostics.spectral import SV_METRICS

SHAPES = [(24, 40), (40, 24)]  # wide and tall
ONE_DEVICE = None


def one_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("stack",))


def ref_pair(b, t, topk=8):
    """The delta metrics of docs/metrics.md with numpy.linalg.svd in float64 (independent of the library)."""
    b = b.astype(np.float64)
    t = t.astype(np.float64)
    d = t - b
    ub, sb, _ = np.linalg.svd(b, full_matrices=False)
    ut, st, _ = np.linalg.svd(t, full_matrices=False)
    ud, sd, _ = np.linalg.svd(d, full_matrices=False)
    k = len(sd)
    K = min(topk, k)
    out = {"base_fro": np.linalg.norm(b), "delta_fro": np.linalg.norm(d)}
    out["rel_delta"] = out["delta_fro"] / out["base_fro"]
    if sd[0] > 0:
        # directions of zero singular values (sigma <= 1e-4 sigma_1) are arbitrary and do not count;
        # the sum is over the r = min(#defined base, #defined delta) principal angles
        kd = int(np.sum(sd[:K] > sd[0] * 1e-4))
        kb = int(np.sum(sb[:K] > sb[0] * 1e-4))
        out["base_overlap"] = np.sum((ub[:, :kb].T @ ud[:, :kd]) ** 2) / min(kb, kd)
    else:
        out["base_overlap"] = 0.0
    T = min(10, k)
    out["intruder_count"] = float(np.sum(np.max(np.abs(ut[:, :T].T @ ub), axis=1) < 0.5))
    S1, S2 = sd.sum(), (sd**2).sum()
    if S2 > 0:
        p = sd / S1
        p = p[p > 0]
        q = sd**2 / S2
        q = q[q > 0]
        cum = np.cumsum(sd**2)
        out.update({
            "delta_spectral_norm": sd[0], "delta_nuclear_norm": S1, "delta_stable_rank": S2 / sd[0] ** 2,
            "delta_effective_rank": np.exp(-np.sum(p * np.log(p))),
            "delta_spectral_entropy": -np.sum(q * np.log(q)) / np.log(k),
            "delta_energy_rank_90": np.argmax(cum >= 0.9 * S2) + 1.0,
            "delta_energy_rank_99": np.argmax(cum >= 0.99 * S2) + 1.0,
            "delta_topk_energy": cum[K - 1] / S2,
        })
    else:
        out.update({f"delta_{m}": 0.0 for m in SV_METRICS if m != "fro"})
    return out


def planted(rng, shape, decay=0.7, scale=1.0):
    m, n = shape
    k = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = scale * decay ** np.arange(k)
    return (u * s) @ v.T


def make_pairs(shape, seed):
    """Base with a decaying spectrum; deltas: dense small, planted rank 2 strong, rank 3, zero."""
    rng = np.random.default_rng(seed)
    m, n = shape
    bases, tuneds = [], []
    for kind in ("dense", "rank2", "rank3", "zero"):
        b = planted(rng, shape, 0.8, 10.0) + 0.01 * rng.standard_normal(shape)
        if kind == "dense":
            d = 0.05 * planted(rng, shape, 0.9)
        elif kind == "rank2":
            d = rng.standard_normal((m, 2)) @ np.diag([40.0, 25.0]) @ rng.standard_normal((2, n)) / np.sqrt(m * n)
        elif kind == "rank3":
            d = rng.standard_normal((m, 3)) @ rng.standard_normal((3, n)) * 0.1
        else:
            d = np.zeros(shape)
        bases.append(b)
        tuneds.append(b + d)
    return np.stack(bases).astype(np.float32), np.stack(tuneds).astype(np.float32)


COLS = ["base_fro", "delta_fro", "rel_delta", "base_overlap", "intruder_count"] + [
    f"delta_{m}" for m in SV_METRICS if m != "fro"]


@pytest.mark.parametrize("shape", SHAPES)
def test_exact_path_matches_numpy(shape):
    b, t = make_pairs(shape, 0)
    got = stacks.pair_stack(b, t, topk=4, method="svd", mesh=one_device_mesh())
    for i in range(b.shape[0]):
        ref = ref_pair(b[i], t[i], topk=4)
        for c in COLS:
            tol = 2e-3 if c in ("delta_effective_rank", "delta_spectral_entropy") and i == 3 else 2e-4
            np.testing.assert_allclose(got[c][i], ref[c], rtol=tol, atol=2e-5, err_msg=f"{c} pair {i}")
    assert got["intruder_count"][1] >= 1  # a strong planted rank-2 delta brings intruders
    assert got["delta_effective_rank"][2] < 3 and got["delta_energy_rank_90"][2] <= 3


def assert_fast_matches_exact(fa, ex):
    for c in COLS:
        if c in ("delta_energy_rank_90", "delta_energy_rank_99", "intruder_count"):
            np.testing.assert_array_equal(fa[c], ex[c], err_msg=c)
        elif c == "base_overlap":
            np.testing.assert_allclose(fa[c], ex[c], atol=1e-3, err_msg=c)
        else:
            np.testing.assert_allclose(fa[c], ex[c], rtol=1e-3, atol=1e-5, err_msg=c)


def fast_and_exact(shape, eig_backend: str):
    """The Gram path with this eigensolver backend against the exact one, on make_pairs(shape)."""
    b, t = make_pairs(shape, 1)
    mesh = one_device_mesh()
    ex = stacks.pair_stack(b, t, topk=4, method="svd", mesh=mesh)
    fa = stacks.pair_stack(b, t, topk=4, method="gram", mesh=mesh, eig_backend=eig_backend)
    assert_fast_matches_exact(fa, ex)
    return fa, ex


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_path_agrees_with_exact_jax_eigh(shape):
    fa, _ = fast_and_exact(shape, "jax")
    # the low-rank deltas cannot be resolved by a float32 Gram: they must take the exact route
    assert fa.redo_sv[2]
    assert not fa.redo_sv[0]


@pytest.mark.parametrize("shape", SHAPES + [(96, 160), (160, 96), (72, 72)])
def test_fast_path_agrees_with_exact_host_partial(shape):
    # (96, 160): k = 96 > HOST_BASE_VECTORS, so intruders are decided from the top base vectors only
    fa, ex = fast_and_exact(shape, "host")
    assert not fa.redo_sv.any()  # float64 Gram values need no exact redo, low-rank deltas included
    assert ex["intruder_count"][1] >= 1  # the planted rank-2 delta brings intruders: the test can see them


@pytest.mark.parametrize("shape", [(160, 96), (96, 160), (90, 90)])
def test_host_partial_float64_work_in_small_blocks_gives_the_same_metrics(monkeypatch, shape):
    # the float64 Gram, the tall projection and base_fro are accumulated block by block to bound
    # memory; 7-row blocks must give what one block gives
    b, t = make_pairs(shape, 7)
    mesh = one_device_mesh()
    whole = stacks.pair_stack(b, t, topk=4, method="gram", mesh=mesh, eig_backend="host")
    monkeypatch.setattr(host, "_BLOCK_BYTES", 8 * max(shape) * 7)
    assert len(host.row_blocks(b[0] if shape[0] > shape[1] else b[0].T)) > 10
    blocked = stacks.pair_stack(b, t, topk=4, method="gram", mesh=mesh, eig_backend="host")
    for c in COLS:
        np.testing.assert_allclose(blocked[c], whole[c], rtol=1e-6, atol=1e-7, err_msg=c)


def test_host_partial_intruders_fall_back_when_base_vectors_cannot_decide(monkeypatch):
    # with only 2 base vectors most tuned vectors cannot be decided: those pairs must be redone
    # exactly and still give the exact counts
    monkeypatch.setattr(host, "HOST_BASE_VECTORS", 2)
    b, t = make_pairs((96, 160), 5)
    mesh = one_device_mesh()
    ex = stacks.pair_stack(b, t, topk=2, method="svd", mesh=mesh)
    fa = stacks.pair_stack(b, t, topk=2, method="gram", mesh=mesh, eig_backend="host")
    assert fa.redo_intruders.any()
    np.testing.assert_array_equal(fa["intruder_count"], ex["intruder_count"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_lapack_eigensolvers_match_numpy(dtype):
    from bshadow_jax.diagnostics import lapack

    assert lapack.available()  # the GIL-free ctypes route, not the scipy fallback, is what runs here
    rng = np.random.default_rng(6)
    w = rng.standard_normal((70, 90)).astype(dtype)
    g = w @ w.T
    ref_lam, ref_vec = np.linalg.eigh(g.astype(np.float64))
    ref_lam, ref_vec = ref_lam[::-1], ref_vec[:, ::-1]
    tol = 1e-10 if dtype == np.float64 else 2e-5
    lam, vec = lapack.eigvalsh_and_top(g, 5)
    np.testing.assert_allclose(lam, ref_lam, rtol=tol, atol=tol * ref_lam[0])
    np.testing.assert_allclose(np.abs(np.sum(vec * ref_vec[:, :5], axis=0)), 1.0, atol=tol * 10)
    lam, vec = lapack.top_eigh(g, 6)
    np.testing.assert_allclose(lam, ref_lam[:6], rtol=tol, atol=tol * ref_lam[0])
    np.testing.assert_allclose(np.abs(np.sum(vec * ref_vec[:, :6], axis=0)), 1.0, atol=tol * 10)


def test_vmapped_stack_equals_single_matrices():
    b, t = make_pairs((24, 40), 2)
    mesh = one_device_mesh()
    stacked = stacks.pair_stack(b, t, method="svd", mesh=mesh)
    for i in range(b.shape[0]):
        one = stacks.pair_stack(b[i:i + 1], t[i:i + 1], method="svd", mesh=mesh)
        for c in stacked.columns:  # every column, the elementwise and subspace ones included
            np.testing.assert_allclose(one[c][0], stacked[c][i], rtol=1e-5, atol=1e-6, err_msg=c)


def test_sharded_8_devices_equals_one_device():
    assert jax.device_count() == 8
    b, t = make_pairs((40, 24), 3)
    b = np.concatenate([b, b[:1] * 0.5])  # 5 matrices: padding to 8 must be dropped
    t = np.concatenate([t, t[:1]])
    one = stacks.pair_stack(b, t, method="gram", mesh=one_device_mesh())
    eight = stacks.pair_stack(b, t, method="gram", mesh=meshlib.default_mesh())
    assert meshlib.mesh_size(meshlib.default_mesh()) == 8
    for c in one.columns:
        assert eight[c].shape == (5,)
        np.testing.assert_allclose(eight[c], one[c], rtol=1e-5, atol=1e-6, err_msg=c)


def test_zero_delta_and_bf16_upcast():
    rng = np.random.default_rng(4)
    b = rng.standard_normal((2, 16, 24)).astype(np.float32)
    res = stacks.pair_stack(b, b.copy(), method="gram", mesh=one_device_mesh())
    for c in COLS:
        if c != "base_fro":
            np.testing.assert_array_equal(res[c], 0.0, err_msg=c)
    import ml_dtypes

    b16 = b.astype(ml_dtypes.bfloat16)
    t16 = (b + 0.1 * rng.standard_normal(b.shape)).astype(ml_dtypes.bfloat16)
    r16 = stacks.pair_stack(b16, t16, mesh=one_device_mesh())
    r32 = stacks.pair_stack(b16.astype(np.float32), t16.astype(np.float32), mesh=one_device_mesh())
    for c in COLS:
        np.testing.assert_allclose(r16[c], r32[c], rtol=1e-6, err_msg=c)


def test_gram_guard_bound_is_conservative():
    # measured float32 Gram eigenvalue error must stay below the guard's assumed bound
    rng = np.random.default_rng(5)
    for shape in [(64, 256), (256, 64), (128, 128)]:
        w = rng.standard_normal(shape).astype(np.float32)
        g32 = (w @ w.T if shape[0] <= shape[1] else w.T @ w).astype(np.float64)
        w64 = w.astype(np.float64)
        g64 = w64 @ w64.T if shape[0] <= shape[1] else w64.T @ w64
        lam = np.linalg.eigvalsh(g64)
        err = np.max(np.abs(np.linalg.eigvalsh(g32) - lam)) / lam[-1]
        assert err < gram.GRAM_REL_ERR / 5, (shape, err)
