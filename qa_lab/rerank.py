"""Cross-encoder reranking: any retriever's top_n rescored on (query, passage) pairs.

`retriever.rerank` (null: off) names a sentence-transformers CrossEncoder, read from a local
folder or the Hugging Face cache only. `Reranked` has the `Retriever` interface (`search`,
`stats`, `kind`, `k`, `key`), so callers never know whether a run reranks; the index key stays
the base retriever's. `retrieval.make_retriever` builds it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qa_lab.errors import QaLabError
from qa_lab.index_base import latency_stats, read_whole
from qa_lab.records import Passage

if TYPE_CHECKING:
    from qa_lab.retrieval import Retriever


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
            top_n=read_whole(node, "top_n", cls.top_n, where=where),
            batch_size=read_whole(node, "batch_size", cls.batch_size, where=where),
        )
        if opts.model and opts.top_n < k:
            raise QaLabError(f"{where}.top_n={opts.top_n} must be >= retriever.k={k}")
        if opts.batch_size < 1:
            raise QaLabError(f"{where}.batch_size={opts.batch_size} must be >= 1")
        return opts


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
        return {**self.base.stats(), **latency_stats(self._query_ms)}
