"""`bshadow experiment ...`. Light at import."""
from __future__ import annotations

import argparse

from bshadow_jax import distributed

# name: (what it is, module with run_cli, a shipped config, what --out holds)
_STUDIES = {
    "regimes": ("the controlled intervention study: bases x data arms x seeds, narrow vs broad with per-item records, "
                "footprints, a seed noise floor, claims tested with power (the main job)",
                "bshadow_jax.studies.regimes", "configs/regimes_cpu.yaml",
                "study folder (results.json, items.csv, passages.csv, report.md, figures, one folder per arm/base/seed)"),
    "repetition": ("prompt-repetition case study: same recipe with and without repeated prompts and deduplication",
                   "bshadow_jax.studies.repetition", "configs/repetition_cpu.yaml",
                   "study folder (results.json, items.csv, passages.csv, report.md, figures, one folder per arm/base/seed)"),
    "cross-family": ("diagnose a list of released base/tuned pairs and compare their footprints",
                     "bshadow_jax.studies.cross_family", "configs/cross_family.yaml",
                     "study folder (comparison.csv/.json, report.md, figures, pairs/NAME/ with each pair's diagnose output)"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="run one of the paper's studies")
    esub = p.add_subparsers(dest="study", metavar="STUDY", parser_class=type(p))
    esub.required = True
    for name, (help_text, module, example, out_help) in _STUDIES.items():
        e = esub.add_parser(name, help=help_text, description=help_text)
        e.add_argument("config", help=f"study config, e.g. {example}")
        e.add_argument("--out", required=True, help=out_help)
        e.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        if name in _REHEARSABLE:
            e.add_argument("--rehearse", action="store_true",
                           help="run this config as written at toy size on this machine, offline: every hub model, "
                                "tokenizer, dataset and lm-eval task is replaced by a local stand-in in the same "
                                "format (named in the report); tests an accelerator config before it is launched")
        distributed.add_args(e)
        e.set_defaults(handler=_make_handler(module, rehearsable=name in _REHEARSABLE))


_REHEARSABLE = ("regimes", "repetition")


def _make_handler(module: str, *, rehearsable: bool):
    def handler(args: argparse.Namespace) -> int:
        import importlib

        kw = {"rehearse": args.rehearse} if rehearsable else {}
        return distributed.run(args, lambda: importlib.import_module(module).run_cli(args.config, args.out,
                                                                                     args.overrides, **kw))

    return handler
