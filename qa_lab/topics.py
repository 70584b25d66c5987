"""Topics: mapped labels cleaned of spelling variants, or inferred by clustering questions.

Per-topic breakdowns are a headline result, so every dataset gets topics: a file's own topic
column (spellings that differ only in case or spacing merged, look-alike labels reported but
never merged), else k-means clusters of the question embeddings named by their TF-IDF terms.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from difflib import SequenceMatcher
from typing import Any

import numpy as np

from qa_lab import checks
from qa_lab.errors import QaLabError
from qa_lab.records import QAItem
from qa_lab.similarity import as_matrix


@dataclass(frozen=True)
class TopicOptions:
    """`dataset.topics`: inference when a file has no topic column, look-alike reporting."""

    infer: bool
    min_k: int
    max_k: int
    seed: int
    terms: int
    similar_labels: float

    @classmethod
    def from_cfg(cls, node: Any) -> TopicOptions:
        """Read `dataset.topics`, each value checked by `qa_lab.checks` with its key.

        `infer_topics` checks min_k <= max_k (and the bounds again, for direct callers).
        """
        where = "dataset.topics"
        return cls(
            infer=checks.flag(node.infer, f"{where}.infer"),
            min_k=checks.whole(node.min_k, f"{where}.min_k", low=2),
            max_k=checks.whole(node.max_k, f"{where}.max_k", low=2),
            seed=checks.whole(node.seed, f"{where}.seed"),
            terms=checks.whole(node.terms, f"{where}.terms", low=1),
            similar_labels=checks.number(
                node.similar_labels, f"{where}.similar_labels", low=0, high=1
            ),
        )


def _label_key(label: str) -> str:
    return " ".join(label.split()).casefold()


def clean_topics(items: Sequence[QAItem], similar: float) -> tuple[list[QAItem], dict[str, Any]]:
    """Unify spellings of mapped topics that differ only in case or spacing; report look-alikes.

    "Networking", "networking " and "NETWORKING" are one topic (the most frequent spelling
    wins, then the first seen), because a per-topic breakdown split three ways by a
    spreadsheet's typing says nothing. Labels that are merely similar ("network" and
    "networks", "data structures" and "data_structures") may be different topics, so they
    are reported for the user to fix in the file, never merged.

    Args:
        items: Loaded items with their topic cells (whitespace already collapsed).
        similar: difflib ratio at or above which two distinct labels are reported.

    Returns:
        Items with `topic_source="mapped"` where they have a topic, and a JSON-ready report:
        `source`, `merged` (spelling -> label used), `similar` ([a, b, ratio] pairs), `labels`
        (label -> rows).
    """
    spellings: dict[str, Counter[str]] = {}
    for item in items:
        if item.topic:
            spellings.setdefault(_label_key(item.topic), Counter())[item.topic] += 1
    chosen = {key: counts.most_common(1)[0][0] for key, counts in spellings.items()}
    merged = {
        spelling: chosen[key]
        for key, counts in spellings.items()
        for spelling in counts
        if spelling != chosen[key]
    }
    out = [
        replace(it, topic=chosen[_label_key(it.topic)], topic_source="mapped") if it.topic else it
        for it in items
    ]
    labels = Counter(it.topic for it in out if it.topic)
    report = {
        "source": "mapped",
        "merged": merged,
        "similar": similar_labels(list(labels), similar),
        "labels": dict(labels.most_common()),
    }
    return out, report


def similar_labels(labels: Sequence[str], threshold: float) -> list[list[Any]]:
    """Pairs of distinct labels that look like one label typed two ways.

    Two labels are flagged when they are equal once spaces, underscores, hyphens and other
    punctuation are removed, or when their difflib ratio is at least `threshold`.

    Returns:
        [label_a, label_b, ratio] rows, in label order.
    """
    squashed = ["".join(ch for ch in _label_key(lab) if ch.isalnum()) for lab in labels]
    pairs: list[list[Any]] = []
    for i, a in enumerate(labels):
        for j in range(i + 1, len(labels)):
            matcher = SequenceMatcher(None, _label_key(a), _label_key(labels[j]))
            if squashed[i] == squashed[j] or (
                matcher.quick_ratio() >= threshold and matcher.ratio() >= threshold
            ):
                pairs.append([a, labels[j], round(matcher.ratio(), 3)])
    return pairs


def infer_topics(
    items: Sequence[QAItem],
    vectors: np.ndarray,
    *,
    min_k: int,
    max_k: int,
    seed: int,
    terms: int,
) -> tuple[list[QAItem], dict[str, Any]]:
    """Topics for data without a topic column: k-means on the question embeddings.

    Per-topic breakdowns are a headline result, so they must exist for any file. k is the
    value in [min_k, max_k] with the best silhouette (seeded k-means, so the same data
    gives the same topics); each topic is named by the TF-IDF terms that are most
    characteristic of its questions (cluster mean minus corpus mean), joined with `-` so the
    name is a valid MLflow metric path segment.

    Args:
        items: Items in file order.
        vectors: (n, d) unit-normalised question embeddings, row for row.
        min_k: Fewest topics tried (`dataset.topics.min_k`, >= 2).
        max_k: Most topics tried (`dataset.topics.max_k`); capped at n - 1.
        seed: k-means and silhouette sampling seed.
        terms: Terms in each topic's name.

    Returns:
        Items with `topic` and `topic_source="inferred"`, and a JSON-ready report: `source`,
        `k`, `silhouette` (k -> score), `labels` (name -> rows), `terms` (name -> terms).
    """
    if not 2 <= int(min_k) <= int(max_k):
        raise QaLabError(
            f"dataset.topics.min_k={min_k} and dataset.topics.max_k={max_k} must satisfy "
            "2 <= min_k <= max_k"
        )
    if int(terms) < 1:
        raise QaLabError(f"dataset.topics.terms={terms} must be at least 1")
    x = as_matrix(vectors)
    if len(x) != len(items):
        raise ValueError(f"{len(x)} vectors for {len(items)} items")
    scores, labels = _best_kmeans(x, int(min_k), min(int(max_k), len(items) - 1), int(seed))
    names = _topic_names([it.question for it in items], labels, int(terms))
    out = [
        replace(it, topic=names[label], topic_source="inferred") for it, label in zip(items, labels)
    ]
    counts = Counter(it.topic for it in out)
    report = {
        "source": "inferred",
        "k": len(names),
        "silhouette": {str(k): round(v, 4) for k, v in scores.items()},
        "labels": dict(counts.most_common()),
        "terms": {name: name.split("-") for name in names},
    }
    return out, report


def _best_kmeans(
    x: np.ndarray, min_k: int, max_k: int, seed: int
) -> tuple[dict[int, float], np.ndarray]:
    """Silhouette per k and the labels of the best k, renumbered by first appearance."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    scores: dict[int, float] = {}
    best = np.zeros(len(x), dtype=np.int64)  # too few distinct questions: one topic
    best_k = 0
    distinct = len(np.unique(x.round(6), axis=0))
    for k in range(min_k, min(max_k, distinct - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        sample = min(len(x), 4000)  # silhouette is O(n^2): a seeded sample bounds it
        try:
            scores[k] = float(silhouette_score(x, labels, sample_size=sample, random_state=seed))
        except ValueError:  # the sample fell into one cluster
            continue
        if not best_k or scores[k] > scores[best_k]:  # ties: the fewer topics
            best_k, best = k, labels
    order = {label: i for i, label in enumerate(dict.fromkeys(best.tolist()))}
    return scores, np.array([order[label] for label in best.tolist()], dtype=np.int64)


def _topic_names(questions: Sequence[str], labels: np.ndarray, terms: int) -> list[str]:
    """Name each cluster by its most characteristic TF-IDF terms; names are unique."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    k = int(labels.max()) + 1
    try:
        tfidf = TfidfVectorizer(stop_words="english", sublinear_tf=True).fit(questions)
        matrix = tfidf.transform(questions)
    except ValueError:  # no usable words at all (numbers, stop words only)
        return [f"topic-{c + 1}" for c in range(k)]
    vocab = tfidf.get_feature_names_out()
    overall = np.asarray(matrix.mean(axis=0)).ravel()
    names: list[str] = []
    for c in range(k):
        lift = np.asarray(matrix[labels == c].mean(axis=0)).ravel() - overall
        top = [vocab[t] for t in np.argsort(-lift, kind="stable")[:terms] if lift[t] > 0]
        name = "-".join(top) or f"topic-{c + 1}"
        names.append(name if name not in names else f"{name}-{c + 1}")
    return names
