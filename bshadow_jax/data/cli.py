"""`bshadow data audit`. Light at import."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="inspect training data mixtures")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=type(p))
    dsub.required = True
    a = dsub.add_parser(
        "audit",
        help="how benchmark-aligned is a mixture: format shares, skill-coverage entropy, n-gram overlap with evals",
    )
    a.add_argument("config", help="training or study config whose data mixture to audit")
    a.add_argument("--out", help="also write audit.json here")
    a.add_argument("--items", type=int, default=2000, help="items to sample per stream (default 2000)")
    a.add_argument("overrides", nargs="*", metavar="key=value")
    a.set_defaults(handler=_run_audit)


def _run_audit(args: argparse.Namespace) -> int:
    from bshadow_jax.data.audit import audit_cli

    return audit_cli(args)
