"""Hugging Face datasets as a stream: local json / parquet / text files with a field mapping."""
import json

import numpy as np
import pytest

from bshadow_jax.config import from_dict
from bshadow_jax.data import pipeline as P
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.hf_source import load_hf_examples
from bshadow_jax.data.tokenizer import get_tokenizer
from bshadow_jax.errors import UserError

ROWS = [{"question": f"What is the capital of land {i}?", "reply": f"City{i}", "id": i} for i in range(40)]


@pytest.fixture()
def jsonl(tmp_path):
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in ROWS))
    return str(p)


def hf_cfg(**kw):
    return from_dict(DataConfig, {"text_source": "procedural", "arm": "hf", "hf": kw})


def test_local_json_with_field_mapping(jsonl):
    cfg = hf_cfg(path="json", data_files=[jsonl], prompt_field="question", answer_field="reply")
    recs = load_hf_examples(cfg.hf)
    assert [(r["prompt"], r["answer"].strip()) for r in recs] == [(r["question"], r["reply"]) for r in ROWS]
    tok = get_tokenizer(cfg)
    b = next(iter(P.make_train_dataset(cfg, tok, seq_len=64, batch_size=2, seed=0)))
    text = tok.decode(b["inputs"][0])
    assert "What is the capital of land" in text and "City" in text


def test_local_parquet_and_text(tmp_path):
    import datasets

    pq = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(pq))
    recs = load_hf_examples(hf_cfg(path="parquet", data_files=[str(pq)], prompt_field="question",
                                   answer_field="reply").hf)
    assert len(recs) == len(ROWS)
    txt = tmp_path / "lines.txt"
    txt.write_text("first line of text\nsecond line of text\n")
    recs = load_hf_examples(hf_cfg(path="text", data_files=[str(txt)], text_field="text").hf)
    assert [r["answer"] for r in recs] == ["first line of text", "second line of text"]
    assert all(r["prompt"] == "" for r in recs)


def test_hf_mixed_into_another_arm(jsonl):
    cfg = from_dict(DataConfig, {"text_source": "procedural", "arm": "benchmark_aligned",
                                 "hf": {"path": "json", "data_files": [jsonl], "prompt_field": "question",
                                        "answer_field": "reply", "weight": 1.0}})
    plan = P.resolve_plan(cfg)
    assert np.isclose(plan.stages[0][1]["hf"], 0.5)
    it = iter(P.mixed_examples(cfg, plan, seed=0))
    streams = {next(it)["stream"] for _ in range(50)}
    assert streams == {"aligned", "hf"}


def test_bad_fields_and_files_are_user_errors(jsonl, tmp_path):
    with pytest.raises(UserError, match="no field 'prompt'"):
        load_hf_examples(hf_cfg(path="json", data_files=[jsonl]).hf)
    with pytest.raises(UserError, match="not found"):
        load_hf_examples(hf_cfg(path="json", data_files=[str(tmp_path / "missing.jsonl")]).hf)
    with pytest.raises(UserError, match="data_files"):
        load_hf_examples(hf_cfg(path="json").hf)
