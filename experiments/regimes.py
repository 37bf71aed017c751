"""Thin script over the library: the same as `bshadow experiment regimes CONFIG --out DIR [key=value ...]`.

    python experiments/regimes.py                                   # configs/regimes_cpu.yaml -> runs/regimes
    python experiments/regimes.py configs/regimes_cpu.yaml --out runs/regimes [key=value ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    from bshadow_jax.cli import main as cli_main

    if not argv or argv[0].startswith("-") or "=" in argv[0]:
        argv = [str(ROOT / "configs" / "regimes_cpu.yaml"), *argv]
    if "--out" not in argv:
        argv = [*argv, "--out", str(ROOT / "runs" / "regimes")]
    return cli_main(["experiment", "regimes", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
