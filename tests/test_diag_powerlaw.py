"""WeightWatcher-compatible metrics (diagnostics/powerlaw.py) against weightwatcher itself."""
from __future__ import annotations

import importlib
import logging

import numpy as np
import pytest
import scipy.linalg

import jax
import jax.numpy as jnp

from bshadow_jax.diagnostics.powerlaw import (
    mp_fit,
    ww_metrics,
    ww_metrics_from_sv,
    ww_metrics_stack,
)

COMPARED = ("alpha", "xmin", "D", "sigma", "num_pl_spikes", "log_norm", "log_spectral_norm",
            "alpha_weighted", "stable_rank", "log_alpha_norm")


def _layers(rng):
    """[out, in] weights that exercise every branch of WW's fit."""
    low_rank = rng.standard_normal((64, 12)) @ rng.standard_normal((12, 64))
    tiny_rank = rng.standard_normal((48, 5)) @ rng.standard_normal((5, 32))
    return {
        # Marchenko-Pastur bulk: large alpha, standard fit
        "gauss": rng.standard_normal((300, 200)) / 15,
        # heavy-tailed entries: alpha in WW's "well-trained" range
        "student": rng.standard_t(2.5, (512, 256)) / 20,
        # very heavy tails: alpha < 2
        "cauchyish": rng.standard_t(1.2, (384, 192)) / 50,
        # wide layer (out < in)
        "wide": rng.standard_t(3.0, (96, 400)) / 10,
        # 16 eigenvalues: WW's small-N fit
        "small": rng.standard_t(3.0, (64, 16)),
        # rank 12: only 12 eigenvalues above 1e-5 -> small-N fit after thresholding
        "lowrank": low_rank,
        # rank 5: fewer than 8 fitted eigenvalues -> small-N fallback to the whole spectrum
        "tinyrank": tiny_rank,
    }


@pytest.fixture(scope="module")
def ww_reference():
    ww = importlib.import_module("weightwatcher")
    torch = importlib.import_module("torch")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    rng = np.random.default_rng(1234)
    weights = _layers(rng)

    model = torch.nn.Module()
    for name, w in weights.items():
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(w, dtype=torch.float32))
        model.add_module(name, lin)
    details = ww.WeightWatcher(model=model).analyze(mp_fit=True)  # mp_fit adds num_spikes, mp_softrank
    ref = {row["name"]: row for row in details.to_dict("records")}
    # what WW actually analysed: the float32 weights, upcast (W.astype(float))
    w32 = {name: getattr(model, name).weight.detach().numpy().astype(np.float64) for name in weights}
    return ref, w32


def test_matches_weightwatcher_per_layer(ww_reference):
    ref, w32 = ww_reference
    assert set(ref) == set(w32), "WW skipped a layer: pick larger sizes"
    for name, w in w32.items():
        ours = ww_metrics_from_sv(scipy.linalg.svdvals(w))
        theirs = ref[name]
        assert theirs["status"] == "success", name
        for key in COMPARED:
            # same algorithm in float64; differences are LAPACK/summation-order round-off
            np.testing.assert_allclose(ours[key], float(theirs[key]), rtol=1e-8, atol=1e-10,
                                       err_msg=f"{name}.{key}")


def test_mp_fit_matches_weightwatcher(ww_reference):
    ref, w32 = ww_reference
    for name, w in w32.items():
        ours = mp_fit(scipy.linalg.svdvals(w) ** 2, max(w.shape), min(w.shape))
        theirs = ref[name]
        assert ours["num_spikes"] == theirs["num_spikes"], name
        np.testing.assert_allclose(ours["mp_softrank"], theirs["mp_softrank"], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(ours["sigma_mp"], theirs["sigma_mp"], rtol=1e-6, err_msg=name)
    assert any(ref[n]["num_spikes"] > 0 for n in w32)  # the heavy-tailed layers have spikes: the count is tested
    assert mp_fit(np.zeros(8), 16, 8)["num_spikes"] == -1  # a zero matrix: failed fit


def test_spectrum_columns_match_weightwatcher_and_write_esd_fits(ww_reference, tmp_path):
    from bshadow_jax import diagnostics

    ref, w32 = ww_reference
    params = {f"{n}.weight": w.astype(np.float32) for n, w in w32.items() if n in ("gauss", "student", "wide", "small")}
    res = diagnostics.spectrum(params)
    for r in res.rows:
        theirs = ref[r["name"].removesuffix(".weight")]
        for c, tol in (("alpha", 1e-3), ("xmin", 1e-3), ("D", 1e-2), ("mp_softrank", 1e-3)):
            np.testing.assert_allclose(r[c], float(theirs[c]), rtol=tol, err_msg=f"{r['name']} {c}")
        assert r["num_spikes"] == theirs["num_spikes"], r["name"]
    diagnostics.write_outputs(res, tmp_path / "spec")
    fits = sorted((tmp_path / "spec" / "esd_fits").glob("*.png"))
    assert len(fits) == 4
    md = (tmp_path / "spec" / "report.md").read_text()
    assert "## ESD fits" in md and all(f"esd_fits/{f.name}" in md for f in fits)


def test_eigenvalue_and_sv_entry_points_agree(ww_reference):
    _, w32 = ww_reference
    w = w32["student"]
    sv = scipy.linalg.svdvals(w)
    ev = np.linalg.eigvalsh(w.T @ w)  # ESD of WᵀW, unnormalised, ascending
    a, b = ww_metrics(ev), ww_metrics_from_sv(sv)
    np.testing.assert_allclose(a["alpha"], b["alpha"], rtol=1e-6)
    np.testing.assert_allclose(a["log_norm"], np.log10(np.sum(w * w)), rtol=1e-12)
    np.testing.assert_allclose(b["log_spectral_norm"], np.log10(sv[0] ** 2), rtol=1e-12)


def _padded_stack(spectra):
    L = max(len(s) for s in spectra)
    ev = np.zeros((len(spectra), L))
    valid = np.zeros((len(spectra), L), bool)
    for b, s in enumerate(spectra):
        ev[b, : len(s)] = s
        valid[b, : len(s)] = True
    return ev, valid


def test_jax_stack_matches_host_float64(ww_reference):
    _, w32 = ww_reference
    spectra = [scipy.linalg.svdvals(w) ** 2 for w in w32.values()]
    ev, valid = _padded_stack(spectra)
    host = [ww_metrics(s) for s in spectra]
    with jax.enable_x64(True):
        got = ww_metrics_stack(jnp.asarray(ev), jnp.asarray(valid), ks_batch=64)
        got = {k: np.asarray(v) for k, v in got.items()}
    for b, h in enumerate(host):
        for key in COMPARED:
            np.testing.assert_allclose(got[key][b], h[key], rtol=1e-10, atol=1e-12,
                                       err_msg=f"row {b} {key}")


def test_jax_float32_close_to_host(ww_reference):
    _, w32 = ww_reference
    spectra = [scipy.linalg.svdvals(w) ** 2 for w in w32.values()]
    ev, valid = _padded_stack(spectra)
    got = ww_metrics_stack(jnp.asarray(ev, jnp.float32), jnp.asarray(valid))
    assert got["alpha"].dtype == jnp.float32
    for b, s in enumerate(spectra):
        h = ww_metrics(s)
        # these spectra have a well-separated KS minimum, so float32 picks the same xmin
        np.testing.assert_allclose(float(got["xmin"][b]), h["xmin"], rtol=1e-5)
        np.testing.assert_allclose(float(got["alpha"][b]), h["alpha"], rtol=1e-4)
        np.testing.assert_allclose(float(got["alpha_weighted"][b]), h["alpha_weighted"], rtol=1e-4)


def test_vectorised_fit_equals_direct_loop():
    """Independent per-xmin loop (WW's standard formulas) on a power-law sample."""
    rng = np.random.default_rng(7)
    x = np.sort((1 - rng.random(300)) ** (-1 / 1.7))  # Pareto, alpha = 2.7
    best = (np.inf, None, None)
    logx = np.log(x)
    for i in range(len(x) - 1):
        n = len(x) - i
        alpha = 1 + n / (logx[i:].sum() - n * logx[i])
        d = np.max(np.abs(1 - (x[i:] / x[i]) ** (1 - alpha) - np.arange(n) / n)) if alpha > 1 else 1.0
        if d < best[0]:
            best = (d, alpha, x[i])
    got = ww_metrics(x)
    np.testing.assert_allclose([got["D"], got["alpha"], got["xmin"]], best, rtol=1e-10)
    assert 2.0 < got["alpha"] < 3.5


def test_degenerate_inputs():
    zero = ww_metrics(np.zeros(16))
    assert zero["alpha"] == -1 and zero["stable_rank"] == 0.0 and zero["D"] == -1
    one = ww_metrics(np.array([0.0] * 15 + [4.0]))  # rank 1: one fitted eigenvalue -> failed fit
    assert one["alpha"] == -1
    np.testing.assert_allclose(one["log_spectral_norm"], np.log10(4.0))
    np.testing.assert_allclose(one["stable_rank"], 1.0)
    # jitted + vmapped: a zero spectrum fails like the host path; an all-equal one never crashes
    res = ww_metrics_stack(jnp.stack([jnp.zeros(32), jnp.ones(32)]))
    assert float(res["alpha"][0]) == -1.0 and float(res["stable_rank"][0]) == 0.0
    host = ww_metrics(np.ones(32))
    np.testing.assert_allclose(float(res["D"][1]), host["D"], rtol=1e-6)
