"""Shared pieces of the hostile-checkpoint tests (test_reliability_readers*.py): a tiny model written as
a Hugging Face folder and as GGUF bytes, the reader-or-UserError harness, and a memory cap.

Test modules import the fixtures by name; pytest registers fixtures found in a module's namespace.
"""
from __future__ import annotations

import importlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase

from bshadow_jax.models import checkpoint_config
from reliability_helpers import no_hang as _no_hang
from reliability_helpers import user_error_or_ok as _user_error_or_ok
from testkit import fuzz_settings

sources = importlib.import_module("bshadow_jax.formats.sources")
st_format = importlib.import_module("bshadow_jax.formats.safetensors")
models = importlib.import_module("bshadow_jax.models")

# No shrinking: a failing case is reported as found (derandomized, so reproducible); keeps failures cheap.
# The long campaign is these tests under BSHADOW_HYPOTHESIS_PROFILE=long (tests/conftest.py).
PHASES = [Phase.explicit, Phase.generate]
FUZZ = fuzz_settings(100, derandomize=True, suppress_health_check=list(HealthCheck), phases=PHASES)
FUZZ_SMALL = fuzz_settings(40, derandomize=True, suppress_health_check=list(HealthCheck), phases=PHASES)
HANG_SECONDS = 30

TINY = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32)




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


def st_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
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


