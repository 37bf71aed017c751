"""The user docs the code points at exist: every `docs/PAGE.md#anchor` in the package, the README and the
reports names a real page and a real heading, and the docs' own links resolve."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from bshadow_jax.reporting import docs_ref

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_REF = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
_CALL = re.compile(r"docs_ref\(\s*['\"]([\w.-]+\.md)['\"](?:\s*,\s*['\"]([\w-]+)['\"])?\s*\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces as hyphens."""
    text = page.read_text(encoding="utf-8")
    out = set(re.findall(r'<a id="([\w-]+)"></a>', text))  # explicit anchors on table rows
    for line in text.splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def _references() -> list[tuple[str, str, str]]:
    refs = []
    files = list((ROOT / "bshadow_jax").rglob("*.py")) + [ROOT / "README.md"]
    for f in files:
        text = f.read_text(encoding="utf-8")
        refs += [(str(f.relative_to(ROOT)), page, anchor or "") for page, anchor in _REF.findall(text)]
        refs += [(str(f.relative_to(ROOT)), page, anchor or "") for page, anchor in _CALL.findall(text)]
    for f in DOCS.glob("*.md"):  # links between the docs pages: (page.md#anchor) and (#anchor)
        text = f.read_text(encoding="utf-8")
        refs += [(str(f.relative_to(ROOT)), page, anchor) for page, anchor in re.findall(r"\]\(([\w.-]+\.md)#([\w-]+)\)", text)]
        refs += [(str(f.relative_to(ROOT)), f.name, anchor) for anchor in re.findall(r"\]\(#([\w-]+)\)", text)]
    return refs


def _dangling(refs) -> list[str]:
    bad = []
    for where, page, anchor in refs:
        path = DOCS / page
        if not path.is_file():
            bad.append(f"{where}: docs/{page} does not exist")
        elif anchor and anchor not in _anchors(path):
            bad.append(f"{where}: docs/{page} has no heading #{anchor}")
    return bad


def test_code_and_reports_cite_docs_pages_that_exist():
    refs = _references()
    assert len(refs) >= 10, refs  # the reports and docstrings do point at the docs
    assert {page for _, page, _ in refs} >= {"metrics.md", "outputs.md", "cli.md"}
    bad = _dangling(refs)
    assert not bad, "\n".join(bad)


def test_nothing_points_at_the_internal_contract_file():
    hits = [str(f.relative_to(ROOT)) for f in list((ROOT / "bshadow_jax").rglob("*.py")) + list(DOCS.glob("*.md"))
            + [ROOT / "README.md"] if "DESIGN.md" in f.read_text(encoding="utf-8")]
    assert hits == []


@pytest.mark.parametrize("page,anchor", [("metrics.md", "no-such-heading"), ("nope.md", "")])
def test_the_check_catches_a_dangling_reference(page, anchor):
    assert len(_dangling([("x.py", page, anchor)])) == 1
    assert _dangling([("x.py", "metrics.md", "footprint"), ("x.py", "metrics.md", "energy_share")]) == []
    assert _REF.search(docs_ref(page, anchor)).groups() == (page, anchor or None)
