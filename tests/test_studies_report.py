"""results.json and report from synthetic per-seed records (no training): regimes and repetition."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from testkit import check_png_figure, png_pixel, read_png

from bshadow_jax.studies import finalize
from bshadow_jax.studies.spec import load_study_config

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _record(arm, seed, *, narrow, broad, spread, rng):
    # spread in (0, 1]: how evenly the update energy is spread over the matrices
    n = 2 * len(MODULES)
    w = np.exp(-np.arange(n) / (spread * n)) * rng.uniform(0.9, 1.1, n)
    share = w / w.sum()
    ent = float(-(share * np.log(share)).sum() / np.log(n))
    mats = [{"name": f"model.layers.{i // len(MODULES)}.{m}.weight", "component": "language_model",
             "layer": i // len(MODULES), "module": m, "expert": None, "energy_share": float(share[i]),
             "delta_effective_rank": float(5 + 20 * spread + rng.normal())} for i, m in enumerate(MODULES * 2)]
    return {"arm": arm, "seed": seed,
            "narrow": {"score": narrow + rng.normal(0, 0.01), "by_category": {"sorting": narrow}},
            "broad": {"score": broad + rng.normal(0, 0.01), "by_category": {"other_skills": broad}},
            "perplexity": {"value": 30.0},
            "footprint": {"entropy": ent, "gini": 1 - ent, "matrices_for_90pct": spread,
                          "delta_effective_rank": float(np.mean([m["delta_effective_rank"] for m in mats]))},
            "footprint_curve": [{"step": s, "entropy": ent * s / 4} for s in (1, 2, 3, 4)],
            "train_curve": [{"step": s, "loss": 3.0 / s} for s in (1, 2, 3, 4)],
            "matrices": mats}


@pytest.fixture
def regimes_cfg():
    return load_study_config("configs/regimes_cpu.yaml")


def test_results_contract_and_report_from_records(tmp_path, regimes_cfg, saved_figures):
    rng = np.random.default_rng(0)
    spec = {"general": (0.3, 0.3, 0.5), "benchmark_aligned": (0.7, 0.3, 0.2), "coverage_expanding": (0.5, 0.5, 0.8),
            "mixture_a25": (0.65, 0.35, 0.35), "mixture_a75": (0.55, 0.45, 0.65), "repeated_subset": (0.5, 0.45, 0.6),
            "normalised_rewrite": (0.6, 0.4, 0.4), "optimizer_control": (0.5, 0.5, 0.9)}
    records = {a: [_record(a, s, narrow=n, broad=b, spread=sp, rng=rng) for s in regimes_cfg.seeds]
               for a, (n, b, sp) in spec.items()}
    res = finalize.build_results(regimes_cfg, records, study="regimes", base_eval={"narrow": {"score": 0.25},
                                                                                  "broad": {"score": 0.25}})
    finalize.write_outputs(regimes_cfg, tmp_path, res, records, base_eval={"narrow": {"score": 0.25},
                                                                            "broad": {"score": 0.25}},
                           base_curve=[{"step": 1, "loss": 5.0}], title="t")
    out = json.loads((tmp_path / "results.json").read_text())
    assert list(out["arms"]) == list(spec)
    a = out["arms"]["benchmark_aligned"]
    assert a["seeds"] == [0, 1, 2] and a["narrow"]["score"]["n"] == 3
    assert a["narrow"]["by_category"]["sorting"]["mean"] == pytest.approx(0.7)
    assert {"entropy", "gini", "matrices_for_90pct", "delta_effective_rank"} <= set(a["footprint"])
    claims = {c["id"]: c for c in out["claims"]}
    assert claims["C1"]["held"] and claims["C2"]["held"]
    # the optimizer arm here moves the footprint a lot but not the gap: the data effect dominates the gap
    assert claims["C3"]["held"]
    rs = out["regime_score"]
    assert rs["held_out_seeds"]["n"] == 6
    assert rs["mixture_monotonicity"]["spearman"] > 0.5
    md = (tmp_path / "report.md").read_text()
    assert "### C1" in md and "Regime score" in md
    figs = {f: saved_figures.figure_for(tmp_path / f) for f in out["figures"]}
    for f, (fig, kw) in figs.items():
        check_png_figure(tmp_path / f, fig, kw)
    _check_heatmap_pixels(tmp_path / "footprint_heatmaps.png", *figs["footprint_heatmaps.png"], records)
    _check_curves(figs, records)


def _check_heatmap_pixels(path, fig, kw, records):
    """Under each layer x module cell the PNG shows the viridis colour of that cell's energy share (mean over
    seeds, on the common scale), computed here from the records."""
    import matplotlib

    img = read_png(path)
    want = {arm: np.mean([[m["energy_share"] for m in r["matrices"]] for r in recs], axis=0).reshape(2, len(MODULES))
            for arm, recs in records.items()}
    vmax = max(float(g.max()) for g in want.values())
    axes = {ax.get_title(): ax for ax in fig.axes if ax.images}
    assert sorted(axes) == sorted(records)
    for arm, grid in want.items():
        for (i, j), v in np.ndenumerate(grid):
            r, c = png_pixel(fig, kw, axes[arm], j, i)
            colour = matplotlib.colormaps["viridis"](v / vmax)[:3]
            np.testing.assert_allclose(img[r, c], colour, atol=0.02, err_msg=f"{arm} layer {i} {MODULES[j]}")
        (i0, j0), (i1, j1) = (np.unravel_index(f(grid), grid.shape) for f in (np.argmax, np.argmin))
        hi, lo = img[png_pixel(fig, kw, axes[arm], j0, i0)], img[png_pixel(fig, kw, axes[arm], j1, i1)]
        assert np.abs(hi - lo).sum() > 0.2, (arm, hi, lo)  # the largest cell's colour is not the smallest's


def _check_curves(figs, records):
    """The plotted lines and points are the records' numbers: loss and entropy curves, narrow/broad means."""
    fig, _ = figs["training_curves.png"]
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    for arm in records:
        np.testing.assert_allclose(lines[arm].get_xydata(), [[s, 3.0 / s] for s in (1, 2, 3, 4)])
    np.testing.assert_allclose(fig.axes[1].get_lines()[0].get_xydata(), [[1, 5.0]])
    fig, _ = figs["footprint_curves.png"]
    cumulative = {ln.get_label(): ln.get_ydata() for ln in fig.axes[0].get_lines() if ln.get_label() in records}
    entropy = {ln.get_label(): ln.get_xydata() for ln in fig.axes[1].get_lines()}
    for arm, recs in records.items():
        assert np.all(np.diff(cumulative[arm]) >= 0) and cumulative[arm][-1] == pytest.approx(1.0)
        ent = np.mean([r["footprint"]["entropy"] for r in recs])
        np.testing.assert_allclose(entropy[arm], [[s, ent * s / 4] for s in (1, 2, 3, 4)])
    fig, _ = figs["narrow_broad.png"]
    points = [tuple(ln.get_xydata()[0]) for ln in fig.axes[0].get_lines() if len(ln.get_xydata()) == 1]
    for recs in records.values():
        want = (np.mean([r["narrow"]["score"] for r in recs]), np.mean([r["broad"]["score"] for r in recs]))
        assert any(np.allclose(p, want) for p in points), (want, points)


def test_repetition_claims_from_records(tmp_path):
    cfg = load_study_config("configs/repetition_cpu.yaml")
    rng = np.random.default_rng(1)
    spec = {"benchmark_aligned": (0.7, 0.3, 0.2), "plain": (0.5, 0.5, 0.8), "prompt_repetition": (0.55, 0.48, 0.8),
            "dedup": (0.5, 0.5, 0.3), "prompt_repetition_dedup": (0.55, 0.48, 0.3)}
    records = {a: [_record(a, s, narrow=n, broad=b, spread=sp, rng=rng) for s in cfg.seeds]
               for a, (n, b, sp) in spec.items()}
    res = finalize.build_results(cfg, records, study="repetition")
    claims = {c["id"]: c for c in res["claims"]}
    assert claims["R1"]["held"]          # same spread: no regime shift
    assert not claims["R2"]["held"]      # dedup planted a narrower footprint
    assert "score_shifts" in claims["R1"]


def test_regimes_cpu_config_is_the_designed_study():
    raw = yaml.safe_load(open("configs/regimes_cpu.yaml"))
    ft = raw["finetune"]
    assert "seed" not in ft and "model" not in ft
    assert len(raw["seeds"]) >= 3
