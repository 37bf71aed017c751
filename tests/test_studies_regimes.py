"""A tiny end-to-end regimes study (3 arms x 2 bases x 2 seeds, a few steps) and the study config errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml
from testkit import FigureRecorder, check_png_figure, png_pixel, read_png

from bshadow_jax.cli import main
from bshadow_jax.config import from_dict
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.pipeline import distinct_tokens
from bshadow_jax.data.tokenizer import get_tokenizer

TINY = {
    "seeds": [0, 1],
    "base": {"seeds": [3, 4], "pretrain": {
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
        {"name": "token_matched", "data": {"arm": "custom", "sources": {"aligned": 0.75, "text": 0.25}}},
        {"name": "optimizer_control", "data": {"arm": "coverage_expanding"}, "optim": {"name": "lion", "lr": 3e-4}},
        {"name": "general", "data": {"arm": "general_text"}, "n_bases": 1, "n_seeds": 1},
    ],
    "only_arms": ["benchmark_aligned", "coverage_expanding", "token_matched", "general"],
    "evals": {"batch_size": 16, "seq_len": 64,
              "options": {"n_narrow_per_skill": 3, "n_other_per_skill": 1, "n_bench_other_per_skill": 2,
                          "n_compositional": 3, "n_text": 2, "broad_formats": ["qa", "cloze"]}},
    "diagnose": {"topk": 4, "track_points": 2},
    "analysis": {"n_boot": 200, "noise_floor_pairs": 1},
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
    assert set(res["arms"]) == {"benchmark_aligned", "coverage_expanding", "token_matched", "general"}
    assert res["arms"]["general"]["bases"] == [3] and res["arms"]["general"]["seeds"] == [0]
    for arm in ("benchmark_aligned", "coverage_expanding", "token_matched"):
        entry = res["arms"][arm]
        assert entry["seeds"] == [0, 1] and entry["bases"] == [3, 4] and entry["runs"] == 4
        for section in ("narrow", "broad"):
            for key in ("score", "margin"):
                ci = entry[section][key]
                assert {"mean", "lo", "hi", "se", "n_boot", "values"} <= set(ci) and len(ci["values"]) == 4
            score = entry[section]["score"]
            assert 0.0 <= score["lo"] <= score["mean"] <= score["hi"] <= 1.0
            assert entry[section]["by_category"] and entry[section]["chance"] == pytest.approx(0.25)
        assert entry["perplexity"]["value"]["mean"] > 1
        assert set(entry["footprint_variants"]) == {"all", "blocks_only", "per_parameter"}
        assert entry["footprint"] == entry["footprint_variants"]["all"]
        assert 0.0 <= entry["footprint_variants"]["blocks_only"]["entropy"]["mean"] <= 1.0
        assert entry["distinct_tokens"]["mean"] > 10
        for base in (3, 4):
            for seed in (0, 1):
                unit = out / "arms" / arm / f"base{base}" / f"seed{seed}"
                assert (unit / "run" / "metrics.jsonl").is_file()
                summary = json.loads((unit / "diagnose" / "summary.json").read_text())
                rec = json.loads((unit / "record.json").read_text())
                assert rec["footprint"]["entropy"] == pytest.approx(summary["footprint"]["entropy"])
                assert rec["footprint_variants"]["blocks_only"]["entropy"] == pytest.approx(
                    summary["footprint_blocks_only"]["entropy"])
                # footprint tracked along training (every 2 of 4 steps) and at the end
                assert [p["step"] for p in rec["footprint_curve"]] == [2, 4]
    # the count taken while training equals a second pass over the same stream
    rec = json.loads((out / "arms" / "coverage_expanding" / "base3" / "seed1" / "record.json").read_text())
    data_cfg = from_dict(DataConfig, {**TINY["finetune"]["data"], "arm": "coverage_expanding"})
    train = TINY["finetune"]["train"]
    assert rec["distinct_tokens"] == distinct_tokens(data_cfg, get_tokenizer(data_cfg), seq_len=train["seq_len"],
                                                     batch_size=train["batch_size"], seed=1, steps=train["steps"])
    # benchmark-aligned streams feed fewer distinct tokens than coverage (the C2 confound)
    dt = {a: res["arms"][a]["distinct_tokens"]["mean"] for a in ("benchmark_aligned", "coverage_expanding")}
    assert dt["benchmark_aligned"] < dt["coverage_expanding"], dt
    assert [c["id"] for c in res["claims"]] == ["C1", "C2", "C3"]
    c1, c2, c3 = res["claims"]
    assert c3["verdict"] == "not tested" and not c3["held"]  # optimizer arm not run here
    assert {t["metric"] for t in c1["tests"]} == {"acc", "margin", "log_ppl"}
    assert {t["b"] for t in c2["tests"]} == {"benchmark_aligned", "token_matched"}
    for c in (c1, c2):
        assert c["verdict"] in ("held", "not held", "inconclusive")
        for t in c["tests"]:
            assert t["mde"] > 0 and t["bases"] == [3, 4] and t["verdict"] in ("held", "not held", "inconclusive")
    assert len(res["power"]) == len(c1["tests"]) + len(c2["tests"])
    assert res["base"]["bases"] == [3, 4] and "narrow" in res["base"]["above_chance"]
    floor = res["noise_floor"]
    assert set(floor["arms"]) == {"benchmark_aligned", "coverage_expanding", "token_matched"}
    for arm, f in floor["arms"].items():
        assert f["pairs"] == 2 and f["delta_fro_blocks_only"] > 0
        assert (out / "noise_floor" / arm / "base3" / "seed0-seed1.json").is_file()
    assert set(floor["between_arms"]) == {"coverage_expanding - benchmark_aligned", "coverage_expanding - token_matched"}
    assert all(v["over_floor_blocks_only"] > 0 for v in floor["between_arms"].values())


def test_items_csv_and_passages_csv(tiny_study):
    import csv

    _, out = tiny_study
    res = json.loads((out / "results.json").read_text())
    with open(out / "items.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["arm", "base", "seed", "category", "skill", "format", "item_id", "correct",
                             "gold_logprob", "margin"]
    n_items = res["eval_items"]["narrow"] + res["eval_items"]["broad"]
    runs = sum(e["runs"] for e in res["arms"].values()) + 2  # and the two bases
    assert len(rows) == n_items * runs
    # the arm's score is the mean over its runs of the items' correct column
    a = [r for r in rows if r["arm"] == "benchmark_aligned" and r["category"] == "narrow"]
    by_run: dict = {}
    for r in a:
        by_run.setdefault((r["base"], r["seed"]), []).append(int(r["correct"]))
    assert np.mean([np.mean(v) for v in by_run.values()]) == pytest.approx(
        res["arms"]["benchmark_aligned"]["narrow"]["score"]["mean"])
    for r in rows[:50]:
        assert float(r["margin"]) <= 0.0 or r["correct"] == "1"
        assert float(r["gold_logprob"]) <= 0.0
    # broad shares no item with narrow, and leaves out the formats the config leaves out
    narrow_ids = {r["item_id"] for r in rows if r["category"] == "narrow"}
    assert not narrow_ids & {r["item_id"] for r in rows if r["category"] != "narrow"}
    assert {r["format"] for r in rows if r["category"] != "narrow"} <= {"qa", "cloze"}
    with open(out / "passages.csv", newline="") as f:
        prow = list(csv.DictReader(f))
    assert list(prow[0]) == ["arm", "base", "seed", "passage", "tokens", "logprob"]
    assert len(prow) == res["eval_items"]["text_passages"] * runs


def test_tiny_regimes_report_and_figures(tiny_study_run):
    _, out, figures = tiny_study_run
    md = (out / "report.md").read_text()
    for name in ("narrow_broad.png", "footprint_heatmaps.png", "effective_rank.png", "footprint_curves.png",
                 "training_curves.png"):
        check_png_figure(out / name, *figures.figure_for(out / name))
        assert name in md
    assert "## Findings" in md and "## Power" in md and "benchmark_aligned" in md
    arms = ["benchmark_aligned", "coverage_expanding", "general", "token_matched"]
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
    rec = out / "arms" / "benchmark_aligned" / "base3" / "seed0" / "record.json"
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
        # the claim arms run on at least 2 bases x 5 seeds (the GPU study's released base is one base)
        min_bases = 1 if cfg.base.load else 2
        claim_arms = [cfg.claims.aligned, cfg.claims.coverage] + (
            [cfg.claims.token_matched] if name.startswith("regimes") else [cfg.claims.plain, cfg.claims.repeated])
        for a in claim_arms:
            units = cfg.arm_units(cfg.arm(a))
            assert len({b for b, _ in units}) >= min_bases and len({s for _, s in units}) >= 5, (name, a)
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
    # the token-matched control: the aligned items with the coverage arm's share of general text
    tm = cpu.arm(cpu.claims.token_matched)
    assert tm.data == {"arm": "custom", "sources": {"aligned": 1 - 0.25, "text": 0.25}}
    from bshadow_jax.data.config import DataConfig
    assert DataConfig().text_share == 0.25 and "text_share" not in cpu.finetune.get("data", {})


def test_repetition_without_equivalence_margins_exits_2_before_compute(tmp_path, capsys):
    cfg = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "repetition_cpu.yaml")))
    del cfg["claims"]["equivalence_margins"]
    out = tmp_path / "out"
    rc = main(["experiment", "repetition", str(_write(tmp_path, cfg)), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "equivalence_margins" in err
    assert not out.exists()


def test_stream_cache_replays_the_pipelines_batches_while_a_base_still_needs_them():
    from bshadow_jax.data.pipeline import make_train_dataset, replay_dataset
    from bshadow_jax.studies.runner import StreamCache
    from bshadow_jax.training.config import TrainConfig

    tcfg = from_dict(TrainConfig, {"seed": 5, "model": TINY["base"]["pretrain"]["model"],
                                   "data": {"arm": "coverage_expanding", "text_source": "procedural"},
                                   "train": {"steps": 3, "batch_size": 2, "seq_len": 32}})
    tok = get_tokenizer(tcfg.data)
    it = iter(make_train_dataset(tcfg.data, tok, seq_len=32, batch_size=2, seed=5))
    want = [next(it) for _ in range(3)]
    key = StreamCache.key(tcfg)
    cache = StreamCache({key: 2})
    for use in range(2):
        got = list(iter(cache.dataset(tcfg, tok)(2)))
        assert len(got) == 3
        for g, w in zip(got, want):
            assert set(g) == set(w) and all(np.array_equal(g[k], w[k]) for k in w)
        assert (key in cache.kept) == (use == 0)  # kept for the second base, then dropped
    small = StreamCache({key: 2}, max_bytes=0)
    small.dataset(tcfg, tok)
    assert not small.kept  # over the memory cap: the next base makes its own
    # a run resumed from a checkpoint continues the replay where the iterator's state says
    first = iter(replay_dataset(want))
    next(first)
    state = first.get_state()
    again = iter(replay_dataset(want))
    again.set_state(state)
    assert np.array_equal(next(again)["inputs"], want[1]["inputs"])
