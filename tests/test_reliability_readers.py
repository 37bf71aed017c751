"""Hostile and broken checkpoint files: every reader either works or raises one UserError.

Readers fuzzed: safetensors headers and data (models.sources + models.load_pretrained, i.e.
`bshadow spectrum/diagnose/export`), model.safetensors.index.json, GGUF bytes, config.json.
The properties:
  * Python API: the result is a success or a UserError - never another exception, never a hang
    (each case runs under an alarm);
  * CLI: exit code 2 with exactly one `error:` line and no traceback;
  * a header that claims more bytes than the file holds fails before any allocation (RSS check);
  * nothing is written outside --out, whatever the tensor names.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bshadow_jax.errors import UserError

# the fixtures (hf_folder, gguf_bytes, tiny_model, the autouse memory_cap) are used by name
from readers_kit import (  # noqa: F401
    FUZZ, FUZZ_SMALL, HANG_SECONDS, PHASES, TINY, _PRINT_OWN_PEAK, gguf_bytes, hf_folder, memory_cap, models,
    no_hang, read_all, sources, st_bytes, st_format, tiny_model, user_error_or_ok,
)
from reliability_helpers import record  # noqa: F401


# ----------------------------------------------------------------------------- safetensors

_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "f32", "", "F4", "Q4_0", 7, None])
_DIM = st.integers(min_value=-3, max_value=8) | st.sampled_from([2**31, 2**32 + 1, 2**62, 2**64, 10**30, -2**63])
_OFF = st.integers(min_value=-5, max_value=300) | st.sampled_from([2**40, 2**63, 2**64 + 5, -(2**63)])
_entry = st.fixed_dictionaries({}, optional={
    "dtype": _DTYPES,
    "shape": st.lists(_DIM, max_size=4) | st.just("1,2") | st.none(),
    "data_offsets": st.lists(_OFF, min_size=0, max_size=3) | st.just({"a": 1}),
})
_tensor_names = st.text(max_size=12) | st.sampled_from(
    ["model.embed_tokens.weight", "../x", "/abs", "a\nb", "__metadata__", "x" * 300])
_headers = st.dictionaries(_tensor_names, _entry | st.integers() | st.text(max_size=5), max_size=4)
_lengths = st.none() | st.sampled_from([0, 1, 7, 2**20, 2**40, 2**63, 2**64 - 1]) | st.integers(-1, 400).map(abs)


@FUZZ
@given(header=_headers, data=st.binary(max_size=256), length=_lengths)
def test_safetensors_header_fuzz(tmp_path_factory, header, data, length):
    p = tmp_path_factory.mktemp("st") / "model.safetensors"
    p.write_bytes(st_bytes(header, data, length))
    user_error_or_ok(read_all, p)


@FUZZ
@given(data=st.data())
def test_safetensors_byte_mutations(hf_folder, tmp_path_factory, data):
    """Flip, truncate or splice bytes of a valid file, then read it through both reader paths."""
    good = (hf_folder / "model.safetensors").read_bytes()
    buf = bytearray(good)
    op = data.draw(st.sampled_from(["flip", "truncate", "splice", "header_len"]))
    if op == "flip":
        hi = len(buf) - 1 if data.draw(st.booleans()) else min(len(buf) - 1, 600)  # whole file or the header
        for _ in range(data.draw(st.integers(1, 8))):
            buf[data.draw(st.integers(0, hi))] = data.draw(st.integers(0, 255))
    elif op == "truncate":
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    elif op == "splice":
        i = data.draw(st.integers(0, len(buf)))
        buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        buf[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    folder = tmp_path_factory.mktemp("mut")
    (folder / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(bytes(buf))
    user_error_or_ok(read_all, folder)
    user_error_or_ok(models.load_pretrained, folder)


def test_huge_tensor_claim_fails_fast_with_low_memory(tmp_path):
    """A header claiming a 1 TB tensor inside a 1 KB file: UserError before any allocation, via the CLI."""
    header = {"model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [2**19, 2**19],
                                                    "data_offsets": [0, 2**40]}}
    p = tmp_path / "huge.safetensors"
    p.write_bytes(st_bytes(header, b"\0" * 1000))
    for fn in (read_all, models.load_pretrained):
        with pytest.raises(UserError):
            with no_hang(10):
                fn(p)
    script = "import sys\nfrom bshadow_jax.cli import main\nrc = main(sys.argv[1:])\n" + _PRINT_OWN_PEAK + "sys.exit(rc)\n"
    for argv in (["spectrum", str(p), "--out", str(tmp_path / "o1")], ["export", str(p), "--out", str(tmp_path / "o2")],
                 ["diagnose", str(p), str(p), "--out", str(tmp_path / "o3")]):
        r = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-3000:]
        assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in r.stderr
        rss_mb = int(r.stdout.split("maxrss_kb")[1]) / 1024
        assert rss_mb < 1500, f"{argv[0]}: {rss_mb:.0f} MB resident for a 1 KB file"
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


# ----------------------------------------------------------------------------- sharded index

_shard_names = st.sampled_from([
    "model-00001-of-00002.safetensors", "missing.safetensors", "../../etc/passwd", "/etc/passwd", "..", ".", "",
    "sub/../../outside.safetensors", "pytorch_model.bin", "x\x00y", "a" * 300, "model.safetensors",
]) | st.text(max_size=10)
_weight_maps = (
    st.dictionaries(st.text(max_size=10), _shard_names | st.integers() | st.none() | st.lists(st.text(max_size=3)), max_size=4)
    | st.lists(st.text(max_size=4)) | st.text(max_size=10) | st.integers() | st.none()
)


@FUZZ
@given(weight_map=_weight_maps, extra=st.booleans(), raw=st.sampled_from([None, "", "{", "[]", "null", '{"weight_map": 1}', "\xff"]))
def test_index_json_fuzz(hf_folder, tmp_path_factory, weight_map, extra, raw):
    root = tmp_path_factory.mktemp("idx")
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    (folder / "model-00001-of-00002.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    (root / "outside.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    text = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map} if extra else {"weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    opened = []
    real_open = st_format.SafetensorsFile.__init__

    def spy(self, path):
        opened.append(Path(path).resolve())
        real_open(self, path)

    st_format.SafetensorsFile.__init__ = spy
    try:
        user_error_or_ok(read_all, folder)
    finally:
        st_format.SafetensorsFile.__init__ = real_open
    user_error_or_ok(models.load_pretrained, folder)
    # never a shard outside the checkpoint folder, never a pickle
    assert all(folder.resolve() in p.parents for p in opened), opened
    assert not any(p.suffix == ".bin" for p in opened)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "../../../../etc/passwd", "pytorch_model.bin"])
def test_index_traversal_refused(hf_folder, tmp_path, shard):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    (tmp_path / "outside.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": shard}}))
    for fn in (read_all, models.load_pretrained):
        with pytest.raises(UserError):
            fn(folder)


# ----------------------------------------------------------------------------- GGUF

@FUZZ
@given(data=st.data())
def test_gguf_byte_mutations(gguf_bytes, tmp_path_factory, data):
    buf = bytearray(gguf_bytes)
    op = data.draw(st.sampled_from(["flip", "flip_header", "truncate", "counts", "splice"]))
    if op in ("flip", "flip_header"):
        hi = len(buf) - 1 if op == "flip" else min(len(buf) - 1, 1200)
        for _ in range(data.draw(st.integers(1, 6))):
            buf[data.draw(st.integers(0, hi))] = data.draw(st.integers(0, 255))
    elif op == "truncate":
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    elif op == "counts":  # version, n_tensors, n_kv
        off = data.draw(st.sampled_from([4, 8, 16]))
        fmt = "<I" if off == 4 else "<Q"
        buf[off:off + struct.calcsize(fmt)] = struct.pack(fmt, data.draw(st.sampled_from(
            [0, 1, 2, 3, 4, 255, 2**31, 2**32 - 1] + ([2**63, 2**64 - 1] if fmt == "<Q" else []))))
    else:
        i = data.draw(st.integers(0, len(buf)))
        buf[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    p = tmp_path_factory.mktemp("gguf_mut") / "m.gguf"
    p.write_bytes(bytes(buf))
    user_error_or_ok(read_all, p)
    user_error_or_ok(models.load_pretrained, p)


_HUGE_GGUF_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
from bshadow_jax.cli import main
rc = main(sys.argv[1:])
""" + _PRINT_OWN_PEAK + "sys.exit(rc)\n"


@pytest.mark.parametrize("field,cmd", [
    ("llama.block_count", "export"),
    ("llama.embedding_length", "export"),
    *[pytest.param(f, c, marks=pytest.mark.slow) for f, c in [
        ("llama.block_count", "spectrum"), ("llama.attention.head_count", "export"), ("llama.attention.head_count", "spectrum"),
        ("llama.embedding_length", "spectrum"), ("llama.context_length", "export"), ("llama.feed_forward_length", "export")]],
])
def test_gguf_header_sized_allocation(gguf_bytes, tmp_path, field, cmd):
    """Metadata claiming 2**40 of something in a tiny file: exit 0 or 2 (never 1), fast and with low memory
    (8 GB address-space cap, so a failure cannot OOM the machine)."""
    import gguf

    reader = gguf.GGUFReader(_write(tmp_path / "src.gguf", gguf_bytes))
    f = reader.fields[field]
    buf = bytearray(gguf_bytes)
    off = int(f.offset) + sum(int(p.nbytes) for p in f.parts[:-1])  # the value is the last part
    assert f.parts[-1].nbytes in (4, 8)
    buf[off:off + int(f.parts[-1].nbytes)] = (2**40 if f.parts[-1].nbytes == 8 else 2**31).to_bytes(int(f.parts[-1].nbytes), "little")
    p = tmp_path / "huge.gguf"
    p.write_bytes(bytes(buf))
    r = subprocess.run([sys.executable, "-c", _HUGE_GGUF_SCRIPT, cmd, str(p), "--out", str(tmp_path / cmd)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode in (0, 2), (field, cmd, r.stderr[-2000:])  # 0: e.g. a 2**40 context length is legal
    assert "maxrss_kb" in r.stdout and int(r.stdout.split("maxrss_kb")[1]) < 1_500_000, r.stdout


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("field,value", [
    ("llama.attention.head_count", 3), ("general.architecture", "gpt2"),
    ("llama.attention.head_count", 0), ("llama.embedding_length", 0), ("llama.block_count", 0),
    ("llama.block_count", 10**6), ("llama.attention.head_count_kv", 0), ("llama.feed_forward_length", -1),
    ("llama.context_length", 0), ("llama.attention.head_count", "eight"), ("llama.embedding_length", 2**62),
])
def test_gguf_bad_metadata(tiny_model, tmp_path, field, value):
    """Metadata a writer controls: config building must refuse with a UserError, not crash."""
    import gguf

    cfg, params = tiny_model
    p = tmp_path / "m.gguf"
    arch = value if field == "general.architecture" else "llama"
    w = gguf.GGUFWriter(str(p), arch)
    kv = {"llama.block_count": 1, "llama.embedding_length": 8, "llama.feed_forward_length": 16,
          "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1, "llama.context_length": 32}
    if field != "general.architecture":
        kv[field] = value
    for k, v in kv.items():
        if isinstance(v, str):
            w.add_string(k.replace("llama.", f"{arch}."), v)
        elif v < 0:
            w.add_int64(k.replace("llama.", f"{arch}."), v)
        else:
            w.add_uint64(k.replace("llama.", f"{arch}."), v)
    flat = models.flatten_params(params)
    w.add_tensor("token_embd.weight", np.asarray(flat["model.embed_tokens.weight"], np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.asarray(flat["model.layers.0.self_attn.q_proj.weight"], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert user_error_or_ok(models.load_pretrained, p) == "user_error"
    user_error_or_ok(read_all, p)


# ----------------------------------------------------------------------------- config.json

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_config_keys = st.sampled_from([
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "max_position_embeddings", "model_type", "hidden_act", "sliding_window",
    "attention_bias", "torch_dtype", "auto_map", "architectures",
])


@FUZZ_SMALL
@given(changes=st.dictionaries(_config_keys, _json_values | st.just("__delete__"), max_size=4))
def test_config_json_fuzz(hf_folder, tmp_path_factory, changes):
    base = json.loads((hf_folder / "config.json").read_text())
    for k, v in changes.items():
        if v == "__delete__":
            base.pop(k, None)
        else:
            base[k] = v
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_text(json.dumps(base))
    os.symlink(hf_folder / "model.safetensors", folder / "model.safetensors")
    user_error_or_ok(models.load_pretrained, folder)
    user_error_or_ok(read_all, folder)


@pytest.mark.parametrize("text", ["", "{", "[]", "null", "\xff\xfe", '{"model_type": "llama"}', "1e999999",
                                  '{"model_type": "llama", "auto_map": {"AutoConfig": "evil.Config"}}'])
def test_config_json_garbage(hf_folder, tmp_path, text):
    (tmp_path / "config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
    os.symlink(hf_folder / "model.safetensors", tmp_path / "model.safetensors")
    assert user_error_or_ok(models.load_pretrained, tmp_path) == "user_error"


