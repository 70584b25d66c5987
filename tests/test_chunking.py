"""Chunking the shipped corpus with the real MiniLM tokenizer: exact spans, bounds, coverage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qa_lab.chunking import Chunk, chunk_documents, chunk_from_dict, chunk_to_dict
from qa_lab.config import PROJECT_ROOT
from qa_lab.errors import QaLabError
from qa_lab.models import load_embedder
from qa_lab.readers import Document, Section, read_corpus

SETTINGS = [("sections", 128, 16), ("fixed", 128, 16), ("sections", 256, 0), ("fixed", 256, 0)]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_embedder("all-MiniLM-L6-v2").tokenizer


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return read_corpus(PROJECT_ROOT / "data" / "corpus", exclude=["evidence.jsonl"]).documents


def token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def by_document(chunks: list[Chunk]) -> dict[str, list[Chunk]]:
    out: dict[str, list[Chunk]] = {}
    for chunk in chunks:
        out.setdefault(chunk.document, []).append(chunk)
    return out


@pytest.mark.parametrize(("strategy", "size", "overlap"), SETTINGS)
def test_shipped_corpus_chunks(
    corpus: list[Document], tokenizer: Any, strategy: str, size: int, overlap: int
) -> None:
    chunks = chunk_documents(
        corpus, strategy=strategy, size=size, overlap=overlap, tokenizer=tokenizer
    )
    docs = {d.id: d for d in corpus}
    assert len({c.id for c in chunks}) == len(chunks)
    assert set(by_document(chunks)) == set(docs)
    for chunk in chunks:
        doc = docs[chunk.document]
        assert chunk.text == doc.text[chunk.start : chunk.end] and chunk.text == chunk.text.strip()
        assert chunk.title == doc.title
        # the stored count is what the embedder sees when it tokenizes the chunk alone
        assert 0 < chunk.tokens == token_count(tokenizer, chunk.text) <= size
    for doc_id, doc_chunks in by_document(chunks).items():
        doc = docs[doc_id]
        assert [c.id for c in doc_chunks] == [f"{doc_id}#{n}" for n in range(len(doc_chunks))]
        covered = [False] * len(doc.text)
        for chunk in doc_chunks:
            covered[chunk.start : chunk.end] = [True] * (chunk.end - chunk.start)
        missed = [ch for ch, hit in zip(doc.text, covered) if not hit and not ch.isspace()]
        assert not missed, doc_id
        if strategy == "sections":
            for chunk in doc_chunks:
                (section,) = [s for s in doc.sections if s.start <= chunk.start < s.end]
                assert chunk.end <= section.end and chunk.heading == " > ".join(
                    section.heading_path
                )
        else:
            for prev, nxt in zip(doc_chunks, doc_chunks[1:]):
                shared = token_count(tokenizer, doc.text[nxt.start : prev.end])
                # windows snap back to a word start, so a few tokens more than asked
                assert overlap <= shared <= overlap + 6, (prev.id, shared)


def test_short_sections_are_whole_chunks_and_long_ones_cut_at_paragraphs(
    tokenizer: Any,
) -> None:
    para = "Dirty pages are flushed to disk later."  # 8 tokens: a break in every cut zone
    text = f"\n \n# Pool\n\n  {para}  \n\n## Long\n\n" + "\n\n".join([para] * 30)
    pool_at, long_at = text.index("# Pool"), text.index("## Long")
    doc = Document(
        id="pool.md",
        title="Pool",
        text=text,
        sections=(
            Section((), 0, pool_at),  # whitespace only: dropped
            Section(("Pool",), pool_at, long_at),
            Section(("Pool", "Long"), long_at, len(text)),
        ),
        path="pool.md",
    )
    chunks = chunk_documents([doc], strategy="sections", size=64, overlap=8, tokenizer=tokenizer)
    assert (chunks[0].text, chunks[0].heading) == (f"# Pool\n\n  {para}", "Pool")
    long_chunks = chunks[1:]
    assert len(long_chunks) >= 4 and {c.heading for c in long_chunks} == {"Pool > Long"}
    assert long_chunks[0].text.startswith("## Long")
    assert all(c.text.endswith(para) for c in long_chunks)  # cut at paragraph breaks
    assert all(48 <= c.tokens <= 64 for c in long_chunks[:-1])
    assert all(b.start < a.end for a, b in zip(long_chunks, long_chunks[1:]))  # overlapping


def test_fixed_heading_is_where_the_window_starts(tokenizer: Any) -> None:
    text = "# A\n\n" + "alpha " * 30 + "\n\n## B\n\n" + "beta " * 30
    b_at = text.index("## B")
    doc = Document(
        "x.md",
        "A",
        text,
        (Section(("A",), 0, b_at), Section(("A", "B"), b_at, len(text))),
        "x.md",
    )
    chunks = chunk_documents([doc], strategy="fixed", size=20, overlap=5, tokenizer=tokenizer)
    for chunk in chunks:
        assert chunk.heading == ("A > B" if chunk.start >= b_at else "A")
    assert any(c.start < b_at < c.end for c in chunks)  # fixed windows ignore headings


def test_round_trip_through_json(corpus: list[Document], tokenizer: Any) -> None:
    chunks = chunk_documents(
        corpus[:2], strategy="sections", size=128, overlap=16, tokenizer=tokenizer
    )
    rows = [json.loads(json.dumps(chunk_to_dict(c))) for c in chunks]
    assert [chunk_from_dict(r) for r in rows] == chunks
    with pytest.raises(QaLabError, match=r"lacks tokens"):
        chunk_from_dict({k: v for k, v in rows[0].items() if k != "tokens"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "words"}, r"chunking\.strategy='words' is not one of: sections, fixed"),
        ({"size": 4}, r"chunking\.size=4 must be an integer >= 8"),
        ({"overlap": -1}, r"chunking\.overlap=-1 must be >= 0 and < chunking\.size=64"),
        ({"overlap": 64}, r"chunking\.overlap=64 must be"),
    ],
)
def test_bad_values_name_the_key(
    tmp_path: Path, tokenizer: Any, kwargs: dict[str, Any], message: str
) -> None:
    (tmp_path / "a.txt").write_text("some text")
    docs = read_corpus(tmp_path).documents
    settings = {"strategy": "sections", "size": 64, "overlap": 8, **kwargs}
    with pytest.raises(QaLabError, match=message):
        chunk_documents(docs, tokenizer=tokenizer, **settings)


def test_no_documents_no_chunks(tokenizer: Any) -> None:
    blank = Document("b.txt", "b", " \n ", (Section((), 0, 3),), "b.txt")
    for strategy in ("sections", "fixed"):
        assert (
            chunk_documents([blank], strategy=strategy, size=8, overlap=0, tokenizer=tokenizer)
            == []
        )
