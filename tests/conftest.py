"""Test-session setup.

Eight simulated CPU devices, set before jax is imported anywhere (MaxText habit), so that
sharded code paths run in-process. Code that wants one device asks for a 1-device mesh.
"""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def write_orbax_run():
    """write(root, model: dict, trees: {step: params}) -> root: a run folder as `bshadow train` lays it out
    (config.yaml + checkpoints/<step>/params), written with orbax directly."""

    def write(root, model: dict, trees: dict):
        import orbax.checkpoint as ocp
        import yaml

        root.mkdir(parents=True, exist_ok=True)
        (root / "config.yaml").write_text(yaml.safe_dump({"model": model}))
        ckpt = ocp.StandardCheckpointer()
        for step, params in trees.items():
            ckpt.save((root / "checkpoints" / str(step) / "params").absolute(), params)
        ckpt.wait_until_finished()
        return root

    return write
