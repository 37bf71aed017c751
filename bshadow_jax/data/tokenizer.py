"""Tokenizer: a small byte-level BPE trained on first use and cached, or a user's HF tokenizer.

The BPE is trained with `tokenizers` on a deterministic sample of world items (training
partition only, every format) plus general text, with digits split one by one (small models
learn arithmetic far more easily on single-digit tokens). It is saved as a Hugging Face
tokenizer folder, so `AutoTokenizer.from_pretrained(folder)` loads it, and cached under
$BSHADOW_CACHE (default ~/.cache/bshadow_jax) keyed by a hash of what it was trained on.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from bshadow_jax.data import decontam, world
from bshadow_jax.config import config_hash
from bshadow_jax.data.config import DataConfig
from bshadow_jax.data.text import text_corpus
from bshadow_jax.errors import UserError
from bshadow_jax.fileio import atomic_output_dir, cache_root
from bshadow_jax.formats.hub import looks_like_hub_id

log = logging.getLogger("bshadow_jax.data.tokenizer")

TOKENIZER_VERSION = 1
PAD, EOS = "<pad>", "<|endoftext|>"
_TEXT_CHARS = 1_500_000  # enough text for merges; training stays ~1-2 s on 2 cores


def training_corpus(text_train: tuple[str, ...], *, n_items_per_family: int = 300, seed: int = 0) -> list[str]:
    """Deterministic sample: training-partition world items in every format, plus general text."""
    out = []
    for fam in world.FAMILIES:
        items = world.sample_items(seed, fam, n_items_per_family, salt="tokenizer",
                                   accept=lambda it: not decontam.is_eval_item(it.item_id, 0.1))
        for i, it in enumerate(items):
            ex = world.render(it, world.FORMATS[i % len(world.FORMATS)])
            out.append(ex.prompt + ex.answer)
    n = 0
    for p in text_train:
        out.append(p)
        n += len(p)
        if n > _TEXT_CHARS:
            break
    return out


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (`transformers.PreTrainedTokenizerFast`) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=EOS, unk_token=None,
        clean_up_tokenization_spaces=False,
    )


def get_tokenizer(data_cfg: DataConfig | None = None):
    """The run's tokenizer: `data_cfg.tokenizer` (a Hugging Face tokenizer folder, or a hub id such as
    "HuggingFaceTB/SmolLM2-135M", fetched once when online) or the cached BPE for `vocab_size`."""
    from transformers import AutoTokenizer

    data_cfg = data_cfg or DataConfig()
    if data_cfg.tokenizer:
        path = Path(data_cfg.tokenizer)
        hub = not path.exists() and looks_like_hub_id(data_cfg.tokenizer)
        if not path.is_dir() and not hub:
            raise UserError(f"{path}: tokenizer folder not found (data.tokenizer: a local folder or a hub id org/name)")
        try:
            tok = AutoTokenizer.from_pretrained(data_cfg.tokenizer if hub else str(path), local_files_only=not hub,
                                                trust_remote_code=False)
        except Exception as e:  # tokenizers/transformers raise KeyError, plain Exception, ... on damaged files
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            what = "no tokenizer from the Hugging Face Hub (offline or not found" if hub else \
                "not a Hugging Face tokenizer folder ("
            raise UserError(f"{data_cfg.tokenizer}: {what}{': ' if hub else ''}{type(e).__name__}: {msg})") from None
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok
    corpus = text_corpus(data_cfg.text_key)
    texts = training_corpus(corpus.train)
    # keyed by the training texts themselves: a change to the skill world, the text split or
    # decontamination trains a new tokenizer instead of reusing one trained on other data
    digest = hashlib.sha256("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
    key = config_hash({"v": TOKENIZER_VERSION, "vocab": data_cfg.vocab_size, "texts": digest})
    folder = cache_root() / "tokenizers" / f"bpe{data_cfg.vocab_size}-{corpus.name.replace('/', '_')}-{key}"
    if (folder / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # a damaged cache (disk filled up, killed writer): train it again
            log.warning("tokenizer: cached %s unreadable (%s); training it again", folder, type(e).__name__)
    log.info("tokenizer: training byte-level BPE (vocab %d, text %s)", data_cfg.vocab_size, corpus.name)
    tok = train_bpe(texts, data_cfg.vocab_size)
    try:
        with atomic_output_dir(folder) as tmp:
            tok.save_pretrained(str(tmp))
    except OSError as e:
        log.warning("tokenizer: cannot cache %s (%s); using it uncached", folder, e.strerror or type(e).__name__)
        return tok
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def special_ids(tokenizer) -> tuple[int, int]:
    """(separator/eos id, pad id) of any HF tokenizer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)
