"""Lineage: which items are relatives (a seed and its rewordings), so no split separates them.

Near-duplicates across train and test would make test scores measure memorisation, and the
seed-clustered statistics resample whole families; both read the lineage decided here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from qa_lab.errors import QaLabError
from qa_lab.records import QAItem
from qa_lab.similarity import as_matrix, check_threshold, nearest_neighbours, similar_pairs


def assign_seeds(items: Sequence[QAItem], vectors: np.ndarray, n_seeds: int) -> list[QAItem]:
    """`dataset.seeds=N`: the first N rows are seeds; every later row joins its nearest seed.

    A dataset expanded elsewhere (seeds first, then their paraphrases) carries no lineage;
    the most similar seed question is the best evidence of which seed a row came from, and
    it makes the group split and the seed-clustered statistics treat a seed's family as one.

    Args:
        items: Loaded items in file order.
        vectors: (n, d) unit-normalised question embeddings, row for row.
        n_seeds: How many leading rows are seeds.

    Returns:
        Items with `seed_id` set (seeds: their own id) and `source` seed / expanded.
    """
    if not isinstance(n_seeds, int) or isinstance(n_seeds, bool) or not 1 <= n_seeds <= len(items):
        raise QaLabError(f"dataset.seeds={n_seeds} must be a row count between 1 and {len(items)}")
    if any(it.seed_id not in (None, it.id) for it in items):
        raise QaLabError(
            "dataset.seeds and a seed_id column both give lineage; set only one "
            "(dataset.seeds=null or drop dataset.columns.seed_id)"
        )
    x = as_matrix(vectors)
    if len(x) != len(items):
        raise ValueError(f"{len(x)} vectors for {len(items)} items")
    seeds = [replace(it, seed_id=it.id, source="seed") for it in items[:n_seeds]]
    nearest, _ = nearest_neighbours(x[n_seeds:], x[:n_seeds])
    expanded = [
        replace(it, seed_id=seeds[j].id, source="expanded" if it.source == "seed" else it.source)
        for it, j in zip(items[n_seeds:], nearest.tolist())
    ]
    return seeds + expanded


def lineage_groups(
    items: Sequence[QAItem], vectors: np.ndarray | None, threshold: float
) -> list[str]:
    """Label each item with its lineage group, so a split never separates relatives.

    Items are linked when they share a `seed_id` (a seed and its paraphrases), when one's
    `seed_id` is another's id, or when their questions have cosine >= `threshold`; groups
    are the connected components. Near-duplicates across train and test would otherwise
    make test scores measure memorisation.

    Args:
        items: Items in file order.
        vectors: (n, d) unit-normalised question embeddings, or None to link by seed only.
        threshold: Cosine at which two questions belong together.

    Returns:
        Per item, the id of the first item (in file order) of its group.
    """
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the root is always the earliest member

    by_id = {item.id: i for i, item in enumerate(items)}
    by_seed: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.seed_id is None:
            continue
        union(i, by_seed.setdefault(item.seed_id, i))
        if item.seed_id in by_id:
            union(i, by_id[item.seed_id])
    if vectors is not None and len(items):
        if len(vectors) != len(items):
            raise ValueError(f"{len(vectors)} vectors for {len(items)} items")
        for i, j, _ in similar_pairs(
            vectors, check_threshold(threshold, "dataset.split.group_threshold")
        ):
            union(i, j)
    return [items[find(i)].id for i in range(len(items))]
