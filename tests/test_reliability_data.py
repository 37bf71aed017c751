"""Hostile tokenizer files and data files: a working result or one UserError, never another exception."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st

tokenizer_mod = importlib.import_module("bshadow_jax.data.tokenizer")
hf_source = importlib.import_module("bshadow_jax.data.hf_source")
from bshadow_jax.data.config import DataConfig  # noqa: E402
from reliability_helpers import no_hang, record, user_error_or_ok
from testkit import fuzz_settings

# The long campaign is these tests under BSHADOW_HYPOTHESIS_PROFILE=long (tests/conftest.py).
FUZZ = fuzz_settings(40, derandomize=True, suppress_health_check=list(HealthCheck),
                     phases=[Phase.explicit, Phase.generate])


_record = record


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory) -> dict[str, bytes]:
    tok = tokenizer_mod.train_bpe(["hello world 123", "the quick brown fox"] * 20, 300)
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(str(d))
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def _load_tok(folder: Path):
    tok = tokenizer_mod.get_tokenizer(DataConfig(tokenizer=str(folder)))
    ids = tok("hello 42")["input_ids"]
    assert all(isinstance(i, int) for i in ids)


@FUZZ
@given(data=st.data())
def test_tokenizer_folder_fuzz(tok_files, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("tokmut")
    for name, raw in tok_files.items():
        (folder / name).write_bytes(raw)
    target = data.draw(st.sampled_from(sorted(tok_files)))
    raw = bytearray(tok_files[target])
    op = data.draw(st.sampled_from(["flip", "truncate", "json", "delete", "empty"]))
    if op == "flip":
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    elif op == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif op == "json":
        value = data.draw(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                                       lambda i: st.lists(i, max_size=3) | st.dictionaries(st.text(max_size=8), i, max_size=3),
                                       max_leaves=8))
        if isinstance(value, dict) and data.draw(st.booleans()):
            base = json.loads(tok_files[target])
            if isinstance(base, dict):
                base.update(value)
                value = base
        raw = bytearray(json.dumps(value).encode())
    elif op == "empty":
        raw = bytearray()
    if op == "delete":
        (folder / target).unlink()
    else:
        (folder / target).write_bytes(bytes(raw))
    user_error_or_ok(_load_tok, folder)


def test_tokenizer_folder_missing_or_file(tmp_path):
    assert user_error_or_ok(_load_tok, tmp_path / "nope") == "user_error"
    (tmp_path / "file").write_text("x")
    assert user_error_or_ok(_load_tok, tmp_path / "file") == "user_error"
    (tmp_path / "empty").mkdir()
    assert user_error_or_ok(_load_tok, tmp_path / "empty") == "user_error"


def test_corrupt_tokenizer_cache(tmp_path, monkeypatch):
    """A damaged cached BPE (e.g. a disk that filled up) gives a UserError or is rebuilt, never a crash."""
    monkeypatch.setenv("BSHADOW_CACHE", str(tmp_path))
    cfg = DataConfig(vocab_size=300, text_source="procedural")
    with no_hang(300):
        tokenizer_mod.get_tokenizer(cfg)
    cached = list(tmp_path.rglob("tokenizer.json"))
    assert cached
    cached[0].write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 7}}')
    assert user_error_or_ok(tokenizer_mod.get_tokenizer, cfg) in ("ok", "user_error")


# ----------------------------------------------------------------------------- data files
#
# Data files go through HF datasets and pyarrow (C++). A hostile file can crash the process
# outright (pyarrow 26 segfaults on a JSON Lines file holding `null`), so every case runs in a
# worker process: a crash is recorded as an outcome instead of taking the test session down.

_WORKER = """
import json, sys
from bshadow_jax.errors import UserError
from bshadow_jax.data.config import HFSourceConfig
from bshadow_jax.data import hf_source
print("ready", flush=True)
for line in sys.stdin:
    case = json.loads(line)
    try:
        recs = hf_source.load_hf_examples(HFSourceConfig(**case))
        assert recs and all(isinstance(r["answer"], str) for r in recs)
        out = {"outcome": "ok"}
    except UserError as e:
        out = {"outcome": "user_error", "msg": str(e)}
    except BaseException as e:
        out = {"outcome": "exception", "type": type(e).__module__ + "." + type(e).__name__, "msg": str(e)[:200]}
    print(json.dumps(out), flush=True)
"""


class IsolatedLoader:
    """A long-lived worker that loads data files; restarted after a crash."""

    def __init__(self, root: Path):
        self.root = root
        self.proc = None
        self.log: list[tuple[str, dict]] = []

    def _start(self):
        import os
        import subprocess
        import sys

        env = dict(os.environ, HF_DATASETS_CACHE=str(self.root / "hf_cache"))
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        assert self.proc.stdout.readline().strip() == "ready"

    def load(self, case: dict, timeout: float = 60) -> dict:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            res = {"outcome": "hang"}
        else:
            line = self.proc.stdout.readline()
            if line:
                res = json.loads(line)
            else:
                self.proc.wait()
                res = {"outcome": "crash", "returncode": self.proc.returncode}
        self.log.append((case["data_files"][0], res))
        _record(res["outcome"] if res["outcome"] in ("ok", "user_error") else f"FAIL {res['outcome']} {res.get('type', res.get('returncode', ''))}",
                case["path"])
        return res

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def loader(tmp_path_factory):
    ld = IsolatedLoader(tmp_path_factory.mktemp("loader"))
    yield ld
    ld.close()


_lines = st.one_of(
    st.text(max_size=40),
    st.builds(json.dumps, st.dictionaries(st.sampled_from(["prompt", "answer", "text", "x", ""]),
                                          st.none() | st.integers() | st.text(max_size=10) | st.lists(st.integers(), max_size=2),
                                          max_size=3)),
    st.sampled_from(['{"prompt": "1+1=", "answer": "2"}', "[1, 2]", "null", '{"prompt": "a"', "\x00\x01", "}{"]),
)


def _data_case(path: Path, builder: str, text_field: str) -> dict:
    return {"path": builder, "data_files": [str(path)], "text_field": text_field}


def _check(res: dict) -> None:
    assert res["outcome"] in ("ok", "user_error"), res


@FUZZ
@given(lines=st.lists(_lines, max_size=6), builder=st.sampled_from(["json", "text"]),
       text_field=st.sampled_from(["", "text"]), binary=st.binary(max_size=64) | st.none())
def test_data_file_fuzz(loader, tmp_path_factory, lines, builder, text_field, binary):
    p = tmp_path_factory.mktemp("data") / ("d.jsonl" if builder == "json" else "d.txt")
    if binary is not None:
        p.write_bytes(binary)
    else:
        p.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    _check(loader.load(_data_case(p, builder, text_field)))


@pytest.mark.parametrize("content,builder", [
    ('{"prompt": "1+1=", "answer": "2"}\n', "json"), ("[1, 2]", "json"), ('{"prompt": 1}', "json"),
    ("", "json"), ("not json at all", "json"), ("null\n", "json"), ("", "text"), ("1\n", "json"), ('"s"\n', "json"),
    ("\xff\xfe\x00", "text"),
])
def test_data_file_cases(loader, tmp_path, content, builder):
    p = tmp_path / "d.jsonl"
    p.write_text(content, encoding="utf-8", errors="surrogateescape")
    _check(loader.load(_data_case(p, builder, "")))


def test_data_file_missing(loader, tmp_path):
    assert loader.load(_data_case(tmp_path / "nope.jsonl", "json", ""))["outcome"] == "user_error"
    assert loader.load(_data_case(tmp_path, "json", ""))["outcome"] in ("user_error",)  # a folder
