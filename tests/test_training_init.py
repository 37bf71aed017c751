"""`bshadow train CONFIG --out DIR init=CKPT`: fine-tune any checkpoint; the model section and the
tokenizer come from it, a resumed run reads only its own checkpoint, and mistakes are one error line."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from bshadow_jax.cli import main
from bshadow_jax.config import to_dict
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.tokenizer import get_tokenizer
from bshadow_jax.models import LlamaConfig, flatten_params, init_params, load_pretrained, save_pretrained
from reliability_helpers import assert_cli_user_error

ROOT = Path(__file__).resolve().parents[1]
FT = str(ROOT / "configs" / "finetune.yaml")
FAST = ["train.steps=2", "train.batch_size=8", "train.seq_len=32", "train.log_every=1", "train.checkpoint_every=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small HF checkpoint with its own tokenizer (the project's BPE at vocab 320, saved beside it)."""
    tok = get_tokenizer(DataConfig(vocab_size=320, text_source="procedural"))
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(7)))
    folder = save_pretrained(cfg, params, tmp_path_factory.mktemp("hf") / "pretrained", tokenizer=tok)
    return folder, cfg, params


def test_finetune_starts_from_the_checkpoint_with_its_tokenizer(pretrained, tmp_path, capsys):
    folder, cfg, params = pretrained
    run = tmp_path / "ft"
    # a learning rate this small leaves the weights where they started: a random init would not be
    assert main(["train", FT, "--out", str(run), f"init={folder}", "optim.lr=1e-20", *FAST]) == 0, capsys.readouterr().err
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["init"] == str(folder) and resolved["model"] == to_dict(cfg)
    assert (run / "tokenizer" / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()
    got_cfg, got = load_pretrained(run)
    assert got_cfg == cfg
    ref = flatten_params(params)
    for name, w in flatten_params(got).items():
        np.testing.assert_allclose(w, ref[name], rtol=0, atol=1e-6, err_msg=name)
    # resuming reads the run's own checkpoint, not the init checkpoint (which may be gone by then)
    moved = tmp_path / "moved"
    folder.rename(moved)
    try:
        assert main(["train", FT, "--out", str(run), f"init={folder}", "optim.lr=1e-20", *FAST[1:],
                     "train.steps=3"]) == 0, capsys.readouterr().err
    finally:
        moved.rename(folder)


def test_finetune_config_mistakes_are_one_error_line(pretrained, tmp_path, capsys):
    folder, _, _ = pretrained
    cases = [
        [],                                                          # no init and no model section
        [f"init={folder}", "model.hidden_size=48", "model.num_hidden_layers=1", "model.intermediate_size=64",
         "model.num_attention_heads=2", "model.num_key_value_heads=1"],   # a model section that differs
        [f"init={tmp_path / 'missing'}"],                            # no such checkpoint
        [f"init={folder}", "train.seq_len=128"],                     # longer than the checkpoint's context
    ]
    for extra in cases:
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        rc = main(["train", FT, "--out", str(out), *FAST, *extra])
        captured = capsys.readouterr()
        assert_cli_user_error(rc, captured.err, out)


def test_a_run_without_a_terminal_logs_one_line_every_log_every_steps(tmp_path):
    """stderr is a file here (no terminal): one progress line per logged step, and no bar."""
    import subprocess
    import sys

    out = tmp_path / "smoke"
    run = subprocess.run([sys.executable, "-m", "bshadow_jax", "train", str(ROOT / "configs" / "smoke.yaml"), "--out",
                          str(out), "train.steps=6", "train.log_every=2", "train.checkpoint_every=6",
                          "train.batch_size=8", "train.seq_len=32"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("[train ")]
    assert [ln.split()[3] for ln in lines] == ["2/6", "4/6", "6/6"], run.stderr
    assert all(" loss " in ln and "tok/s" in ln for ln in lines) and "\r" not in run.stderr
