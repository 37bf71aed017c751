"""`bshadow export`. Light at import."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face folder (config.json, safetensors, tokenizer)",
        description=(
            "Export any checkpoint bshadow can read (a bshadow run folder, an orbax step folder, "
            "a Hugging Face folder, a .safetensors or .gguf file) to a Hugging Face folder that "
            "transformers' AutoModelForCausalLM loads."
        ),
    )
    p.add_argument("ckpt", help="checkpoint to export")
    p.add_argument("--out", required=True, help="Hugging Face folder to write (replaced atomically)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from bshadow_jax import models

    cfg, params = models.load_pretrained(args.ckpt)
    models.save_pretrained(cfg, params, args.out, source=args.ckpt)
    return 0
