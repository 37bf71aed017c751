"""Training config errors: always ConfigError (exit 2), before anything is compiled or written."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bshadow_jax import config
from bshadow_jax.errors import ConfigError
from reliability_helpers import assert_cli_user_error, record
from testkit import fuzz_settings, tiny_model_config

training_config = importlib.import_module("bshadow_jax.training.config")

TINY = {
    "seed": 0,
    "model": tiny_model_config(),
    "train": {"steps": 4, "batch_size": 8, "seq_len": 16, "log_every": 1, "checkpoint_every": 2},
    "optim": {"lr": 1e-2, "warmup_steps": 0},
}

_record = record

_KEYS = [
    "seed", "train.steps", "train.batch_size", "train.seq_len", "train.grad_accum", "train.log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.compute_dtype", "optim.name", "optim.lr",
    "optim.warmup_steps", "optim.schedule", "optim.b1", "optim.b2", "optim.eps", "optim.clip_norm",
    "optim.min_lr_ratio", "mesh.data", "mesh.fsdp", "mesh.tensor", "model.hidden_size", "model.num_attention_heads",
    "model.num_key_value_heads", "model.head_dim", "model.rms_norm_eps", "model.rope_theta", "model.vocab_size",
    "model.max_position_embeddings", "model.model_type", "model.rope_scaling", "model.sliding_window",
    "model.tie_word_embeddings", "data.vocab_size", "data.arm", "data.alpha", "data.stages", "data.sources",
    "train.bogus", "bogus", "optim", "model",
]
_RAW = [
    "0", "-1", "1", "3", "7", "1e3", "1e-4", "2.5", ".nan", ".inf", "-.inf", "true", "null", "abc", "[]", "{}",
    "[1, 2]", "{rope_type: llama3}", "{rope_type: linear, factor: abc}", "{rope_type: bogus}", "99999999999999999999",
    "float32", "bfloat16", "qwen2", "mistral", "adamw", "lion", "''", "'\x00'", "{a: 1}", "[{start_step: 0, weights: {x: -1}}]",
]


@fuzz_settings(200)
@given(overrides=st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_RAW)), max_size=4))
def test_train_config_fuzz(overrides):
    try:
        data = config.apply_overrides(TINY, [f"{k}={v}" for k, v in overrides])
        cfg = training_config.train_config_from_dict(data)
    except ConfigError:
        _record("config_error")
        return
    _record("ok")
    # Whatever validated must be usable: a model config comes out, sizes are sane.
    model = cfg.llama_config(100)
    assert model.hidden_size > 0 and model.num_attention_heads > 0
    assert cfg.train.steps >= 1 and cfg.train.batch_size >= 1


_NO_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, io, contextlib
    import jax
    from jax import monitoring
    events = []
    monitoring.register_event_duration_secs_listener(lambda name, secs, **kw: events.append(name))
    from bshadow_jax import cli
    cases = json.loads(sys.argv[1])
    out = []
    for argv in cases:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(argv)
        out.append({"rc": rc, "err": err.getvalue(), "compiles": [e for e in events if "compile" in e or "trace" in e]})
        events.clear()
    print(json.dumps(out))
""")


def test_config_errors_exit_2_before_compiling(tmp_path):
    import yaml

    good = tmp_path / "tiny.yaml"
    good.write_text(yaml.safe_dump(TINY))
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("model: [unclosed\n")
    out = str(tmp_path / "run")
    cases = [
        ["train", str(tmp_path / "missing.yaml"), "--out", out],
        ["train", str(garbage), "--out", out],
        ["train", str(good), "--out", out, "train.stpes=3"],
        ["train", str(good), "--out", out, "train.steps=0"],
        ["train", str(good), "--out", out, "train.steps=abc"],
        ["train", str(good), "--out", out, "optim.lr=-1"],
        ["train", str(good), "--out", out, "optim.lr=.nan"],
        ["train", str(good), "--out", out, "optim.name=adam"],
        ["train", str(good), "--out", out, "mesh.data=16"],
        ["train", str(good), "--out", out, "mesh.data=3"],
        ["train", str(good), "--out", out, "model.num_key_value_heads=0"],
        ["train", str(good), "--out", out, "model.num_key_value_heads=3"],
        ["train", str(good), "--out", out, "train.seq_len=4096"],
        ["train", str(good), "--out", out, "train.grad_accum=3"],
        ["train", str(good), "--out", out, "noequals"],
        ["train", str(good), "--out", str(good)],  # --out is a file
    ]
    repo = Path(__file__).resolve().parents[1] / "configs"
    if (repo / "smoke.yaml").is_file():  # the shipped configs, with a bad override after --out
        cases += [["train", str(repo / "smoke.yaml"), "--out", out, "train.steps=-5"],
                  ["train", str(repo / "smoke.yaml"), "--out", out, "optim.lr=fast"]]
    for study in ("regimes", "repetition"):
        if (repo / f"{study}_cpu.yaml").is_file():
            cases += [["experiment", study, str(repo / f"{study}_cpu.yaml"), "--out", out, "bogus_key=1"],
                      ["experiment", study, str(garbage), "--out", out]]
    r = subprocess.run([sys.executable, "-c", _NO_COMPILE_SCRIPT, json.dumps(cases)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for argv, res in zip(cases, results):
        assert_cli_user_error(res["rc"], res["err"], context=(argv, res))
        assert res["compiles"] == [], (argv, res)  # nothing traced or compiled
    assert not (tmp_path / "run").exists()  # nothing written either
    assert good.read_text() == __import__("yaml").safe_dump(TINY)


@pytest.mark.parametrize("override", ["model.rms_norm_eps=.nan", "model.rope_theta=.inf", "model.rope_theta=.nan"])
def test_non_finite_model_hyperparameters_refused(override):
    data = config.apply_overrides(TINY, [override])
    with pytest.raises(ConfigError):
        training_config.train_config_from_dict(data)
