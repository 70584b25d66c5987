"""The lexical retrievers: BM25 (bm25s) and its reciprocal rank fusion with a dense index.

`retriever=bm25` is `Bm25Index`; `retriever=hybrid` is `HybridIndex`, which fuses a dense
index it is given (`retrieval`'s FAISS one, so this module loads no embedder) with a BM25 index
over the same documents. Both are `index_base.CachedIndex` kinds, keyed by the corpus and their
own settings. Not to be confused with `lexical`, the lexical *answer* metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab import keys
from qa_lab.errors import QaLabError, require_choice
from qa_lab.index_base import CachedIndex, Hits, IndexSpec, read_number, read_whole

BM25_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")  # bm25s's scoring variants
STOPWORDS = ("en", "none")
STEMMERS = ("none", "porter")  # porter: nltk's PorterStemmer (PyStemmer is not installed)


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
        k1, b = read_number(node, "k1", cls.k1), read_number(node, "b", cls.b)
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
            name: read_number(weights, name, 0.0, where="retriever.weights")
            for name in ("dense", "bm25")
        }
        if min(parsed.values()) < 0 or max(parsed.values()) == 0:
            raise QaLabError(f"retriever.weights={parsed}: each must be >= 0, one > 0")
        rrf_k, depth = read_number(node, "rrf_k", cls.rrf_k), read_whole(node, "depth", cls.depth)
        if rrf_k < 0:
            raise QaLabError(f"retriever.rrf_k={rrf_k:g} must be >= 0")
        if depth < 1:
            raise QaLabError(f"retriever.depth={depth} must be >= 1")
        return cls(weights=parsed, rrf_k=rrf_k, depth=depth)


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


class Bm25Index(CachedIndex):
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


class HybridIndex(CachedIndex):
    """A dense index and a BM25 one over the same documents, top-`depth` lists fused by `rrf`.

    `dense` is given, already keyed (`retrieval` passes its FAISS index), so the two parts are
    cached under the keys a faiss and a bm25 run use.
    """

    kind = "hybrid"

    def __init__(self, documents: list[str], spec: IndexSpec, *, dense: CachedIndex) -> None:
        self.dense, self.bm25 = dense, Bm25Index(documents, spec)
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
        depth = min(max(self.fusion.depth, n), len(self.bm25.documents))  # the parts' documents
        dense = self.dense.search(queries, depth)
        # a BM25 score of 0 shares no query term: no evidence, no rank credit
        sparse = self.bm25.search(queries, depth)
        return [
            rrf(
                {"dense": [i for i, _ in d], "bm25": [i for i, s in b if s > 0]},
                self.fusion.weights,
                self.fusion.rrf_k,
            )[:n]
            for d, b in zip(dense, sparse)
        ]
