"""Helpers shared by the test modules (not a test module). Fixtures live in conftest.py.

  * fuzz_settings: hypothesis settings for one property, under the profile conftest.py loads;
  * tiny_model_config: the tiny Llama model section the training tests use.
"""
from __future__ import annotations

import os

from hypothesis import settings

# Which hypothesis profile conftest.py loads: "default" (the normal suite) or "long" (a long campaign).
HYPOTHESIS_PROFILE_ENV = "BSHADOW_HYPOTHESIS_PROFILE"
# Under the long profile each property runs this many times its default number of examples.
LONG_FACTOR = 15


def hypothesis_profile() -> str:
    return os.environ.get(HYPOTHESIS_PROFILE_ENV, "default")


def fuzz_settings(max_examples: int, *, derandomize: bool = False, **kwargs) -> settings:
    """Settings for one property test.

    Default profile: `max_examples` cases, derandomized if asked (so the suite repeats exactly).
    Long profile: LONG_FACTOR x `max_examples` cases from fresh random seeds, no example database
    (the profile's derandomize=False, database=None). Other kwargs (phases, suppress_health_check)
    apply under both. deadline=None comes from the profiles.
    """
    if hypothesis_profile() == "long":
        return settings(max_examples=max_examples * LONG_FACTOR, **kwargs)
    return settings(max_examples=max_examples, derandomize=derandomize, **kwargs)


# The tiny model section of the training tests' configs (bshadow_jax.models.LlamaConfig fields).
TINY_MODEL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_model_config(*, without: tuple[str, ...] = (), **overrides) -> dict:
    """A fresh copy of TINY_MODEL with `overrides` applied and the keys in `without` left out
    (so that the library default applies), e.g. tiny_model_config(vocab_size=61, num_hidden_layers=1)."""
    if set(without) - set(TINY_MODEL):
        raise KeyError(f"not a TINY_MODEL key: {sorted(set(without) - set(TINY_MODEL))}")
    model = {k: v for k, v in TINY_MODEL.items() if k not in without}
    model.update(overrides)
    return model

