"""`bshadow diagnose` and `bshadow spectrum`. Light at import."""
from __future__ import annotations

import argparse

from bshadow_jax import distributed


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "diagnose",
        help="spectral footprint of the fine-tuning delta between two checkpoints",
        description=(
            "Compare TUNED against BASE tensor by tensor (dW = W_tuned - W_base) and write "
            "metrics.csv (one row per matrix), vectors.csv (one row per 1-D tensor), summary.json "
            "(footprint, groups, skipped), "
            "report.md and PNG figures to --out. Checkpoints may be Hugging Face folders, "
            ".safetensors or .gguf files, bshadow run folders, or any orbax checkpoint (a step folder, "
            "or a CheckpointManager folder: its latest finished step) written by any JAX stack."
        ),
    )
    d.add_argument("base", help="base checkpoint")
    d.add_argument("tuned", nargs="+", help="tuned checkpoint(s); with several, the base is read and decomposed once, "
                                          "each pair goes to OUT/<label>/ and comparison.md/.csv set them side by side")
    d.add_argument("--out", required=True, help="output folder (written atomically)")
    d.add_argument("--topk", type=int, default=8, help="K for topk_energy and base_overlap (default 8)")
    d.add_argument("--include", metavar="REGEX", help="analyse only tensors whose name matches")
    d.add_argument("--exclude", metavar="REGEX", help="skip tensors whose name matches")
    d.add_argument(
        "--rename", action="append", default=[], metavar="OLD=NEW",
        help="prefix rule applied to TUNED names before pairing, e.g. model.language_model.=model. (repeatable)",
    )
    d.add_argument("--batch-budget-mb", type=float, default=512.0, help="memory budget for one stack of matrices")
    d.add_argument("--probe", metavar="TEXT",
                   help="a UTF-8 text file: also measure KL divergence, perplexities and top-1 agreement of the two "
                        "models on it (probe.json and a report section; needs Llama-family checkpoints with a tokenizer)")
    d.add_argument("--probe-seq-len", type=int, default=256, metavar="N", help="tokens per probe row (default 256)")
    d.add_argument(
        "--metrics", choices=("all", "values"), default="all",
        help="all (default): every column; values: only what singular values and norms give, skipping the "
             "decompositions of BASE and TUNED (base_overlap, intruder_count, subspace_rotation left empty)",
    )
    _layout_options(d)
    distributed.add_args(d)
    d.set_defaults(handler=_run_diagnose)

    s = sub.add_parser(
        "spectrum",
        help="per-matrix spectra and WeightWatcher-style metrics of one checkpoint's weights",
        description="Write metrics.csv, summary.json, report.md and figures for the weights of CKPT themselves.",
    )
    s.add_argument("ckpt", help="checkpoint")
    s.add_argument("--out", required=True, help="output folder (written atomically)")
    s.add_argument("--topk", type=int, default=8, help="K for topk_energy (default 8)")
    s.add_argument("--include", metavar="REGEX")
    s.add_argument("--exclude", metavar="REGEX")
    s.add_argument("--batch-budget-mb", type=float, default=512.0)
    _layout_options(s)
    s.set_defaults(handler=_run_spectrum)


def _layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--item", metavar="NAME",
                   help="item of a multi-item orbax step to read (default: params, else the only item)")
    p.add_argument(
        "--layer-axis", action="append", default=[], metavar="REGEX=AXIS",
        help="leaves whose name matches REGEX hold one matrix per layer along AXIS of the stored shape, "
             "e.g. '^decoder\\.layers\\.=1' (repeatable; the first matching rule applies)",
    )
    p.add_argument("--layout", metavar="NAME",
                   help="a named scanned-layer layout: maxtext (every decoder.layers.* leaf has its layer axis at 1)")


def _run_diagnose(args: argparse.Namespace) -> int:
    def go() -> int:
        from bshadow_jax.diagnostics.run import diagnose_cli

        return diagnose_cli(args)

    return distributed.run(args, go)


def _run_spectrum(args: argparse.Namespace) -> int:
    from bshadow_jax.diagnostics.run import spectrum_cli

    return spectrum_cli(args)
