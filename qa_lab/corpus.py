"""The knowledge corpus: the passages RAG retrieves and the text the fine-tune can learn.

Two kinds share one record (`Corpus`): `folder` reads documents (`readers`) and cuts them into
chunks (`chunking`), a cached stage keyed by the files' bytes and the chunking config
(`corpus/<key>/`: documents.jsonl, chunks.jsonl, manifest.json last); `train_qa` takes the
training split's QA pairs as its passages, the original study's design, which by the group
split holds no test answer. Everything downstream (the index, gold evidence, continued
pretraining) reads a `Corpus`, never the kind.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab import checks, chunking, readers
from qa_lab.cache import file_sha256, stable_hash, tree_sha256
from qa_lab.errors import QaLabError, require_choice
from qa_lab.jsonl import read_jsonl, write_jsonl
from qa_lab.records import Passage, QAItem

KINDS = ("folder", "train_qa")


@dataclass(frozen=True)
class ChunkingOptions:
    """The `chunking` node: strategy, and size/overlap in the embedder's tokens."""

    strategy: str
    size: int
    overlap: int

    @classmethod
    def from_cfg(cls, node: Any) -> ChunkingOptions:
        """Read `chunking`, refusing a bad value before any work (`chunk_documents` re-checks)."""
        size = checks.whole(node.size, "chunking.size", low=chunking.MIN_SIZE)
        overlap = checks.whole(node.overlap, "chunking.overlap", low=0)
        if overlap >= size:
            raise QaLabError(f"chunking.overlap={overlap} must be < chunking.size={size}")
        return cls(
            strategy=require_choice("chunking.strategy", node.strategy, chunking.STRATEGIES),
            size=size,
            overlap=overlap,
        )


@dataclass(frozen=True)
class CorpusOptions:
    """The `corpus` node (conf/corpus/*.yaml documents each key)."""

    kind: str
    source: str | None
    exclude: tuple[str, ...]
    encoding: str
    on_bad_file: str
    gold_threshold: float

    @classmethod
    def from_cfg(cls, node: Any) -> CorpusOptions:
        """Read `corpus`, refusing an unknown kind or bad-file action before any work."""
        kind = require_choice("corpus.kind", node.kind, KINDS)
        return cls(
            kind=kind,
            source=str(node.source) if node.get("source") else None,
            exclude=tuple(node.get("exclude") or ()),
            encoding=str(node.get("encoding") or "utf-8"),
            on_bad_file=require_choice(
                "corpus.on_bad_file", node.get("on_bad_file") or "error", readers.BAD_FILE_ACTIONS
            ),
            gold_threshold=checks.number(
                node.gold_threshold, "corpus.gold_threshold", low=-1, high=1
            ),
        )


@dataclass(frozen=True)
class Corpus:
    """Passages in index order, and for a folder the chunks and their documents' text.

    `key` identifies the passages (the index key is built on it); `texts` are what the
    continued pretraining reads (a folder's chunk texts; none for train_qa, whose pairs the
    SFT already trains on).
    """

    key: str
    kind: str
    passages: tuple[Passage, ...]
    chunks: tuple[chunking.Chunk, ...] = ()
    documents: dict[str, str] | None = None  # document id -> its text (spans index into it)

    @property
    def texts(self) -> list[str]:
        """The chunk texts (continued pretraining's input)."""
        return [c.text for c in self.chunks]


# --------------------------------------------------------------------------- a folder


def files_hash(opts: CorpusOptions) -> str:
    """Content hash of the corpus source: a folder's whole tree, or the files a glob matches.

    Refuses a source that does not exist with a one-line error naming `corpus.source`.
    """
    source = str(opts.source or "")
    path = Path(source)
    if path.is_dir():
        return tree_sha256(path)
    matches = sorted(p for p in glob.glob(source, recursive=True) if Path(p).is_file())
    if not matches:
        raise QaLabError(f"corpus.source={source}: no such folder, and no file matches it")
    return stable_hash([[p, file_sha256(p)] for p in matches])


def build_into(opts: CorpusOptions, chunk_opts: ChunkingOptions, tokenizer: Any, out: Path) -> dict:
    """Read -> chunk -> write documents.jsonl and chunks.jsonl; returns the manifest's fields."""
    read = readers.read_corpus(
        str(opts.source), on_bad_file=opts.on_bad_file, encoding=opts.encoding, exclude=opts.exclude
    )
    chunks = chunking.chunk_documents(
        read.documents,
        strategy=chunk_opts.strategy,
        size=chunk_opts.size,
        overlap=chunk_opts.overlap,
        tokenizer=tokenizer,
    )
    write_jsonl(
        out / "documents.jsonl",
        [
            {"id": d.id, "title": d.title, "path": d.path, "url": d.url, "text": d.text}
            for d in read.documents
        ],
    )
    write_jsonl(out / "chunks.jsonl", [chunking.chunk_to_dict(c) for c in chunks])
    tokens = np.array([c.tokens for c in chunks], dtype=float)
    print(
        f"corpus: {len(read.documents)} documents from {opts.source} -> {len(chunks)} chunks "
        f"({chunk_opts.strategy}, {chunk_opts.size} tokens, overlap {chunk_opts.overlap})"
        + (f"; skipped {read.skipped}" if read.skipped else ""),
        flush=True,
    )
    return {
        "counts": {
            "files": len(read.files),
            "documents": len(read.documents),
            "chunks": len(chunks),
        },
        "skipped": dict(read.skipped),
        "tokens": {
            "total": int(tokens.sum()),
            "mean": float(tokens.mean()),
            "p50": float(np.percentile(tokens, 50)),
            "p95": float(np.percentile(tokens, 95)),
            "max": int(tokens.max()),
        },
        "source_files": [list(f) for f in read.files],
        "chunking": {
            "strategy": chunk_opts.strategy,
            "size": chunk_opts.size,
            "overlap": chunk_opts.overlap,
        },
    }


def load_folder(folder: Path, key: str) -> Corpus:
    """A built corpus folder as a `Corpus` (chunk passages in chunks.jsonl order)."""
    chunks = tuple(chunking.chunk_from_dict(row) for row in read_jsonl(folder / "chunks.jsonl"))
    documents = {row["id"]: row["text"] for row in read_jsonl(folder / "documents.jsonl")}
    passages = tuple(
        Passage(c.id, text=c.text, document=c.document, heading=c.heading) for c in chunks
    )
    return Corpus(key=key, kind="folder", passages=passages, chunks=chunks, documents=documents)


# --------------------------------------------------------------------------- train_qa


def from_train(train: list[QAItem], train_hash: str) -> Corpus:
    """The training pairs as the passages (`corpus=train_qa`), keyed by the split's hash."""
    passages = tuple(Passage(it.id, it.question, it.answer) for it in train)
    return Corpus(key=train_hash, kind="train_qa", passages=passages)
