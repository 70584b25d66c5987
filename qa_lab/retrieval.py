"""Retrievers over a corpus's passages: the embeddings, the dense index, one `Retriever`.

Every kind is an `index_base.CachedIndex`: built once under `<cache>/index/<key>/`, loaded
back, searched for each query's top-n (passage position, score) pairs. Here: `none` and the
dense (MiniLM + FAISS) index, and `INDEXES`, every kind by name; BM25 and its fusion with the
dense index live in `sparse`, the cross-encoder in `rerank`. `Retriever` adds what all kinds
share: k, `exclude_ids`, the `Passage` records and latency stats; `Reranked` wraps any
retriever. `retriever=none` is a real retriever that returns nothing, so every config runs the
same code. Index keys cover the corpus and the kind's own settings, never `k`: it is chosen at
query time. `make_retriever` reads the `retriever` config node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qa_lab import checks, keys
from qa_lab.cache import stable_hash
from qa_lab.errors import QaLabError, require_choice
from qa_lab.index_base import CachedIndex, Hits, IndexSpec, latency_stats
from qa_lab.records import Passage
from qa_lab.rerank import Reranked, RerankOptions, load_cross_encoder
from qa_lab.sparse import Bm25Index, Bm25Options, FusionOptions, HybridIndex

if TYPE_CHECKING:
    from qa_lab.corpus import Corpus

DOCUMENT_KINDS = ("question_answer", "question", "answer")


@lru_cache(maxsize=2)
def _embedder(name: str) -> Any:
    from qa_lab.models import load_embedder

    return load_embedder(name)


def embedder_tokenizer(name: str) -> Any:
    """The embedder's own tokenizer: chunk sizes are counted in the tokens it reads."""
    return _embedder(name).tokenizer


def embedder_max_tokens(name: str) -> int:
    """Text tokens the embedder reads before it truncates (its special tokens left out)."""
    model = _embedder(name)
    return int(model.max_seq_length) - model.tokenizer.num_special_tokens_to_add()


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


def document_text(passage: Passage, kind: str) -> str:
    """What an indexed document holds: a chunk's text, or the chosen part of a training pair."""
    if passage.text:
        return passage.text
    if kind == "question":
        return passage.question
    if kind == "answer":
        return passage.answer
    return f"{passage.question}\n{passage.answer}"


# --------------------------------------------------------------------------- index kinds


class NoIndex(CachedIndex):
    """`retriever=none`: an index of nothing."""

    kind = "none"

    def __init__(self, documents: list[str], spec: IndexSpec) -> None:
        self.key = "none"

    def open(self, cache_dir: str | Path | None) -> None:
        """Nothing to build."""

    def search(self, queries: Sequence[str], n: int) -> Hits:
        """No passages for any query."""
        return [[] for _ in queries]


class DenseIndex(CachedIndex):
    """MiniLM embeddings in a FAISS inner-product index (cosine: the vectors are unit length)."""

    kind = "faiss"

    def __init__(self, documents: list[str], spec: IndexSpec) -> None:
        self.documents, self.spec = documents, spec
        self.key = keys.index_key(spec.corpus_key, spec.embedder, spec.form)
        self._index: Any = None

    def build(self, folder: Path) -> dict[str, Any]:
        """Embed every document and write index.faiss."""
        import faiss

        vectors = embed(
            self.documents, self.spec.embedder, batch_size=self.spec.batch_size, progress=True
        )
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        faiss.write_index(index, str(folder / "index.faiss"))
        return {
            "documents": len(self.documents),
            "embedder": self.spec.embedder,
            "document": self.spec.form,
        }

    def load(self, folder: Path) -> None:
        """Read index.faiss."""
        import faiss

        self._index = faiss.read_index(str(folder / "index.faiss"))

    def search(self, queries: Sequence[str], n: int) -> Hits:
        """One batched embedding and FAISS search."""
        vectors = embed(queries, self.spec.embedder, batch_size=self.spec.batch_size)
        scores, ids = self._index.search(vectors, n)
        return [
            [(int(i), float(s)) for s, i in zip(score_row, id_row)]
            for score_row, id_row in zip(scores, ids)
        ]


def _hybrid(documents: list[str], spec: IndexSpec) -> HybridIndex:
    """`retriever=hybrid`: BM25 fused with the same dense index a `faiss` run opens."""
    return HybridIndex(documents, spec, dense=DenseIndex(documents, spec))


# every kind by name: its index class, or the function that builds it from (documents, spec)
INDEXES: dict[str, Callable[[list[str], IndexSpec], CachedIndex]] = {
    "none": NoIndex,
    "faiss": DenseIndex,
    "bm25": Bm25Index,
    "hybrid": _hybrid,
}


# --------------------------------------------------------------------------- retrievers


class Retriever:
    """Top-k search over a corpus's passages; with kind none (or k=0) every query gets nothing.

    Bad settings are refused before any index is built.
    """

    def __init__(
        self,
        kind: str,
        k: int,
        corpus: Corpus | None = None,
        *,
        embedder: str = "all-MiniLM-L6-v2",
        document: str = "question_answer",
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        bm25: Bm25Options = Bm25Options(),  # noqa: B008 (frozen: safe to share)
        fusion: FusionOptions = FusionOptions(),  # noqa: B008
    ) -> None:
        require_choice("retriever.kind", kind, tuple(INDEXES))
        require_choice("retriever.document", document, DOCUMENT_KINDS)
        self.passages = list(corpus.passages) if corpus is not None else []
        self.kind, self.k = kind, 0 if kind == "none" else int(k)
        if self.k < 0:
            raise QaLabError(f"retriever.k={self.k} must be >= 0")
        if self.k > len(self.passages):
            raise QaLabError(
                f"retriever.k={self.k} is larger than the index ({len(self.passages)} documents)"
            )
        if kind == "hybrid" and fusion.depth < self.k:
            raise QaLabError(f"retriever.depth={fusion.depth} must be >= retriever.k={self.k}")
        # chunks are indexed as their text whatever `document` says (it shapes pairs only)
        form = document if corpus is None or corpus.kind == "train_qa" else "chunk"
        spec = IndexSpec(corpus.key if corpus else "", form, embedder, batch_size, bm25, fusion)
        self._index = INDEXES[kind]([document_text(p, document) for p in self.passages], spec)
        self.key = self._index.key
        if self.k > 0:
            self._index.open(cache_dir)
        self._query_ms: list[float] = []

    def search(
        self,
        queries: Sequence[str],
        exclude_ids: Sequence[str] | None = None,
        *,
        k: int | None = None,
    ) -> list[list[Passage]]:
        """Top-k passages (score set) for every query in one batched search.

        `exclude_ids[i]` drops that passage from query i's results (RAFT-style training
        prompts must never contain the example itself). `k` overrides `self.k` (a reranker
        asks for its top_n), capped at the corpus size.
        """
        n = min(self.k if k is None else k, len(self.passages))
        if self.k == 0 or n == 0:
            return [[] for _ in queries]
        start = time.perf_counter()
        extra = 1 if exclude_ids is not None else 0
        hits = self._index.search(list(queries), min(n + extra, len(self.passages)))
        results = []
        for row, found in enumerate(hits):
            passages = [
                replace(self.passages[i], score=score)
                for i, score in found
                if exclude_ids is None or self.passages[i].item_id != exclude_ids[row]
            ]
            results.append(passages[:n])
        # searches are batched: a query's latency is its batch's time over the batch size
        self._query_ms += [1000 * (time.perf_counter() - start) / len(queries)] * len(queries)
        return results

    def stats(self) -> dict[str, float]:
        """Index build seconds (0: loaded from the cache), its size, query latency so far."""
        opened = self.k > 0
        return {
            "index_build_s": self._index.build_s,
            "index_bytes": float(self._index.size_bytes),
            "index_documents": float(len(self.passages) if opened else 0),
            **latency_stats(self._query_ms),
        }


def make_retriever(
    node: Mapping[str, Any],
    kb: Corpus | None,
    *,
    embedder: str,
    cache_dir: str | Path | None,
    batch_size: int,
    k: int | None = None,
) -> Retriever | Reranked:
    """The retriever a `retriever` config node describes; `k` overrides `node.k`.

    Every setting is checked, and the rerank model loaded, before any index is built.
    """
    opts = retriever_settings(node, k)
    if opts.kind == "none":
        return Retriever("none", 0)
    rerank = opts.rerank
    model = load_cross_encoder(rerank.model) if rerank.model and opts.k > 0 else None
    base = Retriever(
        opts.kind,
        opts.k,
        kb,
        embedder=embedder,
        document=opts.document,
        cache_dir=cache_dir,
        batch_size=batch_size,
        bm25=opts.bm25,
        fusion=opts.fusion,
    )
    return base if model is None else Reranked(base, model, rerank)


@dataclass(frozen=True)
class RetrieverSettings:
    """A `retriever` node read and checked: what `make_retriever` builds from."""

    kind: str
    k: int
    document: str
    bm25: Bm25Options
    fusion: FusionOptions
    rerank: RerankOptions


def retriever_settings(node: Mapping[str, Any], k: int | None = None) -> RetrieverSettings:
    """Every retriever setting checked, nothing built or loaded; `k` overrides `node.k`.

    `make_retriever`'s first step, and what the scripts' boundary check (`qa_lab.validate`)
    calls, so both refuse the same values with the same lines.
    """
    depth = checks.whole(node.get("k"), "retriever.k", low=0) if k is None else int(k)
    return RetrieverSettings(
        kind=require_choice("retriever.kind", node.get("kind"), tuple(INDEXES)),
        k=depth,
        document=require_choice(
            "retriever.document", node.get("document") or "question_answer", DOCUMENT_KINDS
        ),
        bm25=Bm25Options.from_cfg(node),
        fusion=FusionOptions.from_cfg(node),
        rerank=RerankOptions.from_cfg(node.get("rerank"), depth),
    )
