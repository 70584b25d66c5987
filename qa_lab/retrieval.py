"""Embeddings (cached by content), the FAISS index over the training split, batched top-k.

`retriever=none` is a real retriever that returns nothing, so every config runs the same code.
The index key covers the training split and the embedder only: `k` is chosen at query time.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab import keys
from qa_lab.cache import build_once, stable_hash
from qa_lab.errors import QaLabError
from qa_lab.records import Passage, QAItem

DOCUMENT_KINDS = ("question_answer", "question", "answer")


@lru_cache(maxsize=2)
def _embedder(name: str) -> Any:
    from qa_lab.models import load_embedder

    return load_embedder(name)


def embed(
    texts: Sequence[str],
    embedder: str,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Unit-normalised float32 embeddings, one row per text, cached by (embedder, texts)."""
    texts = list(texts)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "embeddings" / f"{stable_hash([embedder, texts])}.npy"
        if path.is_file():
            return np.load(path)
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    vectors = _embedder(embedder).encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=progress,
    )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{np.random.randint(1 << 30)}.tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
    return vectors


def document_text(item: QAItem, kind: str) -> str:
    """What an indexed document holds for one training pair."""
    if kind == "question":
        return item.question
    if kind == "answer":
        return item.answer
    return f"{item.question}\n{item.answer}"


class Retriever:
    """Top-k search over training pairs; with kind none (or k=0) every query gets nothing."""

    def __init__(
        self,
        kind: str,
        k: int,
        train: Sequence[QAItem] = (),
        *,
        train_hash: str = "",
        embedder: str = "all-MiniLM-L6-v2",
        document: str = "question_answer",
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
    ) -> None:
        if kind not in ("none", "faiss"):
            raise QaLabError(f"retriever.kind={kind!r} is not one of: none, faiss")
        if document not in DOCUMENT_KINDS:
            raise QaLabError(
                f"retriever.document={document!r} is not one of: {', '.join(DOCUMENT_KINDS)}"
            )
        if kind == "faiss" and k < 0:
            raise QaLabError(f"retriever.k={k} must be >= 0")
        if kind == "faiss" and k > len(train):
            raise QaLabError(f"retriever.k={k} is larger than the index ({len(train)} documents)")
        self.kind, self.k, self.train = kind, int(k), list(train)
        self.embedder, self.batch_size, self.cache_dir = embedder, batch_size, cache_dir
        self.key = keys.index_key(train_hash, embedder, document) if kind == "faiss" else "none"
        self._index = None
        if kind == "faiss" and self.k > 0:
            self._index = self._load_index(document)

    def _load_index(self, document: str) -> Any:
        import faiss

        def build(tmp: Path) -> dict[str, Any]:
            docs = [document_text(item, document) for item in self.train]
            vectors = embed(docs, self.embedder, batch_size=self.batch_size, progress=True)
            index = faiss.IndexFlatIP(vectors.shape[1])
            index.add(vectors)
            faiss.write_index(index, str(tmp / "index.faiss"))
            return {"documents": len(docs), "embedder": self.embedder, "document": document}

        if self.cache_dir is None:
            raise QaLabError("a faiss retriever needs paths.cache")
        folder, _ = build_once(Path(self.cache_dir) / "index" / self.key, build)
        return faiss.read_index(str(folder / "index.faiss"))

    def search(
        self, queries: Sequence[str], exclude_ids: Sequence[str] | None = None
    ) -> list[list[Passage]]:
        """Top-k passages for every query in one batched search.

        `exclude_ids[i]` drops that training item from query i's results (RAFT-style training
        prompts must never contain the example itself).
        """
        if self._index is None:
            return [[] for _ in queries]
        vectors = embed(queries, self.embedder, batch_size=self.batch_size)
        extra = 1 if exclude_ids is not None else 0
        scores, ids = self._index.search(vectors, self.k + extra)
        results = []
        for row, (score_row, id_row) in enumerate(zip(scores, ids)):
            passages = []
            for score, idx in zip(score_row, id_row):
                item = self.train[int(idx)]
                if exclude_ids is not None and item.id == exclude_ids[row]:
                    continue
                passages.append(Passage(item.id, item.question, item.answer, float(score)))
            results.append(passages[: self.k])
        return results
