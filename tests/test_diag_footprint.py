"""Name-parsing table (diagnostics/names.py), --rename pairing and footprint statistics (no jax needed)."""
import math

import numpy as np
import pytest

from bshadow_jax.diagnostics import footprint, names
from bshadow_jax.diagnostics.names import NameRule, parse_name
from bshadow_jax.errors import UserError

CASES = [
    # llama / mistral / qwen2 / gemma
    ("model.layers.3.self_attn.q_proj.weight", "language_model", 3, "q_proj", None),
    ("model.layers.11.mlp.down_proj.weight", "language_model", 11, "down_proj", None),
    ("model.layers.0.self_attn.k_proj.bias", "language_model", 0, "k_proj", None),
    ("model.embed_tokens.weight", "language_model", None, "embed", None),
    ("lm_head.weight", "language_model", None, "lm_head", None),
    ("model.norm.weight", "language_model", None, "model.norm.weight", None),
    # GPT-2 fused tensors, analysed as stored
    ("transformer.h.5.attn.c_attn.weight", "language_model", 5, "c_attn", None),
    ("transformer.h.5.mlp.c_fc.weight", "language_model", 5, "c_fc", None),
    ("transformer.wte.weight", "language_model", None, "embed", None),
    ("model.layers.2.self_attn.qkv_proj.weight", "language_model", 2, "qkv_proj", None),
    ("model.layers.2.mlp.gate_up_proj.weight", "language_model", 2, "gate_up_proj", None),
    # MoE
    ("model.layers.4.mlp.experts.7.gate_proj.weight", "language_model", 4, "gate_proj", 7),
    ("model.layers.4.block_sparse_moe.experts.12.w1.weight", "language_model", 4, "w1", 12),
    ("model.layers.4.mlp.experts.gate_up_proj", "language_model", 4, "gate_up_proj", None),
    ("model.layers.4.mlp.gate.weight", "language_model", 4, "gate", None),
    # LLaVA
    ("vision_tower.vision_model.encoder.layers.3.self_attn.q_proj.weight", "vision", 3, "q_proj", None),
    ("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "vision", 0, "fc1", None),
    ("multi_modal_projector.linear_1.weight", "projector", None, "multi_modal_projector.linear_1.weight", None),
    ("model.language_model.layers.3.mlp.up_proj.weight", "language_model", 3, "up_proj", None),
    ("model.mm_projector.0.weight", "projector", None, "model.mm_projector.0.weight", None),
    # Qwen-VL
    ("visual.blocks.2.attn.qkv.weight", "vision", 2, "qkv", None),
    ("model.visual.blocks.2.mlp.fc2.weight", "vision", 2, "fc2", None),
    ("visual.merger.mlp.0.weight", "projector", None, "visual.merger.mlp.0.weight", None),
    # unknown: full name as module, no layer
    ("some.random.tensor", "language_model", None, "some.random.tensor", None),
]


@pytest.mark.parametrize("name,component,layer,module,expert", CASES)
def test_parse_name_table(name, component, layer, module, expert):
    assert parse_name(name) == {"component": component, "layer": layer, "module": module, "expert": expert}


def test_user_rule_extends_table():
    rule = names.register_name_rule(r"(?:^|\.)encoder\.block\.(?P<layer>\d+)\.(?P<module>\w+)\.weight$")
    try:
        assert parse_name("encoder.block.4.attention.weight")["layer"] == 4
        assert parse_name("encoder.block.4.attention.weight")["module"] == "attention"
    finally:
        names.NAME_RULES.remove(rule)
    assert parse_name("encoder.block.4.attention.weight")["layer"] is None
    r2 = NameRule(r"(?:^|\.)wpe(?:\.|$)", module="pos_embed")
    names.NAME_RULES.insert(0, r2)
    try:
        assert parse_name("transformer.wpe.weight")["module"] == "pos_embed"
    finally:
        names.NAME_RULES.remove(r2)


def test_rename_rules():
    rules = names.parse_rename(["model.language_model.=model."])
    assert names.apply_rename("model.language_model.layers.3.mlp.up_proj.weight", rules) == \
        "model.layers.3.mlp.up_proj.weight"
    assert names.apply_rename("model.vision_tower.x", rules) == "model.vision_tower.x"
    with pytest.raises(UserError):
        names.parse_rename(["nonsense"])
    with pytest.raises(UserError):
        names.compile_filter("([", "--include")


def _ref_gini(x):
    x = np.asarray(x, float)
    n = len(x)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * n * n * x.mean())


def test_footprint_stats_reference():
    rng = np.random.default_rng(0)
    e = rng.gamma(0.5, size=37)
    s = e / e.sum()
    st = footprint.footprint_stats(s)
    assert st["entropy"] == pytest.approx(-np.sum(s * np.log(s)) / math.log(37), rel=1e-12)
    assert st["gini"] == pytest.approx(_ref_gini(s), rel=1e-9)
    srt = np.sort(s)[::-1]
    r = next(i + 1 for i in range(37) if srt[: i + 1].sum() >= 0.9)
    assert st["matrices_for_90pct"] == pytest.approx(r / 37)


def test_footprint_extremes():
    st = footprint.footprint_stats([1.0, 0, 0, 0])
    assert st["entropy"] == 0.0 and st["matrices_for_90pct"] == 0.25
    assert st["gini"] == pytest.approx(0.75)
    st = footprint.footprint_stats([0.25] * 4)
    assert st["entropy"] == pytest.approx(1.0) and st["gini"] == pytest.approx(0.0)
    assert st["matrices_for_90pct"] == 1.0
    assert footprint.footprint_stats([0.0, 0.0])["entropy"] == 0.0


def test_group_means():
    rows = [
        {"layer": 0, "module": "q", "energy_share": 0.2, "m": 1.0},
        {"layer": 0, "module": "k", "energy_share": 0.3, "m": 3.0},
        {"layer": None, "module": "embed", "energy_share": 0.5, "m": 5.0},
    ]
    g = footprint.group_means(rows, "layer", ["m"])
    assert g["0"] == {"matrices": 2, "energy_share": 0.5, "m": 2.0}
    assert g["none"]["m"] == 5.0
