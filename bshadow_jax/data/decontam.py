"""Decontamination: a hash split of item identities plus an n-gram check.

Every world item has an identity hash of (family, key), independent of the surface format.
Items whose hash falls in the lowest `eval_fraction` of the hash space belong to evaluation
and are never emitted by a training stream (`is_eval_item`). General-text passages are split
the same way by a hash of their text, and training passages sharing any 13-gram with a
held-out passage are dropped (GPT-3's contamination rule).
"""
from __future__ import annotations

import hashlib
import re
import struct
from typing import Iterable

NGRAM = 13
_HASH_SPACE = 2**64
_WORD = re.compile(r"[a-z0-9]+")


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


def shares_ngram(text: str, hashes: frozenset[int]) -> bool:
    return any(hash(g) in hashes for g in ngrams(text))
