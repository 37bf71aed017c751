"""A procedural skill world: skill families x surface formats, deterministic from seeds.

An `Item` is the content of one question (family, canonical key, question, declarative stem,
answer, distractors). `render(item, fmt)` turns it into an `Example` (prompt, answer) in one
of the surface formats. Item identity is a hash of (family, key), independent of format, so
the same fact asked in another shape is the same item: `decontam.is_eval_item` uses it to
keep evaluation items out of every training stream.

Numbers and vocabularies are deliberately small: the CPU study trains ~1-5M-parameter
models for a few hundred steps, and the skills must be learnable at that scale.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import random
import struct
from typing import Callable

FORMATS = ("mc", "qa", "cloze", "chat", "sentence", "json")
LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class Item:
    family: str
    key: str  # canonical content: equal keys = the same question
    question: str
    stem: str  # declarative prefix the answer completes ("23 + 45 =")
    answer: str
    distractors: tuple[str, ...]  # exactly 3, distinct from each other and from the answer

    @property
    def item_id(self) -> int:
        return item_hash(self.family, self.key)


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered training/eval example: the model reads prompt, learns answer."""

    prompt: str
    answer: str
    family: str
    format: str
    item_id: int
    options: tuple[str, ...] = ()  # continuations for option-likelihood scoring
    gold: int = 0  # index of the correct continuation in `options`


def item_hash(family: str, key: str) -> int:
    digest = hashlib.blake2b(f"{family}|{key}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0]


def rng_for(*parts) -> random.Random:
    """A Random seeded by a stable hash of `parts` (str/int), so index -> item is pure."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(struct.unpack("<Q", digest)[0])


# ----------------------------------------------------------------------------- helpers
def _num_distractors(rng: random.Random, answer: int, spread: int, lo: int = 0) -> tuple[str, ...]:
    out: list[int] = []
    cands = [answer + d for d in (1, -1, 10, -10, 2, -2, spread, -spread)]
    rng.shuffle(cands)
    for c in cands:
        if c >= lo and c != answer and c not in out:
            out.append(c)
            if len(out) == 3:
                return tuple(str(c) for c in out)
    while len(out) < 3:  # rare: near-misses fell below `lo`
        c = rng.randint(lo, answer + spread + 20)
        if c != answer and c not in out:
            out.append(c)
    return tuple(str(c) for c in out)


def _pick_distractors(rng: random.Random, answer: str, pool: list[str]) -> tuple[str, ...]:
    cands = [p for p in dict.fromkeys(pool) if p != answer]
    rng.shuffle(cands)
    if len(cands) < 3:  # a degenerate pool: fall back to numeric near-misses
        cands += [d for d in _num_distractors(rng, len(answer), 5) if d != answer and d not in cands]
    return tuple(cands[:3])


def _perm_distractors(rng: random.Random, seq: list, answer: str) -> tuple[str, ...]:
    out: list[str] = []
    for _ in range(60):
        s = seq[:]
        rng.shuffle(s)
        cand = " ".join(map(str, s))
        if cand != answer and cand not in out:
            out.append(cand)
        if len(out) == 3:
            return tuple(out)
    # tiny sequences have few permutations: pad with near-misses
    while len(out) < 3:
        cand = " ".join(map(str, seq + [seq[-1]] * (len(out) + 1)))
        if cand != answer and cand not in out:
            out.append(cand)
    return tuple(out)


_LETTERS_POOL = "bcdfgkmnprstvz"
_NAMES = ["Ann", "Bob", "Cal", "Dee", "Eve", "Finn", "Gus", "Hal", "Ida", "Jo", "Kim", "Lu", "Max", "Ned", "Oli", "Pam",
          "Quin", "Rae", "Sam", "Tom", "Uma", "Val", "Wes", "Xia", "Yan", "Zoe", "Abe", "Bea", "Cy", "Dot", "Ed",
          "Fay", "Gil", "Hope", "Ivy", "Jay", "Kai", "Liv", "Mo", "Nia"]
_OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "eggs", "cups", "keys"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_UNITS = [  # (big, small, factor)
    ("kilometers", "meters", 1000), ("kilograms", "grams", 1000), ("hours", "minutes", 60),
    ("minutes", "seconds", 60), ("meters", "centimeters", 100), ("dollars", "cents", 100),
    ("days", "hours", 24), ("weeks", "days", 7), ("liters", "milliliters", 1000), ("feet", "inches", 12),
]
_CATEGORIES = ["bird", "fish", "tree", "tool", "dance", "fruit", "stone", "boat", "song", "game", "cloth", "drink"]
_SYL_A = ["bl", "gr", "tr", "sn", "fl", "dr", "pl", "kr", "st", "w", "z", "m"]
_SYL_B = ["ick", "orp", "ent", "ax", "ib", "ume", "og", "ash", "el", "und", "ip", "oon"]


@functools.lru_cache(maxsize=16)
def lexicon(seed: int, size: int = 64) -> list[tuple[str, str]]:
    """Nonce words with a category each: the world's 'facts' (depends on the world seed)."""
    rng = rng_for("lexicon", seed)
    words = sorted({a + b for a in _SYL_A for b in _SYL_B})
    rng.shuffle(words)
    return [(w, _CATEGORIES[rng.randrange(len(_CATEGORIES))]) for w in words[:size]]


# ----------------------------------------------------------------------------- families
def _arithmetic(rng, seed):
    a, b = rng.randint(10, 99), rng.randint(1, 99)
    if rng.random() < 0.5:
        op, ans = "+", a + b
    else:
        a, b = max(a, b), min(a, b)
        op, ans = "-", a - b
    return Item("arithmetic", f"{a}{op}{b}", f"What is {a} {op} {b}?", f"{a} {op} {b} =", str(ans),
                _num_distractors(rng, ans, 10))


def _comparison(rng, seed):
    a, b = rng.sample(range(10, 100), 2)
    kind = rng.choice(["larger", "smaller"])
    ans = max(a, b) if kind == "larger" else min(a, b)
    other = min(a, b) if kind == "larger" else max(a, b)
    pool = [str(other), str(a + b), str(abs(a - b)), str(ans + 1), str(other + 1)]
    return Item("comparison", f"{kind}:{a},{b}", f"Which is {kind}, {a} or {b}?",
                f"The {kind} of {a} and {b} is", str(ans), _pick_distractors(rng, str(ans), pool))


def _sorting(rng, seed):
    xs = rng.sample(range(1, 10), rng.randint(3, 4))
    ans = " ".join(map(str, sorted(xs)))
    shown = " ".join(map(str, xs))
    return Item("sorting", shown, f"Sort from smallest to largest: {shown}", f"{shown} sorted is", ans,
                _perm_distractors(rng, xs, ans))


def _counting(rng, seed):
    alphabet = rng.sample(_LETTERS_POOL, 3)
    target = alphabet[0]
    s = [rng.choice(alphabet) for _ in range(rng.randint(5, 8))]
    ans = s.count(target)
    shown = " ".join(s)
    return Item("counting", f"{target}:{shown}", f"How many {target} are in: {shown}?",
                f"The number of {target} in {shown} is", str(ans), _num_distractors(rng, ans, 3))


def _letters(rng, lo=3, hi=5):
    return [rng.choice(_LETTERS_POOL) for _ in range(rng.randint(lo, hi))]


def _copy(rng, seed):
    s = _letters(rng)
    ans = " ".join(s)
    return Item("copy", ans, f"Copy the letters: {ans}", f"A copy of {ans} is", ans, _perm_distractors(rng, s, ans))


def _reverse(rng, seed):
    s = _letters(rng)
    shown, ans = " ".join(s), " ".join(reversed(s))
    ds = [shown, *_perm_distractors(rng, s, ans)]
    ds = tuple(dict.fromkeys(d for d in ds if d != ans))[:3]
    return Item("reverse", shown, f"Reverse the letters: {shown}", f"{shown} reversed is", ans, ds)


def _kv_lookup(rng, seed):
    keys = rng.sample(_LETTERS_POOL, 3)
    vals = [rng.randint(1, 9) for _ in keys]
    q = rng.randrange(3)
    table = ", ".join(f"{k}={v}" for k, v in zip(keys, vals))
    ans = str(vals[q])
    pool = [str(v) for v in range(1, 10)]
    return Item("kv_lookup", f"{table};{keys[q]}", f"{table}. What is {keys[q]}?",
                f"{table}. So {keys[q]} is", ans, _pick_distractors(rng, ans, pool))


def _deduction(rng, seed):
    a, b, c, d = rng.sample(_NAMES, 4)
    adj, sup = rng.choice([("taller", "tallest"), ("older", "oldest"), ("faster", "fastest"),
                           ("stronger", "strongest"), ("richer", "richest"), ("happier", "happiest")])
    facts = f"{a} is {adj} than {b}. {b} is {adj} than {c}."
    return Item("deduction", f"{a}>{b}>{c}:{adj}", f"{facts} Who is {sup}?", f"{facts} The {sup} is", a, (b, c, d))


def _dates(rng, seed):
    if rng.random() < 0.5:
        i, k = rng.randrange(7), rng.randint(1, 13)
        ans = _DAYS[(i + k) % 7]
        unit, start, pool = "days", _DAYS[i], _DAYS
    else:
        i, k = rng.randrange(12), rng.randint(1, 11)
        ans = _MONTHS[(i + k) % 12]
        unit, start, pool = "months", _MONTHS[i], _MONTHS
    return Item("dates", f"{start}+{k}{unit}", f"What comes {k} {unit} after {start}?",
                f"{k} {unit} after {start} comes", ans, _pick_distractors(rng, ans, pool))


def _unit_conversion(rng, seed):
    big, small, f = rng.choice(_UNITS)
    n = rng.randint(2, 30)
    ans = n * f
    pool = [str(n * f * 10), str(n * f // 10) if f >= 100 else str(n * f + f), str(n + f), str((n + 1) * f),
            str((n - 1) * f)]
    return Item("unit_conversion", f"{n}{big}>{small}", f"How many {small} are in {n} {big}?",
                f"{n} {big} in {small} is", str(ans), _pick_distractors(rng, str(ans), pool))


def _word_problem(rng, seed):
    name, obj = rng.choice(_NAMES), rng.choice(_OBJECTS)
    a, b = rng.randint(2, 12), rng.randint(1, 9)
    if rng.random() < 0.5:
        verb, ans = "gets", a + b
    else:
        a = a + b
        verb, ans = "gives away", a - b
    return Item("word_problem", f"{name}:{obj}:{a}:{verb}:{b}",
                f"{name} has {a} {obj} and {verb} {b}. How many {obj} now?",
                f"{name} has {a} {obj} and {verb} {b}, so the count is", str(ans), _num_distractors(rng, ans, b))


def _sequence(rng, seed):
    start, step = rng.randint(1, 40), rng.randint(2, 9)
    xs = [start + step * i for i in range(4)]
    ans = start + step * 4
    shown = ", ".join(map(str, xs))
    return Item("sequence", shown, f"What comes next: {shown}?", f"{shown}, then", str(ans),
                _num_distractors(rng, ans, step))


_FACT_TEMPLATES = (  # several phrasings per fact: held-out phrasings test recall, not memorised strings
    ("What is a {w}?", "A {w} is a kind of"),
    ("A {w} is what kind of thing?", "The word {w} names a kind of"),
    ("Name the category of the word {w}.", "The category of {w} is"),
)


def _word_facts(rng, seed):
    w, cat = rng.choice(lexicon(seed))
    v = rng.randrange(len(_FACT_TEMPLATES))
    q, stem = (t.format(w=w) for t in _FACT_TEMPLATES[v])
    return Item("word_facts", f"{w}:{v}", q, stem, cat, _pick_distractors(rng, cat, _CATEGORIES))


def _compositional(rng, seed):
    """Two skills chained; evaluation only (never in a training stream)."""
    kind = rng.randrange(4)
    if kind == 0:  # arithmetic -> comparison
        a, b, c = rng.randint(10, 60), rng.randint(1, 30), rng.randint(20, 90)
        ans = max(a + b, c)
        q, stem = f"Which is larger, {a} + {b} or {c}?", f"The larger of {a} + {b} and {c} is"
        ds = _pick_distractors(rng, str(ans), [str(min(a + b, c)), str(a), str(b), str(ans + 1)])
    elif kind == 1:  # lookup -> arithmetic
        k1, k2 = rng.sample(_LETTERS_POOL, 2)
        v1, v2 = rng.randint(1, 9), rng.randint(1, 9)
        ans = v1 + v2
        q, stem = f"{k1}={v1}, {k2}={v2}. What is {k1} + {k2}?", f"{k1}={v1}, {k2}={v2}. So {k1} + {k2} is"
        ds = _num_distractors(rng, ans, 2)
    elif kind == 2:  # unit conversion -> arithmetic
        big, small, f = rng.choice(_UNITS)
        n, extra = rng.randint(2, 5), rng.randint(1, 9)
        ans = n * f + extra
        q, stem = f"How many {small} are in {n} {big} plus {extra} {small}?", f"{n} {big} plus {extra} {small} in {small} is"
        ds = _pick_distractors(rng, str(ans), [str(n * f), str(n * f - extra), str(n + extra), str((n + 1) * f + extra)])
    else:  # sorting -> lookup of the smallest
        xs = rng.sample(range(1, 10), 4)
        ans = min(xs)
        shown = " ".join(map(str, xs))
        q, stem = f"Sort {shown} and give the first number.", f"{shown} sorted starts with"
        ds = _pick_distractors(rng, str(ans), [str(x) for x in xs] + [str(max(xs) + 1)])
    return Item("compositional", f"{kind}:{q}", q, stem, str(ans), ds)


FAMILIES: dict[str, Callable[[random.Random, int], Item]] = {
    "arithmetic": _arithmetic,
    "comparison": _comparison,
    "sorting": _sorting,
    "counting": _counting,
    "copy": _copy,
    "reverse": _reverse,
    "kv_lookup": _kv_lookup,
    "deduction": _deduction,
    "dates": _dates,
    "unit_conversion": _unit_conversion,
    "word_problem": _word_problem,
    "sequence": _sequence,
    "word_facts": _word_facts,
}
EVAL_ONLY_FAMILIES: dict[str, Callable[[random.Random, int], Item]] = {"compositional": _compositional}


def make_item(family: str, rng: random.Random, seed: int) -> Item:
    gen = FAMILIES.get(family) or EVAL_ONLY_FAMILIES[family]
    return gen(rng, seed)


# ----------------------------------------------------------------------------- formats
def _options(item: Item) -> tuple[list[str], int]:
    """Answer + distractors in a fixed order derived from the item (same order in every format)."""
    opts = [item.answer, *item.distractors]
    order = list(range(len(opts)))
    rng_for("options", item.family, item.key).shuffle(order)
    return [opts[i] for i in order], order.index(0)


def _json_str(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def render(item: Item, fmt: str, *, prompt_repetition: bool = False) -> Example:
    """The item in surface format `fmt`; options are the scoring continuations of that format."""
    opts, gold = _options(item)
    if fmt == "mc":
        lines = "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, opts))
        prompt = f"Question: {item.question}\n{lines}\nAnswer:"
        conts = tuple(f" {L}" for L in LETTERS[: len(opts)])
        return _ex(item, fmt, prompt, conts, gold, prompt_repetition)
    if fmt == "qa":
        prompt, tmpl = f"Q: {item.question}\nA:", " {}"
    elif fmt == "cloze":
        prompt, tmpl = f"Fill in the blank: {item.stem} ___\nBlank:", " {}"
    elif fmt == "chat":
        prompt, tmpl = f"<user> {item.question}\n<assistant>", " {}"
    elif fmt == "sentence":
        prompt, tmpl = item.stem, " {}."
    elif fmt == "json":
        prompt = f'{{"task": "{item.family}", "input": "{_json_str(item.question)}", "output": "'
        tmpl = '{}"}}'
        opts = [_json_str(o) for o in opts]
    else:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    return _ex(item, fmt, prompt, tuple(tmpl.format(o) for o in opts), gold, prompt_repetition)


def _ex(item, fmt, prompt, conts, gold, prompt_repetition) -> Example:
    if prompt_repetition:
        # the whole prompt twice, as in "repeat the prompt" (Leviathan et al. 2025); the answer once
        prompt = f"{prompt}\n{prompt}"
    return Example(prompt, conts[gold], item.family, fmt, item.item_id, conts, gold)


def sample_items(seed: int, family: str, n: int, *, salt: str = "sample", accept=None) -> list[Item]:
    """`n` items of `family` (index-deterministic); `accept(item)` filters (e.g. eval partition)."""
    out = []
    i = 0
    while len(out) < n:
        rng = rng_for(seed, salt, family, i)
        item = make_item(family, rng, seed)
        if accept is None or accept(item):
            out.append(item)
        i += 1
        if i > 200 * n + 10000:
            raise RuntimeError(f"{family}: could not find {n} accepted items")
    return out
