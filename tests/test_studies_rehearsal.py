"""`bshadow experiment regimes configs/regimes_gpu.yaml --rehearse`: the shipped accelerator config as written,
at toy size on the CPU, offline. Every hub resource it names (base model, tokenizer, datasets, the data of its
lm-eval tasks) is replaced by a local stand-in in the same format, and the report names each one; the lm-eval
benchmarks are scored item by item through the JAX adapter; the data budget is in results.json."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from bshadow_jax.cli import main
from bshadow_jax.formats.hub import looks_like_hub_id

GPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "regimes_gpu.yaml"


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("rehearsal") / "study"
    rc = main(["experiment", "regimes", str(GPU_CONFIG), "--rehearse", "--out", str(out)])
    return rc, out, json.loads((out / "results.json").read_text()) if rc == 0 else None


def _strings(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def test_every_hub_resource_has_a_named_local_stand_in(rehearsal):
    rc, out, res = rehearsal
    assert rc == 0
    written = yaml.safe_load(GPU_CONFIG.read_text())
    data = written["finetune"]["data"]
    le = written["evals"]["lm_eval"]
    tasks = le["narrow"] + le["broad"]
    want = {written["base"]["load"], data["tokenizer"], data["hf"]["path"], data["text_hf"]["path"],
            "allenai/ai2_arc", "baber/piqa", "allenai/sciq"} | {f"lm-eval task {t}" for t in tasks}
    named = {s["resource"] for s in res["rehearsal"]["stand_ins"]}
    assert want <= named, want - named
    for s in res["rehearsal"]["stand_ins"]:
        assert Path(s["stand_in"]).exists() and s["format"]
    rehearsed = yaml.safe_load(Path(res["rehearsal"]["rehearsed_config"]).read_text())
    assert not [v for v in _strings(rehearsed) if looks_like_hub_id(v)]  # nothing left to fetch
    for t in tasks:  # lm-eval's own task configs, pointed at the stand-in data
        task = yaml.safe_load((out / "rehearsal" / "tasks" / f"{t}.yaml").read_text())
        assert task["task"] == t and Path(task["dataset_path"]).is_dir()
    report = (out / "report.md").read_text()
    assert "## Rehearsal: stand-ins, not results" in report
    for name in want:
        assert name in report
    assert res["rehearsal"]["scaled"]["finetune.train.steps"] == [written["finetune"]["train"]["steps"], 4]


def test_lm_eval_benchmarks_are_scored_item_by_item(rehearsal):
    rc, out, res = rehearsal
    le = yaml.safe_load(GPU_CONFIG.read_text())["evals"]["lm_eval"]
    rows = list(csv.DictReader((out / "items.csv").open()))
    limit = 8
    runs = sum(e["runs"] for e in res["arms"].values()) + len(res["base"]["bases"])
    assert len(rows) == runs * limit * (len(le["narrow"]) + len(le["broad"]))  # world items are off in this config
    by_task = {}
    for r in rows:
        assert r["format"] == "lm_eval"
        by_task.setdefault(r["skill"], set()).add(r["category"])
    assert by_task == {**{t: {"narrow"} for t in le["narrow"]}, **{t: {t} for t in le["broad"]}}
    gsm = [r for r in rows if r["skill"] == "gsm8k"]
    assert all(r["margin"] == "" and r["gold_logprob"] == "" for r in gsm)  # generated answers: no option margin
    arc = [r for r in rows if r["skill"] == "arc_easy"]
    assert all(float(r["margin"]) == float(r["margin"]) for r in arc)
    assert res["eval_items"]["lm_eval"] == {"narrow": {t: limit for t in le["narrow"]},
                                           "broad": {t: limit for t in le["broad"]}}
    assert res["chance"]["narrow"] == 0.0  # exact match on a generated answer
    c1 = next(c for c in res["claims"] if c["id"] == "C1")
    assert "narrow.margin" in c1["not_measured"]
    assert {t["metric"] for t in c1["tests"]} >= {"acc", "margin", "log_ppl"}


def test_data_budget_per_source_is_in_results_and_report(rehearsal):
    rc, out, res = rehearsal
    for name, entry in res["arms"].items():
        d = entry["data"]
        drawn = sum(s["tokens_drawn"] for s in d["streams"].values())
        assert drawn == pytest.approx(d["total_tokens"], rel=1e-9), name
        for s in d["streams"].values():
            if s["source_tokens"]:
                assert s["epochs"] == pytest.approx(s["tokens_drawn"] / s["source_tokens"])
    assert set(res["arms"]["coverage_expanding"]["data"]["streams"]) == {"hf", "text"}
    assert "### Data drawn per source" in (out / "report.md").read_text()


def test_a_hub_dataset_without_a_stand_in_is_one_error_line(tmp_path, capsys):
    cfg = yaml.safe_load(GPU_CONFIG.read_text())
    cfg["finetune"]["data"]["hf"]["path"] = "someone/unknown-dataset"
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["experiment", "regimes", str(path), "--rehearse", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("error: someone/unknown-dataset: no local stand-in")
    assert not (tmp_path / "out" / "results.json").exists()
