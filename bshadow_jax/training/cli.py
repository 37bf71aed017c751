"""`bshadow train`. Light at import: the training machinery loads in the handler."""
from __future__ import annotations

import argparse

from bshadow_jax import distributed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config (resumes if DIR already holds a run)",
        description=(
            "Train a Llama-family model from a YAML config. Re-running the same command on the "
            "same --out resumes from the latest checkpoint. Overrides are dotted key=value pairs, "
            "e.g. train.steps=200 mesh.data=4 mesh.fsdp=2 seed=1."
        ),
    )
    p.add_argument("config", help="YAML config file, e.g. configs/smoke.yaml")
    p.add_argument("--out", required=True, help="run folder: checkpoints/, metrics.jsonl, config.yaml, TensorBoard events")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    distributed.add_args(p)
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    def go() -> int:
        from bshadow_jax.training.loop import train_from_cli

        return train_from_cli(args.config, args.out, args.overrides)

    return distributed.run(args, go)
