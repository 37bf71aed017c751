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

import importlib
import contextlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from bshadow_jax.models import checkpoint_config
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import strategies as st

from bshadow_jax.errors import UserError
from reliability_helpers import Hang, assert_cli_user_error, record
from reliability_helpers import user_error_or_ok as _user_error_or_ok
from reliability_helpers import no_hang as _no_hang
from testkit import fuzz_settings

sources = importlib.import_module("bshadow_jax.formats.sources")
st_format = importlib.import_module("bshadow_jax.formats.safetensors")
models = importlib.import_module("bshadow_jax.models")

# No shrinking: a failing case is reported as found (derandomized, so reproducible); keeps failures cheap.
# The long campaign is these tests under BSHADOW_HYPOTHESIS_PROFILE=long (tests/conftest.py).
_PHASES = [Phase.explicit, Phase.generate]
FUZZ = fuzz_settings(100, derandomize=True, suppress_health_check=list(HealthCheck), phases=_PHASES)
FUZZ_SMALL = fuzz_settings(40, derandomize=True, suppress_health_check=list(HealthCheck), phases=_PHASES)
HANG_SECONDS = 30

TINY = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32)


_record = record


# The child's own peak RSS: VmHWM belongs to the address space that execve creates, whereas
# ru_maxrss is carried over from the parent across fork+exec, so a pytest worker that had grown
# past the limit made these tests fail at random.
_PRINT_OWN_PEAK = ("print('maxrss_kb', next(int(ln.split()[1]) for ln in open('/proc/self/status') "
                   "if ln.startswith('VmHWM:')))\n")


def no_hang(seconds: int = HANG_SECONDS):
    return _no_hang(seconds)


def user_error_or_ok(fn, *args):
    """Run a reader; return "ok" or "user_error"; anything else fails the test."""
    return _user_error_or_ok(fn, *args, seconds=HANG_SECONDS)


def read_all(path):
    with sources.open_checkpoint(path) as src:
        for name in src.names():
            src.shape(name), src.dtype(name)
            arr = src.read(name)
            assert arr.dtype == np.float32
        checkpoint_config(src, required=False)


@pytest.fixture(autouse=True)
def memory_cap():
    """Cap this process's address space while a reader runs: an allocation sized by a hostile header then fails
    with MemoryError (a test failure) instead of summoning the OOM killer on a shared machine."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
    cap = vm_kb * 1024 + (4 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_model():
    import jax

    cfg = models.LlamaConfig(**TINY)
    params = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.key(0)))
    return cfg, params


@pytest.fixture(scope="module")
def hf_folder(tiny_model, tmp_path_factory) -> Path:
    cfg, params = tiny_model
    out = tmp_path_factory.mktemp("hf") / "model"
    models.save_pretrained(cfg, params, out)
    return out


def _st_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.fixture(scope="module")
def gguf_bytes(tiny_model, tmp_path_factory) -> bytes:
    """A small valid llama GGUF written with gguf.GGUFWriter (F32 and F16 tensors)."""
    import gguf

    cfg, params = tiny_model
    flat = models.flatten_params(params)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for hf, arr in flat.items():
        if hf in names:
            g = names[hf]
        else:
            _, _, layer, *rest = hf.split(".")
            g = f"blk.{layer}.{parts['.'.join(rest[:-1])]}.weight"
        arr = np.asarray(arr, np.float32)
        w.add_tensor(g, arr.astype(np.float16) if arr.ndim == 2 and "attn_v" in g else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    assert user_error_or_ok(read_all, path) == "ok"
    return data


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
    p.write_bytes(_st_bytes(header, data, length))
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
    p.write_bytes(_st_bytes(header, b"\0" * 1000))
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


# ----------------------------------------------------------------------------- CLI sweep

def _cli(argv) -> tuple[int, str]:
    from bshadow_jax import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), no_hang(120):
        rc = cli.main(argv)
    return rc, err.getvalue()


def _broken_inputs(root: Path, hf_folder: Path, gguf_bytes: bytes) -> dict[str, Path]:
    good = (hf_folder / "model.safetensors").read_bytes()
    cases = {
        "empty.safetensors": b"",
        "truncated.safetensors": good[: len(good) // 2],
        "json_garbage.safetensors": struct.pack("<Q", 5) + b"{{{{{" + b"\0" * 8,
        "huge_len.safetensors": struct.pack("<Q", 2**63) + b"{}",
        "bad_offsets.safetensors": _st_bytes({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64000]}}, b"\0" * 64),
        "empty.gguf": b"",
        "truncated.gguf": gguf_bytes[: len(gguf_bytes) // 3],
        "badmagic.gguf": b"GGUX" + gguf_bytes[4:],
        "model.bin": b"\x80\x04pickle",
        "model.pt": b"\x80\x04pickle",
        "model.pth": b"\x80\x04pickle",
        "model.ckpt": b"\x80\x04pickle",
        "weights.npz": b"PK\x03\x04",
    }
    out = {}
    for name, data in cases.items():
        (root / name).write_bytes(data)
        out[name] = root / name
    folder = root / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    out["no_weights"] = folder
    pick = root / "pickle_folder"
    pick.mkdir()
    (pick / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    (pick / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    out["pickle_folder"] = pick
    out["missing"] = root / "does_not_exist.safetensors"
    out["run_folder_no_ckpt"] = root / "run"
    (root / "run" / "checkpoints").mkdir(parents=True)
    return out


def test_cli_broken_inputs_exit_2(hf_folder, gguf_bytes, tmp_path):
    inputs = _broken_inputs(tmp_path, hf_folder, gguf_bytes)
    results = {}
    for name, path in inputs.items():
        for argv in (["spectrum", str(path)], ["export", str(path)], ["diagnose", str(hf_folder), str(path)],
                     ["diagnose", str(path), str(hf_folder)]):
            out = tmp_path / "out" / f"{argv[0]}-{name}"
            rc, err = _cli([*argv, "--out", str(out)])
            results[(argv[0], name)] = rc
            _record(f"exit {rc}", f"{argv[0]} {name}")
            line = assert_cli_user_error(rc, err, out, context=argv)
            if name.endswith((".bin", ".pt", ".pth", ".ckpt")) or name == "pickle_folder":
                assert "pickle" in line


@fuzz_settings(25, derandomize=True, suppress_health_check=list(HealthCheck), phases=_PHASES)
@given(data=st.data())
def test_cli_mutated_checkpoints(hf_folder, gguf_bytes, tmp_path_factory, data):
    """Mutated safetensors/GGUF files through `bshadow spectrum` and `bshadow export`: exit 0 or 2, never more."""
    kind = data.draw(st.sampled_from(["safetensors", "gguf"]))
    buf = bytearray((hf_folder / "model.safetensors").read_bytes() if kind == "safetensors" else gguf_bytes)
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            buf[data.draw(st.integers(0, min(len(buf) - 1, 1500)))] = data.draw(st.integers(0, 255))
    root = tmp_path_factory.mktemp("climut")
    f = root / f"model.{kind}"
    f.write_bytes(bytes(buf))
    if kind == "safetensors":
        (root / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    cmd = data.draw(st.sampled_from(["spectrum", "export"]))
    rc, err = _cli([cmd, str(f), "--out", str(root / "out")])
    _record(f"exit {rc}", f"{cmd} {kind}")
    assert rc in (0, 2), err
    if rc == 2:
        assert_cli_user_error(rc, err, root / "out")


def test_failed_run_keeps_previous_good_output(hf_folder, tmp_path):
    """A good `spectrum`/`export` output, then a failing run into the same --out: the good one survives intact."""
    def digest(folder: Path) -> dict:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((hf_folder / "model.safetensors").read_bytes()[:100])
    for cmd in ("spectrum", "export"):
        out = tmp_path / f"{cmd}_out"
        rc, err = _cli([cmd, str(hf_folder), "--out", str(out)])
        assert rc == 0, err
        before = digest(out)
        assert before
        rc, err = _cli([cmd, str(bad), "--out", str(out)])
        assert rc == 2, err
        assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "export_out", "spectrum_out"]


# ----------------------------------------------------------------------------- output containment

def test_hostile_tensor_names_stay_inside_out(tmp_path):
    """Tensor names like ../x, /abs, with NUL, newlines or CSV delimiters: outputs only inside --out."""
    names = ["../../escape.weight", "/tmp/abs.weight", "a/../../b.weight", "x\ny,z\"q.weight", "model.layers.0.mlp.up_proj.weight",
             ".hidden.weight", "=cmd|' /C calc'!A0.weight", "\u202egnp.weight"]
    rng = np.random.default_rng(0)
    from safetensors.numpy import save_file

    base = {n: rng.standard_normal((6, 4)).astype(np.float32) for n in names}
    tuned = {n: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
    work = tmp_path / "work"
    work.mkdir()
    save_file(base, str(work / "base.safetensors"))
    save_file(tuned, str(work / "tuned.safetensors"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc, err = _cli(["diagnose", str(work / "base.safetensors"), str(work / "tuned.safetensors"), "--out", str(work / "out")])
    assert rc == 0, err
    rc2, err2 = _cli(["spectrum", str(work / "tuned.safetensors"), "--out", str(work / "spec")])
    assert rc2 == 0, err2
    after = sorted(str(p) for p in tmp_path.rglob("*"))
    new = [p for p in after if p not in before]
    assert all(p.startswith((str(work / "out"), str(work / "spec"))) for p in new), new
    assert not Path("/tmp/abs.weight").exists() and not (tmp_path / "escape.weight").exists()
    import csv

    rows = list(csv.DictReader(open(work / "out" / "metrics.csv", newline="")))
    assert sorted(r["name"] for r in rows) == sorted(names)  # names round-trip through the CSV intact


# ----------------------------------------------------------------------------- orbax run folders

def _orbax_run(write_orbax_run, root: Path) -> Path:
    import jax

    from bshadow_jax.models import LlamaConfig, init_params

    model = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    return write_orbax_run(root, model, {1: init_params(LlamaConfig(**model), jax.random.key(0))})


def _data_files(run: Path, under: str = "") -> list[Path]:
    top = run / "checkpoints" / "1" / "params" / under
    return sorted(p for p in top.rglob("*") if p.is_file() and p.parent.name == "d")


@pytest.mark.parametrize("damage", ["delete_data", "delete_array_data", "zero_data", "garbage_metadata",
                                    "truncate_manifest"])
def test_damaged_orbax_run_folder(tmp_path, damage, write_orbax_run):
    """A damaged run folder read tensor by tensor: exit 2, one error line naming it, no output folder."""
    good = _orbax_run(write_orbax_run, tmp_path / "good")
    bad = _orbax_run(write_orbax_run, tmp_path / "bad")
    params = bad / "checkpoints" / "1" / "params"
    if damage == "delete_data":
        for p in _data_files(bad):
            p.unlink()
    elif damage == "delete_array_data":  # the tree metadata still reads; the arrays do not
        for p in _data_files(bad, "ocdbt.process_0"):
            p.unlink()
    elif damage == "zero_data":
        for p in _data_files(bad):
            p.write_bytes(b"\0" * p.stat().st_size)
    elif damage == "garbage_metadata":
        (params / "_METADATA").write_text("{not json")
    else:
        for p in params.rglob("manifest.ocdbt"):
            p.write_bytes(p.read_bytes()[:7])
    out = tmp_path / "out"
    rc, err = _cli(["diagnose", str(good), str(bad), "--out", str(out)])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], err
    assert not out.exists()
