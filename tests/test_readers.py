"""Corpus reading on real files written here: markdown, HTML, text PDFs, JSONL, bad files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib
import pytest

from qa_lab.config import PROJECT_ROOT
from qa_lab.errors import QaLabError
from qa_lab.readers import Document, read_corpus

matplotlib.use("Agg")
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

CORPUS = PROJECT_ROOT / "data" / "corpus"

MARKDOWN = """Intro before any heading.

# Storage

Pages hold rows.

## Indexing

```sql
# not a heading
```

### B-trees

Balanced.

Hash Indexes
------------

Buckets.
"""


def write_pdf(path: Path, pages: list[str | None], title: str | None = None) -> Path:
    """One figure per page; None draws only a rectangle (a page with no text layer)."""
    with PdfPages(path, metadata={"Title": title} if title else None) as pdf:
        for text in pages:
            fig = Figure(figsize=(4, 3))
            if text is None:
                fig.patches.append(matplotlib.patches.Rectangle((0.2, 0.2), 0.5, 0.5))
            else:
                fig.text(0.1, 0.5, text)
            pdf.savefig(fig)
    return path


def read_one(path: Path, **kwargs) -> Document:
    (doc,) = read_corpus(path.parent, **kwargs).documents
    return doc


def assert_partition(doc: Document) -> None:
    """Sections cover the text completely, in order, without overlap."""
    assert doc.sections[0].start == 0 and doc.sections[-1].end == len(doc.text)
    assert all(a.end == b.start for a, b in zip(doc.sections, doc.sections[1:]))


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_markdown_sections_follow_heading_tokens(tmp_path: Path, newline: str) -> None:
    path = tmp_path / "db" / "storage.md"
    path.parent.mkdir()
    path.write_bytes(MARKDOWN.replace("\n", newline).encode())
    doc = read_one(path)
    assert doc.id == "storage.md" and doc.title == "Storage"
    assert doc.text == path.read_bytes().decode()
    assert [s.heading_path for s in doc.sections] == [
        (),
        ("Storage",),
        ("Storage", "Indexing"),
        ("Storage", "Indexing", "B-trees"),
        ("Storage", "Hash Indexes"),
    ]
    texts = [doc.text[s.start : s.end] for s in doc.sections]
    assert texts[0].startswith("Intro") and texts[2].startswith("## Indexing")
    assert "# not a heading" in texts[2]  # fenced code stays inside its section
    assert texts[3] == f"### B-trees{newline}{newline}Balanced.{newline}{newline}"
    assert texts[4].startswith("Hash Indexes") and texts[4].endswith(f"Buckets.{newline}")
    assert_partition(doc)


def test_markdown_without_preamble_or_h1(tmp_path: Path) -> None:
    (tmp_path / "notes.markdown").write_text("## Only\n\nBody.\n")
    doc = read_one(tmp_path / "notes.markdown")
    assert doc.title == "notes"
    assert [(s.heading_path, s.start) for s in doc.sections] == [(("Only",), 0)]


def test_markdown_byte_order_mark_keeps_the_first_heading(tmp_path: Path) -> None:
    (tmp_path / "bom.md").write_bytes("\ufeff# Title\n\nBody.\n".encode())
    doc = read_one(tmp_path / "bom.md")
    assert doc.title == "Title" and doc.text.startswith("\ufeff# Title")
    assert [(s.heading_path, s.start) for s in doc.sections] == [(("Title",), 0)]


def test_text_file_is_one_section(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain\n\ntext")
    doc = read_one(tmp_path / "a.txt")
    assert (doc.title, doc.text, [(s.start, s.end) for s in doc.sections]) == (
        "a",
        "plain\n\ntext",
        [(0, 11)],
    )


def test_html_visible_text_and_heading_sections(tmp_path: Path) -> None:
    (tmp_path / "page.html").write_text(
        "<html><head><title>Caching Guide</title><style>p {color: red}</style></head><body>"
        "<nav>Home | Docs</nav><script>alert('x')</script>"
        "<p>Intro   text\n spread.</p>"
        "<h2>Write <em>Back</em></h2><p>Dirty lines.</p><p>Flushed later.</p>"
        "<h3>Eviction</h3><ul><li>LRU</li><li>LFU</li></ul><!-- hidden -->"
        "<h2>Write Through</h2><div><div></div><p>Both <b>at once</b>.</p></div></body></html>"
    )
    doc = read_one(tmp_path / "page.html")
    assert doc.title == "Caching Guide"
    assert doc.text == (
        "Intro text spread.\n\nWrite Back\n\nDirty lines.\n\nFlushed later.\n\n"
        "Eviction\n\nLRU\nLFU\n\nWrite Through\n\nBoth at once."
    )
    assert [s.heading_path for s in doc.sections] == [
        (),
        ("Write Back",),
        ("Write Back", "Eviction"),
        ("Write Through",),
    ]
    for section in doc.sections[1:]:
        assert doc.text[section.start :].startswith(section.heading_path[-1])
    assert_partition(doc)


def test_html_title_falls_back_to_first_h1(tmp_path: Path) -> None:
    (tmp_path / "p.htm").write_text("<body><p>x</p><h1>Main</h1><pre>a  b\n  c</pre></body>")
    doc = read_one(tmp_path / "p.htm")
    assert doc.title == "Main" and doc.text == "x\n\nMain\n\na  b\n  c"


def test_pdf_pages_become_sections(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "manual.pdf", ["Alpha page text", "Beta page text"], "Manual")
    doc = read_one(path)
    assert doc.title == "Manual" and doc.pages is not None and len(doc.pages) == 2
    assert [s.heading_path for s in doc.sections] == [("page 1",), ("page 2",)]
    assert [s.start for s in doc.sections] == list(doc.pages)
    page1, page2 = (doc.text[s.start : s.end] for s in doc.sections)
    assert "Alpha page text" in page1 and "Beta page text" in page2
    assert "Beta" not in page1
    assert_partition(doc)


def test_pdf_with_one_blank_page_is_fine(tmp_path: Path) -> None:
    doc = read_one(write_pdf(tmp_path / "m.pdf", [None, "Only text here"]))
    assert doc.title == "m" and "Only text here" in doc.text[doc.sections[1].start :]


def test_pdf_without_text_layer(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "scan.pdf", [None, None])
    with pytest.raises(QaLabError, match=r"scan\.pdf: no text layer \(a scanned PDF\?\)"):
        read_corpus(tmp_path)
    (tmp_path / "ok.txt").write_text("fine")
    result = read_corpus(tmp_path, on_bad_file="skip")
    assert [d.id for d in result.documents] == ["ok.txt"]
    assert result.skipped == {"no_text_layer": 1}
    assert [rel for rel, _ in result.files] == ["ok.txt", "scan.pdf"]
    assert result.files[1][1] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_broken_pdf(tmp_path: Path) -> None:
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.7\nnot really a pdf")
    with pytest.raises(QaLabError, match=r"bad\.pdf: not a readable PDF \(Pdf\w+Error: "):
        read_corpus(tmp_path)


def test_bad_utf8_names_the_byte(tmp_path: Path) -> None:
    (tmp_path / "latin.md").write_bytes("# Café\n".encode("latin-1"))
    with pytest.raises(QaLabError, match=r"latin\.md: not valid utf-8 at byte 5; set corpus"):
        read_corpus(tmp_path)
    assert read_one(tmp_path / "latin.md", encoding="latin-1").title == "Café"


def test_extensions_that_lie(tmp_path: Path) -> None:
    (tmp_path / "a.pdf").write_text("just text")
    with pytest.raises(QaLabError, match=r"a\.pdf: the content is not PDF \(looks like text\)"):
        read_corpus(tmp_path)
    (tmp_path / "a.pdf").unlink()
    write_pdf(tmp_path / "b.md", ["pdf text"])
    with pytest.raises(QaLabError, match=r"b\.md: the content is not markdown \(looks like pdf\)"):
        read_corpus(tmp_path)
    (tmp_path / "b.md").write_bytes(b"abc\0def")
    with pytest.raises(QaLabError, match=r"b\.md: the content is not markdown \(looks like bin"):
        read_corpus(tmp_path)


def test_jsonl_rows_are_documents(tmp_path: Path) -> None:
    (tmp_path / "docs.jsonl").write_text(
        '{"id": "k1", "text": "First.", "title": "One", "url": "https://x/1"}\n\n'
        '{"id": "k2", "text": "Second."}\n'
    )
    docs = read_corpus(tmp_path).documents
    assert [(d.id, d.title, d.text, d.url) for d in docs] == [
        ("k1", "One", "First.", "https://x/1"),
        ("k2", "k2", "Second.", None),
    ]
    assert docs[1].sections[0].end == len("Second.")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"id": "k3"}', "`text` must be a non-empty string"),
        ('{"id": "", "text": "t"}', "`id` must be a non-empty string"),
        ('{"id": "k1", "text": "again"}', "duplicate document id 'k1'"),
        ('{"id": "page.md", "text": "clash"}', "duplicate document id 'page.md'"),
    ],
)
def test_jsonl_bad_row_names_file_and_line(tmp_path: Path, row: str, problem: str) -> None:
    (tmp_path / "page.md").write_text("# Page\n")
    (tmp_path / "docs.jsonl").write_text(f'{{"id": "k1", "text": "t"}}\n\n{row}\n')
    with pytest.raises(QaLabError, match=rf"docs\.jsonl:3: {problem}"):
        read_corpus(tmp_path)


def test_no_documents(tmp_path: Path) -> None:
    with pytest.raises(QaLabError, match=r": no documents \(\.md, \.txt, \.html, \.pdf, \.jsonl\)"):
        read_corpus(tmp_path)
    (tmp_path / "empty.md").write_text("  \n\n")
    with pytest.raises(QaLabError, match=r"empty\.md: empty document"):
        read_corpus(tmp_path)
    with pytest.raises(QaLabError, match=r"no documents"):  # skipped everything: still an error
        read_corpus(tmp_path, on_bad_file="skip")
    with pytest.raises(QaLabError, match=r"no such folder or file"):
        read_corpus(tmp_path / "missing")


def test_skip_counts_bad_files_by_reason(tmp_path: Path) -> None:
    (tmp_path / "good.md").write_text("# Good\n\nText.\n")
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "empty2.html").write_text("<script>only()</script>")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    (tmp_path / "fake.pdf").write_text("text")
    write_pdf(tmp_path / "scan.pdf", [None])
    (tmp_path / "rows.jsonl").write_text("oops\n")
    result = read_corpus(tmp_path, on_bad_file="skip")
    assert [d.id for d in result.documents] == ["good.md"]
    assert result.skipped == {
        "empty": 2,
        "undecodable": 1,
        "wrong_extension": 1,
        "no_text_layer": 1,
        "bad_jsonl_row": 1,
    }
    assert len(result.files) == 7


def test_glob_exclude_hidden_and_other_files(tmp_path: Path) -> None:
    for rel in ["a/x.md", "a/b/y.md", "a/z.txt", "a/.hidden/h.md", "a/.h.md", "a/skip/s.md"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    (tmp_path / "a" / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    folder = read_corpus(tmp_path / "a", exclude=["skip/*"])
    assert [d.id for d in folder.documents] == ["b/y.md", "x.md", "z.txt"]
    matched = read_corpus(f"{tmp_path}/a/**/*.md", exclude=["b/*"])
    assert [d.id for d in matched.documents] == ["skip/s.md", "x.md"]
    with pytest.raises(QaLabError, match=r"no documents"):
        read_corpus(f"{tmp_path}/a/*.html")


def test_bad_on_bad_file_and_encoding(tmp_path: Path) -> None:
    with pytest.raises(QaLabError, match=r"corpus\.on_bad_file='x' is not one of: error, skip"):
        read_corpus(tmp_path, on_bad_file="x")
    with pytest.raises(QaLabError, match=r"corpus\.encoding='nope' is not a known"):
        read_corpus(tmp_path, encoding="nope")


def test_shipped_corpus() -> None:
    result = read_corpus(CORPUS, exclude=["evidence.jsonl"])
    ids = [d.id for d in result.documents]
    every_md = sorted(p.relative_to(CORPUS).as_posix() for p in CORPUS.rglob("*.md"))
    assert ids == every_md and len(ids) >= 56 and "databases/indexing.md" in ids
    assert "evidence.jsonl" not in {rel for rel, _ in result.files}
    assert not result.skipped
    for doc in result.documents:
        assert doc.text == (CORPUS / doc.id).read_text(encoding="utf-8")
        assert len(doc.sections) >= 2 and doc.title != Path(doc.id).stem
        assert_partition(doc)
        for section in doc.sections:
            if section.heading_path:
                hashes = "#" * len(section.heading_path)
                first_line = doc.text[section.start : section.end].split("\n", 1)[0]
                assert first_line == f"{hashes} {section.heading_path[-1]}", doc.id
    indexing = next(d for d in result.documents if d.id == "databases/indexing.md")
    assert ("Indexing", "Covering Indexes") in [s.heading_path for s in indexing.sections]
