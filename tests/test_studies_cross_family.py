"""Cross-family comparison on generated pairs: component grouping, the table, config errors."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from bshadow_jax.cli import main
from bshadow_jax.studies import cross_family


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
