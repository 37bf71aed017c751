"""Thin script over the library: the same as `bshadow experiment cross-family CONFIG --out DIR [key=value ...]`.

    python experiments/cross_family.py                                   # configs/cross_family.yaml -> runs/cross_family
    python experiments/cross_family.py configs/cross_family.yaml --out runs/cross_family [key=value ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    from bshadow_jax.cli import main as cli_main

    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        argv = [str(ROOT / "configs" / "cross_family.yaml"), *argv]
    if "--out" not in argv:
        argv = [*argv, "--out", str(ROOT / "runs" / "cross_family")]
    return cli_main(["experiment", "cross-family", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
