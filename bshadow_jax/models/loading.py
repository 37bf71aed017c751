"""`load_pretrained`: one entry point for every checkpoint kind bshadow reads."""
from __future__ import annotations

import os
from pathlib import Path

from bshadow_jax.errors import UserError, refuse_pickle
from bshadow_jax.models.hf import SAFETENSORS_FILE, SAFETENSORS_INDEX, load_hf, looks_like_hub_id
from bshadow_jax.models.llama import LlamaConfig


def _is_hf_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and (
        (p / SAFETENSORS_INDEX).is_file() or (p / SAFETENSORS_FILE).is_file() or any(p.glob("*.safetensors"))
    )


def load_pretrained(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """(cfg, float32 numpy param tree) from an HF folder, a .safetensors or .gguf file, a bshadow
    run folder or orbax step folder, or a Hugging Face Hub id ("org/name", safetensors only).

    Pickle-based files are refused; anything unreadable raises UserError naming the file.
    """
    name = os.fspath(path)
    refuse_pickle(name)
    p = Path(name)
    if not p.exists():
        if looks_like_hub_id(name):
            return load_hf(name)
        raise UserError(f"{p}: no such file or folder")
    if p.is_file():
        if p.stat().st_size == 0:
            raise UserError(f"{p}: file is empty")
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            from bshadow_jax.models.gguf import load_gguf

            return load_gguf(p)
        if suffix == ".safetensors":
            return load_hf(p)
        raise UserError(f"{p}: unsupported checkpoint file type {suffix or '(no suffix)'} "
                        "(expected .safetensors, .gguf, or a folder)")
    if _is_hf_folder(p):
        return load_hf(p)
    if not (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        raise UserError(f"{p / 'config.json'}: missing; a Hugging Face folder needs it beside the safetensors")
    if (p / "config.json").is_file():
        pickles = sorted(f for f in p.iterdir() if f.name.lower().endswith((".bin", ".pt", ".pth", ".ckpt")))
        if pickles:
            refuse_pickle(pickles[0])
    try:
        from bshadow_jax.training.checkpoint import load_run_params
    except ImportError:
        raise UserError(f"{p}: not a Hugging Face folder (config.json + safetensors) and run folders "
                        "cannot be read in this install") from None
    return load_run_params(p)
