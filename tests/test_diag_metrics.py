"""The delta metrics added on top of the spectral ones (base_overlap over r defined directions,
subspace_rotation, cosine, update_sparsity, update_sparsity_bf16) against float64 NumPy written
here from docs/metrics.md, on every compute path the library selects; values mode; 1-D tensors."""
import jax
import ml_dtypes
import numpy as np
import pytest

from bshadow_jax.diagnostics import exact, gram, host, host_partial, stacks

DEFINED = 1e-4  # docs/metrics.md#defined-singular-vectors: sigma_i > 1e-4 sigma_1
# (method, eig_backend): exact on host (SciPy), exact on device (XLA), Gram on host (partial
# LAPACK), Gram on device (XLA eigh of float32 Grams)
PATHS = [("svd", "host"), ("svd", "jax"), ("gram", "host"), ("gram", "jax")]
VECTOR_COLS = ("base_overlap", "subspace_rotation")
ELEMENT_COLS = ("cosine", "update_sparsity", "update_sparsity_bf16")


def one_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("stack",))


def _mean_sq_cos(ua, sa, ub, sb, K):
    va = sa[:K] > DEFINED * sa[0] if sa[0] > 0 else np.zeros(K, bool)
    vb = sb[:K] > DEFINED * sb[0] if sb[0] > 0 else np.zeros(K, bool)
    r = min(va.sum(), vb.sum())
    if r == 0:
        return 0.0, 0
    return float(np.sum((ua[:, :K][:, va].T @ ub[:, :K][:, vb]) ** 2) / r), r


def ref_metrics(b32, t32, topk):
    """float64 NumPy from the definitions (independent of the library)."""
    b, t = b32.astype(np.float64), t32.astype(np.float64)
    d = (t32.astype(np.float32) - b32.astype(np.float32)).astype(np.float64)  # the float32 delta, as read
    ub, sb, _ = np.linalg.svd(b, full_matrices=False)
    ut, st, _ = np.linalg.svd(t, full_matrices=False)
    ud, sd, _ = np.linalg.svd(d, full_matrices=False)
    K = min(topk, len(sb))
    out = {}
    out["base_overlap"], _ = _mean_sq_cos(ub, sb, ud, sd, K)
    cos_bt, r = _mean_sq_cos(ub, sb, ut, st, K)
    out["subspace_rotation"] = 1.0 - cos_bt if r else 0.0
    nb, nt = np.linalg.norm(b), np.linalg.norm(t)
    out["cosine"] = float(np.sum(b * t) / (nb * nt)) if nb > 0 and nt > 0 else float(nb == nt)
    out["update_sparsity"] = float(np.mean(t32 == b32))
    b16, t16 = b32.astype(ml_dtypes.bfloat16), t32.astype(ml_dtypes.bfloat16)
    out["update_sparsity_bf16"] = float(np.mean(t16.astype(np.float64) == b16.astype(np.float64)))
    return out


def planted(rng, shape, decay, scale=1.0):
    m, n = shape
    k = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * (scale * decay ** np.arange(k))) @ v.T


def make_pairs(shape, seed):
    """Pairs: dense delta, rank-2 delta inside the base's top-2 subspace, rank-2 random delta,
    zero delta, a bf16-rounding-only change, a sparse change."""
    rng = np.random.default_rng(seed)
    m, n = shape
    bases, tuneds = [], []
    for kind in ("dense", "rank2_in_top", "rank2_random", "zero", "bf16_only", "sparse"):
        b = planted(rng, shape, 0.8, 10.0) + 0.01 * rng.standard_normal(shape)
        if kind == "dense":
            t = b + 0.05 * planted(rng, shape, 0.9)
        elif kind == "rank2_in_top":
            u, s, vt = np.linalg.svd(b, full_matrices=False)
            t = b + u[:, :2] @ np.diag([0.5, 0.3]) @ rng.standard_normal((2, n)) / np.sqrt(n)
        elif kind == "rank2_random":
            t = b + rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)) * 0.05
        elif kind == "zero":
            t = b.copy()
        elif kind == "bf16_only":
            # both sides bf16-representable after rounding b; tuned moves by less than half a bf16 ulp
            b = b.astype(ml_dtypes.bfloat16).astype(np.float64)
            ulp = np.abs(b) * 2.0 ** -8
            t = b + 0.25 * ulp * np.sign(rng.standard_normal(shape))
        else:
            t = b.copy()
            mask = rng.random(shape) < 0.1
            t[mask] += 0.3 * rng.standard_normal(mask.sum())
        bases.append(b)
        tuneds.append(t)
    return np.stack(bases).astype(np.float32), np.stack(tuneds).astype(np.float32)


@pytest.mark.parametrize("method,backend", PATHS)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (96, 160)])
def test_new_delta_metrics_match_numpy_on_every_path(method, backend, shape):
    b, t = make_pairs(shape, 0)
    got = stacks.pair_stack(b, t, topk=8, method=method, eig_backend=backend, mesh=one_device_mesh())
    for i in range(b.shape[0]):
        ref = ref_metrics(b[i], t[i], 8)
        for c in VECTOR_COLS + ELEMENT_COLS:
            np.testing.assert_allclose(got[c][i], ref[c], atol=2e-4 if c in VECTOR_COLS else 1e-6,
                                       err_msg=f"{method}/{backend} {c} pair {i}")


@pytest.mark.parametrize("method,backend", PATHS)
def test_rank2_delta_in_the_base_top_subspace_has_overlap_one(method, backend):
    # the old definition divided by K: a rank-2 delta scored at most 2/K = 0.25 with K = 8
    b, t = make_pairs((40, 24), 1)
    got = stacks.pair_stack(b[1:3], t[1:3], topk=8, method=method, eig_backend=backend, mesh=one_device_mesh())
    assert got["base_overlap"][0] == pytest.approx(1.0, abs=1e-4)
    assert got["base_overlap"][1] < 0.5  # a random rank-2 delta does not lie in the top subspace
    assert got["subspace_rotation"][0] < 0.05  # a small update barely turns the weights' subspace


@pytest.mark.parametrize("method,backend", PATHS)
def test_identical_and_bf16_only_changes(method, backend):
    b, t = make_pairs((24, 40), 2)
    got = stacks.pair_stack(b, t, topk=4, method=method, eig_backend=backend, mesh=one_device_mesh())
    zero, bf16_only, sparse = 3, 4, 5
    assert got["cosine"][zero] == 1.0
    assert got["update_sparsity"][zero] == 1.0 and got["update_sparsity_bf16"][zero] == 1.0
    assert got["base_overlap"][zero] == 0.0 and got["subspace_rotation"][zero] == pytest.approx(0.0, abs=1e-5)
    assert got["update_sparsity_bf16"][bf16_only] == 1.0
    assert got["update_sparsity"][bf16_only] < 0.5
    assert 0.85 < got["update_sparsity"][sparse] < 0.95


def test_zero_base_and_zero_pair():
    z = np.zeros((2, 16, 24), np.float32)
    t = z.copy()
    t[1] = np.random.default_rng(3).standard_normal((16, 24))
    for method, backend in PATHS:
        got = stacks.pair_stack(z, t, topk=4, method=method, eig_backend=backend, mesh=one_device_mesh())
        np.testing.assert_array_equal(got["cosine"], [1.0, 0.0])
        np.testing.assert_array_equal(got["base_overlap"], [0.0, 0.0])
        np.testing.assert_array_equal(got["subspace_rotation"], [0.0, 0.0])  # no defined base direction: r = 0
        np.testing.assert_array_equal(got["update_sparsity"], [1.0, 0.0])


@pytest.mark.parametrize("method,backend", PATHS)
def test_values_mode_skips_the_vector_work(monkeypatch, method, backend):
    b, t = make_pairs((24, 40), 4)
    full = stacks.pair_stack(b, t, topk=4, method=method, eig_backend=backend, mesh=one_device_mesh())

    def boom(*a, **k):
        raise AssertionError("values mode ran a vector kernel")

    for mod, fn in ((host, "exact_pairs"), (host_partial, "partial_pairs"), (host, "exact_pair_metrics"),
                    (exact, "device_pairs"), (gram, "device_pairs")):
        monkeypatch.setattr(mod, fn, boom)
    vals = stacks.pair_stack(b, t, topk=4, method=method, eig_backend=backend, mesh=one_device_mesh(),
                             metrics="values")
    for c in ("base_overlap", "intruder_count", "subspace_rotation"):
        assert np.isnan(vals[c]).all(), c
    for c, v in full.columns.items():
        if c in ("base_overlap", "intruder_count", "subspace_rotation"):
            continue
        np.testing.assert_allclose(vals[c], v, rtol=2e-4, atol=1e-5, err_msg=c)


# ------------------------------------------------------------------------------------------
# pipeline: vectors.csv, footprint variants, values mode through the CLI
# ------------------------------------------------------------------------------------------

def _checkpoints(rng):
    D, F, V = 8, 16, 20
    base = {"model.embed_tokens.weight": rng.standard_normal((V, D)), "lm_head.weight": rng.standard_normal((V, D)),
            "model.norm.weight": np.ones(D), "model.layers.0.input_layernorm.weight": rng.standard_normal(D),
            "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((D, D)),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((F, D)),
            "model.layers.0.self_attn.q_proj.bias": rng.standard_normal(D),
            "only_base.bias": np.ones(3), "mismatch.bias": np.ones(4)}
    base = {k: np.asarray(v, np.float32) for k, v in base.items()}
    tuned = {k: v + np.float32(0.1) * rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    tuned["model.norm.weight"] = base["model.norm.weight"].copy()  # unchanged vector
    tuned["model.layers.0.self_attn.q_proj.bias"][:4] = base["model.layers.0.self_attn.q_proj.bias"][:4]
    del tuned["only_base.bias"]
    tuned["mismatch.bias"] = np.ones(5, np.float32)
    return base, tuned


def test_vectors_rows_footprint_variants_and_skipped():
    from bshadow_jax import diagnostics

    base, tuned = _checkpoints(np.random.default_rng(7))
    res = diagnostics.diagnose(base, tuned, topk=2)
    vec = {v["name"]: v for v in res.vectors}
    assert set(vec) == {"model.norm.weight", "model.layers.0.input_layernorm.weight",
                        "model.layers.0.self_attn.q_proj.bias"}
    for n, v in vec.items():
        b, t = base[n].astype(np.float64), tuned[n].astype(np.float64)
        assert v["size"] == b.size
        assert v["base_norm"] == pytest.approx(np.linalg.norm(b), rel=1e-12)
        assert v["delta_norm"] == pytest.approx(np.linalg.norm(t - b), rel=1e-12, abs=0)
        assert v["cosine"] == pytest.approx(b @ t / np.linalg.norm(b) / np.linalg.norm(t), rel=1e-12)
        assert v["update_sparsity"] == np.mean(base[n] == tuned[n])
    assert vec["model.norm.weight"]["update_sparsity"] == 1.0 and vec["model.norm.weight"]["cosine"] == 1.0
    assert vec["model.layers.0.self_attn.q_proj.bias"]["update_sparsity"] == 0.5
    assert vec["model.layers.0.self_attn.q_proj.bias"]["module"] == "q_proj"
    reasons = {s["name"]: s["reason"] for s in res.summary["skipped"]}
    assert reasons == {"only_base.bias": "missing in tuned", "mismatch.bias": "shape mismatch: base [4] vs tuned [5]"}
    assert res.summary["vectors"] == 3

    # footprint variants from the rows, recomputed here in float64
    e = {r["name"]: np.sum((tuned[r["name"]].astype(np.float64) - base[r["name"]]) ** 2) for r in res.rows}
    blocks = [n for n in e if "embed" not in n and "lm_head" not in n]
    s = np.array([e[n] for n in blocks]) / sum(e[n] for n in blocks)
    fb = res.summary["footprint_blocks_only"]
    assert fb["matrices"] == 2
    assert fb["entropy"] == pytest.approx(-np.sum(s * np.log(s)) / np.log(2), rel=1e-4)
    assert fb["energy_share"] == pytest.approx(sum(e[n] for n in blocks) / sum(e.values()), rel=1e-4)
    dens = np.array([e[r["name"]] / (r["rows"] * r["cols"]) for r in res.rows])
    dens /= dens.sum()
    fpp = res.summary["footprint_per_parameter"]
    assert fpp["matrices"] == 4
    assert fpp["entropy"] == pytest.approx(-np.sum(dens * np.log(dens)) / np.log(4), rel=1e-4)
    srt = np.sort(dens)[::-1]
    assert fpp["matrices_for_90pct"] == (np.searchsorted(np.cumsum(srt), 0.9) + 1) / 4
    # group means cover the new columns
    assert res.summary["by_module"]["q_proj"]["cosine"] == pytest.approx(res.rows[[r["module"] for r in res.rows].index("q_proj")]["cosine"])


def test_values_mode_cli_writes_empty_vector_cells(tmp_path):
    import csv
    import json

    from safetensors.numpy import save_file

    from bshadow_jax.cli import main

    base, tuned = _checkpoints(np.random.default_rng(8))
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    outs = {}
    for mode in ("values", "all"):
        out = tmp_path / mode
        assert main(["diagnose", str(tmp_path / "b.safetensors"), str(tmp_path / "t.safetensors"), "--out", str(out),
                     "--metrics", mode]) == 0
        with open(out / "metrics.csv") as f:
            outs[mode] = list(csv.DictReader(f))
        summary = json.loads((out / "summary.json").read_text())
        assert summary["metrics"] == mode
        with open(out / "vectors.csv") as f:
            vrows = list(csv.DictReader(f))
        assert list(vrows[0]) == ["name", "component", "layer", "module", "size", "base_norm", "delta_norm",
                                  "rel_delta", "cosine", "update_sparsity", "update_sparsity_bf16"]
        assert len(vrows) == 3
    for rv, ra in zip(outs["values"], outs["all"]):
        for c in ("base_overlap", "intruder_count", "subspace_rotation"):
            assert rv[c] == "" and ra[c] != "", c
        for c in ("delta_fro", "delta_effective_rank", "cosine", "update_sparsity", "rel_delta"):
            assert float(rv[c]) == pytest.approx(float(ra[c]), rel=1e-4, abs=1e-6), c
    assert summary["by_module"]["q_proj"]["base_overlap"] is not None
    values_summary = json.loads((tmp_path / "values" / "summary.json").read_text())
    assert values_summary["by_module"]["q_proj"]["base_overlap"] is None
    assert values_summary["not_computed"] == ["base_overlap", "subspace_rotation", "intruder_count"]


@pytest.mark.parametrize("method,backend", PATHS)
def test_directions_a_float32_gram_cannot_resolve_are_recomputed_exactly(method, backend):
    """A rank-3 base (top-8 values 4..8 are zero) and a delta whose second direction has
    sigma_2 = 5e-4 sigma_1: defined (> 1e-4) but below a float32 Gram's ~1.4e-3 floor. The Gram
    paths must redo those pairs exactly and still give the definitions' values."""
    rng = np.random.default_rng(9)
    m, n = 48, 40
    b1 = rng.standard_normal((m, 3)) @ rng.standard_normal((3, n))
    t1 = b1 + 0.05 * rng.standard_normal((m, n))
    b2 = planted(rng, (m, n), 0.8, 10.0)
    u, _ = np.linalg.qr(rng.standard_normal((m, 2)))
    v, _ = np.linalg.qr(rng.standard_normal((n, 2)))
    t2 = b2 + (u * [1.0, 5e-4]) @ v.T
    b, t = np.stack([b1, b2]).astype(np.float32), np.stack([t1, t2]).astype(np.float32)
    got = stacks.pair_stack(b, t, topk=8, method=method, eig_backend=backend, mesh=one_device_mesh())
    for i in range(2):
        ref = ref_metrics(b[i], t[i], 8)
        for c in VECTOR_COLS:
            np.testing.assert_allclose(got[c][i], ref[c], atol=2e-4, err_msg=f"{c} pair {i}")
    if method == "gram":
        assert got.redo_vectors[0]  # the rank-3 base, on both Gram variants
        assert got.redo_vectors[1] == (backend == "jax")  # a float64 Gram resolves the delta on CPU
    else:
        assert not got.redo_vectors.any()
