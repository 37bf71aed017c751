"""Decontamination: a hash split of item identities plus an n-gram check.

Every world item has an identity hash of (family, key), independent of the surface format.
Items whose hash falls in the lowest `eval_fraction` of the hash space belong to evaluation
and are never emitted by a training stream (`is_eval_item`). General-text passages are split
the same way by a hash of their text, and training passages sharing any 13-gram with a
held-out passage are dropped (GPT-3's contamination rule).
"""
from __future__ import annotations

import functools
import hashlib
import re
import struct
from typing import Iterable

NGRAM = 13
_HASH_SPACE = 2**64
_WORD = re.compile(r"[a-z0-9]+")
MAX_EVAL_PER_SALT = 128  # build_eval_sets draws at most this many items per family and salt
EVAL_SALTS = ("eval", "eval-broad")


def is_eval_item(item_id: int, eval_fraction: float) -> bool:
    # a multiplicative remix so that the partition is not just the low bits of blake2b
    mixed = (item_id * 0x9E3779B97F4A7C15) % _HASH_SPACE
    return mixed < int(eval_fraction * _HASH_SPACE)


def text_id(text: str) -> int:
    return struct.unpack("<Q", hashlib.blake2b(text.encode(), digest_size=8).digest())[0]


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words, punctuation dropped: the units of the n-gram check.

    Punctuation is dropped so that a format's template alone (JSON braces and quotes) never
    forms an n-gram: every window then holds item content.
    """
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text)
    if len(w) < n:
        return {tuple(w)} if w else set()  # short texts: the whole text is its only "n-gram"
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def ngram_set(texts: Iterable[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    out: set[tuple[str, ...]] = set()
    for t in texts:
        out |= ngrams(t, n)
    return out


def overlap(train_texts: Iterable[str], eval_ngrams: set, n: int = NGRAM) -> dict:
    """How many training texts share an n-gram with the evaluation n-gram set."""
    hits = total = 0
    shared: set = set()
    for t in train_texts:
        total += 1
        g = ngrams(t, n) & eval_ngrams
        if g:
            hits += 1
            shared |= g
    return {"texts": total, "texts_with_overlap": hits, "shared_ngrams": len(shared),
            "overlap_rate": hits / total if total else 0.0}


@functools.lru_cache(maxsize=8)
def eval_ngram_hashes(world_seed: int, eval_fraction: float) -> frozenset[int]:
    """Hashes (this process's `hash`) of the n-grams of every item any eval set may hold, in every format.

    build_eval_sets takes the first n <= MAX_EVAL_PER_SALT items of a fixed per-family sequence
    for each salt, so this superset covers every eval set it can build for this world. The
    n-grams are cached on disk, keyed by the source of the code that generates them.
    """
    return frozenset(hash(tuple(g.split(" "))) for g in _eval_ngram_strings(world_seed, eval_fraction))


def _eval_ngram_strings(world_seed: int, eval_fraction: float) -> list[str]:
    import json
    from pathlib import Path

    from bshadow_jax.data import text, world
    from bshadow_jax.evals import sets
    from bshadow_jax.fileio import atomic_write_text

    src = b"".join(Path(m.__file__).read_bytes() for m in (world, sets)) + Path(__file__).read_bytes()
    key = hashlib.blake2b(src + f"|{world_seed}|{eval_fraction}".encode(), digest_size=8).hexdigest()
    path = text.cache_dir() / "decontam" / f"eval-ngrams-{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt
    out: set[str] = set()
    for fam in list(world.FAMILIES) + list(world.EVAL_ONLY_FAMILIES):
        for salt in EVAL_SALTS:
            for item in sets.eval_items(world_seed, fam, MAX_EVAL_PER_SALT, eval_fraction, salt=salt):
                for fmt in world.FORMATS:
                    ex = world.render(item, fmt)
                    out.update(" ".join(g) for g in ngrams(ex.prompt + ex.answer))
    strings = sorted(out)
    try:
        atomic_write_text(path, json.dumps(strings))
    except OSError:
        pass  # a read-only cache only costs time
    return strings


def shares_ngram(text: str, hashes: frozenset[int]) -> bool:
    return any(hash(g) in hashes for g in ngrams(text))
