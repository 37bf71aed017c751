"""A tiny end-to-end regimes study (2 arms x 2 seeds, a few steps) and the study config errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from testkit import FigureRecorder, check_png_figure, png_pixel, read_png

from bshadow_jax.cli import main

TINY = {
    "seeds": [0, 1],
    "base": {"pretrain": {
        "seed": 3,
        "model": {"vocab_size": 0, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64},
        "data": {"arm": "coverage_expanding", "text_share": 0.7, "text_source": "procedural"},
        "train": {"steps": 6, "batch_size": 4, "seq_len": 64, "log_every": 2, "checkpoint_every": 6},
        "optim": {"lr": 3e-3, "warmup_steps": 0},
        "mesh": {"data": 1},
    }},
    "finetune": {
        "data": {"text_source": "procedural"},
        "train": {"steps": 4, "batch_size": 4, "seq_len": 64, "log_every": 1, "checkpoint_every": 4},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "mesh": {"data": 1},
    },
    "arms": [
        {"name": "benchmark_aligned", "data": {"arm": "benchmark_aligned"}},
        {"name": "coverage_expanding", "data": {"arm": "coverage_expanding"}},
        {"name": "optimizer_control", "data": {"arm": "coverage_expanding"}, "optim": {"name": "lion", "lr": 3e-4}},
    ],
    "only_arms": ["benchmark_aligned", "coverage_expanding"],
    "evals": {"batch_size": 16, "seq_len": 64,
              "options": {"n_narrow_per_skill": 3, "n_other_per_skill": 1, "n_bench_other_per_skill": 2,
                          "n_compositional": 3, "n_text": 2}},
    "diagnose": {"topk": 4, "track_points": 2},
    "regime_score": {"n_boot": 20},
}


def _write(tmp_path, cfg, name="study.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def tiny_study_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regimes")
    cfg = _write(tmp, TINY)
    out = tmp / "out"
    with FigureRecorder() as figures:
        rc = main(["experiment", "regimes", str(cfg), "--out", str(out)])
    assert rc == 0
    return cfg, out, figures


@pytest.fixture(scope="module")
def tiny_study(tiny_study_run):
    return tiny_study_run[:2]


def test_tiny_regimes_results_contract(tiny_study):
    _, out = tiny_study
    res = json.loads((out / "results.json").read_text())
    assert set(res["arms"]) == {"benchmark_aligned", "coverage_expanding"}
    for arm, entry in res["arms"].items():
        assert entry["seeds"] == [0, 1]
        for section in ("narrow", "broad"):
            score = entry[section]["score"]
            assert {"mean", "lo", "hi", "n"} <= set(score) and score["n"] == 2
            assert 0.0 <= score["mean"] <= 1.0
            assert entry[section]["by_category"], section
        fp = entry["footprint"]
        for key in ("entropy", "gini", "matrices_for_90pct", "delta_effective_rank"):
            assert fp[key]["n"] == 2, key
        assert 0.0 <= fp["entropy"]["mean"] <= 1.0
        for seed in (0, 1):
            unit = out / "arms" / arm / f"seed{seed}"
            assert (unit / "run" / "metrics.jsonl").is_file()
            assert (unit / "diagnose" / "metrics.csv").is_file()
            summary = json.loads((unit / "diagnose" / "summary.json").read_text())
            rec = json.loads((unit / "record.json").read_text())
            assert rec["footprint"]["entropy"] == pytest.approx(summary["footprint"]["entropy"])
            # footprint tracked along training (every 2 of 4 steps) and at the end
            assert [p["step"] for p in rec["footprint_curve"]] == [2, 4]
    ids = [c["id"] for c in res["claims"]]
    assert ids == ["C1", "C2", "C3"]
    c3 = res["claims"][2]
    assert c3["verdict"] == "not tested" and not c3["held"]  # optimizer arm not run here
    for c in res["claims"][:2]:
        assert c["verdict"] in ("held", "not held", "inconclusive (right direction, not significant)")
        assert all("diff" in t for t in c["tests"])


def test_tiny_regimes_report_and_figures(tiny_study_run):
    _, out, figures = tiny_study_run
    md = (out / "report.md").read_text()
    for name in ("narrow_broad.png", "footprint_heatmaps.png", "effective_rank.png", "footprint_curves.png",
                 "training_curves.png"):
        check_png_figure(out / name, *figures.figure_for(out / name))
        assert name in md
    assert "## Claims" in md and "benchmark_aligned" in md
    arms = ["benchmark_aligned", "coverage_expanding"]
    # heatmaps: the PNG shows each arm's largest and smallest cell in their (different) colours
    fig, kw = figures.figure_for(out / "footprint_heatmaps.png")
    img = read_png(out / "footprint_heatmaps.png")
    axes = [ax for ax in fig.axes if ax.images]
    assert sorted(ax.get_title() for ax in axes) == arms
    for ax in axes:
        im = ax.images[0]
        grid = np.asarray(im.get_array(), dtype=float)
        assert grid.shape == (1, 7) and np.isfinite(grid).all() and grid.max() > grid.min(), grid
        cells = [np.unravel_index(f(grid), grid.shape) for f in (np.argmax, np.argmin)]
        seen = [img[png_pixel(fig, kw, ax, j, i)] for i, j in cells]
        for (i, j), colour in zip(cells, seen):
            np.testing.assert_allclose(colour, im.to_rgba(grid[i, j])[:3], atol=0.02, err_msg=ax.get_title())
        assert np.abs(seen[0] - seen[1]).sum() > 0.05, seen
    # training curves: one finite loss curve per arm over the 4 fine-tuning steps, and the loss moves
    fig, _ = figures.figure_for(out / "training_curves.png")
    lines = {ln.get_label(): ln.get_xydata() for ln in fig.axes[0].get_lines()}
    for arm in arms:
        xy = lines[arm]
        assert list(xy[:, 0]) == [1, 2, 3, 4] and np.isfinite(xy).all() and np.ptp(xy[:, 1]) > 0, xy


def test_rerun_reuses_finished_units(tiny_study):
    cfg, out = tiny_study
    rec = out / "arms" / "benchmark_aligned" / "seed0" / "record.json"
    before = (rec.stat().st_mtime_ns, rec.read_bytes())
    rc = main(["experiment", "regimes", str(cfg), "--out", str(out)])
    assert rc == 0
    assert (rec.stat().st_mtime_ns, rec.read_bytes()) == before
    assert json.loads((out / "results.json").read_text())["arms"]


def test_changed_settings_on_same_folder_is_refused(tiny_study, capsys):
    cfg, out = tiny_study
    rc = main(["experiment", "regimes", str(cfg), "--out", str(out), "finetune.optim.lr=0.5"])
    assert rc == 2
    assert "different config" in capsys.readouterr().err


@pytest.mark.parametrize("override, needle", [
    ("bogus_key=1", "bogus_key"),
    ("finetune.train.stepz=3", "stepz"),
    ("finetune.data.alpha=7", "alpha"),
    ("base.pretrain.model.hidden_size=-3", "hidden_size"),
    ("only_arms=[nope]", "nope"),
    ("seeds=[]", "seeds"),
    ("evals.options.n_items=3", "n_items"),
])
def test_config_errors_exit_2_before_compute(tmp_path, capsys, override, needle):
    cfg = _write(tmp_path, TINY)
    out = tmp_path / "out"
    rc = main(["experiment", "regimes", str(cfg), "--out", str(out), override])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "Traceback" not in err
    assert not out.exists()


def test_arm_with_unknown_data_key_exits_2(tmp_path, capsys):
    bad = json.loads(json.dumps(TINY))
    bad["arms"][1]["data"]["colour"] = "blue"
    rc = main(["experiment", "regimes", str(_write(tmp_path, bad)), "--out", str(tmp_path / "o")])
    assert rc == 2 and "colour" in capsys.readouterr().err


def test_shipped_study_configs_validate():
    from bshadow_jax.studies.spec import load_study_config

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    for name in ("regimes_cpu.yaml", "repetition_cpu.yaml", "regimes_gpu.yaml"):
        cfg = load_study_config(os.path.join(root, name))
        assert len(cfg.seeds) >= 3
    from bshadow_jax.studies.cross_family import load_cross_family_config

    for name in ("cross_family.yaml", "cross_family_synthetic.yaml"):
        load_cross_family_config(os.path.join(root, name))
    cpu = load_study_config(os.path.join(root, "regimes_cpu.yaml"))
    names = {a.name for a in cpu.arms}
    assert {"general", "benchmark_aligned", "coverage_expanding", "repeated_subset", "normalised_rewrite",
            "optimizer_control"} <= names
    assert sum(1 for a in cpu.arms if a.data.get("arm") == "mixture") >= 2
    # identical settings: only the optimizer arm touches the optimizer
    assert [a.name for a in cpu.arms if a.optim] == ["optimizer_control"]
