"""A regime score: where does a fine-tune's footprint sit between the two references?

Fit on the controlled runs: the benchmark-aligned fine-tunes (score 0) and the
coverage-expanding ones (score 1). A pair's footprint features are projected onto a
diagonal-LDA direction (difference of the class means over the pooled per-feature
variance, features standardised on the references) and rescaled so the aligned centroid
sits at 0 and the coverage centroid at 1. The uncertainty is a bootstrap over reference
runs (resampling seeds within each class, refitting everything). A pair is called
"aligned" when its whole interval is below 0.5, "coverage" when above, and "can't tell"
otherwise: with few seeds the score is often honest about not knowing.

Validation (`validate`): leave-one-seed-out over the reference arms (accuracy and can't-tell
rate on the held-out seed), plus the held-out arms: mixture-sweep points should rise with
the coverage fraction (Spearman correlation), other arms are reported without a label.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

# Scale-free footprint features (each is comparable across model sizes).
DEFAULT_FEATURES = ("entropy", "gini", "matrices_for_90pct", "delta_effective_rank",
                    "delta_spectral_entropy", "delta_stable_rank", "base_overlap")


@dataclasses.dataclass(frozen=True)
class RegimeModel:
    features: tuple[str, ...]
    mu: np.ndarray        # feature standardisation (reference mean)
    sd: np.ndarray        # feature standardisation (reference std, floored)
    w: np.ndarray         # projection direction in standardised space
    a0: float             # projection of the aligned centroid
    a1: float             # projection of the coverage centroid
    boot: tuple["RegimeModel", ...] = ()

    def raw_score(self, x: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(x) - self.mu) / self.sd
        return ((z @ self.w) - self.a0) / (self.a1 - self.a0)

    def score(self, x: Mapping[str, float] | np.ndarray) -> dict:
        vec = feature_vector(x, self.features) if isinstance(x, Mapping) else np.asarray(x, dtype=np.float64)
        s = float(self.raw_score(vec)[0])
        out = {"score": s, "lo": None, "hi": None}
        if self.boot:
            bs = np.array([float(m.raw_score(vec)[0]) for m in self.boot])
            bs = bs[np.isfinite(bs)]
            if bs.size:
                out["lo"], out["hi"] = float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))
        out["call"] = call(out)
        return out


def call(scored: Mapping[str, Any], threshold: float = 0.5) -> str:
    lo, hi = scored.get("lo"), scored.get("hi")
    if lo is None or hi is None:
        s = scored["score"]
        return "aligned" if s < threshold else "coverage"
    if hi < threshold:
        return "aligned"
    if lo > threshold:
        return "coverage"
    return "can't tell"


def feature_vector(fp: Mapping[str, float], features: Sequence[str]) -> np.ndarray:
    return np.array([float(fp.get(f, np.nan)) if fp.get(f) is not None else np.nan for f in features])


def _fit_once(xa: np.ndarray, xc: np.ndarray, features: tuple[str, ...]) -> RegimeModel | None:
    both = np.concatenate([xa, xc])
    mu = both.mean(0)
    sd = both.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    za, zc = (xa - mu) / sd, (xc - mu) / sd
    diff = zc.mean(0) - za.mean(0)
    # Pooled within-class variance, shrunk towards 1 so 2-3 seeds per class cannot blow it up.
    pooled = 0.5 * (za.var(0) + zc.var(0))
    w = diff / (0.5 * pooled + 0.5)
    a0, a1 = float(za.mean(0) @ w), float(zc.mean(0) @ w)
    if not np.isfinite(a1 - a0) or abs(a1 - a0) < 1e-12:
        return None
    return RegimeModel(features, mu, sd, w, a0, a1)


def fit(aligned: Sequence[Mapping[str, float]], coverage: Sequence[Mapping[str, float]],
        features: Sequence[str] = DEFAULT_FEATURES, *, n_boot: int = 200, seed: int = 0) -> RegimeModel:
    """Fit the score on reference footprints (one mapping of features per fine-tune)."""
    feats = tuple(f for f in features
                  if all(np.isfinite(feature_vector(r, (f,))[0]) for r in list(aligned) + list(coverage)))
    if not feats:
        raise ValueError("regime score: no feature is present in every reference footprint")
    xa = np.stack([feature_vector(r, feats) for r in aligned])
    xc = np.stack([feature_vector(r, feats) for r in coverage])
    model = _fit_once(xa, xc, feats)
    if model is None:
        raise ValueError("regime score: the references do not separate on any feature")
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        ba = xa[rng.integers(0, len(xa), len(xa))]
        bc = xc[rng.integers(0, len(xc), len(xc))]
        m = _fit_once(ba, bc, feats)
        if m is not None:
            boots.append(m)
    return dataclasses.replace(model, boot=tuple(boots))


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    from scipy import stats

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def validate(per_arm: Mapping[str, Sequence[Mapping[str, float]]], *, aligned: str, coverage: str,
             mixture_alpha: Mapping[str, float] | None = None, features: Sequence[str] = DEFAULT_FEATURES,
             n_boot: int = 200) -> dict:
    """Leave-one-seed-out validation on the references and scores of every other arm.

    per_arm: arm -> list of per-seed footprint dicts (same seed order across arms).
    mixture_alpha: arm -> coverage fraction for mixture-sweep arms (0 = aligned, 1 = coverage).
    """
    al, co = list(per_arm.get(aligned, [])), list(per_arm.get(coverage, []))
    out: dict[str, Any] = {"method": "diagonal LDA between reference centroids, bootstrap over reference seeds",
                           "references": {"aligned": aligned, "coverage": coverage}}
    if len(al) < 2 or len(co) < 2:
        out["note"] = "needs at least 2 seeds of each reference arm"
        return out
    n = min(len(al), len(co))
    held_out = []
    for i in range(n):
        try:
            m = fit(al[:i] + al[i + 1:], co[:i] + co[i + 1:], features, n_boot=n_boot, seed=i)
        except ValueError as e:
            held_out.append({"seed_index": i, "error": str(e)})
            continue
        for truth, rec in (("aligned", al[i]), ("coverage", co[i])):
            s = m.score(rec)
            held_out.append({"seed_index": i, "truth": truth, **s,
                             "correct": s["call"] == truth, "point_correct": (s["score"] >= 0.5) == (truth == "coverage")})
    scored = [h for h in held_out if "truth" in h]
    decided = [h for h in scored if h["call"] != "can't tell"]
    out["held_out_seeds"] = {
        "items": held_out,
        "n": len(scored),
        "point_accuracy": (sum(h["point_correct"] for h in scored) / len(scored)) if scored else None,
        "cant_tell_rate": (1 - len(decided) / len(scored)) if scored else None,
        "accuracy_when_decided": (sum(h["correct"] for h in decided) / len(decided)) if decided else None,
    }
    # All references -> score every arm and seed.
    try:
        full = fit(al, co, features, n_boot=n_boot)
    except ValueError as e:
        out["note"] = str(e)
        return out
    out["features"] = list(full.features)
    out["weights"] = {f: float(w) for f, w in zip(full.features, full.w)}
    arms_out = {}
    for arm, recs in per_arm.items():
        scores = [full.score(r) for r in recs]
        pts = [s["score"] for s in scores]
        arms_out[arm] = {"per_seed": scores, "mean": float(np.mean(pts)) if pts else None,
                         "in_sample": arm in (aligned, coverage)}
    out["arms"] = arms_out
    if mixture_alpha:
        xs, ys = [], []
        for arm, alpha in mixture_alpha.items():
            for s in arms_out.get(arm, {}).get("per_seed", []):
                xs.append(float(alpha))
                ys.append(s["score"])
        out["mixture_monotonicity"] = {"alpha": xs, "score": ys, "spearman": _spearman(xs, ys)}
    return out


def fit_from_results(arm_footprints: Mapping[str, Sequence[Mapping[str, float]]], aligned: str, coverage: str,
                     features: Sequence[str] = DEFAULT_FEATURES, n_boot: int = 200) -> RegimeModel:
    return fit(arm_footprints[aligned], arm_footprints[coverage], features, n_boot=n_boot)
