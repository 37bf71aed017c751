"""Training faults: SIGKILL anywhere, full disk, unwritable checkpoint folder, NaN loss.

Every run goes through the real entry point (`bshadow_jax.cli.main(["train", ...])`) in a
subprocess, with the synthetic token stream in place of the data pipeline (speed) and a
fault injected at a chosen moment:
  before_save:N  SIGKILL just before step N's checkpoint is written
  during_save:N  SIGKILL right after the async save of step N was dispatched (commit in flight)
  after_save:N   SIGKILL after step N's checkpoint is fully committed
  after_step:N   SIGKILL after step N's metrics row was written (between checkpoints)
  fsize:BYTES    RLIMIT_FSIZE: every file write past BYTES fails with EFBIG (a full disk, as root too)
Each killed run is resumed by running the same command again; the chain must end exactly
(bit for bit params, same metrics rows) as one uninterrupted run.
"""
from __future__ import annotations

import importlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from testkit import tiny_model_config

importlib.import_module("bshadow_jax.training.loop")

TINY = {
    "seed": 0,
    "model": tiny_model_config(),
    "train": {"steps": 6, "batch_size": 8, "seq_len": 16, "log_every": 1, "checkpoint_every": 2,
              "keep_checkpoints": 2},
    "optim": {"lr": 1e-2, "warmup_steps": 0},
}
DEVICES = 2  # same device count in every run of a chain (docs/outputs.md: exact resume on CPU, same device count)
TIMING_KEYS = {"tokens_per_s"}

DRIVER = textwrap.dedent("""
    import functools, os, resource, signal, sys
    import numpy as np
    run_dir, cfg_path, fault = sys.argv[1], sys.argv[2], sys.argv[3]
    overrides = sys.argv[4:]
    from bshadow_jax import cli
    from bshadow_jax.training import checkpoint, loop
    from bshadow_jax.data.synthetic import make_synthetic_dataset
    # `bshadow train` on the synthetic stream: the CLI handler calls loop.train_from_cli, here given the
    # data through its dataset_fn parameter (so no tokenizer loads: the vocab is the model section's).
    loop.train_from_cli = functools.partial(loop.train_from_cli, dataset_fn=lambda cfg, b: make_synthetic_dataset(
        vocab_size=cfg.model["vocab_size"], seq_len=cfg.train.seq_len, batch_size=b, seed=cfg.seed))
    mode, _, at = fault.partition(":")
    at = int(at or -1)

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    orig_save = checkpoint.RunCheckpointer.save

    def save(self, state, data_iter=None):
        step = int(state.step)
        if mode == "before_save" and step == at:
            die()
        orig_save(self, state, data_iter)
        if mode == "during_save" and step == at:
            die()
        if mode == "after_save" and step == at:
            self.wait()
            die()

    checkpoint.RunCheckpointer.save = save
    orig_log = loop._Logger.log

    def log(self, row):
        orig_log(self, row)
        if mode == "after_step" and row["step"] == at:
            die()

    loop._Logger.log = log
    if mode == "nan_batch":  # a poisoned batch (NaN loss weights) feeds step `at`
        from bshadow_jax.data import synthetic
        orig_batch = synthetic.synthetic_batch

        def poisoned(index, **kw):
            b = orig_batch(index, **kw)
            if index == at - 1:
                b["loss_mask"] = np.full_like(b["loss_mask"], np.nan)
            return b

        synthetic.synthetic_batch = poisoned
    if mode == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (at, at))
    print("started", flush=True)
    rc = cli.main(["train", cfg_path, "--out", run_dir, *overrides])
    if rc == 0:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        from bshadow_jax.models.llama import flatten_params
        from bshadow_jax.models import load_pretrained
        _, params = load_pretrained(run_dir)
        np.savez(os.path.join(run_dir, "final.npz"), **flatten_params(params))
    sys.exit(rc)
""")


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
    env.pop("BSHADOW_DEBUG", None)
    return env


class Runner:
    def __init__(self, root: Path, cfg: dict = TINY):
        self.root = root
        self.driver = root / "driver.py"
        self.driver.write_text(DRIVER)
        self.cfg_path = root / "tiny.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))

    def cmd(self, run_dir: Path, fault: str = "none", *overrides: str) -> list[str]:
        return [sys.executable, str(self.driver), str(run_dir), str(self.cfg_path), fault, *overrides]

    def run(self, run_dir: Path, fault: str = "none", *overrides: str) -> subprocess.CompletedProcess:
        # stdout/stderr are pipes: RLIMIT_FSIZE does not apply to them
        return subprocess.run(self.cmd(run_dir, fault, *overrides), capture_output=True, text=True, env=_env(),
                              timeout=600, cwd=self.root)


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "final.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _complete_steps(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit() and (p / "commit_success.txt").exists()
                  or (p.name.isdigit() and (p / "params").is_dir()))


def _assert_latest_restorable(run_dir: Path) -> None:
    """The newest complete checkpoint left behind by a fault loads (export/diagnose path)."""
    if not _complete_steps(run_dir):
        return
    from bshadow_jax.models import load_pretrained

    cfg, params = load_pretrained(run_dir)
    emb = params["model"]["embed_tokens"]["weight"]
    assert emb.shape == (TINY["model"]["vocab_size"], TINY["model"]["hidden_size"])
    assert np.isfinite(emb).all()


def _assert_same_as_reference(run_dir: Path, reference: dict) -> None:
    assert _rows(run_dir) == reference["rows"]
    final = _final(run_dir)
    assert sorted(final) == sorted(reference["params"])
    for k, v in reference["params"].items():
        np.testing.assert_array_equal(final[k], v, err_msg=k)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Runner:
    return Runner(tmp_path_factory.mktemp("reliability_train"))


@pytest.fixture(scope="module")
def reference(runner) -> dict:
    run_dir = runner.root / "reference"
    proc = subprocess.Popen(runner.cmd(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            cwd=runner.root)
    assert proc.stdout.readline().strip() == "started"
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=600)
    seconds = time.monotonic() - t0  # from imports done to exit: the window random kills aim at
    assert proc.returncode == 0, err[-4000:]
    return {"rows": _rows(run_dir), "params": _final(run_dir), "dir": run_dir, "seconds": seconds}


_STASH: dict[str, subprocess.CompletedProcess] = {}


def _chain(runner: Runner, run_dir: Path, faults: list[str], log: list) -> None:
    for fault in faults:
        r = runner.run(run_dir, fault)
        if fault.startswith("fsize"):
            _STASH["disk_full"] = r
            assert len(_error_lines(r.stderr)) == 1 and "File too large" in r.stderr, r.stderr[-3000:]
        want = 2 if fault.startswith("fsize") else -signal.SIGKILL
        log.append((fault, r.returncode, _complete_steps(run_dir)))
        assert r.returncode == want, (fault, r.returncode, r.stderr[-4000:])
        _assert_latest_restorable(run_dir)
    r = runner.run(run_dir)
    assert r.returncode == 0, r.stderr[-4000:]


def test_kill_and_disk_full_chain_matches_uninterrupted(runner, reference):
    """Default-suite chain: kill after a committed save, full disk during the next save, kill while a
    save is in flight; resume each time; end bit-identical. (More kill points: -m slow.)"""
    run_dir = runner.root / "chain_short"
    log: list = []
    _chain(runner, run_dir, ["after_save:2", "fsize:3000", "during_save:4"], log)
    print(log)
    assert log[0][2] == [2] and log[1][2] == [2]  # the full disk destroyed nothing
    full = _STASH["disk_full"]  # the full-disk run itself: one clear line, no traceback
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert "resume" in _error_lines(full.stderr)[0]  # says the previous checkpoint is kept and how to go on
    _assert_same_as_reference(run_dir, reference)


@pytest.mark.slow
def test_kill_campaign_matches_uninterrupted(runner, reference):
    """Nine deterministic kill points (every phase around each checkpoint), plus a torn metrics line."""
    run_dir = runner.root / "chain_long"
    log: list = []
    faults = ["before_save:2", "during_save:2", "after_step:1", "after_step:3", "before_save:4",
              "during_save:4", "after_save:4", "after_step:5", "during_save:6"]
    _chain(runner, run_dir, faults[:5], log)  # runs to the end once ...
    import shutil

    shutil.rmtree(run_dir)
    _chain(runner, run_dir, faults, log)
    # a torn last line (killed mid-write) must be ignored on resume
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    r = runner.run(run_dir)
    assert r.returncode == 0, r.stderr[-4000:]
    print(log)
    _assert_same_as_reference(run_dir, reference)


def _rows_logged(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0


def _kill_at(runner: Runner, run_dir: Path, rows: int, extra: float) -> tuple:
    """Start a run; once metrics.jsonl holds `rows` rows (0: right after imports), wait `extra` s and SIGKILL it.

    Progress-triggered rather than clock-triggered, so the kills spread over compile, steps and the async
    saves whatever the machine's speed. Returns (rows, extra, killed?, complete checkpoints after).
    """
    proc = subprocess.Popen(runner.cmd(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=runner.root)
    proc.stdout.readline()  # "started": imports done
    while proc.poll() is None and _rows_logged(run_dir) < rows:
        time.sleep(0.005)
    time.sleep(extra)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return rows, round(extra, 3), killed, _complete_steps(run_dir)


@pytest.mark.slow
def test_random_time_kills_match_uninterrupted(runner, reference):
    """Independent trials: SIGKILL a fresh run at a random moment (a random step count logged, then a random
    delay up to 1 s: compile, steps, async saves), SIGKILL its resume the same way, then resume to the end."""
    rng = random.Random(1234)
    steps = TINY["train"]["steps"]
    trials = []
    for trial in range(6):
        run_dir = runner.root / f"random_{trial}"
        first = _kill_at(runner, run_dir, rng.randint(0, steps - 1), rng.uniform(0.0, 1.0))
        _assert_latest_restorable(run_dir)
        second = _kill_at(runner, run_dir, rng.randint(first[0], steps - 1), rng.uniform(0.0, 1.0))
        _assert_latest_restorable(run_dir)
        r = runner.run(run_dir)
        assert r.returncode == 0, r.stderr[-4000:]
        _assert_same_as_reference(run_dir, reference)
        trials.append((first, second))
    print("random kills (rows logged, extra s, killed, complete checkpoints after):", trials)
    assert sum(t[0][2] + t[1][2] for t in trials) >= 6, trials  # most kills must land in a live run


@pytest.fixture(scope="module")
def unwritable(runner) -> subprocess.CompletedProcess:
    run_dir = runner.root / "unwritable"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a folder")
    return runner.run(run_dir)


def test_unwritable_checkpoint_folder(runner, unwritable):
    """`checkpoints` is a file: a real failure even as root. Exit 2, one error line naming it."""
    r = unwritable
    assert r.returncode == 2, r.stderr[-4000:]
    errs = _error_lines(r.stderr)
    assert len(errs) == 1 and "checkpoints" in errs[0], r.stderr[-4000:]
    assert (runner.root / "unwritable" / "checkpoints").read_text() == "not a folder"


def test_unwritable_checkpoint_folder_prints_no_traceback(unwritable):
    assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr, unwritable.stderr[-2000:]


def test_nan_loss_stops_keeps_last_good_checkpoint(runner, reference):
    """A NaN loss at step 3: exit 2 with one line that says how to resume; checkpoint 2 kept intact; a
    resumed run (the transient fault gone) ends exactly like the uninterrupted one."""
    run_dir = runner.root / "nan"
    r = runner.run(run_dir, "nan_batch:3")
    assert r.returncode == 2, r.stderr[-4000:]
    errs = _error_lines(r.stderr)
    assert len(errs) == 1, r.stderr[-4000:]
    msg = errs[0].lower()
    assert "nan" in msg and "step 3" in msg
    assert "resume" in msg and "optim." in msg  # says how to resume with changed settings
    assert _complete_steps(run_dir) == [2]
    _assert_latest_restorable(run_dir)
    assert all(np.isfinite(r_["loss"]) for r_ in _rows(run_dir))  # the NaN step was not logged as good
    r = runner.run(run_dir)
    assert r.returncode == 0, r.stderr[-4000:]
    _assert_same_as_reference(run_dir, reference)


@pytest.mark.slow
def test_diverging_lr_stops_with_finite_checkpoint(runner):
    """lr=1e30 diverges: the run stops at the first non-finite loss and what it kept is finite."""
    run_dir = runner.root / "diverge"
    r = runner.run(run_dir, "none", "optim.lr=1e30", "train.checkpoint_every=1")
    assert r.returncode == 2 and len(_error_lines(r.stderr)) == 1, r.stderr[-4000:]
    _assert_latest_restorable(run_dir)
