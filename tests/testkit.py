"""Helpers shared by the test modules (not a test module). Fixtures live in conftest.py.

  * fuzz_settings: hypothesis settings for one property, under the profile conftest.py loads.
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

