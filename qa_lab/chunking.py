"""Cut corpus documents into token-bounded chunks whose spans index the document text exactly.

Windows are counted in the embedder's own tokens, using the fast tokenizer's offset mapping,
so `chunking.size` is exactly what the embedder sees (keep it <= its max_seq_length minus the
2 special tokens, or the tail is silently truncated), and a chunk's text is always
`document.text[start:end]`: no re-joined tokens, so a retrieved chunk can be quoted and traced
to its source. `sections` keeps each heading's text together (the unit evidence links name);
`fixed` is the heading-blind baseline.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from qa_lab.errors import QaLabError, require_choice
from qa_lab.readers import Document, Section

STRATEGIES = ("sections", "fixed")
MIN_SIZE = 8  # tokens; below this a window cannot hold a sentence
CUT_ZONE = 0.2  # a long section prefers a paragraph/sentence cut in the window's last 20%
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = (".", "!", "?")


@dataclass(frozen=True)
class Chunk:
    """A retrievable piece of a document; `text == document.text[start:end]`."""

    id: str  # f"{document_id}#{n}", n from 0 within the document
    document: str  # Document.id
    title: str  # Document.title
    heading: str  # " > ".join(heading_path), "" for none
    start: int  # span in Document.text, end exclusive
    end: int
    text: str
    tokens: int  # embedder tokens, no special tokens


@dataclass(frozen=True)
class _Piece:
    """A stretch of one document to window: a section (sections) or the whole text (fixed)."""

    document: Document
    start: int  # offset of `text` in document.text
    text: str


def chunk_documents(
    documents: Sequence[Document], *, strategy: str, size: int, overlap: int, tokenizer: Any
) -> list[Chunk]:
    """Chunk documents into windows of at most `size` tokens, `overlap` shared between windows.

    `tokenizer` is a Hugging Face fast tokenizer (the embedder's). Every piece is tokenized
    once, in one batch; windows end at word boundaries so a chunk re-tokenizes to the same count.
    """
    _check(strategy, size, overlap, tokenizer)
    pieces = [p for doc in documents for p in _pieces(doc, by_section=strategy == "sections")]
    if not pieces:  # the tokenizer rejects an empty batch
        return []
    encoded = tokenizer(
        [p.text for p in pieces],
        add_special_tokens=False,
        return_offsets_mapping=True,
        verbose=False,  # whole documents exceed model_max_length; we window them ourselves
    )
    chunks: list[Chunk] = []
    counts: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        offsets = encoded["offset_mapping"][i]
        words = encoded.word_ids(i)
        doc = piece.document
        for first, stop in _windows(piece.text, offsets, words, size, overlap, strategy):
            start, end = piece.start + offsets[first][0], piece.start + offsets[stop - 1][1]
            n = counts.get(doc.id, 0)
            counts[doc.id] = n + 1
            chunks.append(
                Chunk(
                    id=f"{doc.id}#{n}",
                    document=doc.id,
                    title=doc.title,
                    heading=" > ".join(_section_at(doc, start).heading_path),
                    start=start,
                    end=end,
                    text=doc.text[start:end],
                    tokens=stop - first,
                )
            )
    return chunks


def chunk_to_dict(chunk: Chunk) -> dict[str, Any]:
    """A chunk as a JSON-ready row."""
    return asdict(chunk)


def chunk_from_dict(row: dict[str, Any]) -> Chunk:
    """Rebuild a chunk from `chunk_to_dict`'s row."""
    names = [f.name for f in fields(Chunk)]
    missing = [name for name in names if name not in row]
    if missing:
        raise QaLabError(f"chunk row {row.get('id')!r} lacks {', '.join(missing)}")
    return Chunk(**{name: row[name] for name in names})


def _check(strategy: str, size: int, overlap: int, tokenizer: Any) -> None:
    """Reject bad chunking settings with the config key that holds them."""
    require_choice("chunking.strategy", strategy, STRATEGIES)
    if not isinstance(size, int) or size < MIN_SIZE:
        raise QaLabError(f"chunking.size={size!r} must be an integer >= {MIN_SIZE} (tokens)")
    if not isinstance(overlap, int) or not 0 <= overlap < size:
        raise QaLabError(f"chunking.overlap={overlap!r} must be >= 0 and < chunking.size={size}")
    if not getattr(tokenizer, "is_fast", False):
        raise QaLabError(
            f"chunking needs a fast tokenizer (character offsets); got {type(tokenizer).__name__}"
        )


def _pieces(doc: Document, by_section: bool) -> list[_Piece]:
    """Non-blank stretches to window, with surrounding whitespace moved out of the span."""
    spans = [(s.start, s.end) for s in doc.sections] if by_section else [(0, len(doc.text))]
    pieces = []
    for start, end in spans:
        raw = doc.text[start:end]
        lead = len(raw) - len(raw.lstrip())
        body = raw.strip()
        if body:
            pieces.append(_Piece(doc, start + lead, body))
    return pieces


def _section_at(doc: Document, offset: int) -> Section:
    """The section containing a character offset (sections partition the text in order)."""
    starts = [s.start for s in doc.sections]
    return doc.sections[max(bisect.bisect_right(starts, offset) - 1, 0)]


def _windows(
    text: str,
    offsets: list[tuple[int, int]],
    words: list[int | None],
    size: int,
    overlap: int,
    strategy: str,
) -> list[tuple[int, int]]:
    """Token index ranges [first, stop) covering all tokens; a short section is one window."""
    n = len(offsets)
    windows: list[tuple[int, int]] = []
    first = 0
    while n:
        stop = min(first + size, n)
        if stop < n:
            stop = (
                _best_cut(text, offsets, words, first, stop, size)
                if strategy == "sections"
                else _word_start(words, stop, first)
            )
        windows.append((first, stop))
        if stop == n:
            break
        first = _word_start(words, max(stop - overlap, first + 1), first)
    return windows


def _word_start(words: list[int | None], k: int, low: int) -> int:
    """The last token index in (low, k] that starts a word, else k (one word longer than size)."""
    for j in range(k, low, -1):
        if words[j] is None or words[j] != words[j - 1]:
            return j
    return k


def _best_cut(
    text: str,
    offsets: list[tuple[int, int]],
    words: list[int | None],
    first: int,
    stop: int,
    size: int,
) -> int:
    """Where to end a window: the last paragraph break, else sentence end, in its last 20%."""
    sentence = None
    for j in range(stop, max(first + 1, stop - int(size * CUT_ZONE)) - 1, -1):
        gap = text[offsets[j - 1][1] : offsets[j][0]]
        if _PARAGRAPH_BREAK.search(gap):
            return j
        if sentence is None and gap and text[offsets[j - 1][1] - 1] in _SENTENCE_END:
            sentence = j
    return sentence if sentence is not None else _word_start(words, stop, first)
