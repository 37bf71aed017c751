"""One base against several fine-tunes: unique labels, comparison.csv against the pairs' own numbers,
and figures that show each pair's data."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from testkit import read_png

from bshadow_jax import diagnostics
from bshadow_jax.diagnostics.compare import COMPARISON_COLS, unique_labels, write_comparison


def test_labels_are_last_components_made_unique():
    assert unique_labels(["runs/sft", "runs/dpo", "/abs/rl/"]) == ["sft", "dpo", "rl"]
    assert unique_labels(["a/final", "b/final"]) == ["a_final", "b_final"]
    assert unique_labels(["x/final", "x/final", "m.gguf"]) == ["x_final", "x_final-2", "m.gguf"]
    assert len(set(unique_labels(["../t", "..", "t"]))) == 3


def _tree(rng, scale_mlp: float, scale_attn: float, base=None):
    shapes = {"model.embed_tokens.weight": (40, 16), "model.layers.0.self_attn.q_proj.weight": (16, 16),
              "model.layers.0.mlp.up_proj.weight": (24, 16), "model.layers.1.mlp.up_proj.weight": (24, 16)}
    if base is None:
        return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    out = {}
    for n, w in base.items():
        scale = scale_mlp if "mlp" in n else scale_attn if "attn" in n else 0.0
        out[n] = (w + scale * rng.standard_normal(w.shape)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    base = _tree(rng, 0, 0)
    tuned = {"mlp_heavy": _tree(rng, 0.3, 0.01, base), "attn_heavy": _tree(rng, 0.01, 0.3, base)}
    return base, {k: diagnostics.diagnose(base, t, topk=4) for k, t in tuned.items()}


def test_comparison_rows_restate_each_pair(tmp_path, pairs, saved_figures):
    _, results = pairs
    labels = list(results)
    crow = write_comparison(tmp_path, "base/", labels, list(results.values()))
    with open(tmp_path / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COMPARISON_COLS) and [r["label"] for r in rows] == labels
    for r, lab in zip(rows, labels):
        res = results[lab]
        assert math.isclose(float(r["entropy"]), res.summary["footprint"]["entropy"], rel_tol=1e-9)
        shares = {}
        for m in res.rows:
            shares[m["module"]] = shares.get(m["module"], 0.0) + m["energy_share"]
        top = max(shares, key=shares.get)
        assert r["top_module"] == top and math.isclose(float(r["top_module_share"]), shares[top], rel_tol=1e-9)
        assert math.isclose(float(r["embed_lm_head_share"]), shares.get("embed", 0.0), abs_tol=1e-12)
        erank = np.mean([m["delta_effective_rank"] for m in res.rows])
        assert math.isclose(float(r["mean_delta_effective_rank"]), erank, rel_tol=1e-9)
    assert crow[0]["top_module"] == "up_proj" and crow[1]["top_module"] == "q_proj"
    md = (tmp_path / "comparison.md").read_text()
    assert "mlp_heavy/report.md" in md and "comparison_footprints.png" in md and "DESIGN" not in md
    # the module figure: each bar stack is that pair's module shares, summing to 1
    fig, _ = saved_figures.figure_for(tmp_path / "comparison_modules.png")
    ax = fig.axes[0]
    heights = np.zeros(len(labels))
    for patch in ax.patches:
        heights[round(patch.get_x() + patch.get_width() / 2)] += patch.get_height()
    np.testing.assert_allclose(heights, 1.0, atol=1e-9)
    fig, _ = saved_figures.figure_for(tmp_path / "comparison_footprints.png")
    bars = [p.get_height() for p in fig.axes[0].patches]
    np.testing.assert_allclose(bars, [results[k].summary["footprint"]["entropy"] for k in labels])
    img = read_png(tmp_path / "comparison_curves.png")
    assert img.std() > 0.01  # not a blank image
