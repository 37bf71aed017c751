"""DataConfig: `data: {}` works, bad values are one-line ConfigErrors."""
import pytest

from bshadow_jax.config import from_dict
from bshadow_jax.data.config import DataConfig
from bshadow_jax.errors import ConfigError


def test_empty_section_gives_mixed_default():
    cfg = from_dict(DataConfig, {})
    assert cfg.arm == "coverage_expanding" and 0 < cfg.text_share < 1 and cfg.vocab_size <= 2048


@pytest.mark.parametrize("bad, match", [
    ({"stages": [{"start_step": 0, "weights": {"nope": 1}}]}, "unknown stream 'nope'"),
    ({"stages": [{"start_step": 5, "weights": {"text": 1}}]}, "first must be 0"),
    ({"arm": "custom", "sources": {"x": 1}}, "unknown stream 'x'"),
    ({"arm": "custom"}, "data.sources"),
    ({"benchmark_skills": ["juggling"]}, "unknown skill"),
    ({"benchmark_format": "haiku"}, "benchmark_format"),
    ({"alpha": 1.5}, "alpha"),
    ({"arm": "hf"}, "data.hf"),
    ({"repeat_k": 0}, "repeat_k"),
    ({"colour": "red"}, "unknown key"),
])
def test_bad_values_are_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(DataConfig, bad, "data")
