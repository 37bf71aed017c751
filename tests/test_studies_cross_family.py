"""Cross-family comparison on generated pairs: component grouping, the table, config errors (typed sections)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from bshadow_jax.cli import main
from bshadow_jax.config import from_dict
from bshadow_jax.data.config import DataConfig
from bshadow_jax.errors import ConfigError
from bshadow_jax.studies import cross_family
from bshadow_jax.training.config import OptimSection, TrainSection


def test_synthetic_pairs_plant_what_they_say(tmp_path):
    spec = cross_family.SyntheticSpec(name="v", kind="llava", layers=1, width=16)
    b, t, rename, _ = cross_family.make_synthetic_pair(spec, tmp_path)
    base, tuned = load_file(str(b / "model.safetensors")), load_file(str(t / "model.safetensors"))
    assert set(base) == set(tuned) and rename == []
    rel = {n: np.linalg.norm(tuned[n] - base[n]) / np.linalg.norm(base[n]) for n in base if base[n].ndim == 2}
    proj = [v for n, v in rel.items() if "multi_modal_projector" in n]
    vision = [v for n, v in rel.items() if "vision_tower" in n]
    assert min(proj) > 10 * max(vision)


def test_cross_family_groups_components(tmp_path):
    cfg = tmp_path / "cf.yaml"
    cfg.write_text(yaml.safe_dump({"synthetic": [{"name": "vlm", "kind": "llava", "layers": 1, "width": 16},
                                                 {"name": "tower", "kind": "llava_vs_lm", "layers": 1, "width": 16}]}))
    out = tmp_path / "out"
    assert main(["experiment", "cross-family", str(cfg), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["name"] for r in rows] == ["vlm", "tower"]
    res = json.loads((out / "comparison.json").read_text())
    vlm, tower = res["records"]
    assert set(vlm["by_component"]) == {"language_model", "vision", "projector"}
    assert vlm["by_component"]["projector"] > 0.5 > vlm["by_component"]["vision"]
    # --rename pairs the VLM's language tower with the base LM; vision/projector exist on one side only
    assert set(tower["by_component"]) == {"language_model"} and tower["matrices"] > 0 and tower["skipped"] > 0
    summary = json.loads((out / "pairs" / "vlm" / "diagnose" / "summary.json").read_text())
    assert summary["footprint"]["entropy"] == pytest.approx(float(rows[0]["entropy"]), rel=1e-5)
    md = (out / "report.md").read_text()
    assert "components.png" in md and (out / "components.png").is_file()


@pytest.mark.parametrize("body, needle", [
    ({"synthetic": [{"name": "x", "kind": "tpu"}]}, "tpu"),
    ({"pairs": [{"name": "a", "base": "b"}]}, "tuned"),
    ({}, "at least one"),
    ({"synthetic": [{"name": "../up", "kind": "moe"}]}, "name"),
])
def test_cross_family_config_errors_exit_2(tmp_path, capsys, body, needle):
    cfg = tmp_path / "cf.yaml"
    cfg.write_text(yaml.safe_dump(body))
    assert main(["experiment", "cross-family", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    cfg = tmp_path / "cf.yaml"
    cfg.write_text(yaml.safe_dump({"pairs": [{"name": "a", "base": str(tmp_path / "nope"), "tuned": str(tmp_path)}]}))
    assert main(["experiment", "cross-family", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err


# ---------------------------------------------------------------- typed config sections

_SYNTH = {"name": "s", "kind": "moe", "layers": 1, "width": 8}


@pytest.mark.parametrize("finetune, needle", [
    ({"train": {"stepz": 3}}, "stepz"),                                   # unknown key in a typed section
    ({"data": {"colour": "blue"}}, "colour"),
    ({"optim": {"lr": "fast"}}, "expected a number"),                     # wrong type
    ({"train": {"steps": [1]}}, "expected an integer"),
    ({"data": "benchmark_aligned"}, "expected a mapping"),
    ({"optim": {"lr": -1.0}}, "optim.lr: must be > 0"),                   # bad value
    ({"data": {"arm": "tpu"}}, "tpu"),
    ({"train": {"batch_size": 3, "grad_accum": 2}}, "grad_accum"),
])
def test_finetune_section_errors_exit_2_before_any_work(tmp_path, capsys, finetune, needle):
    cfg = tmp_path / "cf.yaml"
    # the synthetic pair comes first in a run: a bad fine-tune section must stop the run before it is generated
    cfg.write_text(yaml.safe_dump({"synthetic": [_SYNTH],
                                   "finetunes": [{"name": "f", "base": str(tmp_path / "none"), **finetune}]}))
    out = tmp_path / "o"
    assert main(["experiment", "cross-family", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("body, exc_needle", [
    ({"synthetic": [_SYNTH], "colour": 1}, "unknown key 'colour'"),
    ({"synthetic": [{**_SYNTH, "layers": "two"}]}, "expected an integer"),
    ({"synthetic": [{**_SYNTH, "width": 4}]}, "width"),
    ({"synthetic": [_SYNTH], "topk": 0}, "topk"),
    ({"synthetic": [_SYNTH], "method": "qr"}, "qr"),
    ({"pairs": [{"name": "p", "base": "a", "tuned": "b", "rename": "x=y"}]}, "expected a list"),
    ({"finetunes": [{"name": "f", "base": "b", "seed": "s"}]}, "expected an integer"),
])
def test_config_errors_are_config_errors(body, exc_needle):
    with pytest.raises(ConfigError, match=exc_needle.replace("(", r"\(")):
        from_dict(cross_family.CrossFamilyConfig, body)


def test_override_errors_exit_2(tmp_path, capsys):
    cfg = tmp_path / "cf.yaml"
    cfg.write_text(yaml.safe_dump({"synthetic": [_SYNTH]}))
    assert main(["experiment", "cross-family", str(cfg), "--out", str(tmp_path / "o"), "topk=many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "topk" in err and len(err.strip().splitlines()) == 1


def test_finetune_sections_are_typed_with_the_old_defaults(tmp_path):
    cfg = tmp_path / "cf.yaml"
    cfg.write_text(yaml.safe_dump({"finetunes": [
        {"name": "a", "base": "b"},
        {"name": "c", "base": "b", "data": {"arm": "mixture", "alpha": 0.3}, "train": {"steps": 2},
         "optim": {"lr": "3e-4"}},
    ]}))
    a, c = cross_family.load_cross_family_config(cfg).finetunes
    assert (a.data, a.train, a.optim) == (DataConfig(), TrainSection(steps=4, batch_size=2, seq_len=64),
                                          OptimSection(lr=1e-4, warmup_steps=0))
    # a given section starts from its own defaults (as the mapping handed to TrainConfig did)
    assert c.data == DataConfig(arm="mixture", alpha=0.3) and c.train == TrainSection(steps=2)
    assert c.optim == OptimSection(lr=3e-4)
    assert c.data_summary() == {"arm": "mixture", "alpha": 0.3}


def test_shipped_configs_load_typed():
    root = Path(__file__).resolve().parent.parent / "configs"
    cfg = cross_family.load_cross_family_config(root / "cross_family.yaml")
    assert [f.data.arm for f in cfg.finetunes] == ["benchmark_aligned", "coverage_expanding"]
    assert all(f.train.steps == 6 and f.optim.schedule == "constant" for f in cfg.finetunes)
    assert cfg.method == "gram" and len(cfg.synthetic) == 4
    assert cross_family.load_cross_family_config(root / "cross_family_synthetic.yaml").finetunes == []
