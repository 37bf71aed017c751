"""`bshadow data audit`: format shares, skill entropy, alignment, eval overlap; API and CLI."""
import json

import pytest

from bshadow_jax.cli import main
from bshadow_jax.config import from_dict
from bshadow_jax.data.audit import audit, data_sections
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.evalsets import build_eval_sets


@pytest.fixture(scope="module")
def sets():
    return build_eval_sets(from_dict(DataConfig, {"text_source": "procedural"}))


def run_audit(sets, **kw):
    return audit(from_dict(DataConfig, {"text_source": "procedural", **kw}), items=600, eval_sets=sets)


def test_aligned_versus_coverage(sets):
    a = run_audit(sets, arm="benchmark_aligned")
    c = run_audit(sets, arm="coverage_expanding")
    assert a["format_shares"] == {DataConfig().benchmark_format: 1.0} and a["benchmark_alignment"] == 1.0
    assert c["benchmark_alignment"] < 0.15 and c["skill_entropy"] > 0.95 > a["skill_entropy"]
    assert abs(c["format_shares"]["text"] - 0.25) < 0.06
    for r in (a, c):
        assert r["overlap"]["exact"] == 0 and r["overlap"]["texts_with_overlap"] == 0 and r["overlap"]["item_ids"] == 0


def test_rewrite_and_repetition_show_up(sets):
    r = run_audit(sets, rewrite=True)
    assert set(r["format_shares"]) == {DataConfig().benchmark_format, "text"}
    rep = run_audit(sets, arm="benchmark_aligned", repeat_k=4, repeat_steps=10)
    assert rep["stages"]["0"]["unique_examples"] <= 0.3
    assert rep["stages"]["10"]["unique_examples"] > 0.7  # natural repeats only (small skills)


def test_study_config_sections():
    raw = {"finetune": {"data": {"text_share": 0.5}}, "base": {"pretrain": {"data": {"arm": "general_text"}}},
           "arms": [{"name": "a", "data": {"arm": "benchmark_aligned"}}, {"name": "b"}]}
    got = data_sections(raw, "x.yaml")
    assert got == {"base": {"arm": "general_text"}, "a": {"text_share": 0.5, "arm": "benchmark_aligned"},
                   "b": {"text_share": 0.5}}


def test_cli_writes_audit_json(tmp_path, capsys):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("data:\n  text_source: procedural\n  arm: mixture\n")
    assert main(["data", "audit", str(cfg), "--items", "300", "--out", str(tmp_path / "out"), "data.alpha=0.5"]) == 0
    res = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert res["data"]["arm"] == "mixture" and 0.3 < res["data"]["benchmark_alignment"] < 0.7
    assert "alignment" in capsys.readouterr().out


def test_cli_bad_config_is_exit_2(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  arm: nonsense\n")
    assert main(["data", "audit", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(["data", "audit", str(tmp_path / "missing.yaml")]) == 2
