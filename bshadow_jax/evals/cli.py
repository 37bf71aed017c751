"""`bshadow eval`: lm-evaluation-harness tasks on any checkpoint. Light at import (lm-eval and jax load
in the handler)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bshadow_jax import distributed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="run lm-evaluation-harness tasks on a checkpoint (writes lm-eval's results JSON)",
        description=(
            "Evaluate any checkpoint bshadow can read (a bshadow run folder, an orbax step folder, a Hugging "
            "Face folder or hub id, a .safetensors or .gguf file; it must carry a tokenizer) on lm-eval tasks "
            "with the project's JAX forward pass. Writes results.json (lm-eval's results) and "
            "samples_TASK.jsonl (one record per document) to --out. Contexts start with the tokenizer's "
            "bos token (its eos when it has none), as the project's own scoring does; --no-bos for models "
            "trained without one."
        ),
    )
    p.add_argument("ckpt", help="checkpoint to evaluate")
    p.add_argument("--tasks", required=True, metavar="NAMES",
                   help="comma-separated lm-eval task, group or tag names, or task YAML files")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of extra lm-eval task YAML files (repeatable)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.add_argument("--limit", type=_limit, metavar="N",
                   help="at most N documents per task (a fraction below 1: that share of each task)")
    p.add_argument("--batch-size", type=_positive, default=16, metavar="B",
                   help="sequences per forward call (default 16)")
    p.add_argument("--num-fewshot", type=_non_negative, metavar="K",
                   help="few-shot examples (default: each task's own)")
    p.add_argument("--max-length", type=_positive, metavar="T",
                   help="context window in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype (default float32)")
    p.add_argument("--no-bos", action="store_true",
                   help="do not put the start token in front of contexts (lm-eval's add_bos_token=False)")
    distributed.add_args(p)
    p.set_defaults(handler=lambda args: distributed.run(args, lambda: _run(args)))


def _positive(text: str) -> int:
    n = _non_negative(text)
    if n == 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return n


def _limit(text: str) -> float | int:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return int(x) if x >= 1 and x == int(x) else x


def _run(args: argparse.Namespace) -> int:
    from bshadow_jax.errors import UserError
    from bshadow_jax.fileio import atomic_output_dir, check_output_dir, sanitize_filename
    from bshadow_jax.formats.hub import looks_like_hub_id

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks: give at least one task name")
    if not Path(args.ckpt).exists() and not looks_like_hub_id(args.ckpt):  # fail before indexing tasks
        raise UserError(f"{args.ckpt}: checkpoint not found")
    out = check_output_dir(args.out).absolute()
    ckpt = Path(args.ckpt).absolute()
    if ckpt == out or out in ckpt.parents:  # --out is replaced as a whole
        raise UserError(f"--out {args.out}: would replace the input {args.ckpt}; choose another output folder")

    from lm_eval.utils import handle_non_serializable

    from bshadow_jax.evals import harness

    tm = harness.task_manager(names, args.include_path)  # unknown tasks fail before the model loads
    lm = harness.JaxLM(args.ckpt, batch_size=args.batch_size, max_length=args.max_length,
                       add_bos_token=not args.no_bos, dtype=args.dtype)
    results = harness.run_tasks(lm, names, include_path=args.include_path, limit=args.limit,
                                num_fewshot=args.num_fewshot, tm=tm)
    samples = results.pop("samples", {})
    import jax

    if jax.process_index() != 0:  # every process evaluates the whole task list; process 0 writes
        return 0

    def dumps(obj, **kw) -> str:  # lm-eval's own serializer: numpy scalars, sets, functions in task configs
        return json.dumps(obj, default=handle_non_serializable, ensure_ascii=False, **kw)

    with atomic_output_dir(out) as tmp:
        (tmp / "results.json").write_text(dumps(results, indent=2) + "\n", encoding="utf-8")
        for task, records in samples.items():
            lines = "".join(dumps(r) + "\n" for r in records)
            (tmp / f"samples_{sanitize_filename(task)}.jsonl").write_text(lines, encoding="utf-8")
    for task, metrics in results.get("results", {}).items():
        shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                          if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}")
    print(f"wrote {out / 'results.json'}")
    return 0
