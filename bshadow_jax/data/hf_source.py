"""Hugging Face `datasets` as a stream: a hub id, a local dataset folder, or local json/parquet/csv/text files.

`datasets.load_dataset` reads all three (a folder laid out like a hub dataset repository, with
its README's `configs` naming the data files, loads exactly as the hub id would). `streaming`
reads rows as they arrive and `max_rows` keeps the first N, so a web-scale corpus is never
downloaded whole. A field mapping turns rows into the same records the world streams give
({prompt, answer, family, format, item_id}); a plain-text dataset (`text_field`) trains on the
whole field. Rows are read once and cached in memory; the pipeline shuffles and repeats.
"""
from __future__ import annotations

import glob
import itertools
import json
from pathlib import Path

from bshadow_jax.data import decontam
from bshadow_jax.data.config import HFSourceConfig
from bshadow_jax.errors import UserError

LOCAL_BUILDERS = ("json", "parquet", "csv", "text", "arrow")


def _check_local_file(path: str, builder: str) -> None:
    """Reject what would crash or confuse `datasets` (pyarrow even segfaults on a bare `null` line)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise UserError(f"{p}: cannot read data file ({e.strerror or type(e).__name__})") from None
    if not raw.strip():
        raise UserError(f"{p}: empty data file")
    if builder != "json":
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p}: not UTF-8 text") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array of objects
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise UserError(f"{p}: not valid JSON ({e})") from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None) if isinstance(rows, list) else 0
        if bad is not None:
            raise UserError(f"{p}: item {bad} is not a JSON object")
        return
    for i, line in enumerate(text.splitlines(), 1):  # JSON Lines
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == 1 and stripped.startswith("{"):
                return  # a single (multi-line) JSON object: `datasets` reads its columns
            raise UserError(f"{p}: line {i}: not valid JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"{p}: line {i}: not a JSON object")


def load_hf_dataset(cfg: HFSourceConfig):
    import datasets

    if cfg.path in LOCAL_BUILDERS:
        if not cfg.data_files:
            raise UserError(f"data.hf.data_files: required for the local builder {cfg.path!r}")
        for pattern in cfg.data_files:
            files = glob.glob(pattern)
            if not files:
                raise UserError(f"{pattern}: data file not found (data.hf.data_files)")
            for f in files:
                if Path(f).is_file():
                    _check_local_file(f, cfg.path)
    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, data_files=list(cfg.data_files) or None, split=cfg.split,
                                   streaming=cfg.streaming)
        if cfg.max_rows:
            # a streamed split is read only this far; a materialised one is cut (`select` keeps arrow's columns)
            return list(itertools.islice(ds, cfg.max_rows)) if cfg.streaming else ds.select(range(min(cfg.max_rows, len(ds))))
        return list(ds) if cfg.streaming else ds
    except Exception as e:  # datasets raises DatasetGenerationError, StopIteration, arrow errors...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = cfg.data_files[0] if cfg.data_files else cfg.path
        raise UserError(f"{where}: cannot load dataset ({type(e).__name__}: {first[:200]})") from None


def records_from_rows(rows, cfg: HFSourceConfig) -> list[dict]:
    """Rows (mappings) -> pipeline records, mapping fields to prompt and answer."""
    out = []
    for i, row in enumerate(rows):
        if cfg.text_field:
            if cfg.text_field not in row:
                raise UserError(f"{cfg.path}: row {i} has no field {cfg.text_field!r} (data.hf.text_field)")
            prompt, answer = "", str(row[cfg.text_field])
        else:
            for f in (cfg.prompt_field, cfg.answer_field):
                if f not in row:
                    raise UserError(f"{cfg.path}: row {i} has no field {f!r} (fields: {', '.join(row)})")
            prompt = cfg.prompt_template.replace("{prompt}", str(row[cfg.prompt_field]))
            answer = str(row[cfg.answer_field])
            if answer and not answer[0].isspace() and prompt and not prompt[-1].isspace():
                answer = " " + answer  # "Q: ...\nA:" + " answer", as the world formats do
        if not answer.strip():
            continue
        out.append({"prompt": prompt, "answer": answer, "family": "hf", "format": "hf",
                    "item_id": decontam.text_id(prompt + "\x00" + answer)})
    if not out:
        raise UserError(f"{cfg.path}: no usable rows (check data.hf field names)")
    return out


def load_hf_examples(cfg: HFSourceConfig) -> list[dict]:
    return records_from_rows(load_hf_dataset(cfg), cfg)


def load_hf_texts(cfg: HFSourceConfig) -> list[str]:
    """The `text_field` of every row of a plain-text dataset (general text, e.g. FineWeb-Edu), empty rows left out."""
    return [r["answer"].strip() for r in load_hf_examples(cfg)]
