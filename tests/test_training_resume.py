"""Checkpoint/resume: real SIGKILLs then resume give exactly the uninterrupted run; NaN stops cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from testkit import tiny_model_config

from bshadow_jax.errors import UserError
from bshadow_jax.models import load_pretrained
from bshadow_jax.training.config import train_config_from_dict
from bshadow_jax.training.loop import NonFiniteLossError, train
from bshadow_jax.data.synthetic import make_synthetic_dataset, synthetic_batch

ROOT = Path(__file__).resolve().parents[1]
V, T = 64, 16
BASE = {
    "seed": 1,
    "model": tiny_model_config(vocab_size=V),
    "train": {"steps": 12, "batch_size": 4, "seq_len": T, "log_every": 1, "checkpoint_every": 4, "keep_checkpoints": 2},
    "optim": {"lr": 1e-2, "warmup_steps": 2},
}

# The child trains on the synthetic stream and SIGKILLs itself at a chosen moment:
#   log:K   right after logging step K (between checkpoints)
#   save:K  right after the async save of step K was issued (its files are being written)
CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import jax
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from bshadow_jax.training import checkpoint, loop
    from bshadow_jax.training.config import train_config_from_dict
    from bshadow_jax.data.synthetic import make_synthetic_dataset
    cfg = train_config_from_dict(json.loads(os.environ["CHILD_CFG"]))
    kind, _, at = sys.argv[2].partition(":")
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    progress = None
    if kind == "log":
        progress = lambda step, row: die() if step == int(at) else None
    elif kind == "save":
        orig = checkpoint.RunCheckpointer.save
        def save(self, state, data_iter=None):
            orig(self, state, data_iter)
            if int(state.step) == int(at):
                die()
        checkpoint.RunCheckpointer.save = save
    ds = lambda b: make_synthetic_dataset(vocab_size=64, seq_len=16, batch_size=b, seed=9)
    loop.train(cfg, sys.argv[1], dataset=ds, progress=progress)
""")


def _child(run_dir: Path, kill: str, cache: Path) -> int:
    env = dict(os.environ, CHILD_CFG=json.dumps(BASE), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), kill, str(cache)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if kill == "none":
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    cache = tmp_path / "jax_cache"
    ref, run = tmp_path / "ref", tmp_path / "run"
    _child(ref, "none", cache)
    assert _child(run, "log:6", cache) == -signal.SIGKILL
    assert [r["step"] for r in _rows(run)] == list(range(1, 7))  # logged past the step-4 checkpoint
    assert _child(run, "save:8", cache) == -signal.SIGKILL
    _child(run, "none", cache)
    want, got = _rows(ref), _rows(run)
    assert [r["step"] for r in got] == list(range(1, 13))
    for key in ("loss", "grad_norm", "lr", "tokens"):
        assert [r[key] for r in got] == [r[key] for r in want], key  # bit-exact, not approximately
    cfg_a, params_a = load_pretrained(ref)
    cfg_b, params_b = load_pretrained(run / "checkpoints" / "12")
    assert cfg_a == cfg_b and cfg_a.vocab_size == V
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(a, b)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [8, 12]


def _poisoned(bad_index: int):
    def one(i):
        b = synthetic_batch(int(i), vocab_size=V, seq_len=T, batch_size=4, seed=9)
        if int(i) == bad_index:
            b["loss_mask"] = np.full_like(b["loss_mask"], np.nan)
        return b
    return lambda local_batch: grain.MapDataset.range(0, 1 << 30).map(one).to_iter_dataset()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = train_config_from_dict({**BASE, "train": {**BASE["train"], "steps": 8, "checkpoint_every": 2},
                                  "mesh": {"data": 1}})
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, run, dataset=_poisoned(4))  # batch index 4 is step 5
    msg = str(err.value)
    assert isinstance(err.value, UserError)
    assert "at step 5" in msg and "step 4" in msg and "optim.lr=" in msg and "\n" not in msg
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    _, params = load_pretrained(run)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert max(r["step"] for r in _rows(run)) == 4
    # resuming with clean data continues from step 4
    ds = lambda b: make_synthetic_dataset(vocab_size=V, seq_len=T, batch_size=b, seed=9)  # noqa: E731
    result = train(cfg, run, dataset=ds)
    assert [r["step"] for r in result.metrics] == list(range(1, 9)) and result.step == 8


def test_cli_smoke_writes_run_folder_and_rerun_resumes(tmp_path):
    out = tmp_path / "smoke"
    args = [sys.executable, "-m", "bshadow_jax", "train", str(ROOT / "configs" / "smoke.yaml"), "--out", str(out),
            "train.steps=4", "train.log_every=2", "train.checkpoint_every=2", "train.batch_size=4", "train.seq_len=32",
            "mesh.data=1"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(rows[0])
    assert (out / "config.yaml").is_file() and (out / "tokenizer").is_dir()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "4" / "params").is_dir()
    cfg, params = load_pretrained(out)
    assert params["model"]["embed_tokens"]["weight"].shape[0] == cfg.vocab_size > 0
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(out) == rows  # nothing left to do: the finished run is resumed, not redone


@pytest.mark.slow
def test_cli_external_sigkill_at_random_moments(tmp_path):
    """The real pipeline through the CLI, killed from outside at arbitrary times, resumes exactly."""
    args = lambda out: [sys.executable, "-m", "bshadow_jax", "train", str(ROOT / "configs" / "smoke.yaml"),  # noqa: E731
                        "--out", str(out), "train.steps=16", "train.log_every=1", "train.checkpoint_every=3",
                        "train.batch_size=4", "train.seq_len=32", "mesh.data=1"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert subprocess.run(args(ref), cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen(args(run), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = len(_rows(run)) if (run / "metrics.jsonl").exists() else 0
        deadline = time.time() + 300
        target = start + int(rng.integers(1, 4))
        while time.time() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").exists() and len(_rows(run)) >= target:
                time.sleep(float(rng.random()) * 0.3)
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert subprocess.run(args(run), cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    assert [(r["step"], r["loss"]) for r in _rows(run)] == [(r["step"], r["loss"]) for r in _rows(ref)]


def test_load_run_params_refuses_non_runs(tmp_path):
    with pytest.raises(UserError, match="not a bshadow run folder"):
        load_pretrained(tmp_path)
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-123").mkdir(parents=True)
    with pytest.raises(UserError, match="no finished checkpoint"):
        load_pretrained(tmp_path)


def test_init_params_starts_from_given_weights(tmp_path):
    from bshadow_jax.models.llama import init_params
    from bshadow_jax.training.step import loss_sums

    cfg = train_config_from_dict({**BASE, "train": {**BASE["train"], "steps": 8, "checkpoint_every": 2},
                                  "mesh": {"data": 1}})
    model_cfg = cfg.llama_config()
    start = jax.tree.map(np.asarray, init_params(model_cfg, jax.random.key(42)))
    ds = lambda b: make_synthetic_dataset(vocab_size=V, seq_len=T, batch_size=b, seed=9)  # noqa: E731
    seen = []
    result = train(cfg, tmp_path / "run", init_params=start, dataset=ds, callback_every=3,
                   on_checkpoint=lambda step, params: seen.append(step))
    first = synthetic_batch(0, vocab_size=V, seq_len=T, batch_size=4, seed=9)
    s, c = loss_sums(start, first, model_cfg=model_cfg)
    np.testing.assert_allclose(result.metrics[0]["loss"], float(s / c), rtol=1e-5)
    assert seen == [2, 3, 4, 6, 8]  # every checkpoint, plus every `callback_every` steps
    bad = dict(start, lm_head={"weight": np.zeros((V + 1, 32), np.float32)})
    with pytest.raises(UserError, match="init_params"):
        train(cfg, tmp_path / "bad", init_params=bad, dataset=ds)
