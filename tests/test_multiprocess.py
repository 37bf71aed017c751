"""Multi-process runs over localhost (jax.distributed, gloo CPU collectives): 2 processes x 2 devices against
1 process x 4 devices (the same global device count), SIGKILL of both then resume, diagnose split across
processes, and a dead peer stopping the survivor with an `error:` line in bounded time."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from reliability_helpers import assert_cli_user_error

from bshadow_jax.cli import main
from bshadow_jax.models import load_pretrained

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train.steps=6", "train.log_every=1", "train.checkpoint_every=3", "train.batch_size=8", "train.seq_len=32"]
TIMEOUT = 300


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)


def _train_args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bshadow_jax", "train", str(ROOT / "configs" / "smoke.yaml"), "--out", str(out),
            *TRAIN, *extra]


def _flags(port: int, i: int, n: int = 2) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]


def _spawn(args_of, env=None) -> list[subprocess.Popen]:
    """Both processes of a 2-process job (2 CPU devices each); args_of(flags) -> the command line."""
    port = _port()
    return [subprocess.Popen(args_of(_flags(port, i)), cwd=ROOT, env=env or _env(2), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]


def _finish(procs) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        out.append((p.returncode, err))
    return out


def _ok(results) -> None:
    for rc, err in results:
        assert rc == 0, err[-3000:]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _compare_to_reference(ref: Path, run: Path) -> dict:
    """Same steps; losses and final params equal up to float reassociation (gloo vs in-process all-reduce)."""
    want, got = _rows(ref), _rows(run)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(want, got))
    assert loss_diff <= 1e-5 * max(abs(r["loss"]) for r in want), loss_diff
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    _, pa = load_pretrained(ref)
    _, pb = load_pretrained(run)
    param_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))
    for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    print(f"max |loss diff| {loss_diff:.3g}, max |param diff| {param_diff:.3g}")
    return {"loss": loss_diff, "params": param_diff}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One process with 4 CPU devices: the global device count of 2 processes x 2."""
    ref = tmp_path_factory.mktemp("mp") / "ref"
    proc = subprocess.run(_train_args(ref), cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ref


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234"], "--num-processes, --process-id missing"),
    (["--num-processes", "2", "--process-id", "0"], "--coordinator missing"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--coordinator", "h:70000", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--coordinator", "h:1234", "--num-processes", "2", "--process-id", "2"], "must be in 0..1"),
    (["--coordinator", "h:1234", "--num-processes", "0", "--process-id", "0"], "at least 1"),
])
def test_bad_flags_are_one_error_line(tmp_path, capsys, flags, message):
    for command in (["train", str(ROOT / "configs" / "smoke.yaml")], ["diagnose", "a", "b"],
                    ["experiment", "regimes", "c.yaml"]):
        rc = main([*command, "--out", str(tmp_path / "out"), *flags])
        line = assert_cli_user_error(rc, capsys.readouterr().err, tmp_path / "out")
        assert message in line, line


# ----------------------------------------------------------------------------- train

def test_two_processes_train_like_one_process(tmp_path, reference_run):
    run = tmp_path / "run"
    t0 = time.perf_counter()
    _ok(_finish(_spawn(lambda f: _train_args(run, *f))))
    print(f"2-process train: {time.perf_counter() - t0:.1f} s")
    _compare_to_reference(reference_run, run)
    # process 0 wrote the shared files; every process took part in the orbax saves (its own data state)
    assert (run / "config.yaml").is_file() and (run / "tokenizer").is_dir()
    assert sorted(p.name for p in (run / "checkpoints" / "6" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_sigkill_both_after_a_checkpoint_then_resume(tmp_path, reference_run):
    run = tmp_path / "run"
    procs = _spawn(lambda f: _train_args(run, *f))
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (run / "checkpoints" / "3" / "commit_success.txt").exists() and len(_rows(run)) >= 4:
            break
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=60)
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, "finished before the kill"
    assert (run / "checkpoints" / "3").is_dir() and not (run / "checkpoints" / "6").is_dir()
    _ok(_finish(_spawn(lambda f: _train_args(run, *f))))
    _compare_to_reference(reference_run, run)


def test_dead_peer_stops_the_survivor_with_an_error_line(tmp_path):
    run = tmp_path / "run"
    env = _env(2, BSHADOW_HEARTBEAT_TIMEOUT_S="5")
    procs = _spawn(lambda f: _train_args(run, *f, "train.steps=100000", "train.checkpoint_every=100000"), env=env)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (run / "metrics.jsonl").exists() and len(_rows(run)) >= 2:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    took = time.monotonic() - killed
    procs[1].communicate(timeout=60)
    print(f"survivor stopped {took:.1f} s after the kill: {err.strip().splitlines()[-1]}")
    assert procs[0].returncode == 2, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "process 1 of 2 stopped responding" in errors[0], err[-3000:]
    assert "Traceback" not in err and took < 60


@pytest.mark.parametrize("bad", [0, 1])
def test_a_process_failing_on_its_own_error_stops_the_other_with_its_message(tmp_path, bad):
    run = tmp_path / "run"
    procs = _spawn(lambda f: _train_args(run, *f, *(["train.seq_len=zz"] if f[-1] == str(bad) else [])))
    (rc0, err0), (rc1, err1) = _finish(procs)
    own = assert_cli_user_error([rc0, rc1][bad], [err0, err1][bad])
    other = assert_cli_user_error([rc0, rc1][1 - bad], [err0, err1][1 - bad])
    assert "train.seq_len: expected an integer" in own
    assert other == f"error: multi-process run: process {bad} of 2 failed: {own[len('error: '):]}"


# ----------------------------------------------------------------------------- diagnose

def test_diagnose_split_across_processes_writes_what_one_process_writes(tmp_path, reference_run):
    def args(out, *flags):  # --batch-budget-mb 0.5: one matrix per chunk, so both processes compute some
        return [sys.executable, "-m", "bshadow_jax", "diagnose", str(reference_run / "checkpoints" / "3"),
                str(reference_run), "--out", str(out), "--batch-budget-mb", "0.5", *flags]

    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run(args(one), cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _ok(_finish(_spawn(lambda f: args(two, *f))))
    for name in ("metrics.csv", "vectors.csv", "summary.json", "report.md"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


# ----------------------------------------------------------------------------- a study

STUDY = {
    "seeds": [0, 1],
    "base": {"seeds": [3], "pretrain": {
        "model": {"vocab_size": 0, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64},
        "data": {"arm": "coverage_expanding", "text_share": 0.7, "text_source": "procedural"},
        "train": {"steps": 4, "batch_size": 4, "seq_len": 64, "log_every": 2, "checkpoint_every": 4},
        "optim": {"lr": 3e-3, "warmup_steps": 0}, "mesh": {"data": 0}}},
    "finetune": {"data": {"text_source": "procedural"},
                 "train": {"steps": 4, "batch_size": 4, "seq_len": 64, "log_every": 1, "checkpoint_every": 4},
                 "optim": {"lr": 1e-3, "warmup_steps": 0}, "mesh": {"data": 0}},
    "arms": [{"name": "benchmark_aligned", "data": {"arm": "benchmark_aligned"}},
             {"name": "coverage_expanding", "data": {"arm": "coverage_expanding"}}],
    "evals": {"batch_size": 16, "seq_len": 64,
              "options": {"n_narrow_per_skill": 3, "n_other_per_skill": 1, "n_bench_other_per_skill": 2,
                          "n_compositional": 3, "n_text": 2, "broad_formats": ["qa", "cloze"]}},
    "diagnose": {"topk": 4, "track_points": 2},
    "analysis": {"n_boot": 100, "noise_floor_pairs": 1},
    "regime_score": {"enabled": False},
}


def test_a_study_split_across_processes_writes_what_one_process_writes(tmp_path):
    """Both processes train and diagnose every unit together; process 0 evaluates and writes: the records,
    items and footprints equal one process's with the same global device count (4)."""
    import csv

    import yaml

    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump(STUDY))

    def args(out, *flags):
        return [sys.executable, "-m", "bshadow_jax", "experiment", "regimes", str(cfg), "--out", str(out), *flags]

    ref = subprocess.run(args(tmp_path / "ref"), cwd=ROOT, env=_env(4), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    results = _finish(_spawn(lambda f: args(tmp_path / "mp", *f)))
    _ok(results)
    assert "results:" not in results[1][1]  # process 1 prints no summary
    want = json.loads((tmp_path / "ref" / "results.json").read_text())
    got = json.loads((tmp_path / "mp" / "results.json").read_text())
    for arm in want["arms"]:
        a, b = want["arms"][arm], got["arms"][arm]
        assert b["distinct_tokens"]["mean"] == a["distinct_tokens"]["mean"]  # the union over both processes' rows
        for key in ("entropy", "delta_effective_rank"):
            assert b["footprint"][key]["mean"] == pytest.approx(a["footprint"][key]["mean"], rel=1e-4)
    assert set(got["noise_floor"]["arms"]) == set(want["noise_floor"]["arms"]) == {"benchmark_aligned",
                                                                                    "coverage_expanding"}
    rows = [list(csv.DictReader((tmp_path / d / "items.csv").open())) for d in ("ref", "mp")]
    assert len(rows[0]) == len(rows[1]) > 0
    flips = sum(r["correct"] != s["correct"] for r, s in zip(*rows))
    worst = max(abs(float(r["gold_logprob"]) - float(s["gold_logprob"])) for r, s in zip(*rows))
    print(f"2-process study vs 1 process: {flips} of {len(rows[0])} items flipped, max |gold logprob diff| {worst:.3g}")
    assert flips <= len(rows[0]) // 50
    assert worst < 1e-3
    assert [c["verdict"] for c in got["claims"]] == [c["verdict"] for c in want["claims"]]
