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


# ----------------------------------------------------------------------------- hub-layout folders, streaming

def test_hub_layout_folder_streams_like_the_hub_id(tmp_path):
    """A stand-in folder (parquet shards + README configs) loads through load_dataset(folder, name, split):
    streamed with max_rows it gives exactly the first rows of the materialised split, templated prompts."""
    from bshadow_jax.data.standins import write_standin

    folder = write_standin("openai/gsm8k", tmp_path)
    full = hf_cfg(path=str(folder), name="main", split="test", prompt_field="question", answer_field="answer",
                  prompt_template="Question: {prompt}\nAnswer:").hf
    head = hf_cfg(path=str(folder), name="main", split="test", prompt_field="question", answer_field="answer",
                  prompt_template="Question: {prompt}\nAnswer:", streaming=True, max_rows=5).hf
    a, b = load_hf_examples(full), load_hf_examples(head)
    assert len(a) == 64 and b == a[:5]
    assert a[0]["prompt"].startswith("Question: ") and a[0]["prompt"].endswith("\nAnswer:")
    assert "####" in a[0]["answer"]
    with pytest.raises(UserError, match="cannot load dataset"):
        load_hf_examples(hf_cfg(path=str(folder), name="nope", split="test", prompt_field="question",
                                answer_field="answer").hf)


def test_general_text_from_a_streamed_dataset(tmp_path):
    from bshadow_jax.data.standins import write_standin
    from bshadow_jax.data.text import text_corpus

    folder = write_standin("HuggingFaceFW/fineweb-edu", tmp_path)
    text_hf = {"path": str(folder), "name": "sample-10BT", "text_field": "text", "streaming": True, "max_rows": 50}
    cfg = from_dict(DataConfig, {"text_hf": text_hf})
    corpus = text_corpus(cfg.text_key)
    assert corpus.name.endswith("fineweb-edu/sample-10BT") and corpus.train and corpus.heldout
    assert not set(corpus.train) & set(corpus.heldout)
    tok = get_tokenizer(from_dict(DataConfig, {"text_source": "procedural"}))
    b = next(iter(P.make_train_dataset(from_dict(DataConfig, {"text_hf": text_hf, "arm": "general_text"}), tok,
                                       seq_len=64, batch_size=2, seed=0)))
    assert b["inputs"].shape == (2, 64)
    with pytest.raises(Exception, match="text_field"):
        from_dict(DataConfig, {"text_hf": {"path": str(folder), "name": "sample-10BT"}})


def test_source_budget_matches_a_count_of_the_source(jsonl):
    """Expected tokens drawn per stream sum to the run's tokens; a finite source's size and epochs agree with
    tokenizing every one of its examples."""
    from bshadow_jax.data.budget import source_budget, unintended_repeats

    cfg = from_dict(DataConfig, {"text_source": "procedural", "arm": "custom", "sources": {"hf": 0.5, "world": 0.5},
                                 "hf": {"path": "json", "data_files": [jsonl], "prompt_field": "question",
                                        "answer_field": "reply"}})
    tok = get_tokenizer(cfg)
    b = source_budget(cfg, tok, steps=20, batch_size=4, seq_len=64, n_sample=len(ROWS))
    assert sum(s["tokens_drawn"] for s in b["streams"].values()) == pytest.approx(20 * 4 * 64)
    eos, _ = P.special_ids(tok)
    count = sum(len(P._Tokenize(tok.backend_tokenizer, eos, False, 0)(r)["inputs"])
                for r in load_hf_examples(cfg.hf))
    hf = b["streams"]["hf"]
    assert hf["source_examples"] == len(ROWS) and hf["source_tokens"] == pytest.approx(count)
    assert hf["epochs"] == pytest.approx(hf["tokens_drawn"] / count) and hf["epochs"] > 1
    assert b["streams"]["world"]["epochs"] is None
    assert unintended_repeats(b) == ["hf"] and unintended_repeats(b, ["hf"]) == []
