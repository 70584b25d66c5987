"""Read a knowledge-corpus folder into documents with heading-aware sections.

RAG retrieves from the corpus and LoRA learns it, so both arms must see the same text cut the
same way. Every `Section` and every later chunk is a character span into `Document.text`, and
for markdown that text is the file itself, so a retrieved chunk can always be traced back to
the exact lines of its source. Bad files fail with one line naming the file (and line) unless
`on_bad_file=skip`, which leaves them out and counts them by reason.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.element import PreformattedString
from markdown_it import MarkdownIt
from pypdf import PdfReader

from qa_lab.errors import QaLabError, require_choice

FORMATS = (".md", ".markdown", ".txt", ".html", ".htm", ".pdf", ".jsonl")
BAD_FILE_ACTIONS = ("error", "skip")

_KINDS = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".html": "HTML",
    ".htm": "HTML",
    ".pdf": "PDF",
    ".jsonl": "JSONL",
}
_NO_DOCUMENTS = "no documents (.md, .txt, .html, .pdf, .jsonl)"
_SNIFF_BYTES = 8192  # a NUL byte this early means binary (the heuristic git and grep use)
_MAGIC = {b"%PDF-": "pdf", b"\x89PNG\r\n\x1a\n": "binary", b"PK\x03\x04": "binary"}
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the breaks markdown-it counts lines by
_SPACES = re.compile(r"\s+")
_HTML_DROPPED = frozenset({"script", "style", "nav", "head", "noscript", "template"})
# Block elements end a paragraph (blank line); these only end a line.
_HTML_LINE = frozenset({"br", "li", "tr", "dt", "dd", "option"})
_HTML_BLOCK = frozenset(
    {
        *("address", "article", "aside", "blockquote", "caption", "details", "dialog", "div"),
        *("dl", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "main"),
        *("h1", "h2", "h3", "h4", "h5", "h6", "ol", "p", "pre", "section", "summary", "table"),
        "ul",
    }
)
_HTML_HEADINGS = {f"h{n}": n for n in range(1, 7)}


@dataclass(frozen=True)
class Section:
    """A heading's stretch of a document: from its heading line to the next heading line."""

    heading_path: tuple[str, ...]  # ("Indexing", "B-trees"); () before any heading
    start: int  # character span in Document.text, end exclusive
    end: int


@dataclass(frozen=True)
class Document:
    """One corpus document; sections partition `text` in order."""

    id: str  # posix path relative to the corpus root; a .jsonl row: its `id`
    title: str
    text: str
    sections: tuple[Section, ...]
    path: str  # the file it came from (for messages)
    url: str | None = None
    pages: tuple[int, ...] | None = None  # PDF: start offset of each page in text


@dataclass(frozen=True)
class ReadResult:
    """The documents of a corpus and the file hashes a cache can key on."""

    documents: list[Document]  # sorted by id
    files: list[tuple[str, str]]  # (relative path, sha256) of every file read, skipped too
    skipped: dict[str, int]  # reason -> count under on_bad_file=skip (empty otherwise)


class _BadFile(Exception):
    """A file that cannot become documents; `reason` is its `ReadResult.skipped` key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_corpus(
    source: str | Path,
    *,
    on_bad_file: str = "error",
    encoding: str = "utf-8",
    exclude: Sequence[str] = (),
) -> ReadResult:
    """Read every corpus file under a folder (recursively) or matching a glob pattern.

    `exclude` holds glob patterns matched against the posix path relative to the root (`*`
    crosses folders). Nothing is half-returned: under `error` the first bad file raises, under
    `skip` bad files are left out and counted; no documents at all is always an error.
    """
    require_choice("corpus.on_bad_file", on_bad_file, BAD_FILE_ACTIONS)
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise QaLabError(f"corpus.encoding={encoding!r} is not a known text encoding") from None
    root, paths = _corpus_files(source, exclude)
    taken = {_relative(p, root) for p in paths if p.suffix.lower() != ".jsonl"}  # ids in use
    documents: list[Document] = []
    files: list[tuple[str, str]] = []
    skipped: Counter[str] = Counter()
    for path in paths:
        rel = _relative(path, root)
        data = path.read_bytes()
        files.append((rel, hashlib.sha256(data).hexdigest()))
        try:
            docs = _read_file(path, rel, data, encoding, taken)
        except _BadFile as bad:
            if on_bad_file == "error":
                raise QaLabError(str(bad)) from None
            skipped[bad.reason] += 1
            continue
        documents.extend(docs)
        taken.update(d.id for d in docs)
    if not documents:
        raise QaLabError(f"{source}: {_NO_DOCUMENTS}")
    return ReadResult(sorted(documents, key=lambda d: d.id), sorted(files), dict(skipped))


def _corpus_files(source: str | Path, exclude: Sequence[str]) -> tuple[Path, list[Path]]:
    """The root folder and the sorted corpus files under it (known formats, not hidden)."""
    text = str(source)
    if glob.has_magic(text):
        parts = Path(text).parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = Path(*parts[:fixed]) if fixed else Path(".")
        found: Iterable[Path] = root.glob(str(Path(*parts[fixed:])))
    elif Path(text).is_dir():
        root, found = Path(text), Path(text).rglob("*")
    elif Path(text).is_file():
        root, found = Path(text).parent, [Path(text)]
    else:
        raise QaLabError(f"{text}: no such folder or file")
    paths = []
    for path in found:
        rel = _relative(path, root)
        if (
            path.is_file()
            and path.suffix.lower() in FORMATS
            and not any(part.startswith(".") for part in PurePosixPath(rel).parts)
            and not any(fnmatch.fnmatchcase(rel, pattern) for pattern in exclude)
        ):
            paths.append(path)
    if not paths:
        raise QaLabError(f"{text}: {_NO_DOCUMENTS}")
    return root, sorted(paths, key=lambda p: _relative(p, root))


def _relative(path: Path, root: Path) -> str:
    """A file's document id: its posix path relative to the corpus root."""
    return path.relative_to(root).as_posix()


def _read_file(path: Path, rel: str, data: bytes, encoding: str, taken: set[str]) -> list[Document]:
    """Dispatch one file to its format's reader after checking its bytes match its extension."""
    kind = _KINDS[path.suffix.lower()]
    looks_like = _sniff(data, encoding)
    if kind == "PDF":
        if looks_like != "pdf":
            raise _BadFile(
                "wrong_extension",
                f"{path}: the content is not PDF (looks like {looks_like or 'text'})",
            )
        return [_read_pdf(path, rel, data)]
    if looks_like:
        raise _BadFile(
            "wrong_extension", f"{path}: the content is not {kind} (looks like {looks_like})"
        )
    text = _decode(path, data, encoding)
    if not text.strip():
        raise _BadFile("empty", f"{path}: empty document")
    if kind == "markdown":
        return [_read_markdown(path, rel, text)]
    if kind == "HTML":
        return [_read_html(path, rel, text)]
    if kind == "JSONL":
        return _read_jsonl(path, text, taken)
    return [Document(rel, Path(rel).stem, text, (Section((), 0, len(text)),), str(path))]


def _sniff(data: bytes, encoding: str) -> str | None:
    """What the bytes look like when not text: "pdf", "binary", or None for text."""
    for magic, kind in _MAGIC.items():
        if data.startswith(magic):
            return kind
    # UTF-16/32 text is full of NULs, so the NUL test only holds for ASCII-compatible encodings.
    ascii_compatible = "a".encode(encoding) == b"a"
    return "binary" if ascii_compatible and b"\0" in data[:_SNIFF_BYTES] else None


def _decode(path: Path, data: bytes, encoding: str) -> str:
    """The file's text, or a one-line error naming the first bad byte."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise _BadFile(
            "undecodable",
            f"{path}: not valid {encoding} at byte {err.start}; "
            "set corpus.encoding or fix the file",
        ) from None


def _read_markdown(path: Path, rel: str, text: str) -> Document:
    """Sections from markdown-it's heading tokens (ATX and setext, never inside code)."""
    line_starts = [0] + [m.end() for m in _LINE_BREAK.finditer(text)]
    # A byte-order mark hides a first-line heading from markdown-it; a space keeps the offsets.
    tokens = MarkdownIt("commonmark").parse(text.replace("\ufeff", " ", 1))
    headings = [
        (int(tok.tag[1]), line_starts[tok.map[0]], tokens[i + 1].content.strip())
        for i, tok in enumerate(tokens)
        if tok.type == "heading_open" and tok.map is not None
    ]
    title = next((name for level, _, name in headings if level == 1), Path(rel).stem)
    return Document(rel, title, text, _sections(headings, len(text)), str(path))


def _sections(headings: list[tuple[int, int, str]], length: int) -> tuple[Section, ...]:
    """Partition [0, length) at heading offsets; a heading's path is its enclosing chain."""
    sections = [Section((), 0, headings[0][1] if headings else length)]
    chain: list[tuple[int, str]] = []
    for n, (level, start, name) in enumerate(headings):
        while chain and chain[-1][0] >= level:
            chain.pop()
        chain.append((level, name))
        end = headings[n + 1][1] if n + 1 < len(headings) else length
        sections.append(Section(tuple(name for _, name in chain), start, end))
    return tuple(s for s in sections if s.end > s.start)


class _TextBuilder:
    """Visible HTML text with block breaks, built so heading offsets index the final text."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.pending = 0  # newlines owed before the next text (2: a paragraph break)

    def brk(self, newlines: int) -> None:
        """End the current line (1) or paragraph (2); runs of breaks collapse to the largest."""
        self.pending = max(self.pending, newlines)

    def flush(self) -> int:
        """Emit owed breaks (dropping trailing spaces first) and return the current offset."""
        if self.pending and self.parts:
            trimmed = self.parts[-1].rstrip(" ")
            self.size -= len(self.parts[-1]) - len(trimmed)
            self.parts[-1] = trimmed
            self.add("\n" * self.pending)
        self.pending = 0
        return self.size

    def add(self, text: str) -> None:
        """Append text verbatim."""
        self.parts.append(text)
        self.size += len(text)

    def inline(self, text: str, preformatted: bool) -> None:
        """Append a text node: whitespace collapses to one space outside <pre>."""
        if not preformatted:
            text = _SPACES.sub(" ", text)
            at_line_start = self.pending or not self.parts or self.parts[-1].endswith(("\n", " "))
            if at_line_start:
                text = text.lstrip(" ")
        if text:
            self.flush()
            self.add(text)


def _read_html(path: Path, rel: str, html: str) -> Document:
    """Visible text of an HTML page, sectioned at h1..h6 in document order."""
    soup = BeautifulSoup(html, "html.parser")
    out = _TextBuilder()
    headings: list[tuple[int, int, str]] = []
    _walk_html(soup, out, headings, preformatted=False)
    text = "".join(out.parts)
    if not text.strip():
        raise _BadFile("empty", f"{path}: empty document")
    page_title = soup.title.get_text(" ", strip=True) if soup.title else ""
    first_h1 = next((name for level, _, name in headings if level == 1), "")
    title = page_title or first_h1 or Path(rel).stem
    return Document(rel, title, text, _sections(headings, len(text)), str(path))


def _walk_html(
    node: Any, out: _TextBuilder, headings: list[tuple[int, int, str]], preformatted: bool
) -> None:
    """Depth-first text extraction; records (level, offset, text) of every non-empty heading."""
    for child in node.children:
        if isinstance(child, NavigableString):
            if not isinstance(child, PreformattedString):  # comments, doctype, CDATA
                out.inline(str(child), preformatted)
            continue
        if not isinstance(child, Tag) or child.name in _HTML_DROPPED:
            continue
        breaks = 2 if child.name in _HTML_BLOCK else 1 if child.name in _HTML_LINE else 0
        out.brk(breaks)
        level = _HTML_HEADINGS.get(child.name)
        name = _SPACES.sub(" ", child.get_text(" ")).strip() if level else ""
        if name:
            headings.append((level, out.flush(), name))
        _walk_html(child, out, headings, preformatted or child.name == "pre")
        out.brk(breaks)


def _read_pdf(path: Path, rel: str, data: bytes) -> Document:
    """One section per page from pypdf's text layer; pages with no text at all are an error."""
    try:
        reader = PdfReader(io.BytesIO(data))
        texts = [page.extract_text() or "" for page in reader.pages]
        meta_title = (reader.metadata.title or "") if reader.metadata else ""
    except Exception as err:  # pypdf raises many types for damaged files; all mean the same
        reason = f"{type(err).__name__}: {err}"[:100]
        raise _BadFile("unreadable_pdf", f"{path}: not a readable PDF ({reason})") from None
    if not any(t.strip() for t in texts):
        raise _BadFile(
            "no_text_layer",
            f"{path}: no text layer (a scanned PDF?); run OCR first or set corpus.on_bad_file=skip",
        )
    starts = [0]
    for page_text in texts[:-1]:
        starts.append(starts[-1] + len(page_text) + 2)  # the "\n\n" joining pages
    text = "\n\n".join(texts)
    ends = starts[1:] + [len(text)]
    sections = tuple(
        Section((f"page {n}",), start, end) for n, (start, end) in enumerate(zip(starts, ends), 1)
    )
    title = str(meta_title).strip() or Path(rel).stem
    return Document(rel, title, text, sections, str(path), pages=tuple(starts))


def _read_jsonl(path: Path, text: str, taken: set[str]) -> list[Document]:
    """One document per row {id, text, title?, url?}; any bad row fails the whole file."""
    documents: list[Document] = []
    ids = set(taken)
    for lineno, line in enumerate(_LINE_BREAK.split(text), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        row = _jsonl_row(where, line)
        if row["id"] in ids:
            raise _BadFile("bad_jsonl_row", f"{where}: duplicate document id {row['id']!r}")
        ids.add(row["id"])
        body = row["text"]
        documents.append(
            Document(
                id=row["id"],
                title=row.get("title") or row["id"],
                text=body,
                sections=(Section((), 0, len(body)),),
                path=str(path),
                url=row.get("url"),
            )
        )
    return documents


def _jsonl_row(where: str, line: str) -> dict[str, Any]:
    """A parsed row with a non-empty string id and text, and string title/url if present."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadFile("bad_jsonl_row", f"{where}: not JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise _BadFile("bad_jsonl_row", f"{where}: expected a JSON object")
    for key in ("id", "text"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise _BadFile("bad_jsonl_row", f"{where}: `{key}` must be a non-empty string")
    for key in ("title", "url"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise _BadFile("bad_jsonl_row", f"{where}: `{key}` must be a string")
    return row
