"""Byte-level BPE: deterministic training, exact round trips, loadable with AutoTokenizer."""
import pytest
from transformers import AutoTokenizer

from bshadow_jax.data import tokenizer as T
from bshadow_jax.data.config import DataConfig
from bshadow_jax.errors import UserError

SAMPLES = [
    "Question: What is 79 - 74?\nA. 15\nB. 5\nC. 6\nD. 3\nAnswer: B",
    '{"task": "sorting", "input": "Sort: 3 1 2", "output": "1 2 3"}',
    "Whose house is this, and wherefore stand we here?  Tabs\tand  spaces ",
    "unicode: é漢字 — ok",
    "",
]


@pytest.fixture(scope="module")
def small_corpus():
    from bshadow_jax.data.text import procedural_text

    return T.training_corpus(tuple(procedural_text(0, 300)), n_items_per_family=40)


def test_training_is_deterministic_and_round_trips(small_corpus, tmp_path):
    a = T.train_bpe(small_corpus, 400)
    b = T.train_bpe(small_corpus, 400)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) == 400
    for s in SAMPLES:
        ids = a.encode(s, add_special_tokens=False)
        assert a.decode(ids) == s
    a.save_pretrained(str(tmp_path / "tok"))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    for s in SAMPLES:
        assert loaded.encode(s, add_special_tokens=False) == a.encode(s, add_special_tokens=False)
    assert loaded.pad_token_id == 0 and loaded.eos_token_id == 1


def test_digits_are_single_tokens(small_corpus):
    tok = T.train_bpe(small_corpus, 400)
    pieces = tok.convert_ids_to_tokens(tok.encode("12345 + 678", add_special_tokens=False))
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12345678")


def test_get_tokenizer_caches_by_config(tmp_path, monkeypatch):
    monkeypatch.setenv("BSHADOW_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "training_corpus", lambda texts, **kw: list(texts[:200]) + SAMPLES)
    cfg = DataConfig(text_source="procedural", vocab_size=320)
    tok = T.get_tokenizer(cfg)
    folders = list((tmp_path / "tokenizers").iterdir())
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file()
    assert len(tok) == 320
    again = T.get_tokenizer(cfg)
    assert again.get_vocab() == tok.get_vocab()
    T.get_tokenizer(DataConfig(text_source="procedural", vocab_size=330))
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2


def test_get_tokenizer_retrains_when_its_training_texts_change(tmp_path, monkeypatch):
    """Same config, other training texts (a changed world, split or decontamination): a cached
    tokenizer trained on the old texts must not be reused."""
    monkeypatch.setenv("BSHADOW_CACHE", str(tmp_path))
    cfg = DataConfig(text_source="procedural", vocab_size=320)
    monkeypatch.setattr(T, "training_corpus", lambda texts, **kw: list(texts[:200]) + SAMPLES)
    first = T.get_tokenizer(cfg)
    monkeypatch.setattr(T, "training_corpus", lambda texts, **kw: list(texts[200:400]) + SAMPLES[::-1])
    second = T.get_tokenizer(cfg)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2
    assert second.get_vocab() != first.get_vocab()


def test_user_tokenizer_folder(tmp_path, small_corpus):
    tok = T.train_bpe(small_corpus, 400)
    tok.save_pretrained(str(tmp_path / "mine"))
    got = T.get_tokenizer(DataConfig(tokenizer=str(tmp_path / "mine")))
    assert got.get_vocab() == tok.get_vocab()
    with pytest.raises(UserError, match="nope"):
        T.get_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope")))


def test_tokenizer_by_hub_id_goes_through_autotokenizer(tmp_path, monkeypatch):
    """data.tokenizer=org/name (not a local path) asks AutoTokenizer for the hub id, online; answered here
    from a local folder in the same format. A missing local folder that is no hub id is one clear error."""
    import transformers

    from bshadow_jax.data.config import DataConfig
    from bshadow_jax.data.tokenizer import get_tokenizer
    from bshadow_jax.errors import UserError

    local = tmp_path / "tok"
    get_tokenizer(DataConfig(vocab_size=300, text_source="procedural")).save_pretrained(str(local))
    real = transformers.AutoTokenizer.from_pretrained
    asked = []

    def from_pretrained(name, **kw):
        asked.append((name, kw.get("local_files_only"), kw.get("trust_remote_code")))
        return real(str(local) if name == "org/tok" else name, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)
    tok = get_tokenizer(DataConfig(tokenizer="org/tok"))
    assert asked == [("org/tok", False, False)] and len(tok) == 300
    with pytest.raises(UserError, match="tokenizer folder not found"):
        get_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope" / "deeper")))
