"""Evaluation sets: the narrow benchmark and the broad suite, from the eval partition only.

narrow: the benchmark's skills in the benchmark's single format (multiple choice by default).
broad:  other_skills               skills outside the benchmark, every format
        bench_skills_other_formats the benchmark's skills in every other format (same knowledge, new shape)
        compositional              two skills chained (a family that never appears in training)
text:   held-out general-text passages (perplexity)

Every world item here lies in the eval partition of the item-hash space (decontam.is_eval_item),
which training streams never emit, and is unique by (family, key).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

from bshadow_jax.data import decontam, world
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.text import text_corpus
from bshadow_jax.fileio import atomic_write_text, cache_root

MAX_EVAL_PER_SALT = 128  # build_eval_sets draws at most this many items per family and salt
EVAL_SALTS = ("eval", "eval-broad")


@dataclasses.dataclass(frozen=True)
class EvalItem:
    context: str
    options: tuple[str, ...]  # continuations scored by log-likelihood
    gold: int
    category: str
    family: str
    format: str
    item_id: int

    @property
    def text(self) -> str:
        return self.context + self.options[self.gold]


@dataclasses.dataclass(frozen=True)
class EvalSets:
    narrow: tuple[EvalItem, ...]
    broad: tuple[EvalItem, ...]
    text: tuple[str, ...]
    metadata: dict

    def texts(self) -> list[str]:
        """Every evaluation text (items with their gold answer, held-out passages): for overlap checks."""
        return [it.text for it in self.narrow + self.broad] + list(self.text)


def eval_items(seed: int, family: str, n: int, eval_fraction: float, *, salt: str = "eval",
               patience: int = 2000) -> list[world.Item]:
    """Up to `n` distinct eval-partition items of `family` (fewer if the partition is smaller).

    Stops after `patience` draws without a new item: small families have small partitions.
    """
    out, seen = [], set()
    last_new = 0
    for i in range(10**7):
        if i - last_new > patience:
            break
        it = world.make_item(family, world.rng_for(seed, salt, family, i), seed)
        if it.key in seen or (family in world.FAMILIES and not decontam.is_eval_item(it.item_id, eval_fraction)):
            continue
        last_new = i
        seen.add(it.key)
        out.append(it)
        if len(out) == n:
            break
    return out


def _as_eval(item: world.Item, fmt: str, category: str) -> EvalItem:
    ex = world.render(item, fmt)
    return EvalItem(ex.prompt, ex.options, ex.gold, category, item.family, fmt, item.item_id)


def build_eval_sets(data_cfg: DataConfig | None = None, *, n_narrow_per_skill: int = 40,
                    n_other_per_skill: int = 8, n_bench_other_per_skill: int = 16,
                    n_compositional: int = 32, n_text: int = 16) -> EvalSets:
    """Deterministic from data_cfg.world_seed; sizes keep one evaluation of a ~2M model to seconds."""
    cfg = data_cfg or DataConfig()
    sizes = (n_narrow_per_skill, n_other_per_skill, n_bench_other_per_skill, n_compositional)
    if max(sizes) > MAX_EVAL_PER_SALT:
        raise ValueError(f"eval set sizes are capped at {MAX_EVAL_PER_SALT} per skill "
                         "(training streams are decontaminated against that many)")
    seed, frac = cfg.world_seed, cfg.eval_fraction
    bench = list(cfg.benchmark_skills)
    narrow = []
    for fam in bench:
        narrow += [_as_eval(it, cfg.benchmark_format, "narrow") for it in eval_items(seed, fam, n_narrow_per_skill, frac)]
    broad = []
    for fam in (f for f in world.FAMILIES if f not in bench):
        for j, it in enumerate(eval_items(seed, fam, n_other_per_skill, frac)):
            broad.append(_as_eval(it, world.FORMATS[j % len(world.FORMATS)], "other_skills"))
    other_formats = [f for f in world.FORMATS if f != cfg.benchmark_format]
    for fam in bench:
        for j, it in enumerate(eval_items(seed, fam, n_bench_other_per_skill, frac, salt="eval-broad")):
            broad.append(_as_eval(it, other_formats[j % len(other_formats)], "bench_skills_other_formats"))
    for j, it in enumerate(eval_items(seed, "compositional", n_compositional, frac)):
        broad.append(_as_eval(it, world.FORMATS[j % len(world.FORMATS)], "compositional"))
    text: tuple[str, ...] = ()
    meta = {"benchmark_skills": bench, "benchmark_format": cfg.benchmark_format, "world_seed": seed,
            "eval_fraction": frac}
    if n_text > 0:
        corpus = text_corpus(cfg.text_source)
        text = tuple(sorted(corpus.heldout, key=decontam.text_id)[:n_text])
        meta["text"] = corpus.name
    return EvalSets(tuple(narrow), tuple(broad), text, meta)


@functools.lru_cache(maxsize=8)
def eval_ngram_hashes(world_seed: int, eval_fraction: float) -> frozenset[int]:
    """Hashes (this process's `hash`) of the n-grams of every item any eval set may hold, in every format.

    build_eval_sets takes the first n <= MAX_EVAL_PER_SALT items of a fixed per-family sequence
    for each salt, so this superset covers every eval set it can build for this world. The
    n-grams are cached on disk, keyed by the source of the code that generates them.
    """
    return frozenset(hash(tuple(g.split(" "))) for g in _eval_ngram_strings(world_seed, eval_fraction))


def _eval_ngram_strings(world_seed: int, eval_fraction: float) -> list[str]:
    src = b"".join(Path(m.__file__).read_bytes() for m in (world, decontam)) + Path(__file__).read_bytes()
    key = hashlib.blake2b(src + f"|{world_seed}|{eval_fraction}".encode(), digest_size=8).hexdigest()
    path = cache_root() / "decontam" / f"eval-ngrams-{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt
    out: set[str] = set()
    for fam in list(world.FAMILIES) + list(world.EVAL_ONLY_FAMILIES):
        for salt in EVAL_SALTS:
            for item in eval_items(world_seed, fam, MAX_EVAL_PER_SALT, eval_fraction, salt=salt):
                for fmt in world.FORMATS:
                    ex = world.render(item, fmt)
                    out.update(" ".join(g) for g in decontam.ngrams(ex.prompt + ex.answer))
    strings = sorted(out)
    try:
        atomic_write_text(path, json.dumps(strings))
    except OSError:
        pass  # a read-only cache only costs time
    return strings
