"""Thin script over the library: the same as `bshadow experiment repetition CONFIG --out DIR [key=value ...]`.

    python experiments/repetition.py                                   # configs/repetition_cpu.yaml -> runs/repetition
    python experiments/repetition.py configs/repetition_cpu.yaml --out runs/repetition [key=value ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    from bshadow_jax.cli import main as cli_main

    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        argv = [str(ROOT / "configs" / "repetition_cpu.yaml"), *argv]
    if "--out" not in argv:
        argv = [*argv, "--out", str(ROOT / "runs" / "repetition")]
    return cli_main(["experiment", "repetition", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
