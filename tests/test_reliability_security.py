"""No code execution from files: pickle formats refused, no trust_remote_code, no unsafe loaders.

A static scan of bshadow_jax/ (AST, so comments and strings do not count) plus live checks with
files that would run code if anything unpickled them or imported code they name.
"""
from __future__ import annotations

import importlib
import ast
import json
import os
import pickle
from pathlib import Path

import pytest

from bshadow_jax.errors import PICKLE_SUFFIXES, UserError, refuse_pickle

PKG = Path(__file__).resolve().parents[1] / "bshadow_jax"
UNSAFE_LOADERS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "torch", "shelve", "marshal"}


def _sources() -> list[Path]:
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 10
    return files


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal"}:
                    found.append(f"imports {m}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, last = name.rpartition(".")
        if last in {"load", "loads", "Unpickler", "unsafe_load", "full_load"} and head.split(".")[0] in UNSAFE_LOADERS:
            found.append(f"calls {name}")
        if name in {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"}:
            found.append(f"calls {name}")
        if name in {"eval", "exec", "builtins.eval", "builtins.exec"}:
            found.append(f"calls {name}")
        for kw in node.keywords:
            if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{name}(trust_remote_code=...)")
            if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{name}(allow_pickle=...)")
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{name}(shell=...)")
    return found


def test_source_scan_has_no_unsafe_loaders():
    bad = {}
    for f in _sources():
        v = _violations(ast.parse(f.read_text(encoding="utf-8"), filename=str(f)))
        if v:
            bad[str(f.relative_to(PKG.parent))] = v
    assert not bad, bad


def test_scanner_catches_what_it_should():
    """The scan must be able to fail: each of these lines is flagged."""
    for line in ["import pickle", "pickle.load(f)", "torch.load(p, weights_only=True)", "yaml.load(s)",
                 "AutoModel.from_pretrained(p, trust_remote_code=True)", "f(trust_remote_code=flag)",
                 "np.load(p, allow_pickle=True)", "eval('1')", "subprocess.run(c, shell=True)", "from dill import loads"]:
        assert _violations(ast.parse(line)), line
    for line in ["yaml.safe_load(s)", "np.load(p)", "AutoConfig.from_pretrained(p)", "f(trust_remote_code=False)", "json.load(f)"]:
        assert not _violations(ast.parse(line)), line


@pytest.mark.parametrize("suffix", [s for s in PICKLE_SUFFIXES] + [s.upper() for s in PICKLE_SUFFIXES] + [".Pt"])
def test_refuse_pickle_suffixes(suffix):
    with pytest.raises(UserError, match="pickle"):
        refuse_pickle(f"/x/model{suffix}")


class _Boom:
    """Unpickling this creates a marker file: proof that something unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Boom(str(marker))))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "last.ckpt", "model.PT", "weights.pkl",
                                  "model.safetensors", "model.gguf", "weights.npz"])
def test_pickle_files_never_unpickled(tmp_path, name):
    models = importlib.import_module("bshadow_jax.models")
    sources = importlib.import_module("bshadow_jax.formats.sources")
    marker = tmp_path / "PWNED"
    p = tmp_path / name
    _evil(p, marker)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for fn in (models.load_pretrained, sources.open_checkpoint):
        for target in (p, tmp_path):
            try:
                fn(target)
            except UserError:
                pass
    assert not marker.exists()
    if name.lower().endswith(PICKLE_SUFFIXES):
        with pytest.raises(UserError, match="pickle"):
            models.load_pretrained(p)


def test_pickle_shard_in_index_refused(tmp_path):
    models = importlib.import_module("bshadow_jax.models")
    sources = importlib.import_module("bshadow_jax.formats.sources")
    marker = tmp_path / "PWNED"
    _evil(tmp_path / "pytorch_model-00001.bin", marker)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "pytorch_model-00001.bin"}}))
    for fn in (models.load_pretrained, sources.open_checkpoint):
        with pytest.raises(UserError):
            fn(tmp_path)
    assert not marker.exists()


def test_remote_code_in_config_never_runs(tmp_path):
    """config.json / tokenizer_config.json naming local code through auto_map: never imported."""
    models = importlib.import_module("bshadow_jax.models")
    marker = tmp_path / "PWNED"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass Config: pass\nclass Tok: pass\n")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "auto_map": {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Config"},
        "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    }))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    from safetensors.numpy import save_file
    import numpy as np

    save_file({"x": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    try:
        models.load_pretrained(tmp_path)
    except UserError:
        pass
    try:
        from bshadow_jax.data.config import DataConfig
        from bshadow_jax.data.tokenizer import get_tokenizer

        get_tokenizer(DataConfig(tokenizer=str(tmp_path)))
    except (UserError, ImportError):
        pass
    assert not marker.exists()


def _from_pretrained_without_false(tree: ast.AST) -> list[str]:
    """from_pretrained calls that leave trust_remote_code unset: transformers then PROMPTS on stdin when the
    folder names custom code (auto_map), and a "y" runs it."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            ok = any(kw.arg == "trust_remote_code" and isinstance(kw.value, ast.Constant) and kw.value.value is False
                     for kw in node.keywords)
            if not ok:
                out.append(f"line {node.lineno}: {_dotted(node.func)}(...)")
    return out


def test_every_from_pretrained_refuses_remote_code():
    bad = {}
    for f in _sources():
        v = _from_pretrained_without_false(ast.parse(f.read_text(encoding="utf-8")))
        if v:
            bad[str(f.relative_to(PKG.parent))] = v
    assert not bad, bad


def test_from_pretrained_scanner():
    assert _from_pretrained_without_false(ast.parse("AutoTokenizer.from_pretrained(p)"))
    assert _from_pretrained_without_false(ast.parse("AutoConfig.from_pretrained(p, trust_remote_code=None)"))
    assert not _from_pretrained_without_false(ast.parse("AutoTokenizer.from_pretrained(p, trust_remote_code=False)"))


_YES_SCRIPT = """
import sys
from bshadow_jax.errors import UserError
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.tokenizer import get_tokenizer
try:
    get_tokenizer(DataConfig(tokenizer=sys.argv[1]))
except UserError as e:
    print("user_error", e)
"""


def test_tokenizer_auto_map_never_runs_even_if_user_says_yes(tmp_path):
    """A tokenizer folder naming its own code: refused outright, without asking, even with "y" on stdin."""
    importlib.import_module("bshadow_jax.data.tokenizer")
    import subprocess
    import sys

    marker = tmp_path / "PWNED"
    (tmp_path / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PreTrainedTokenizerFast\n"
        "class Tok(PreTrainedTokenizerFast):\n    pass\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.Tok", "evil.Tok"]}, "tokenizer_class": "Tok"}))
    r = subprocess.run([sys.executable, "-c", _YES_SCRIPT, str(tmp_path)], input="y\ny\n", capture_output=True,
                       text=True, timeout=120)
    assert not marker.exists(), "code from the tokenizer folder ran"
    assert "Do you wish to run the custom code" not in r.stdout + r.stderr
    assert "user_error" in r.stdout


def test_cli_never_prompts_for_remote_code(tmp_path):
    """Through `bshadow train` with data.tokenizer pointing at a folder that names its own code, "y" typed on
    stdin changes nothing: the CLI gives libraries an empty stdin, so transformers' prompt fails closed."""
    import subprocess
    import sys

    import yaml

    marker = tmp_path / "PWNED"
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PreTrainedTokenizerFast\n"
        "class Tok(PreTrainedTokenizerFast):\n    pass\n")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.Tok", "evil.Tok"]}, "tokenizer_class": "Tok"}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"vocab_size": 0, "hidden_size": 16, "intermediate_size": 32,
                                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2},
                                   "data": {"tokenizer": str(tok)}, "train": {"steps": 1, "seq_len": 16}}))
    r = subprocess.run([sys.executable, "-m", "bshadow_jax", "train", str(cfg), "--out", str(tmp_path / "run")],
                       input="y\ny\n", capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert not marker.exists(), "code from the tokenizer folder ran"
    assert r.returncode == 2, r.stderr[-3000:]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and str(tok) in errs[0], r.stderr[-3000:]  # refused at the tokenizer, not elsewhere
