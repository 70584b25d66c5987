"""What the retriever modules share: the cached index interface and the `retriever` node readers.

`retrieval` composes the index kinds into a `Retriever`; `sparse` (BM25, the hybrid) and
`rerank` (the cross-encoder) implement parts of it, and `retrieval` imports both. The few
pieces all three need live here, below them, so nothing imports in a circle.

Every index kind is built from `(documents, IndexSpec)` and has one small interface:
`build(folder)` writes it once under `<cache>/index/<key>/` (`cache.build_once`), `load(folder)`
reads it back, `search(queries, n)` returns each query's top-n `Hits`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qa_lab import checks
from qa_lab.cache import build_once
from qa_lab.errors import QaLabError

if TYPE_CHECKING:
    from qa_lab.sparse import Bm25Options, FusionOptions

Hits = list[list[tuple[int, float]]]  # per query: (passage position, score), best first


def read_number(
    node: Mapping[str, Any], key: str, default: float, *, where: str = "retriever"
) -> float:
    """`node[key]` (the class default when unset) as a float, refused as `<where>.<key>`."""
    return checks.number(node.get(key, default), f"{where}.{key}")


def read_whole(node: Mapping[str, Any], key: str, default: int, *, where: str = "retriever") -> int:
    """`node[key]` (the class default when unset) as an int, refused as `<where>.<key>`."""
    return checks.whole(node.get(key, default), f"{where}.{key}")


def latency_stats(per_query_ms: Sequence[float]) -> dict[str, float]:
    """Median and 95th percentile query latency in ms (0 before the first search)."""
    if not per_query_ms:
        return {"query_ms_p50": 0.0, "query_ms_p95": 0.0}
    p50, p95 = np.percentile(per_query_ms, [50, 95])
    return {"query_ms_p50": float(p50), "query_ms_p95": float(p95)}


@dataclass(frozen=True)
class IndexSpec:
    """What an index kind is built from besides its documents."""

    corpus_key: str
    form: str  # the document form: "chunk" for a folder corpus, else `retriever.document`
    embedder: str
    batch_size: int
    bm25: Bm25Options
    fusion: FusionOptions


class CachedIndex:
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

    def search(self, queries: Sequence[str], n: int) -> Hits:
        """Each query's top-n (passage position, score) pairs, best first."""
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
