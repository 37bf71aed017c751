"""report.md and figures (diagnostics/report.py) on synthetic diagnose/spectrum outputs."""
from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest

from bshadow_jax import reporting
from bshadow_jax.diagnostics import report as rp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _metrics(sv):
    """Independent numpy versions of a few documented metrics (docs/metrics.md), for realistic rows."""
    s1, s2 = sv.sum(), (sv ** 2).sum()
    p = sv / s1
    p = p[p > 0]
    return {
        "fro": math.sqrt(s2),
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "stable_rank": float(s2 / sv[0] ** 2),
        "energy_rank_90": int(np.searchsorted(np.cumsum(sv ** 2) / s2, 0.9) + 1),
    }


def _diagnose_rows(rng, layers=4, vision_layers=0, experts=0):
    rows, spectra = [], {}

    def add(name, component, layer, module, expert, shape, scale):
        k = min(shape)
        sv = np.sort(rng.exponential(scale, k))[::-1]
        base_sv = np.sort(rng.exponential(1.0, k))[::-1]
        m = _metrics(sv)
        rows.append({
            "name": name, "component": component, "layer": layer, "module": module, "expert": expert,
            "rows": shape[0], "cols": shape[1], "base_fro": _metrics(base_sv)["fro"], "delta_fro": m["fro"],
            "rel_delta": m["fro"] / _metrics(base_sv)["fro"], "delta_effective_rank": m["effective_rank"],
            "delta_stable_rank": m["stable_rank"], "delta_energy_rank_90": m["energy_rank_90"],
            "base_overlap": float(rng.random()), "intruder_count": int(rng.integers(0, 10)),
        })
        spectra[name] = sv

    add("model.embed_tokens.weight", "language_model", None, "embed", None, (256, 32), 0.5)
    for i in range(layers):
        for mod in MODULES:
            grp = "mlp" if mod.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            if experts and grp == "mlp":
                for e in range(experts):
                    add(f"model.layers.{i}.mlp.experts.{e}.{mod}.weight", "language_model", i, mod, e,
                        (64, 32), 0.2)
            else:
                # a benchmark-shaped delta: the MLP of layer 1 takes most of the energy
                add(f"model.layers.{i}.{grp}.{mod}.weight", "language_model", i, mod, None, (48, 32),
                    5.0 if (i == 1 and grp == "mlp") else 0.3)
    for i in range(vision_layers):
        add(f"model.vision_tower.layers.{i}.attn.qkv_proj.weight", "vision", i, "qkv_proj", None, (96, 32), 0.1)
    add("model.multi_modal_projector.linear_1.weight", "projector", None, "linear_1", None, (32, 32), 0.2) \
        if vision_layers else None
    add("lm_head.weight", "language_model", None, "lm_head", None, (256, 32), 0.5)
    e = np.array([r["delta_fro"] ** 2 for r in rows])
    for r, s in zip(rows, e / e.sum()):
        r["energy_share"] = float(s)
    return rows, spectra


def _independent_footprint(shares):
    s = np.asarray(shares) / np.sum(shares)
    n = s.size
    entropy = -np.sum(s * np.log(s)) / np.log(n)
    # Gini as mean absolute difference / (2 mean)
    gini = np.abs(s[:, None] - s[None, :]).sum() / (2 * n * n * s.mean())
    srt = np.sort(s)[::-1]
    k = next(i + 1 for i in range(n) if srt[: i + 1].sum() >= 0.9 - 1e-12)
    return entropy, gini, k / n


def _check_pngs(out, names):
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, name


def test_diagnose_report_numbers_and_figures(tmp_path):
    rng = np.random.default_rng(0)
    rows, spectra = _diagnose_rows(rng)
    skipped = [{"name": "model.norm.weight", "reason": "1-D tensor"},
               {"name": "model.layers.0.input_layernorm.weight", "reason": "1-D tensor"},
               {"name": "model.extra.weight", "reason": "missing in base"}]
    res = rp.write_report(tmp_path, rows, {"skipped": skipped}, spectra, kind="diagnose")
    _check_pngs(tmp_path, [rp.FIG_ENERGY, rp.FIG_ERANK, rp.FIG_SPECTRA, rp.FIG_FOOTPRINT])
    assert set(res["figures"]) == {rp.FIG_ENERGY, rp.FIG_ERANK, rp.FIG_SPECTRA, rp.FIG_FOOTPRINT}
    md = (tmp_path / "report.md").read_text()

    entropy, gini, frac = _independent_footprint([r["energy_share"] for r in rows])
    assert f"| footprint entropy | {entropy:.4g} |" in md
    assert f"| footprint gini | {gini:.4g} |" in md
    assert f"| matrices_for_90pct | {frac:.4g} |" in md
    assert f"| matrices analysed | {len(rows)} |" in md
    assert "| tensors skipped | 3 |" in md and "| 1-D tensor | 2 |" in md
    # the top-10 table is sorted by energy share and starts with the planted MLP of layer 1
    top = sorted(rows, key=lambda r: -r["energy_share"])[:10]
    table_names = re.findall(r"^\| `([^`]+)` \|", md, flags=re.M)
    assert table_names == [r["name"] for r in top]
    assert top[0]["layer"] == 1 and top[0]["module"] in ("gate_proj", "up_proj", "down_proj")
    # by-component: one language_model group holding all of the energy
    assert re.search(r"^\| language_model \| %d \| 1 \|" % len(rows), md, flags=re.M)
    for f in res["figures"]:
        assert f"]({f})" in md
    total = math.sqrt(sum(r["delta_fro"] ** 2 for r in rows))
    assert f"{total:.4g}" in md


def test_heatmap_grid_matches_rows():
    rng = np.random.default_rng(1)
    rows, _ = _diagnose_rows(rng, layers=3, experts=4)
    shares = np.array([r["energy_share"] for r in rows])
    labels, mods, grid = reporting.layer_module_grid(rows, shares, reduce="sum")
    assert labels == ["0", "1", "2", "other"]
    assert mods[:1] == ["embed"] and mods[-1] == "lm_head" and mods.index("q_proj") < mods.index("down_proj")
    np.testing.assert_allclose(np.nansum(grid), 1.0, rtol=1e-12)
    # MoE: the four experts of layer 2's up_proj share one cell
    want = sum(r["energy_share"] for r in rows if r["layer"] == 2 and r["module"] == "up_proj")
    np.testing.assert_allclose(grid[2, mods.index("up_proj")], want, rtol=1e-12)
    er = np.array([r["delta_effective_rank"] for r in rows])
    _, _, g2 = reporting.layer_module_grid(rows, er, reduce="mean")
    want = np.mean([r["delta_effective_rank"] for r in rows if r["layer"] == 0 and r["module"] == "gate_proj"])
    np.testing.assert_allclose(g2[0, mods.index("gate_proj")], want, rtol=1e-12)


def test_heatmap_grid_layers_only_drops_matrices_without_a_layer():
    # the studies' per-layer heatmaps: no "other" row, and embed/lm_head leave no column behind
    rng = np.random.default_rng(1)
    rows, _ = _diagnose_rows(rng, layers=3, experts=4)
    shares = [r["energy_share"] for r in rows]
    labels, mods, grid = reporting.layer_module_grid(rows, shares, reduce="sum", layers_only=True)
    full_labels, full_mods, full = reporting.layer_module_grid(rows, shares, reduce="sum")
    assert labels == ["0", "1", "2"] and "embed" not in mods and "lm_head" not in mods
    np.testing.assert_array_equal(grid, full[:3][:, [full_mods.index(m) for m in mods]])


def test_report_footprint_fallback_is_summary_footprint_stats(tmp_path):
    # without a footprint in the summary, report.md computes the same numbers as
    # summary.json's footprint_stats, 90% rule included (the shares' float sum is not exactly 1
    # here, and the head share sits right at 90% of it)
    from bshadow_jax.diagnostics.footprint import footprint_stats

    shares = [0.8999999999991, 0.037133334096449665, 0.025513523838502913, 0.004033371644864331,
              0.0273005345057325, 0.006019235915350629]
    rows = [{"name": f"model.layers.{i}.mlp.up_proj.weight", "component": "language_model", "layer": i,
             "module": "up_proj", "rows": 4, "cols": 4, "energy_share": s} for i, s in enumerate(shares)]
    rp.write_report(tmp_path, rows, {}, {}, kind="diagnose")
    md = (tmp_path / "report.md").read_text()
    fp = footprint_stats(shares)
    assert f"| matrices_for_90pct | {reporting.fmt(fp['matrices_for_90pct'])} |" in md
    assert "| matrices holding 90% of the energy | 1 of 6 |" in md


def test_multimodal_and_summary_passthrough(tmp_path):
    rng = np.random.default_rng(2)
    rows, spectra = _diagnose_rows(rng, layers=2, vision_layers=3)
    labels, _, _ = reporting.layer_module_grid(rows, np.ones(len(rows)), reduce="sum")
    assert "vision:2" in labels and "language_model:1" in labels and "projector:other" in labels
    summary = {"footprint": {"entropy": 0.123456, "gini": 0.654321, "matrices_for_90pct": 0.25},
               "by_component": {"language_model": {"matrices": 16, "energy_share": 0.9},
                                "vision": {"matrices": 3, "energy_share": 0.05}},
               "skipped": {"model.vision_tower.pos": "1-D tensor"}}
    rp.write_report(tmp_path, rows, summary, spectra, kind="diagnose", title="VLM vs LM")
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# VLM vs LM")
    assert "| footprint entropy | 0.1235 |" in md and "| matrices_for_90pct | 0.25 |" in md
    assert "| vision | 3 | 0.05 |" in md
    assert "`model.vision_tower.pos` (1-D tensor)" in md
    _check_pngs(tmp_path, [rp.FIG_ENERGY, rp.FIG_FOOTPRINT])


def test_degenerate_inputs(tmp_path):
    # nothing analysed
    res = rp.write_report(tmp_path / "empty", [], {}, {}, kind="diagnose")
    md = (tmp_path / "empty" / "report.md").read_text()
    assert "No matrix was analysed." in md and res["figures"] == []
    # one matrix, no layer id, zero delta, no spectra
    row = {"name": "w", "component": "language_model", "layer": None, "module": "w", "rows": 4, "cols": 4,
           "base_fro": 1.0, "delta_fro": 0.0, "rel_delta": 0.0, "energy_share": 0.0, "delta_effective_rank": 0.0}
    rp.write_report(tmp_path / "one", [row], None, {"w": np.zeros(4)}, kind="diagnose")
    assert "| matrices analysed | 1 |" in (tmp_path / "one" / "report.md").read_text()
    # one layer, values as read back from metrics.csv (strings, empty cells)
    rng = np.random.default_rng(3)
    rows, spectra = _diagnose_rows(rng, layers=1)
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(path) as f:
        str_rows = list(csv.DictReader(f))
    assert str_rows[0]["layer"] == ""
    res = rp.write_report(tmp_path / "csv", str_rows, {}, spectra, kind="diagnose")
    _check_pngs(tmp_path / "csv", res["figures"])
    assert rp.FIG_ENERGY in res["figures"]
    with pytest.raises(ValueError):
        rp.write_report(tmp_path / "bad", [], {}, {}, kind="other")


def test_spectrum_report_alpha_histogram(tmp_path):
    rng = np.random.default_rng(4)
    rows, spectra = [], {}
    for i in range(3):
        for mod in MODULES:
            sv = np.sort(rng.pareto(2.0, 32) + 0.1)[::-1]
            m = _metrics(sv)
            name = f"model.layers.{i}.x.{mod}.weight"
            rows.append({"name": name, "component": "language_model", "layer": i, "module": mod, "expert": None,
                         "rows": 64, "cols": 32, **m, "spectral_norm": sv[0],
                         "alpha": float(rng.uniform(1.5, 8.0)), "alpha_weighted": 1.0, "log_spectral_norm": 0.5})
            spectra[name] = sv
    rows[0]["alpha"] = -1.0  # a failed fit is left out of the histogram
    res = rp.write_report(tmp_path, rows, {}, spectra, kind="spectrum")
    assert rp.FIG_ALPHA in res["figures"] and rp.FIG_ERANK in res["figures"]
    _check_pngs(tmp_path, res["figures"])
    md = (tmp_path / "report.md").read_text()
    ok = np.array([r["alpha"] for r in rows[1:]])
    assert f"| median alpha | {np.median(ok):.4g} |" in md
    assert f"| alpha < 2 (WW: over-trained) | {int((ok < 2).sum())} |" in md
    # a footprint describes an update: the weights' own ‖W‖F² shares get no "footprint entropy" line
    assert "footprint entropy" not in md and "matrices_for_90pct" not in md
