"""Sharded training on 8 simulated CPU devices equals the one-device run (float tolerance)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from testkit import tiny_model_config

from bshadow_jax.errors import ConfigError
from bshadow_jax.training.config import MeshSection, train_config_from_dict
from bshadow_jax.training.loop import train
from bshadow_jax.training.mesh import make_mesh, spec_for
from bshadow_jax.data.synthetic import make_synthetic_dataset

V, T = 64, 16
BASE = {
    "seed": 3,
    "model": tiny_model_config(vocab_size=V),
    "train": {"steps": 3, "batch_size": 8, "seq_len": T, "log_every": 1, "checkpoint_every": 3},
    "optim": {"lr": 1e-2, "warmup_steps": 1},
}


def _run(tmp_path, name, data, fsdp, tensor):
    cfg = train_config_from_dict({**BASE, "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor}})
    ds = lambda b: make_synthetic_dataset(vocab_size=V, seq_len=T, batch_size=b, seed=5)  # noqa: E731
    return train(cfg, tmp_path / name, dataset=ds)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    assert jax.device_count() == 8, "conftest sets 8 simulated devices"
    return _run(tmp_path_factory.mktemp("mesh"), "d1", 1, 1, 1)


@pytest.mark.parametrize("data,fsdp,tensor", [(4, 2, 1), (2, 2, 2)])
def test_sharded_losses_match_one_device(tmp_path, one_device, data, fsdp, tensor):
    sharded = _run(tmp_path, f"d{data}f{fsdp}t{tensor}", data, fsdp, tensor)
    ref = [m["loss"] for m in one_device.metrics]
    got = [m["loss"] for m in sharded.metrics]
    assert len(ref) == len(got) == 3 and ref[-1] < ref[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one_device.params), jax.tree.leaves(sharded.params)):
        # params: Adam steps are ~lr*sign(g), so tiny gradients amplify reduction-order rounding
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
    # the diagnostics read a checkpoint saved across the mesh one tensor at a time, whole
    from bshadow_jax.models import flatten_params
    from bshadow_jax.formats.sources import open_checkpoint

    final = {k: np.asarray(v) for k, v in flatten_params(sharded.params).items()}
    with open_checkpoint(sharded.out_dir) as src:
        assert sorted(src.names()) == sorted(final)
        for name, want in final.items():
            np.testing.assert_array_equal(src.read(name), want)


def test_mesh_uses_first_devices_and_refuses_too_many():
    mesh = make_mesh(MeshSection(data=2, fsdp=1, tensor=1))
    assert mesh.devices.size == 2 and list(mesh.devices.flat) == jax.devices()[:2]
    assert make_mesh(MeshSection()).shape["data"] == 8
    assert make_mesh(MeshSection(fsdp=2)).shape == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ConfigError, match="exceeds the 8 available devices"):
        make_mesh(MeshSection(data=4, fsdp=4))
    with pytest.raises(ConfigError, match="not divisible"):
        make_mesh(MeshSection(data=4, fsdp=2), batch_size=12)


def test_sharding_rules_by_name():
    mesh = make_mesh(MeshSection(data=2, fsdp=2, tensor=2))
    assert spec_for("model.layers.0.self_attn.q_proj.weight", (64, 32), mesh) == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert spec_for("model.layers.3.mlp.down_proj.weight", (32, 64), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert spec_for("model.norm.weight", (32,), mesh) == jax.sharding.PartitionSpec()
    # optimizer state leaves carry the parameter path; an odd dimension falls back to replication
    assert spec_for("opt_state.0.mu.lm_head.weight", (61, 32), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
    assert spec_for("opt_state.0.mu.model.embed_tokens.weight", (64, 32), mesh) == jax.sharding.PartitionSpec("tensor", None)
