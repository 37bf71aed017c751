"""GGUF files read as Hugging Face checkpoints: tensors, metadata and the stored tokenizer.

`gguf.GGUFReader` memory-maps the file and `gguf.quants.dequantize` turns any GGML tensor
type into float32. On top of that this module:
  * refuses anything that is not a complete GGUF file with a one-line `UserError`;
  * renames llama.cpp tensors to Hugging Face names (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`), with HF's [out, in] layout;
  * undoes the row permutation llama.cpp's converter applies to q/k of llama-arch models
    (it interleaves each head's two rotary halves for its GPT-J style RoPE; HF uses
    rotate-half), so the weights run as-is in our forward and in transformers;
  * reads the model config's fields from the metadata (`config_dict`; `models` validates them),
    and the tokenizer through transformers.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from bshadow_jax.errors import UserError, one_line
from bshadow_jax.fileio import atomic_output_dir, cache_root

# Architectures whose GGUF q/k rows llama.cpp permutes (LlamaModel.permute in convert_hf_to_gguf.py).
# qwen2 uses NEOX-style RoPE in llama.cpp, which is HF's rotate-half: no permutation there.
_PERMUTED_QK_ARCHS = frozenset({"llama", "mistral"})
SUPPORTED_ARCHS = frozenset({"llama", "mistral", "qwen2"})

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a llama.cpp tensor name, or None when it has no HF counterpart."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, part, kind = m.groups()
        mapped = _LAYER_NAMES.get(part)
        return None if mapped is None else f"model.layers.{layer}.{mapped}.{kind}"
    m = _GLOBAL_RE.match(gguf_name)
    if m:
        part, kind = m.groups()
        mapped = _GLOBAL_NAMES.get(part)
        return None if mapped is None else f"{mapped}.{kind}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head, n_head_kv)` along rows (weights or biases).

    llama.cpp stores each head's rows as (half, pair) -> interleaved; HF stores (pair, half).
    `n_head` is the number of heads of *this* projection (n_head_kv for k).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise UserError(f"q/k tensor with {rows} rows cannot be split into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    w_HxPx2 = w.reshape(n_head, half, 2, *w.shape[1:])
    return np.ascontiguousarray(w_HxPx2.swapaxes(1, 2).reshape(w.shape))


def _reader_class():
    import gguf

    class _Reader(gguf.GGUFReader):
        """GGUFReader parsing through a plain ndarray view of its memmap.

        The metadata of a 49k-token vocabulary is ~300k tiny slices; np.memmap's Python-level
        __array_finalize__ on each makes opening ~4x slower. Same bytes, same results.
        """

        def _get(self, offset, dtype, count=1, override_order=None):
            if type(self.data) is not np.ndarray:
                self.data = self.data.view(np.ndarray)  # keeps the memmap (and the mapping) alive as .base
            return super()._get(offset, dtype, count, override_order)

    return _Reader


def _check_magic(path: str) -> int:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise UserError(f"{path}: empty file, not a GGUF model")
    if magic != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (bad magic {magic!r})")
    return size


class GGUFFile:
    """A validated, memory-mapped GGUF file with Hugging Face tensor names.

    Tensors are dequantized one at a time on `read`, never all at once.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise UserError(f"{self.path}: no such file")
        size = _check_magic(self.path)
        try:
            self._reader = _reader_class()(self.path, "r")
        except Exception as e:  # the reader raises anything from ValueError to IndexError on bad bytes
            raise UserError(f"{self.path}: unreadable GGUF file (truncated or corrupt: {one_line(e)})") from None
        # The memmap views silently stop at end of file; check every tensor really fits before reading.
        for t in self._reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if int(t.data_offset) < 0 or end > size:
                raise UserError(
                    f"{self.path}: truncated GGUF file: tensor {t.name} needs bytes up to {end}, file has {size}"
                )
        self.arch = str(self.field("general.architecture", ""))
        self._tensors: dict[str, Any] = {}
        self._gguf_names: dict[str, str] = {}
        for t in self._reader.tensors:
            # Unknown tensors (e.g. llama3's rope_freqs) keep their GGUF name so nothing is silently dropped.
            name = hf_name(t.name) or t.name
            if name in self._tensors:
                raise UserError(f"{self.path}: two tensors map to {name}")
            self._tensors[name] = t
            self._gguf_names[name] = t.name

    # -- metadata ---------------------------------------------------------------------------
    def field(self, key: str, default: Any = None) -> Any:
        f = self._reader.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise UserError(f"{self.path}: metadata {key} is corrupt ({one_line(e)})") from None

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    def _int(self, key: str, default: Any = None, *, minimum: int = 1) -> int | None:
        """An integer `{arch}.key` field; anything else a writer could put there is a UserError."""
        v = self._arch_field(key, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
            raise UserError(f"{self.path}: metadata {self.arch}.{key} must be an integer >= {minimum}, got {_short(v)}")
        return int(v)

    def _float(self, key: str, default: float) -> float:
        v = self._arch_field(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or v <= 0:
            raise UserError(f"{self.path}: metadata {self.arch}.{key} must be a positive number, got {_short(v)}")
        return float(v)

    # -- tensors ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        """HF names in file order."""
        return list(self._tensors)

    def raw_tensor(self, name: str):
        """The gguf ReaderTensor behind an HF name (quantized bytes, GGML layout, still permuted)."""
        return self._get(name)

    def gguf_name(self, name: str) -> str:
        self._get(name)
        return self._gguf_names[name]

    def _get(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise UserError(f"{self.path}: no tensor named {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        # GGML lists dims fastest-first; numpy/HF order is the reverse.
        return tuple(int(d) for d in reversed(self._get(name).shape.tolist()))

    def dtype(self, name: str) -> str:
        return self._get(name).tensor_type.name  # e.g. "Q4_1", "F32"

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 in HF layout, q/k rows un-permuted."""
        import gguf

        t = self._get(name)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise UserError(f"{self.path}: tensor {t.name} cannot be dequantized ({one_line(e)})") from None
        # Always an owned copy: F32 tensors come back as views into the file's memmap.
        w = np.array(w, dtype=np.float32, copy=True).reshape(self.shape(name))
        if self.arch in _PERMUTED_QK_ARCHS:
            if ".self_attn.q_proj." in name:
                w = unpermute_qk(w, self._n_heads()[0])
            elif ".self_attn.k_proj." in name:
                w = unpermute_qk(w, self._n_heads()[1])
        return w

    def _n_heads(self) -> tuple[int, int]:
        n_head = self._int("attention.head_count")
        if n_head is None:
            raise UserError(f"{self.path}: metadata {self.arch}.attention.head_count missing; cannot un-permute q/k")
        return n_head, self._int("attention.head_count_kv", n_head)

    # -- config -----------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """LlamaConfig fields from the metadata (HF names)."""
        if self.arch not in SUPPORTED_ARCHS:
            raise UserError(
                f"{self.path}: GGUF architecture {self.arch or '?'} not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})"
            )

        def need(key: str) -> int:
            v = self._int(key)
            if v is None:
                raise UserError(f"{self.path}: metadata {self.arch}.{key} missing")
            return v

        hidden = need("embedding_length")
        n_head, n_head_kv = self._n_heads()
        n_layers = need("block_count")
        blocks = {int(m.group(1)) for m in map(_BLOCK_RE.match, self._gguf_names.values()) if m}
        # compare sizes first: block_count comes from the file and must not size an allocation
        if len(blocks) != n_layers or blocks != set(range(len(blocks))):
            raise UserError(
                f"{self.path}: metadata {self.arch}.block_count = {n_layers} but the file has tensors for "
                f"{len(blocks)} blocks" + (f" (0..{max(blocks)})" if blocks else "")
            )
        if "model.embed_tokens.weight" in self._tensors:
            vocab = self.shape("model.embed_tokens.weight")[0]  # params must match the config exactly
        else:
            tokens = self.field("tokenizer.ggml.tokens")
            vocab = len(tokens) if isinstance(tokens, list) and tokens else need("vocab_size")
        head_dim = self._int("attention.key_length")
        cfg: dict[str, Any] = dict(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=need("feed_forward_length"),
            num_hidden_layers=n_layers,
            num_attention_heads=n_head,
            num_key_value_heads=n_head_kv,
            head_dim=head_dim,
            rms_norm_eps=self._float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=self._float("rope.freq_base", 10000.0),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
            mlp_bias="model.layers.0.mlp.up_proj.bias" in self._tensors,
            max_position_embeddings=self._int("context_length", 2048),
            model_type=self.arch,
        )
        if cfg["head_dim"] == hidden // n_head:
            cfg["head_dim"] = None  # the default, as models.config_from_hf normalises it
        window = self._arch_field("attention.sliding_window")
        if window:
            cfg["sliding_window"] = self._int("attention.sliding_window")
        scaling = self._arch_field("rope.scaling.type")
        if scaling == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": self._float("rope.scaling.factor", 1.0)}
        elif scaling not in (None, "none"):
            raise UserError(f"{self.path}: rope scaling {scaling!r} not supported")
        if "rope_freqs.weight" in self._tensors:
            # llama3-style scaling is baked into a tensor of per-frequency factors; the HF
            # parameters cannot be recovered exactly from it.
            warnings.warn(
                f"{self.path}: rope_freqs tensor ignored; long-context RoPE scaling is not reproduced",
                stacklevel=2,
            )
        return cfg

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        # Drop the reader; the memmap is unmapped when garbage-collected. Closing it by hand
        # while any view is alive would leave dangling pointers (a segfault on next access).
        self._tensors = {}
        self._reader = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def gguf_tokenizer(path: str | os.PathLike, *, cache: bool = True):
    """The tokenizer stored in the GGUF file, as a transformers fast tokenizer.

    transformers rebuilds it from the metadata (about 10 s for a 49k vocabulary), so the
    result is cached under $BSHADOW_CACHE/gguf_tokenizers, keyed by the file's metadata bytes.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    _check_magic(path)  # clear errors for the common bad inputs; transformers' own errors are wrapped below
    from transformers import AutoTokenizer

    cached = _tokenizer_cache_dir(path) if cache else None
    if cached is not None and (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), trust_remote_code=False)
        except Exception:  # a damaged cache entry is rebuilt below
            pass
    folder, name = os.path.split(os.path.abspath(path))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"{path}: cannot build a tokenizer from the GGUF metadata ({one_line(e)})") from None
    if cached is not None:
        try:
            with atomic_output_dir(cached) as tmp:
                tok.save_pretrained(str(tmp))
        except OSError:  # a read-only cache only costs speed
            pass
    return tok


# Metadata (tokenizer included) sits at the start of a GGUF file; tensor data follows.
_TOKENIZER_KEY_BYTES = 32 * 1024 * 1024


def _tokenizer_cache_dir(path: str) -> Path:
    import transformers

    h = hashlib.sha256(f"gguf-tokenizer-v1 transformers={transformers.__version__} size={os.path.getsize(path)}".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(_TOKENIZER_KEY_BYTES))
    return cache_root() / "gguf_tokenizers" / h.hexdigest()[:32]
