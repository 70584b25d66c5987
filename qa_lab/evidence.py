"""Gold evidence: which corpus passages hold an item's answer.

A QA row may name its evidence (`dataset.columns.evidence`: a document, optionally a section
or a verbatim quote; synthesis from the corpus names the chunk). The gold passages are the
chunks that overlap it: the quote's character span, else the section's chunks (its
subsections included), else the whole document's. A row naming nothing gets the passage most
similar to its reference answer as gold when the cosine reaches `corpus.gold_threshold`
(`gold_source: inferred`), so retrieval metrics exist for any QA file, flagged as guesses.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from qa_lab.corpus import Corpus
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow, QAItem

Gold = tuple[str, tuple[str, ...]]  # (gold_source, passage ids)


def check_documents(items: Sequence[QAItem], corpus: Corpus, where: str) -> None:
    """Refuse evidence naming a document (or chunk) the corpus does not have, in one line.

    Run before any answering: a typo in a document id would otherwise turn into silently
    "inferred" gold, or into retrieval metrics over nothing.
    """
    if corpus.documents is None:
        return
    chunk_ids = {c.id for c in corpus.chunks}
    for item in items:
        ev = item.evidence
        if not ev:
            continue
        if ev["document"] not in corpus.documents:
            close = _closest(ev["document"], list(corpus.documents))
            raise QaLabError(
                f"{where}: row {item.id!r} names evidence document {ev['document']!r}, which is "
                f"not in the corpus{f' (did you mean {close!r}?)' if close else ''}; document "
                "ids are paths relative to corpus.source"
            )
        if "chunk" in ev and ev["chunk"] not in chunk_ids:
            raise QaLabError(
                f"{where}: row {item.id!r} names chunk {ev['chunk']!r}, which this corpus's "
                "chunking does not have (the chunking changed since the QA file was written?)"
            )


def _closest(name: str, choices: list[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def gold_for(
    items: Sequence[QAItem],
    corpus: Corpus,
    embed: Callable[[Sequence[str]], np.ndarray],
    threshold: float,
) -> list[Gold | None]:
    """Each item's gold passages: named by its evidence, else inferred, else None."""
    by_document: dict[str, list[Any]] = defaultdict(list)
    for chunk in corpus.chunks:
        by_document[chunk.document].append(chunk)
    gold: list[Gold | None] = [
        _named(it.evidence, by_document, corpus) if it.evidence and corpus.documents else None
        for it in items
    ]
    missing = [i for i, g in enumerate(gold) if g is None]
    if missing and corpus.passages:
        for i, found in zip(
            missing, _inferred([items[i] for i in missing], corpus, embed, threshold)
        ):
            gold[i] = found
    return gold


def _named(ev: dict[str, str], by_document: dict[str, list[Any]], corpus: Corpus) -> Gold | None:
    """The chunks overlapping the named evidence (None: the document has no chunk)."""
    if "chunk" in ev:
        return ("evidence", (ev["chunk"],))
    chunks = by_document.get(ev["document"], [])
    span = _quote_span(corpus.documents[ev["document"]], ev["quote"]) if "quote" in ev else None
    if span is not None:
        picked = [c.id for c in chunks if c.start < span[1] and span[0] < c.end]
    elif "section" in ev:
        wanted = ev["section"].casefold()
        picked = [
            c.id for c in chunks if wanted in (h.strip().casefold() for h in c.heading.split(" > "))
        ]
    else:
        picked = []
    picked = picked or [c.id for c in chunks]
    return ("evidence", tuple(picked)) if picked else None


def _quote_span(text: str, quote: str) -> tuple[int, int] | None:
    """Where a verbatim quote sits in a document, tolerant of line breaks and spacing."""
    start = text.find(quote)
    if start >= 0:
        return start, start + len(quote)
    words = quote.split()
    if not words:
        return None
    match = re.search(r"\s+".join(map(re.escape, words)), text)
    return (match.start(), match.end()) if match else None


def _inferred(
    items: Sequence[QAItem],
    corpus: Corpus,
    embed: Callable[[Sequence[str]], np.ndarray],
    threshold: float,
) -> list[Gold | None]:
    """The passage most similar to each reference answer, when at least `threshold` (cosine)."""
    refs = embed([it.answer for it in items])
    passages = embed([p.content for p in corpus.passages])
    sims = refs @ passages.T  # unit vectors: cosines, (items, passages)
    best = sims.argmax(axis=1)
    return [
        ("inferred", (corpus.passages[j].item_id,)) if sims[i, j] >= threshold else None
        for i, j in enumerate(best)
    ]


def evidence_overlap(test: Sequence[Gold | None], train: Sequence[Gold | None]) -> float:
    """Share of test items whose gold passage also supports a training item.

    By design with a shared corpus (the fine-tune learns the facts the test asks about), so it
    is reported apart from question leakage; NaN when no test item has gold.
    """
    train_ids = {pid for g in train if g for pid in g[1]}
    with_gold = [g for g in test if g]
    if not with_gold:
        return float("nan")
    return sum(bool(train_ids.intersection(g[1])) for g in with_gold) / len(with_gold)


def mark(rows: Sequence[EvalRow], gold: Sequence[Gold | None]) -> list[EvalRow]:
    """Rows with their gold passage ids, and a `gold` flag on each passage they retrieved."""
    out = []
    for row, g in zip(rows, gold):
        if g is None:
            out.append(row)
            continue
        ids = set(g[1])
        retrieved = tuple({**p, "gold": p["item_id"] in ids} for p in row.retrieved or ())
        out.append(replace(row, gold=g[1], gold_source=g[0], retrieved=retrieved))
    return out
