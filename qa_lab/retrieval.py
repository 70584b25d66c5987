"""Retrievers over a corpus's passages: dense (MiniLM + FAISS), BM25, their fusion, reranking.

Every kind is an index with one small interface: `build(folder)` writes it once under
`<cache>/index/<key>/` (`cache.build_once`), `load(folder)` reads it back, `search(queries, n)`
returns each query's top-n (passage position, score) pairs, best first. `Retriever` adds what
all kinds share: k, `exclude_ids`, the `Passage` records and latency stats; `Reranked` wraps any
retriever with a cross-encoder. `retriever=none` is a real retriever that returns nothing, so
every config runs the same code. Index keys cover the corpus and the kind's own settings, never
`k`: it is chosen at query time. `make_retriever` reads the `retriever` config node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qa_lab import keys
from qa_lab.cache import build_once, stable_hash
from qa_lab.errors import QaLabError, require_choice
from qa_lab.records import Passage

if TYPE_CHECKING:
    from qa_lab.corpus import Corpus

DOCUMENT_KINDS = ("question_answer", "question", "answer")
BM25_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")  # bm25s's scoring variants
STOPWORDS = ("en", "none")
STEMMERS = ("none", "porter")  # porter: nltk's PorterStemmer (PyStemmer is not installed)

Hits = list[list[tuple[int, float]]]  # per query: (passage position, score), best first


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


# --------------------------------------------------------------------------- options


def _number(
    node: Mapping[str, Any], key: str, default: float, *, where: str = "retriever"
) -> float:
    """`node[key]` as a float, or a one-line error naming `<where>.<key>`."""
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise QaLabError(f"{where}.{key}={value!r} is not a number")
    try:
        return float(value)
    except ValueError:
        raise QaLabError(f"{where}.{key}={value!r} is not a number") from None


def _whole(node: Mapping[str, Any], key: str, default: int, *, where: str = "retriever") -> int:
    """`node[key]` as an int, or a one-line error naming `<where>.<key>`."""
    value = _number(node, key, default, where=where)
    if value != int(value):
        raise QaLabError(f"{where}.{key}={value:g} is not a whole number")
    return int(value)


@dataclass(frozen=True)
class Bm25Options:
    """The BM25 keys of `retriever=bm25` and `retriever=hybrid` (conf/retriever/bm25.yaml)."""

    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str = "en"
    stemmer: str = "none"

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any]) -> Bm25Options:
        """Read and check the keys (defaults where a node lacks them, e.g. retriever=faiss)."""
        k1, b = _number(node, "k1", cls.k1), _number(node, "b", cls.b)
        if k1 < 0:
            raise QaLabError(f"retriever.k1={k1:g} must be >= 0")
        if not 0 <= b <= 1:
            raise QaLabError(f"retriever.b={b:g} must be in [0, 1]")
        return cls(
            k1=k1,
            b=b,
            method=require_choice("retriever.method", node.get("method", cls.method), BM25_METHODS),
            # null reads as none
            stopwords=require_choice(
                "retriever.stopwords", node.get("stopwords", cls.stopwords) or "none", STOPWORDS
            ),
            stemmer=require_choice(
                "retriever.stemmer", node.get("stemmer", cls.stemmer) or "none", STEMMERS
            ),
        )


@dataclass(frozen=True)
class FusionOptions:
    """How `retriever=hybrid` fuses the dense and BM25 rankings (reciprocal rank fusion)."""

    weights: Mapping[str, float] = field(default_factory=lambda: {"dense": 1.0, "bm25": 1.0})
    rrf_k: float = 60.0  # the rank offset; 60 is the RRF paper's (Cormack et al. 2009)
    depth: int = 50  # each retriever's list length that enters the fusion

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any]) -> FusionOptions:
        """Read and check `weights`, `rrf_k` and `depth`."""
        weights = node.get("weights") or {"dense": 1.0, "bm25": 1.0}
        if not isinstance(weights, Mapping) or set(weights) - {"dense", "bm25"}:
            raise QaLabError(f"retriever.weights={weights!r} may only name dense and bm25")
        parsed = {
            name: _number(weights, name, 0.0, where="retriever.weights")
            for name in ("dense", "bm25")
        }
        if min(parsed.values()) < 0 or max(parsed.values()) == 0:
            raise QaLabError(f"retriever.weights={parsed}: each must be >= 0, one > 0")
        rrf_k, depth = _number(node, "rrf_k", cls.rrf_k), _whole(node, "depth", cls.depth)
        if rrf_k < 0:
            raise QaLabError(f"retriever.rrf_k={rrf_k:g} must be >= 0")
        if depth < 1:
            raise QaLabError(f"retriever.depth={depth} must be >= 1")
        return cls(weights=parsed, rrf_k=rrf_k, depth=depth)


@dataclass(frozen=True)
class RerankOptions:
    """`retriever.rerank`: a cross-encoder rescoring the base retriever's top_n (null: off)."""

    model: str | None = None
    top_n: int = 20
    batch_size: int = 32

    @classmethod
    def from_cfg(cls, node: Mapping[str, Any] | None, k: int) -> RerankOptions:
        """Read and check `rerank`; top_n must cover the k passages returned."""
        node = node or {}
        where = "retriever.rerank"
        opts = cls(
            model=str(node["model"]) if node.get("model") else None,
            top_n=_whole(node, "top_n", cls.top_n, where=where),
            batch_size=_whole(node, "batch_size", cls.batch_size, where=where),
        )
        if opts.model and opts.top_n < k:
            raise QaLabError(f"{where}.top_n={opts.top_n} must be >= retriever.k={k}")
        if opts.batch_size < 1:
            raise QaLabError(f"{where}.batch_size={opts.batch_size} must be >= 1")
        return opts


@dataclass(frozen=True)
class IndexSpec:
    """What an index kind is built from besides its documents."""

    corpus_key: str
    form: str  # the document form: "chunk" for a folder corpus, else `retriever.document`
    embedder: str
    batch_size: int
    bm25: Bm25Options
    fusion: FusionOptions


# --------------------------------------------------------------------------- index kinds


class _CachedIndex:
    """An index built once under `<cache>/index/<key>/` and loaded from there on reuse."""

    kind: str
    key: str
    build_s = 0.0  # seconds this process spent building it (0: loaded from the cache)
    size_bytes = 0

    def build(self, folder: Path) -> dict[str, Any]:
        """Write the index into `folder`; returns the manifest body."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Read the index written by `build`."""
        raise NotImplementedError

    def open(self, cache_dir: str | Path | None) -> None:
        """Build (or reuse) the cached folder, then load it."""
        if cache_dir is None:
            raise QaLabError(f"retriever.kind={self.kind} needs paths.cache")
        start = time.perf_counter()
        folder, built = build_once(Path(cache_dir) / "index" / self.key, self.build)
        self.build_s = time.perf_counter() - start if built else 0.0
        self.size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        self.load(folder)


class NoIndex(_CachedIndex):
    """`retriever=none`: an index of nothing."""

    kind = "none"

    def __init__(self, documents: list[str], spec: IndexSpec) -> None:
        self.key = "none"

    def open(self, cache_dir: str | Path | None) -> None:
        """Nothing to build."""

    def search(self, queries: Sequence[str], n: int) -> Hits:
        """No passages for any query."""
        return [[] for _ in queries]


class DenseIndex(_CachedIndex):
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


@lru_cache(maxsize=1)
def _porter() -> Callable[[list[str]], list[str]]:
    from nltk.stem.porter import PorterStemmer

    stem = lru_cache(maxsize=None)(PorterStemmer().stem)  # a corpus repeats its words
    return lambda words: [stem(w) for w in words]


def bm25_tokens(texts: Sequence[str], opts: Bm25Options) -> list[list[str]]:
    """bm25s's tokenization (lower-cased words of 2+ characters), stopwords and stemmer applied.

    Documents and queries go through this same function, and so do the rank_bm25 baselines
    of the tests and the benchmark, so every scorer sees the same tokens.
    """
    import bm25s

    return bm25s.tokenize(
        list(texts),
        stopwords="en" if opts.stopwords == "en" else None,
        stemmer=_porter() if opts.stemmer == "porter" else None,
        return_ids=False,
        show_progress=False,
    )


class Bm25Index(_CachedIndex):
    """BM25 over the documents' tokens (bm25s: a sparse matrix of precomputed term scores)."""

    kind = "bm25"

    def __init__(self, documents: list[str], spec: IndexSpec) -> None:
        self.documents, self.opts = documents, spec.bm25
        settings = asdict(spec.bm25)
        self.key = keys.index_key(spec.corpus_key, None, spec.form, kind="bm25", settings=settings)
        self._model: Any = None

    def build(self, folder: Path) -> dict[str, Any]:
        """Tokenize, index and save with bm25s."""
        import bm25s

        model = bm25s.BM25(k1=self.opts.k1, b=self.opts.b, method=self.opts.method)
        model.index(bm25_tokens(self.documents, self.opts), show_progress=False)
        model.save(str(folder), show_progress=False)
        return {"documents": len(self.documents), **asdict(self.opts)}

    def load(self, folder: Path) -> None:
        """Read the saved bm25s index and its vocabulary."""
        import bm25s

        self._model = bm25s.BM25.load(str(folder), show_progress=False)

    def search(self, queries: Sequence[str], n: int) -> Hits:
        """Every document's score per query, top n with ties in corpus order.

        A document sharing no query term scores 0 and still fills the list: every query gets
        n passages, so the ranking metrics count a miss as a miss instead of dropping the item.
        """
        out = []
        for tokens in bm25_tokens(queries, self.opts):
            scores = self._model.get_scores_from_ids(self._model.get_tokens_ids(tokens))
            top = np.argsort(-scores, kind="stable")[:n]
            out.append([(int(i), float(scores[i])) for i in top])
        return out


def rrf(
    rankings: Mapping[str, Sequence[int]], weights: Mapping[str, float], rrf_k: float
) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: score(d) = sum_r w_r / (rrf_k + rank_r(d)), ranks from 1.

    Best first; ties keep the order in which the rankings (in the mapping's order) first
    list the document. A ranking with weight 0 is left out.
    """
    fused: dict[int, float] = {}
    for name, ranking in rankings.items():
        if weights[name] == 0:
            continue
        for rank, doc in enumerate(ranking, start=1):
            fused[doc] = fused.get(doc, 0.0) + weights[name] / (rrf_k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


class HybridIndex(_CachedIndex):
    """The dense and the BM25 index, their top-`depth` lists fused by `rrf`."""

    kind = "hybrid"

    def __init__(self, documents: list[str], spec: IndexSpec) -> None:
        self.dense, self.bm25 = DenseIndex(documents, spec), Bm25Index(documents, spec)
        self.fusion = spec.fusion
        settings = {**asdict(spec.bm25), **asdict(spec.fusion)}
        self.key = keys.index_key(
            spec.corpus_key, spec.embedder, spec.form, kind="hybrid", settings=settings
        )

    def open(self, cache_dir: str | Path | None) -> None:
        """Open both parts, each cached under its own key (shared with faiss and bm25 runs)."""
        for part in (self.dense, self.bm25):
            part.open(cache_dir)
        self.build_s = self.dense.build_s + self.bm25.build_s
        self.size_bytes = self.dense.size_bytes + self.bm25.size_bytes

    def search(self, queries: Sequence[str], n: int) -> Hits:
        """Fused top n; each list is max(depth, n) deep, so n always come back (exclusion: k+1)."""
        depth = max(self.fusion.depth, n)
        dense = self.dense.search(queries, min(depth, len(self.dense.documents)))
        # a BM25 score of 0 shares no query term: no evidence, no rank credit
        sparse = self.bm25.search(queries, min(depth, len(self.bm25.documents)))
        return [
            rrf(
                {"dense": [i for i, _ in d], "bm25": [i for i, s in b if s > 0]},
                self.fusion.weights,
                self.fusion.rrf_k,
            )[:n]
            for d, b in zip(dense, sparse)
        ]


INDEXES: dict[str, type[_CachedIndex]] = {
    "none": NoIndex,
    "faiss": DenseIndex,
    "bm25": Bm25Index,
    "hybrid": HybridIndex,
}


# --------------------------------------------------------------------------- retrievers


def _latency_stats(per_query_ms: list[float]) -> dict[str, float]:
    if not per_query_ms:
        return {"query_ms_p50": 0.0, "query_ms_p95": 0.0}
    p50, p95 = np.percentile(per_query_ms, [50, 95])
    return {"query_ms_p50": float(p50), "query_ms_p95": float(p95)}


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
        bm25: Bm25Options = Bm25Options(),
        fusion: FusionOptions = FusionOptions(),
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
            **_latency_stats(self._query_ms),
        }


def load_cross_encoder(name: str) -> Any:
    """A sentence-transformers CrossEncoder from a local folder or the HF cache, never the hub."""
    from sentence_transformers import CrossEncoder

    folder = Path(name).expanduser()
    try:
        return CrossEncoder(str(folder) if folder.is_dir() else name, local_files_only=True)
    except (OSError, ValueError) as err:
        if folder.is_dir():
            raise QaLabError(
                f"retriever.rerank.model={name}: the folder holds no cross-encoder "
                f"({type(err).__name__})"
            ) from None
        raise QaLabError(
            f"retriever.rerank.model={name}: not a local folder and not in the Hugging Face "
            "cache (no internet here)"
        ) from None


class Reranked:
    """Any retriever's top_n rescored by a cross-encoder on (query, passage content) pairs."""

    def __init__(self, base: Retriever, model: Any, opts: RerankOptions) -> None:
        self.base, self.model, self.opts = base, model, opts
        self.kind, self.k, self.key = base.kind, base.k, base.key
        self._query_ms: list[float] = []

    def search(
        self, queries: Sequence[str], exclude_ids: Sequence[str] | None = None
    ) -> list[list[Passage]]:
        """The base's top_n per query, reordered by cross-encoder score (the new score), top k."""
        start = time.perf_counter()
        candidates = self.base.search(queries, exclude_ids, k=self.opts.top_n)
        pairs = [(q, p.content) for q, found in zip(queries, candidates) for p in found]
        flat = (
            self.model.predict(pairs, batch_size=self.opts.batch_size, show_progress_bar=False)
            if pairs
            else []
        )
        results, at = [], 0
        for found in candidates:
            scores = [float(s) for s in flat[at : at + len(found)]]
            at += len(found)
            order = sorted(range(len(found)), key=lambda i: -scores[i])[: self.k]
            results.append([replace(found[i], score=scores[i]) for i in order])
        if queries:
            ms = 1000 * (time.perf_counter() - start) / len(queries)
            self._query_ms += [ms] * len(queries)
        return results

    def stats(self) -> dict[str, float]:
        """The base's index stats; latency includes the reranking."""
        return {**self.base.stats(), **_latency_stats(self._query_ms)}


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
    kind = require_choice("retriever.kind", node.get("kind"), tuple(INDEXES))
    k = _whole(node, "k", 0) if k is None else int(k)
    bm25, fusion = Bm25Options.from_cfg(node), FusionOptions.from_cfg(node)
    rerank = RerankOptions.from_cfg(node.get("rerank"), k)
    if kind == "none":
        return Retriever("none", 0)
    model = load_cross_encoder(rerank.model) if rerank.model and k > 0 else None
    base = Retriever(
        kind,
        k,
        kb,
        embedder=embedder,
        document=str(node.get("document") or "question_answer"),
        cache_dir=cache_dir,
        batch_size=batch_size,
        bm25=bm25,
        fusion=fusion,
    )
    return base if model is None else Reranked(base, model, rerank)
