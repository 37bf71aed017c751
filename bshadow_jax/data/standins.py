"""Local stand-ins for hub datasets: small procedural rows with the real dataset's configs, splits and fields.

A stand-in is a folder laid out as the hub repository is (parquet shards plus a README whose `configs`
metadata names them), so `datasets.load_dataset(folder, name, split=..., streaming=...)` reads it
through the same code path as `load_dataset("openai/gsm8k", "main", ...)`, and an lm-eval task whose
`dataset_path` points at it renders its prompts with its own templates. The rows are made from the
procedural world's vocabulary, never copied from the real datasets; only the schema is the real one.
`bshadow experiment ... --rehearse` (studies.rehearsal) is the user.

    folder = write_standin("openai/gsm8k", root)   # UserError for an id without a stand-in
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from bshadow_jax.data.text import procedural_text
from bshadow_jax.errors import UserError
from bshadow_jax.fileio import atomic_output_dir

_NAMES = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo"]
_THINGS = ["apples", "books", "coins", "marbles", "pens", "shells", "stamps", "cards"]
_SCIENCE = [("water", "liquid"), ("ice", "solid"), ("steam", "gas"), ("iron", "metal"), ("oak", "tree"),
            ("salmon", "fish"), ("eagle", "bird"), ("granite", "rock"), ("mars", "planet"), ("moon", "satellite")]
_KINDS = sorted({k for _, k in _SCIENCE})


def _word_problem(rng: random.Random) -> tuple[str, str, int]:
    who, what = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    if rng.random() < 0.5:
        q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
        return q, f"{who} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {what}.", a + b
    hi, lo = max(a, b), min(a, b)
    q = f"{who} has {hi} {what} and gives away {lo}. How many {what} are left?"
    return q, f"{who} has {hi} - {lo} = <<{hi}-{lo}={hi - lo}>>{hi - lo} {what} left.", hi - lo


def _gsm8k(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        q, steps, ans = _word_problem(rng)
        out.append({"question": q, "answer": f"{steps}\n#### {ans}"})
    return out


def _metamath(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        q, steps, ans = _word_problem(rng)
        out.append({"query": q, "response": f"{steps}\nThe answer is: {ans}", "type": "GSM_AnsAug",
                    "original_question": q})
    return out


def _science_fact(rng: random.Random) -> tuple[str, str, list[str]]:
    """(thing, its kind, three wrong kinds)."""
    thing, kind = rng.choice(_SCIENCE)
    return thing, kind, rng.sample([k for k in _KINDS if k != kind], 3)


def _arc(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        thing, kind, wrong = _science_fact(rng)
        texts = [kind, *wrong]
        rng.shuffle(texts)
        labels = ["A", "B", "C", "D"]
        out.append({"id": f"standin_{i}", "question": f"Which of these best describes {thing}?",
                    "choices": {"text": texts, "label": labels}, "answerKey": labels[texts.index(kind)]})
    return out


def _piqa(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        what = rng.choice(_THINGS)
        good, bad = f"put the {what} in a box", f"throw the {what} into the river"
        label = rng.randint(0, 1)
        sols = (good, bad) if label == 0 else (bad, good)
        out.append({"goal": f"How do you keep {what} safe?", "sol1": sols[0], "sol2": sols[1], "label": label})
    return out


def _sciq(rng: random.Random, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        thing, kind, wrong = _science_fact(rng)
        out.append({"question": f"What kind of thing is {thing}?", "distractor1": wrong[0], "distractor2": wrong[1],
                    "distractor3": wrong[2], "correct_answer": kind, "support": f"Everyone knows {thing} is a {kind}."})
    return out


def _web_text(rng: random.Random, n: int) -> list[dict]:
    passages = procedural_text(rng.randint(0, 2**31), 4 * n)
    return [{"text": "\n\n".join(passages[4 * i: 4 * i + 4]), "id": f"standin_{i}"} for i in range(n)]


# hub id -> ({config name (None = default): {split: rows}}, row maker); sizes are toy sizes
_Maker = Callable[[random.Random, int], list[dict]]
STANDINS: dict[str, tuple[dict[str | None, dict[str, int]], _Maker]] = {
    "openai/gsm8k": ({"main": {"train": 256, "test": 64}}, _gsm8k),
    "meta-math/MetaMathQA": ({None: {"train": 512}}, _metamath),
    "allenai/ai2_arc": ({"ARC-Easy": {"train": 64, "validation": 32, "test": 64},
                         "ARC-Challenge": {"train": 64, "validation": 32, "test": 64}}, _arc),
    "baber/piqa": ({None: {"train": 64, "validation": 64}}, _piqa),
    "allenai/sciq": ({None: {"train": 64, "validation": 32, "test": 64}}, _sciq),
    "HuggingFaceFW/fineweb-edu": ({"sample-10BT": {"train": 600}}, _web_text),
}


def _readme(hub_id: str, configs: dict[str | None, dict[str, int]]) -> str:
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines.append(f"- config_name: {name or 'default'}")
        lines.append("  data_files:")
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {name or 'default'}/{split}-*"]
    lines += ["---", f"# Stand-in for {hub_id}", "",
              "Procedural rows with the real dataset's configs, splits and fields, written by bshadow_jax for an",
              "offline rehearsal. Nothing here comes from the real dataset.", ""]
    return "\n".join(lines)


def write_standin(hub_id: str, root: Path) -> Path:
    """The stand-in folder for `hub_id` under `root` (written once; an existing one is reused).

    Raises:
        UserError: when no stand-in is known for `hub_id`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if hub_id not in STANDINS:
        raise UserError(f"{hub_id}: no local stand-in for this dataset (stand-ins exist for "
                        f"{', '.join(sorted(STANDINS))}); give a local path in the config instead")
    folder = Path(root) / hub_id.replace("/", "__")
    if (folder / "README.md").is_file():
        return folder
    configs, make = STANDINS[hub_id]
    with atomic_output_dir(folder) as tmp:
        for name, splits in configs.items():
            for split, n in splits.items():
                rng = random.Random(f"{hub_id}/{name}/{split}")
                sub = tmp / (name or "default")
                sub.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.Table.from_pylist(make(rng, n)), sub / f"{split}-00000-of-00001.parquet")
        (tmp / "README.md").write_text(_readme(hub_id, configs), encoding="utf-8")
    return folder
