"""`bshadow train` config errors: exit 2 with one `error:` line, before jax compiles anything."""
from __future__ import annotations

import jax
import pytest
import yaml
from testkit import tiny_model_config

from bshadow_jax import cli
# imported up front: module-level @jax.jit decorators are not compiles
from bshadow_jax import models  # noqa: F401
from bshadow_jax.data import pipeline, tokenizer  # noqa: F401
from bshadow_jax.training import loop  # noqa: F401
from bshadow_jax.errors import ConfigError
from bshadow_jax.training.config import load_train_config, train_config_from_dict

TINY = {
    "model": tiny_model_config(num_hidden_layers=1, without=("max_position_embeddings",)),
    "train": {"steps": 2, "batch_size": 8, "seq_len": 16},
}


@pytest.fixture
def no_compile(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("compiled before the config error")
    monkeypatch.setattr(jax, "jit", refuse)
    monkeypatch.setattr(jax, "eval_shape", refuse)


@pytest.mark.parametrize("overrides,needle", [
    (["train.bogus=1"], "unknown key 'bogus'"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["train.steps=abc"], "train.steps: expected an integer"),
    (["train.steps=0"], "train.steps: must be >= 1"),
    (["optim.name=adam2"], "optim.name"),
    (["optim.lr=-1"], "optim.lr"),
    (["train.compute_dtype=float16"], "train.compute_dtype"),
    (["model.num_key_value_heads=3"], "model."),
    (["train.batch_size=6", "train.grad_accum=4"], "grad_accum"),
    (["mesh.data=16"], "exceeds the 8 available devices"),
    (["mesh.data=4", "mesh.fsdp=4"], "exceeds"),
    (["mesh.data=-1"], "mesh"),
    (["mesh.data=3", "train.batch_size=8"], "not divisible by mesh.data*mesh.fsdp"),
])
def test_bad_config_exits_2_before_compiling(tmp_path, capsys, no_compile, overrides, needle):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    rc = cli.main(["train", str(path), "--out", str(tmp_path / "run"), *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error:") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_overrides_every_config_understands(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    cfg = load_train_config(path, ["seed=7", "train.steps=9", "train.log_every=3", "train.checkpoint_every=4",
                                   "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    assert (cfg.seed, cfg.train.steps, cfg.train.log_every, cfg.train.checkpoint_every) == (7, 9, 3, 4)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (2, 2, 2)


def test_vocab_size_zero_comes_from_tokenizer():
    cfg = train_config_from_dict({**TINY, "model": {**TINY["model"], "vocab_size": 0}})
    assert cfg.llama_config(1234).vocab_size == 1234
    with pytest.raises(ConfigError, match="vocab_size"):
        cfg.llama_config()
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train_config_from_dict({**TINY, "model": {**TINY["model"], "vocab_size": -5}})


def test_smoke_config_validates():
    from pathlib import Path

    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
    assert cfg.model["vocab_size"] == 0 and cfg.train.steps > 0
