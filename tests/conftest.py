"""Test-session setup.

Eight simulated CPU devices, set before jax is imported anywhere (MaxText habit), so that
sharded code paths run in-process. Code that wants one device asks for a 1-device mesh.

Hypothesis profiles (registered here, chosen by $BSHADOW_HYPOTHESIS_PROFILE):
  default  the normal suite: each property runs the max_examples its fuzz_settings(...) names;
  long     a long campaign: the same properties, testkit.LONG_FACTOR (15) x as many examples,
           fresh random seeds, no example database. Select the hypothesis tests by their marker:

    BSHADOW_HYPOTHESIS_PROFILE=long pytest -m hypothesis tests/test_reliability_readers.py
    BSHADOW_HYPOTHESIS_PROFILE=long pytest -m "hypothesis or slow" tests/test_reliability_*.py  # + the slow tests

(`-m` on the command line replaces the `-m 'not slow'` of pyproject's addopts.) Use the
variable, not --hypothesis-profile: fuzz_settings reads it when the test modules are imported.
"""
import os

import pytest
from hypothesis import settings

from bshadow_jax.allocator import tune_glibc_malloc
from testkit import FigureRecorder, hypothesis_profile

tune_glibc_malloc()  # as the CLI does, before jax starts its threads: the suite's train steps fault far less

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

settings.register_profile("default", deadline=None)
settings.register_profile("long", deadline=None, derandomize=False, database=None)
settings.load_profile(hypothesis_profile())


def pytest_configure(config):
    chosen = config.getoption("hypothesis_profile", None)
    if chosen is not None and chosen != hypothesis_profile():
        raise pytest.UsageError(f"use BSHADOW_HYPOTHESIS_PROFILE={chosen} instead of --hypothesis-profile "
                                "(tests/conftest.py)")


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


@pytest.fixture
def saved_figures():
    """A testkit.FigureRecorder over the test: .figure_for(png_path) -> (Figure, savefig kwargs)."""
    with FigureRecorder() as rec:
        yield rec
