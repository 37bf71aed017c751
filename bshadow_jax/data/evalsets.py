"""Evaluation sets: the narrow benchmark and the broad suite, from the eval partition only.

narrow: the benchmark's skills in the benchmark's single format (multiple choice by default).
broad:  other_skills               skills outside the benchmark, cycling through the broad formats
        bench_skills_other_formats the benchmark's skills in the broad formats other than the benchmark's
                                   (same knowledge, new shape; never an item narrow already holds)
        compositional              two skills chained (a family that never appears in training)
text:   held-out general-text passages (perplexity)

Every world item here lies in the eval partition of the item-hash space (decontam.is_eval_item),
which training streams never emit, and is unique by (family, key) across narrow and broad together.
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

MAX_EVAL_PER_SALT = 512  # build_eval_sets asks for at most this many items per family and category
EVAL_SALTS = ("eval", "eval-broad")
# How far into each salt's item sequence an eval set can reach (the decontam superset covers this much):
# broad draws for the benchmark's skills skip up to MAX_EVAL_PER_SALT narrow items, so they reach twice as far.
EVAL_SALT_DEPTH = {"eval": MAX_EVAL_PER_SALT, "eval-broad": 2 * MAX_EVAL_PER_SALT}


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

    @property
    def skill(self) -> str:
        """The skill the item tests (its world family; items.csv calls it `skill`)."""
        return self.family

    @property
    def chance(self) -> float:
        """Accuracy of guessing uniformly among the item's options."""
        return 1.0 / len(self.options)


def chance_level(item: EvalItem) -> float:
    """Accuracy of guessing uniformly among the item's options.

    Args:
        item: a scored item.

    Returns:
        1 / number of options.
    """
    return item.chance


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
               patience: int = 2000, exclude: frozenset[str] | set[str] = frozenset()) -> list[world.Item]:
    """Up to `n` distinct eval-partition items of `family` (fewer if the partition is smaller).

    Stops after `patience` draws without a new item: small families have small partitions.

    Args:
        seed: world seed.
        family: world family (or an eval-only family).
        n: how many items to return at most.
        eval_fraction: share of the item-hash space reserved for evaluation.
        salt: names the item sequence; different salts order the same partition differently.
        patience: draws without a new key after which the partition counts as exhausted.
        exclude: keys never returned (items another set already holds); they still count as new
            keys for `patience`, so the keys met are those of the run without `exclude`.

    Returns:
        The items, in sequence order.
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
        if it.key in exclude:
            continue
        out.append(it)
        if len(out) == n:
            break
    return out


def _as_eval(item: world.Item, fmt: str, category: str) -> EvalItem:
    ex = world.render(item, fmt)
    return EvalItem(ex.prompt, ex.options, ex.gold, category, item.family, fmt, item.item_id)


def _check_formats(broad_formats, benchmark_format: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(broad formats, broad formats without the benchmark's), validated."""
    fmts = tuple(world.FORMATS) if broad_formats is None else tuple(broad_formats)
    if not fmts:
        raise ValueError("broad_formats: empty (give at least one format, or None for all)")
    unknown = [f for f in fmts if f not in world.FORMATS]
    if unknown:
        raise ValueError(f"broad_formats: unknown format(s) {unknown} (known: {', '.join(world.FORMATS)})")
    fmts = tuple(dict.fromkeys(fmts))  # a repeated format would only skew the cycle
    other = tuple(f for f in fmts if f != benchmark_format)
    if not other:
        raise ValueError(f"broad_formats {list(fmts)} leaves no format other than the benchmark's "
                         f"({benchmark_format!r}) for bench_skills_other_formats")
    return fmts, other


def build_eval_sets(data_cfg: DataConfig | None = None, *, n_narrow_per_skill: int = 40,
                    n_other_per_skill: int = 8, n_bench_other_per_skill: int = 16,
                    n_compositional: int = 32, n_text: int = 16,
                    broad_formats: tuple[str, ...] | list[str] | None = None) -> EvalSets:
    """The narrow benchmark, the broad suite and held-out passages; deterministic from data_cfg.world_seed.

    Args:
        data_cfg: the data config (benchmark skills and format, world seed, eval fraction, text source).
        n_narrow_per_skill: narrow items per benchmark skill.
        n_other_per_skill: broad other_skills items per non-benchmark skill.
        n_bench_other_per_skill: broad bench_skills_other_formats items per benchmark skill.
        n_compositional: broad compositional items.
        n_text: held-out text passages (0: none).
        broad_formats: formats the broad suite cycles through (None: every world format).

    Returns:
        EvalSets. A small eval partition gives fewer items than asked (word_facts has about 20 in
        all, so when narrow takes them bench_skills_other_formats gets none of that skill);
        metadata records the counts.

    Raises:
        ValueError: a size above MAX_EVAL_PER_SALT, an empty or unknown broad format, or broad
            formats that leave nothing besides the benchmark format.
    """
    cfg = data_cfg or DataConfig()
    sizes = (n_narrow_per_skill, n_other_per_skill, n_bench_other_per_skill, n_compositional)
    if max(sizes) > MAX_EVAL_PER_SALT:
        raise ValueError(f"eval set sizes are capped at {MAX_EVAL_PER_SALT} per skill "
                         "(training streams are decontaminated against that many)")
    fmts, other_formats = _check_formats(broad_formats, cfg.benchmark_format)
    seed, frac = cfg.world_seed, cfg.eval_fraction
    bench = list(cfg.benchmark_skills)
    narrow = []
    taken: dict[str, set[str]] = {}  # family -> keys already in some set: every item appears once
    for fam in bench:
        items = eval_items(seed, fam, n_narrow_per_skill, frac)
        taken.setdefault(fam, set()).update(it.key for it in items)
        narrow += [_as_eval(it, cfg.benchmark_format, "narrow") for it in items]

    def draw(fam: str, n: int, salt: str = "eval") -> list[world.Item]:
        items = eval_items(seed, fam, n, frac, salt=salt, exclude=frozenset(taken.get(fam, ())))
        taken.setdefault(fam, set()).update(it.key for it in items)
        return items

    broad = []
    for fam in (f for f in world.FAMILIES if f not in bench):
        for j, it in enumerate(draw(fam, n_other_per_skill)):
            broad.append(_as_eval(it, fmts[j % len(fmts)], "other_skills"))
    for fam in bench:
        # a second salt: the same partition in another order, minus what narrow holds
        for j, it in enumerate(draw(fam, n_bench_other_per_skill, salt="eval-broad")):
            broad.append(_as_eval(it, other_formats[j % len(other_formats)], "bench_skills_other_formats"))
    for j, it in enumerate(draw("compositional", n_compositional)):
        broad.append(_as_eval(it, fmts[j % len(fmts)], "compositional"))
    by_category = {c: sum(it.category == c for it in broad)
                   for c in ("other_skills", "bench_skills_other_formats", "compositional")}
    narrow_by_skill = {f: sum(it.family == f for it in narrow) for f in bench}
    text: tuple[str, ...] = ()
    meta = {"benchmark_skills": bench, "benchmark_format": cfg.benchmark_format, "world_seed": seed,
            "eval_fraction": frac, "broad_formats": list(fmts), "n_narrow": len(narrow), "n_broad": len(broad),
            "n_narrow_by_skill": narrow_by_skill, "n_broad_by_category": by_category}
    if n_text > 0:
        corpus = text_corpus(cfg.text_key)
        text = tuple(sorted(corpus.heldout, key=decontam.text_id)[:n_text])
        meta["text"] = corpus.name
    meta["n_text"] = len(text)
    return EvalSets(tuple(narrow), tuple(broad), text, meta)


@functools.lru_cache(maxsize=8)
def eval_ngram_hashes(world_seed: int, eval_fraction: float) -> frozenset[int]:
    """Hashes (this process's `hash`) of the n-grams of every item any eval set may hold, in every format.

    build_eval_sets takes items from the first EVAL_SALT_DEPTH[salt] keys of a fixed per-family
    sequence for each salt, so this superset covers every eval set it can build for this world. The
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
            for item in eval_items(world_seed, fam, EVAL_SALT_DEPTH[salt], eval_fraction, salt=salt):
                for fmt in world.FORMATS:
                    ex = world.render(item, fmt)
                    out.update(" ".join(g) for g in decontam.ngrams(ex.prompt + ex.answer))
    strings = sorted(out)
    try:
        atomic_write_text(path, json.dumps(strings))
    except OSError:
        pass  # a read-only cache only costs time
    return strings
