"""WeightWatcher-compatible power-law and norm metrics of one dense layer.

Reproduces what ``weightwatcher`` 0.7.x ``WeightWatcher.analyze()`` reports for a plain dense
layer with its defaults (read from its source, 0.7.7):

* ESD: the eigenvalues of WᵀW **without** any 1/N normalisation, i.e. the squared singular
  values of W (``combined_eigenvalues``: ``evals = sv * sv``; ``normalize`` is off).
* Power-law fit (``fit_powerlaw`` with ``fix_fingers=False``, ``xmax=None``,
  ``pl_package="ww"``, so ``WW_powerlaw.WWFit`` and *not* the ``powerlaw`` package):
  only eigenvalues > 1e-5 (``EVALS_THRESH``) are fitted; every sorted eigenvalue but the
  largest is an xmin candidate; for each candidate the continuous MLE
  ``alpha = 1 + n / Σ ln(x_j / xmin)`` over the tail ``x_j >= xmin`` (n = tail size) and the KS
  distance ``max_j |1 - (x_j/xmin)^(1-alpha) - (j-i)/n|`` (WW's empirical CDF 0, 1/n, ...);
  candidates with alpha <= 1 get D = 1; xmin = the first argmin of D.
  Fewer than 20 fitted eigenvalues switch WW to its small-N fit: bias-corrected
  ``alpha = 1 + (n-1) / Σ ln(x_j/xmin)``, tails shorter than 8 skipped, xmin chosen by
  ``D - 0.868/sqrt(n)``, falling back to the whole spectrum when no candidate qualifies --
  but ``WWFit.__init__`` then re-selects ``argmin(D)`` over those arrays, and that is what
  WW reports, so that is what is reproduced here.
* Norm metrics (``apply_norm_metrics``) from *all* eigenvalues: log_norm = log10 Σλ
  (= log10 ‖W‖F²), log_spectral_norm = log10 λmax (= log10 σ1²), alpha_weighted =
  alpha · log_spectral_norm, log_alpha_norm = log10 Σ λ^alpha, stable_rank = Σλ / λmax.
* A failed fit (fewer than two eigenvalues above the threshold, or a NaN alpha) reports alpha = D = xmin =
  sigma = num_pl_spikes = -1, as WW does.
* Marchenko-Pastur fit (``mp_fit``; WW's ``analyze(mp_fit=True)``, ``WeightWatcher.mp_fit`` with
  ``rescale=True``): the ESD is rescaled to mean 1 (``Wscale² = M / Σλ``), a linear-kernel KDE
  (bandwidth 0.1, 1000 points on [0, max + 0.5], points of density <= 0.01 dropped) is fitted by
  the MP density over sigma (``fit_density_with_range``: ``scipy.optimize.brute`` on
  [0.05, 2) x the sigma that puts the bulk edge at λmax, step 0.01 x, Nelder-Mead polish; the
  quarter-circle law on √λ when Q = N/M = 1); bulk_max = (sigma (1 + 1/√Q))², num_spikes =
  #{λ > bulk_max + √(Q^-1/2 bulk_max^2/3 M^-2/3)} (the Tracy-Widom margin) and
  mp_softrank = bulk_max / λmax. -1 for both when the fit fails (a zero matrix).

The fit is vectorised over the xmin candidates: suffix sums give the MLE alpha of every
candidate at once, and the KS distances of a block of candidates are one broadcast
(candidates × eigenvalues) computation. ``ww_metrics`` is the float64 NumPy host version (it
matches WW to round-off); ``ww_fit_jax`` / ``ww_metrics_stack`` are the same algorithm in
``jax.numpy`` on padded, masked spectra, jittable and vmappable over a stack of matrices
(they compute in the input dtype: float64 only under ``jax.enable_x64``).
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

# Constants of weightwatcher 0.7.x (constants.py / WW_powerlaw.py).
WW_EVALS_THRESH = 1e-5  # eigenvalues at or below are not fitted
WW_SMALL_N_CUTOFF = 20  # fewer fitted eigenvalues -> small-N fit
WW_SMALL_N_KMIN = 8  # small-N fit ignores tails shorter than this
WW_SMALL_N_KS_WEIGHT = 0.868  # small-N objective D - 0.868/sqrt(n)
WW_SMALL_N_S_EPS = 1e-12
WW_OVER_TRAINED_THRESH = 2.0
WW_UNDER_TRAINED_THRESH = 6.0

_KS_BLOCK_ELEMS = 1 << 22  # candidates x eigenvalues per KS block (host path): ~32 MB in float64

FIT_KEYS = ("alpha", "xmin", "D", "sigma", "num_pl_spikes")
NORM_KEYS = ("norm", "log_norm", "spectral_norm", "log_spectral_norm", "alpha_weighted",
             "log_alpha_norm", "stable_rank")


# --------------------------------------------------------------------------------------
# Shared algorithm, written against an array module `xp` (numpy or jax.numpy).
# x_L is sorted ascending with the n fitted eigenvalues first and padding (+inf) after.
# --------------------------------------------------------------------------------------

def _candidate_alphas(xp, x_L, n):
    """MLE alpha (standard and small-N bias-corrected) of every xmin candidate at once."""
    L = x_L.shape[0]
    i_L = xp.arange(L)
    valid_L = i_L < n
    logx_L = xp.where(valid_L, xp.log(xp.where(valid_L, x_L, 1.0)), 0.0)
    # suffix sums Σ_{j>=i} ln x_j: one reversed cumsum instead of a sum per candidate
    suffix_L = xp.cumsum(logx_L[::-1])[::-1]
    tail_L = (n - i_L).astype(x_L.dtype)  # n_i, tail size of candidate i
    s_L = suffix_L - tail_L * logx_L  # Σ ln(x_j / x_i)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha_mle_L = 1.0 + tail_L / s_L
        alpha_bc_L = 1.0 + (tail_L - 1.0) / s_L
    cand_L = i_L < n - 1  # WW: xmins = data[:-1]
    return i_L, tail_L, s_L, alpha_mle_L, alpha_bc_L, cand_L


def _ks_block(xp, x_L, n, rows_B, alpha_B):
    """KS distance of the power law (xmin = x[row], alpha) for a block of candidate rows."""
    L = x_L.shape[0]
    j_L = xp.arange(L)
    xmin_B = x_L[rows_B]
    tail_B = (n - rows_B).astype(x_L.dtype)
    in_tail_BxL = (j_L[None, :] >= rows_B[:, None]) & (j_L[None, :] < n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio_BxL = xp.where(in_tail_BxL, x_L[None, :] / xmin_B[:, None], 1.0)
        theory_BxL = 1.0 - ratio_BxL ** (1.0 - alpha_B[:, None])  # WW: (data/xmin)**(-alpha+1)
        empirical_BxL = (j_L[None, :] - rows_B[:, None]).astype(x_L.dtype) / tail_B[:, None]
        dev_BxL = xp.where(in_tail_BxL, xp.abs(theory_BxL - empirical_BxL), 0.0)
    return xp.max(dev_BxL, axis=1)


def _select(xp, x_L, n, ks_L, i_L, tail_L, s_L, alpha_mle_L, alpha_bc_L, cand_L):
    """Pick xmin exactly as WWFit does (standard or small-N), given the per-row KS distances."""
    dt = x_L.dtype
    inf = xp.asarray(np.inf, dt)
    # standard fit: D = 1 where alpha <= 1 (or NaN); non-candidates never win
    d_std_L = xp.where(cand_L, xp.where(alpha_mle_L > 1.0, ks_L, 1.0), inf)
    j_std = xp.argmin(d_std_L)
    # small-N fit. WWFit.fit_powerlaw_smallN picks by D - 0.868/sqrt(n), but WWFit.__init__
    # then re-selects argmin(Ds) over its arrays, so the effective choice is argmin D among
    # the qualifying candidates (others keep D = 1, alpha = 0).
    ok_L = cand_L & (tail_L >= WW_SMALL_N_KMIN) & (s_L > WW_SMALL_N_S_EPS)
    alphas_small_L = xp.where(ok_L, alpha_bc_L, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigmas_small_L = (alphas_small_L - 1.0) / xp.sqrt(tail_L)  # computed before the fallback
    ks_ok_L = ok_L & (alpha_bc_L > 1.0)
    d_small_L = xp.where(cand_L, xp.where(ks_ok_L, ks_L, 1.0), inf)
    # fallback when no candidate qualified: row 0 gets the whole-spectrum fit (unless degenerate)
    fallback = ~xp.any(ks_ok_L) & (s_L[0] > WW_SMALL_N_S_EPS)
    first_L = i_L == 0
    d_small_L = xp.where(first_L & fallback, ks_L, d_small_L)
    alphas_small_L = xp.where(first_L & fallback, alpha_bc_L, alphas_small_L)
    j_small = xp.argmin(d_small_L)

    small = n < WW_SMALL_N_CUTOFF
    j = xp.where(small, j_small, j_std)
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_std = (alpha_mle_L[j_std] - 1.0) / xp.sqrt(tail_L[j_std])
    alpha = xp.where(small, alphas_small_L[j_small], alpha_mle_L[j_std])
    d = xp.where(small, d_small_L[j_small], d_std_L[j_std])
    sigma = xp.where(small, sigmas_small_L[j_small], sigma_std)
    xmin = x_L[j]
    return alpha, xmin, d, sigma


def _row_alpha_for_ks(xp, n, alpha_mle_L, alpha_bc_L):
    # The KS row of candidate i uses the alpha of the path that applies (one KS matrix for both).
    return xp.where(n < WW_SMALL_N_CUTOFF, alpha_bc_L, alpha_mle_L)


# --------------------------------------------------------------------------------------
# Host (NumPy, float64) version: matches WeightWatcher to round-off.
# --------------------------------------------------------------------------------------

def _fit_numpy(evals: np.ndarray, thresh: float) -> dict[str, float]:
    x = np.sort(evals[evals > thresh])
    n = int(x.shape[0])
    failed = {"alpha": -1.0, "xmin": -1.0, "D": -1.0, "sigma": -1.0, "num_pl_spikes": -1.0}
    if n < 2:  # WW: no xmin candidate -> argmin of an empty array -> status failed
        return failed
    i_L, tail_L, s_L, alpha_mle_L, alpha_bc_L, cand_L = _candidate_alphas(np, x, n)
    alpha_row_L = _row_alpha_for_ks(np, n, alpha_mle_L, alpha_bc_L)
    block = max(1, _KS_BLOCK_ELEMS // max(n, 1))
    ks_L = np.concatenate([
        _ks_block(np, x, n, i_L[b:b + block], alpha_row_L[b:b + block]) for b in range(0, n, block)
    ])
    alpha, xmin, d, sigma = (float(v) for v in _select(np, x, n, ks_L, i_L, tail_L, s_L,
                                                      alpha_mle_L, alpha_bc_L, cand_L))
    if np.isnan(alpha):
        return failed
    return {"alpha": alpha, "xmin": xmin, "D": d, "sigma": sigma,
            "num_pl_spikes": float(np.sum(evals >= xmin))}


def _norms(evals: np.ndarray, alpha: float) -> dict[str, float]:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        norm = float(np.sum(evals))
        spectral = float(np.max(evals)) if evals.size else 0.0
        log_spectral = float(np.log10(spectral))
        return {
            "norm": norm,
            "log_norm": float(np.log10(norm)),
            "spectral_norm": spectral,
            "log_spectral_norm": log_spectral,
            "alpha_weighted": alpha * log_spectral,
            "log_alpha_norm": float(np.log10(np.sum(evals ** alpha))),
            # docs/metrics.md: 0 for a zero matrix (WW would give NaN)
            "stable_rank": norm / spectral if spectral > 0 else 0.0,
        }


def ww_metrics(eigenvalues: Any, *, thresh: float = WW_EVALS_THRESH) -> dict[str, float]:
    """WeightWatcher metrics of one dense layer from its ESD.

    ``eigenvalues``: the eigenvalues of WᵀW, i.e. the **squared** singular values of W
    (min(m, n) of them, any order, no 1/N normalisation), as WW computes them. Use
    ``ww_metrics_from_sv`` when you have singular values. Computed in float64.

    Returns floats: alpha, xmin, D (KS distance at xmin), sigma, num_pl_spikes, norm,
    log_norm, spectral_norm (= λmax = σ1²), log_spectral_norm, alpha_weighted,
    log_alpha_norm, stable_rank.
    """
    evals = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    evals = np.where(evals < 0, 0.0, evals)  # round-off negatives from eigh-style paths
    out = _fit_numpy(evals, thresh)
    out.update(_norms(evals, out["alpha"]))
    return out


def ww_metrics_from_sv(singular_values: Any, *, thresh: float = WW_EVALS_THRESH) -> dict[str, float]:
    """``ww_metrics`` of a layer given its singular values σ (squared in float64 here)."""
    sv = np.asarray(singular_values, dtype=np.float64).reshape(-1)
    return ww_metrics(sv * sv, thresh=thresh)


WW_MP_BW = 0.1  # RMT_Util.fit_density_with_range: KDE bandwidth
WW_MP_GRID = 1000  # RMT_Util.resid_mp: KDE points
WW_MP_DENSITY_THRESH = 0.01  # resid_mp: points of lower density are left out of the residual
MP_KEYS = ("num_spikes", "mp_softrank", "sigma_mp", "bulk_max")


def _linear_kde(data: np.ndarray, x: np.ndarray, bw: float) -> np.ndarray:
    """sklearn's KernelDensity(kernel="linear", bandwidth=bw) density at x: mean of
    max(0, 1 - |x - d| / bw) / bw (blocks of x: bounded memory)."""
    out = np.empty(x.shape[0], np.float64)
    step = max(1, (1 << 22) // max(1, data.shape[0]))
    for i in range(0, x.shape[0], step):
        u = np.abs(x[i:i + step, None] - data[None, :]) / bw
        out[i:i + step] = np.sum(np.maximum(1.0 - u, 0.0), axis=1) / (bw * data.shape[0])
    return out


def mp_fit(eigenvalues: Any, N: int, M: int) -> dict[str, float]:
    """WeightWatcher 0.7.x's Marchenko-Pastur fit of one dense layer's ESD (see the module docstring).

    Args:
        eigenvalues: all M eigenvalues of WᵀW (squared singular values, no normalisation).
        N, M: max(m, n) and min(m, n) of the layer.

    Returns:
        {num_spikes, mp_softrank, sigma_mp, bulk_max} (bulk_max in the rescaled units), -1 each
        when the fit fails.
    """
    from scipy import optimize

    failed = {k: -1.0 for k in MP_KEYS}
    evals = np.maximum(np.asarray(eigenvalues, np.float64).reshape(-1), 0.0)
    if evals.size == 0 or not np.sum(evals) > 0:
        return failed
    Q = N / M
    wscale = np.sqrt(evals.shape[0]) / np.sqrt(np.sum(evals))
    to_plot = (wscale * wscale) * evals
    lambda_max = np.max(to_plot)
    scale = np.sqrt(np.max(to_plot) / np.square(1 + 1.0 / np.sqrt(Q)))  # RMT_Util.calc_sigma
    to_fit = np.sqrt(to_plot) if Q == 1 else to_plot
    xde = np.linspace(0, np.max(to_fit) + 0.5, WW_MP_GRID)
    yde = _linear_kde(to_fit, xde, WW_MP_BW)
    good = yde > WW_MP_DENSITY_THRESH
    xde, yde = xde[good], yde[good]
    if xde.size == 0:
        return failed
    peak = xde[np.where(yde == max(yde))][0]

    def resid(p):  # RMT_Util.resid_mp(allresid=False): sum of squared residuals
        sigma = p
        with np.errstate(all="ignore"):
            if Q == 1:
                ymp = np.nan_to_num((1 / (np.pi * sigma * sigma)) * np.sqrt(4 - xde ** 2))
            else:
                y = 1 / Q
                b = np.power(sigma * (1 + np.sqrt(1 / Q)), 2)
                a = np.power(sigma * (1 - np.sqrt(1 / Q)), 2)
                if (b < peak) | (b > max(xde)) | (a > peak):
                    return np.sum((np.zeros(len(yde)) + 1000) ** 2)
                ymp = np.nan_to_num((1 / (2 * np.pi * sigma * sigma * xde * y)) * np.sqrt((b - xde) * (xde - a)))
        return np.sum((ymp - yde) ** 2)

    try:
        rng = (slice(0.05 * scale, 2.0 * scale, 0.01 * scale),)
        s1 = float(np.ravel(optimize.brute(resid, rng, full_output=True)[0])[0])
    except (ValueError, RuntimeError, FloatingPointError):  # pragma: no cover - WW reports -1 too
        return failed
    bulk_max = (s1 * (1 + 1 / np.sqrt(Q))) ** 2
    tw = 1 / np.sqrt(Q) * np.power(bulk_max, 2 / 3) * np.power(M, -2 / 3)
    return {"num_spikes": float(np.sum(to_plot > bulk_max + np.sqrt(tw))), "mp_softrank": float(bulk_max / lambda_max),
            "sigma_mp": s1, "bulk_max": float(bulk_max)}


def warning_label(alpha: float) -> str:
    """WW's ``warning`` column: over-trained below 2, under-trained above 6."""
    if alpha < WW_OVER_TRAINED_THRESH:
        return "over-trained"
    if alpha > WW_UNDER_TRAINED_THRESH:
        return "under-trained"
    return ""


# --------------------------------------------------------------------------------------
# JAX version: padded/masked spectra, jittable and vmappable.
# --------------------------------------------------------------------------------------

def ww_fit_jax(eigenvalues_L, valid_L=None, *, thresh: float = WW_EVALS_THRESH,
               ks_batch: int | None = 256):
    """The same metrics as ``ww_metrics`` for one padded spectrum, in ``jax.numpy``.

    ``eigenvalues_L``: squared singular values (any order); ``valid_L`` (bool, optional)
    marks real entries when spectra of different lengths are padded into one stack.
    Pure and jittable; ``jax.vmap`` it over a stack (see ``ww_metrics_stack``). KS rows are
    computed ``ks_batch`` candidates at a time (``lax.map``) so memory is ks_batch × L.
    Returns a dict of 0-d arrays with the keys of ``ww_metrics``.
    """
    import jax
    import jax.numpy as jnp

    ev_L = jnp.asarray(eigenvalues_L)
    if not jnp.issubdtype(ev_L.dtype, jnp.floating):
        ev_L = ev_L.astype(jnp.float32)
    dt = ev_L.dtype
    if valid_L is None:
        valid_L = jnp.ones(ev_L.shape, bool)
    ev_L = jnp.where(valid_L, jnp.maximum(ev_L, 0.0), 0.0)
    fitted_L = valid_L & (ev_L > thresh)
    n = jnp.sum(fitted_L).astype(jnp.int32)
    x_L = jnp.sort(jnp.where(fitted_L, ev_L, jnp.inf))
    i_L, tail_L, s_L, alpha_mle_L, alpha_bc_L, cand_L = _candidate_alphas(jnp, x_L, n)
    alpha_row_L = _row_alpha_for_ks(jnp, n, alpha_mle_L, alpha_bc_L)
    L = x_L.shape[0]

    def ks_row(args):
        row, a = args
        return _ks_block(jnp, x_L, n, row[None], a[None])[0]

    batch = None if ks_batch is None else min(int(ks_batch), L)
    ks_L = jax.lax.map(ks_row, (i_L, alpha_row_L), batch_size=batch)
    alpha, xmin, d, sigma = _select(jnp, x_L, n, ks_L, i_L, tail_L, s_L, alpha_mle_L,
                                    alpha_bc_L, cand_L)
    failed = (n < 2) | jnp.isnan(alpha)
    neg = jnp.asarray(-1.0, dt)
    alpha = jnp.where(failed, neg, alpha)
    xmin = jnp.where(failed, neg, xmin)
    num_pl = jnp.where(failed, neg, jnp.sum(valid_L & (ev_L >= xmin)).astype(dt))

    norm = jnp.sum(ev_L)
    spectral = jnp.max(ev_L)
    log_spectral = jnp.log10(spectral)
    return {
        "alpha": alpha,
        "xmin": xmin,
        "D": jnp.where(failed, neg, d),
        "sigma": jnp.where(failed, neg, sigma),
        "num_pl_spikes": num_pl,
        "norm": norm,
        "log_norm": jnp.log10(norm),
        "spectral_norm": spectral,
        "log_spectral_norm": log_spectral,
        "alpha_weighted": alpha * log_spectral,
        "log_alpha_norm": jnp.log10(jnp.sum(jnp.where(valid_L, ev_L ** alpha, 0.0))),
        "stable_rank": jnp.where(spectral > 0, norm / jnp.where(spectral > 0, spectral, 1.0), 0.0),
    }


@functools.lru_cache(maxsize=None)
def _stack_fn(thresh: float, ks_batch: int | None):
    import jax

    return jax.jit(jax.vmap(functools.partial(ww_fit_jax, thresh=thresh, ks_batch=ks_batch)))


def ww_metrics_stack(eigenvalues_BxL, valid_BxL=None, *, thresh: float = WW_EVALS_THRESH,
                     ks_batch: int | None = 256):
    """``ww_fit_jax`` jitted and vmapped over a stack of (padded) spectra: dict of [B] arrays."""
    import jax.numpy as jnp

    ev = jnp.asarray(eigenvalues_BxL)
    if valid_BxL is None:
        valid_BxL = jnp.ones(ev.shape, bool)
    return _stack_fn(float(thresh), ks_batch)(ev, jnp.asarray(valid_BxL, bool))
