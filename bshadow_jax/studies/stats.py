"""A study's statistics: a hierarchical bootstrap over bases, seeds and items, and tests with power.

A study replicates at three nested levels: a pretraining seed gives a base, every base is
fine-tuned under each arm with several seeds, and every fine-tune is scored on the same eval
items. An arm's score is the mean over its bases of the mean over seeds of the mean over items.
The bootstrap resamples that hierarchy in each replicate:

- bases with replacement (one draw shared by every arm: arms fine-tune the same bases, so a
  comparison is paired on bases);
- seeds with replacement within each drawn base, independently per arm (arms share no fine-tune),
  and the same draw for every metric of an arm (narrow and broad of one run stay together);
- items with replacement, one draw per item set shared by every arm, base and seed (all score the
  same items: a comparison is paired on items).

Run-level values (a footprint number per fine-tune) have no item level. Percentile intervals of
means of bounded values stay inside the metric's range. A test's minimal detectable effect is
`MDE_FACTOR * SE` (80% power, two-sided alpha = 0.05, normal approximation) with SE the bootstrap
standard deviation of its statistic, in the units of its difference.

Verdicts are symmetric: a directional test is "held" when its 95% interval lies on the claimed
side of zero, "not held" when it lies on the other side, "inconclusive" otherwise. An equivalence
("no shift") test is TOST at alpha = 0.05: "held" when the 90% interval lies inside
(-margin, margin), "not held" when it lies entirely beyond one margin, "inconclusive" otherwise.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as sps

N_BOOT = 2000
LEVEL = 0.95
Z_ALPHA = float(sps.norm.ppf(0.975))      # two-sided alpha = 0.05
Z_POWER = float(sps.norm.ppf(0.80))       # 80% power
MDE_FACTOR = Z_ALPHA + Z_POWER            # 2.80
# TOST at alpha 0.05 has 80% power at a true difference of 0 when margin >= (z_0.95 + z_0.90) * SE
TOST_FACTOR = float(sps.norm.ppf(0.95) + sps.norm.ppf(0.90))

# base -> [seeds, items] (item-level values) or [seeds] (run-level values)
Values = Mapping[int, np.ndarray]


def _key_seed(*parts: Any) -> int:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Bootstrap:
    """Replicates of arm means under one hierarchical resampling plan.

    Args:
        bases: the bases (pretraining seeds) the compared arms share; every arm passed to `mean`
            must have values for each of them.
        n_boot: replicates.
        seed: the plan's random seed (a study's analysis seed, fixed in its config).

    Draws are derived from (seed, what is drawn), so the same arm, base or item set gets the same
    draws whichever order the means are asked for in.
    """

    def __init__(self, bases: Sequence[int], *, n_boot: int = N_BOOT, seed: int = 0):
        if not bases:
            raise ValueError("a bootstrap needs at least one base")
        self.bases = sorted(int(b) for b in bases)
        self.n_boot = int(n_boot)
        self.seed = int(seed)
        rng = np.random.default_rng(_key_seed(seed, "bases", *self.bases))
        self._base_idx = rng.integers(0, len(self.bases), size=(self.n_boot, len(self.bases)))
        self._items: dict[tuple[str, int], np.ndarray] = {}
        self._seeds: dict[tuple[str, int, int], np.ndarray] = {}

    def item_weights(self, items: str, n: int) -> np.ndarray:
        """[n_boot, n] multinomial counts (each row sums to n) for item set `items`."""
        key = (items, int(n))
        w = self._items.get(key)
        if w is None:
            rng = np.random.default_rng(_key_seed(self.seed, "items", items, n))
            w = self._items[key] = rng.multinomial(n, np.full(n, 1.0 / n), size=self.n_boot).astype(np.float64)
        return w

    def _seed_idx(self, arm: str, base: int, n: int) -> np.ndarray:
        key = (arm, int(base), int(n))
        idx = self._seeds.get(key)
        if idx is None:
            rng = np.random.default_rng(_key_seed(self.seed, "seeds", arm, base, n))
            idx = self._seeds[key] = rng.integers(0, n, size=(self.n_boot, n))
        return idx

    def mean(self, arm: str, values: Values, *, items: str | None = None, denom: Values | None = None,
             cols: np.ndarray | None = None) -> np.ndarray:
        """Replicates [n_boot] of the arm's mean (over bases, of means over seeds, of item means).

        Args:
            arm: the arm's name (keys its seed draws).
            values: base -> [seeds, items] for item-level values (then `items` names the item set),
                or base -> [seeds] for run-level values (`items` None).
            denom: same shapes as `values`; a run's value is then sum(values) / sum(denom) over its
                (resampled) items, e.g. log-probability over tokens for perplexity.
            cols: only these item columns (a category of the item set), drawn as part of the set.
        """
        per_base = []
        for b in self.bases:
            if b not in values:
                raise KeyError(f"{arm}: no values for base {b}")
            v = np.asarray(values[b], np.float64)
            if items is None:
                run = np.broadcast_to(v[None, :], (self.n_boot, v.shape[0]))
            else:
                w = self.item_weights(items, v.shape[1])
                if cols is not None:
                    w, v = w[:, cols], v[:, cols]
                num = w @ v.T
                if denom is not None:
                    d = np.asarray(denom[b], np.float64)
                    den = w @ (d[:, cols] if cols is not None else d).T
                else:
                    den = np.broadcast_to(w.sum(axis=1, keepdims=True), num.shape)
                with np.errstate(invalid="ignore", divide="ignore"):
                    run = num / den
            idx = self._seed_idx(arm, b, run.shape[1])
            per_base.append(np.take_along_axis(run, idx, axis=1).mean(axis=1))
        by_base = np.stack(per_base, axis=1)
        return np.take_along_axis(by_base, self._base_idx, axis=1).mean(axis=1)


def point(values: Values, *, denom: Values | None = None, cols: np.ndarray | None = None) -> float:
    """The arm's estimate: mean over bases of the mean over seeds of the run values."""
    per_base = []
    for b in sorted(values):
        v = np.asarray(values[b], np.float64)
        if cols is not None:
            v = v[:, cols]
        if v.ndim == 1:
            runs = v
        elif denom is not None:
            d = np.asarray(denom[b], np.float64)
            runs = v.sum(axis=1) / (d[:, cols] if cols is not None else d).sum(axis=1)
        else:
            runs = v.mean(axis=1)
        per_base.append(float(np.mean(runs)))
    return float(np.mean(per_base)) if per_base else float("nan")


def run_values(values: Values, *, denom: Values | None = None) -> list[float]:
    """Every run's own value (bases in order, then seeds): the per-fine-tune numbers behind an estimate."""
    out: list[float] = []
    for b in sorted(values):
        v = np.asarray(values[b], np.float64)
        if v.ndim == 1:
            out += [float(x) for x in v]
        elif denom is not None:
            out += [float(x) for x in v.sum(axis=1) / np.asarray(denom[b], np.float64).sum(axis=1)]
        else:
            out += [float(x) for x in v.mean(axis=1)]
    return out


def interval(est: float, reps: np.ndarray, level: float = LEVEL) -> dict:
    """{"mean" (the estimate), "lo", "hi" (percentile interval), "se", "n_boot"}; None where undefined."""
    r = np.asarray(reps, np.float64)
    r = r[np.isfinite(r)]
    out: dict[str, Any] = {"mean": _num(est), "lo": None, "hi": None, "se": None, "n_boot": int(r.size)}
    if r.size >= 2 and np.isfinite(est):
        a = 100 * (1 - level) / 2
        lo, hi = np.percentile(r, [a, 100 - a])
        out.update(lo=float(lo), hi=float(hi), se=float(r.std(ddof=1)))
    return out


def _num(x: float) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def directional(label: str, metric: str, est: float, reps: np.ndarray, *, expect: str = ">",
                **extra: Any) -> dict:
    """Test `diff expect 0` (expect '>' or '<') for the difference `est` with bootstrap replicates `reps`.

    Returns a test record: comparison, metric, expect, diff, lo, hi (95%), se, mde, p_value
    (two-sided bootstrap), verdict ("held" / "not held" / "inconclusive"; "not tested" when the
    difference is undefined) and any `extra` fields.
    """
    if expect not in (">", "<"):
        raise ValueError(f"expect must be '>' or '<', got {expect!r}")
    ci = interval(est, reps)
    t: dict[str, Any] = {"comparison": label, "metric": metric, "kind": "directional", "expect": f"diff {expect} 0",
                         "diff": ci["mean"], "lo": ci["lo"], "hi": ci["hi"], "se": ci["se"], "n_boot": ci["n_boot"]}
    t["mde"] = None if ci["se"] is None else MDE_FACTOR * ci["se"]
    if ci["lo"] is None:
        t.update(p_value=None, verdict="not tested")
        return {**t, **extra}
    r = np.asarray(reps, np.float64)
    r = r[np.isfinite(r)]
    t["p_value"] = float(min(1.0, 2 * min(np.mean(r <= 0), np.mean(r >= 0))))
    sign = 1.0 if expect == ">" else -1.0
    lo, hi = sorted((sign * ci["lo"], sign * ci["hi"]))
    t["verdict"] = "held" if lo > 0 else ("not held" if hi < 0 else "inconclusive")
    return {**t, **extra}


def equivalence(label: str, metric: str, est: float, reps: np.ndarray, *, margin: float, **extra: Any) -> dict:
    """TOST of |diff| < margin at alpha = 0.05 (the 90% interval against +-margin).

    Returns a test record like `directional`, with lo/hi the 95% interval, lo90/hi90, margin,
    mde (the two-sided minimal detectable difference) and min_margin (the smallest margin this
    test could have shown equivalence within at 80% power were the true difference 0).
    """
    if not margin > 0:
        raise ValueError(f"{label}: an equivalence margin must be > 0, got {margin}")
    ci, ci90 = interval(est, reps), interval(est, reps, level=0.90)
    t: dict[str, Any] = {"comparison": label, "metric": metric, "kind": "equivalence", "expect": f"|diff| < {margin:g}",
                         "margin": float(margin), "diff": ci["mean"], "lo": ci["lo"], "hi": ci["hi"],
                         "lo90": ci90["lo"], "hi90": ci90["hi"], "se": ci["se"], "n_boot": ci["n_boot"]}
    t["mde"] = None if ci["se"] is None else MDE_FACTOR * ci["se"]
    t["min_margin"] = None if ci["se"] is None else TOST_FACTOR * ci["se"]
    if ci90["lo"] is None:
        t["verdict"] = "not tested"
    elif -margin < ci90["lo"] and ci90["hi"] < margin:
        t["verdict"] = "held"
    elif ci90["lo"] >= margin or ci90["hi"] <= -margin:
        t["verdict"] = "not held"
    else:
        t["verdict"] = "inconclusive"
    return {**t, **extra}


def combine(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its tests': held when all held, not held when any is, else inconclusive."""
    if not verdicts or any(v == "not tested" for v in verdicts):
        return "not tested"
    if all(v == "held" for v in verdicts):
        return "held"
    if any(v == "not held" for v in verdicts):
        return "not held"
    return "inconclusive"
