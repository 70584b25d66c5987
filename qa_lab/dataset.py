"""The dataset build: normalise, exact and semantic dedup, topics, lineage split, leakage audit.

`build` is pure (items and an embedding function in, splits and their reports out; no files,
MLflow or Hydra), so `stages.build_dataset` only loads, synthesises, builds, writes and logs,
and tests can check each step alone. Two procedures are kept bit-for-bit as the original study
ran them, because its published splits must be reproducible: the `strip_lower` normalisation
and the `random` split (`random.seed(seed); random.shuffle`).
"""

from __future__ import annotations

import math
import random
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qa_lab import checks, lineage, similarity, topics
from qa_lab.errors import QaLabError, require_choice
from qa_lab.loading import BAD_ROW_ACTIONS, FORMATS
from qa_lab.records import QAItem
from qa_lab.synthesis import SynthesisOptions

NORMALIZE_MODES = ("robust", "strip_lower")
SPLIT_STRATEGIES = ("group", "random")
SPLIT_NAMES = ("train", "val", "test")
# Characters dropped from the end of a question by the robust normalisation: "What is X?"
# and "what is x" are the same question.
TRAILING_PUNCTUATION = "?.!;:,…"
# Cosines at which the audit counts a test question as near a training one (audit report only).
AUDIT_THRESHOLDS = (0.8, 0.9)

Embed = Callable[[Sequence[str]], np.ndarray]


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SplitOptions:
    """`dataset.split`: how items are cut into train/val/test."""

    strategy: str
    train: float
    val: float
    seed: int
    group_threshold: float
    stratify: str | None

    @classmethod
    def from_cfg(cls, node: Any) -> SplitOptions:
        """Read `dataset.split`, refusing a bad strategy, fraction or threshold before any work."""
        where = "dataset.split"
        opts = cls(
            strategy=require_choice(f"{where}.strategy", node.strategy, SPLIT_STRATEGIES),
            train=checks.number(node.train, f"{where}.train", low=0, high=1),
            val=checks.number(node.val, f"{where}.val", low=0, high=1),
            seed=checks.whole(node.seed, f"{where}.seed"),
            group_threshold=checks.number(
                node.group_threshold, f"{where}.group_threshold", low=0, high=1
            ),
            stratify=node.stratify,
        )
        _check_fractions(opts.train, opts.val)
        if opts.stratify is not None:
            require_choice(f"{where}.stratify", opts.stratify, ("topic",))
        return opts


@dataclass(frozen=True)
class DatasetOptions:
    """The `dataset` config node, typed once at the script boundary (see conf/dataset/)."""

    source: str | None  # None: no QA file (QA pairs synthesised from the corpus only)
    format: str
    encoding: str
    columns: dict[str, str] | None  # only the fields mapped by hand
    on_bad_row: str
    seeds: int | None
    topics: topics.TopicOptions
    synthesis: SynthesisOptions
    normalize: str
    semantic_dedup_threshold: float
    split: SplitOptions
    output_dir: str | None

    @classmethod
    def from_cfg(cls, node: Any) -> DatasetOptions:
        """Read the `dataset` node (a DictConfig or anything with the same attributes)."""
        columns = {k: v for k, v in dict(node.columns).items() if v}
        return cls(
            source=str(node.source) if node.source else None,
            format=require_choice("dataset.format", node.format, FORMATS),
            encoding=node.encoding,
            columns=columns or None,
            on_bad_row=require_choice("dataset.on_bad_row", node.on_bad_row, BAD_ROW_ACTIONS),
            # the upper bound (the row count) is checked by lineage.assign_seeds
            seeds=checks.maybe_whole(node.seeds, "dataset.seeds", low=1),
            topics=topics.TopicOptions.from_cfg(node.topics),
            synthesis=SynthesisOptions.from_cfg(node.synthesis),
            normalize=require_choice("dataset.normalize", node.normalize, NORMALIZE_MODES),
            semantic_dedup_threshold=checks.number(
                node.semantic_dedup.threshold, "dataset.semantic_dedup.threshold", low=0, high=1
            ),
            split=SplitOptions.from_cfg(node.split),
            output_dir=node.output_dir,
        )


def _check_fractions(train: float, val: float) -> None:
    """Refuse split fractions that leave the test split less than nothing."""
    if not (0.0 <= train <= 1.0 and 0.0 <= val <= 1.0 and train + val <= 1.0 + 1e-9):
        raise QaLabError(
            f"dataset.split.train={train} and dataset.split.val={val} must be fractions "
            "with train + val <= 1"
        )


# --------------------------------------------------------------------------- normalisation


def normalize_question(text: str, mode: str) -> str:
    """The key two questions must share to count as exact duplicates.

    Args:
        text: A question.
        mode: `robust` (NFKC, casefold, collapsed whitespace, no trailing ?.!;:) so that
            trivial variants collapse; or `strip_lower`, exactly `text.strip().lower()`, the
            original study's key, kept for reproducing its 2070 -> 2019 step.

    Returns:
        The normalised question.
    """
    require_choice("dataset.normalize", mode, NORMALIZE_MODES)
    if mode == "strip_lower":
        return text.strip().lower()
    folded = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return folded.rstrip(TRAILING_PUNCTUATION + " ")


def exact_dedup(
    items: Sequence[QAItem], mode: str
) -> tuple[list[QAItem], list[tuple[QAItem, QAItem]]]:
    """Drop repeated questions, keeping the first occurrence in file order.

    Keep-first makes the result depend only on file order, like the original study.

    Args:
        items: Items in file order.
        mode: Normalisation mode for the comparison key (see `normalize_question`).

    Returns:
        The kept items, and (removed item, the kept item it repeats) pairs.
    """
    first: dict[str, QAItem] = {}
    kept: list[QAItem] = []
    removed: list[tuple[QAItem, QAItem]] = []
    for item in items:
        key = normalize_question(item.question, mode)
        if key in first:
            removed.append((item, first[key]))
        else:
            first[key] = item
            kept.append(item)
    return kept, removed


# --------------------------------------------------------------------------- splits


def split_items(
    items: Sequence[QAItem],
    strategy: str,
    *,
    train: float,
    val: float,
    seed: int,
    groups: Sequence[str] | None = None,
    stratify: str | None = None,
) -> dict[str, list[QAItem]]:
    """Split items into train/val/test (test gets the rest).

    Args:
        items: Items in file order.
        strategy: `random`, exactly the original study's shuffle-and-cut (for reproducing
            its splits), or `group`, which keeps each lineage group in one split.
        train: Fraction for training.
        val: Fraction for validation.
        seed: Seed of the shuffle; the same seed gives the same split.
        groups: Group label per item (see `lineage_groups`); for `group` without it, items
            are grouped by `seed_id` (or their own id).
        stratify: `topic` to balance each topic across splits (group strategy), or None.

    Returns:
        {"train": [...], "val": [...], "test": [...]}.
    """
    require_choice("dataset.split.strategy", strategy, SPLIT_STRATEGIES)
    _check_fractions(train, val)
    if strategy == "random":
        return _random_split(items, train, val, seed)
    if stratify is not None:
        require_choice("dataset.split.stratify", stratify, ("topic",))
    if groups is None:
        groups = [item.seed_id or item.id for item in items]
    if len(groups) != len(items):
        raise ValueError(f"{len(groups)} group labels for {len(items)} items")
    return _group_split(items, groups, (train, val, 1.0 - train - val), seed, stratify)


def _random_split(
    items: Sequence[QAItem], train: float, val: float, seed: int
) -> dict[str, list[QAItem]]:
    # The original: random.seed(seed); random.shuffle(rows). A private Random(seed) yields
    # the same permutation without touching the global generator.
    rows = list(items)
    random.Random(seed).shuffle(rows)
    n = len(rows)
    n_train = int(train * n)
    n_val = int(val * n)
    return {
        "train": rows[:n_train],
        "val": rows[n_train : n_train + n_val],
        "test": rows[n_train + n_val :],
    }


def _group_split(
    items: Sequence[QAItem],
    groups: Sequence[str],
    ratios: tuple[float, float, float],
    seed: int,
    stratify: str | None,
) -> dict[str, list[QAItem]]:
    """Whole groups to splits, keeping every prefix of the group order near the ratios.

    Groups are shuffled with the seed (and, when stratifying, ordered by majority topic);
    each goes to the split furthest below its share of the items seen so far. Each split
    then ends within one group's size of its target, and so does each topic's share.
    """
    members: dict[str, list[int]] = {}
    for i, label in enumerate(groups):
        members.setdefault(label, []).append(i)
    order = list(members)
    random.Random(seed).shuffle(order)
    if stratify == "topic":
        order.sort(key=lambda g: _majority_topic(items, members[g]))  # stable: keeps shuffle
    counts = [0, 0, 0]
    seen = 0
    split_of: dict[str, int] = {}
    for label in order:
        seen += len(members[label])
        need = [ratio * seen - count for ratio, count in zip(ratios, counts)]
        best = max(range(3), key=lambda s: need[s])  # ties: train, then val, then test
        split_of[label] = best
        counts[best] += len(members[label])
    out: dict[str, list[QAItem]] = {name: [] for name in SPLIT_NAMES}
    for item, label in zip(items, groups):  # file order within each split
        out[SPLIT_NAMES[split_of[label]]].append(item)
    return out


def _majority_topic(items: Sequence[QAItem], members: Sequence[int]) -> str:
    counts = Counter(items[i].topic for i in members)
    return min(counts, key=lambda t: (-counts[t], t))


# --------------------------------------------------------------------------- audit


def leakage_audit(
    train: Sequence[QAItem],
    test: Sequence[QAItem],
    train_vecs: np.ndarray,
    test_vecs: np.ndarray,
    *,
    thresholds: tuple[float, ...] = AUDIT_THRESHOLDS,
) -> dict[str, Any]:
    """Measure how much of the test set is (nearly) in the training set.

    A test question whose nearest training question is a paraphrase rewards memorisation,
    so these numbers go next to every score computed on the split.

    Args:
        train: Training items.
        test: Test items.
        train_vecs: Unit-normalised question embeddings of `train`, row for row.
        test_vecs: Unit-normalised question embeddings of `test`, row for row.
        thresholds: Cosines at which a test question counts as near a training one.

    Returns:
        JSON-ready dict: `n_train`, `n_test`; per threshold t (as `near_dup_<100t>`) the
        count and `_rate` of test questions whose nearest training question has cosine >=
        t; `verbatim_answers` (+ `_rate`): test answers equal, after strip, to a training
        answer; `pairs`: one row per test question at or above the lowest threshold, as
        {test_id, train_id, similarity}, most similar first.
    """
    if len(test_vecs) != len(test) or len(train_vecs) != len(train):
        raise ValueError("vectors must match the items row for row")
    n_test = len(test)
    nearest, best = similarity.nearest_neighbours(test_vecs, train_vecs)
    report: dict[str, Any] = {"n_train": len(train), "n_test": n_test}
    for t in thresholds:
        count = int((best >= t).sum())
        name = f"near_dup_{round(t * 100)}"
        report[name] = count
        report[f"{name}_rate"] = count / n_test if n_test else 0.0
    train_answers = {item.answer.strip() for item in train}
    verbatim = sum(item.answer.strip() in train_answers for item in test)
    report["verbatim_answers"] = verbatim
    report["verbatim_answer_rate"] = verbatim / n_test if n_test else 0.0
    low = min(thresholds) if thresholds else math.inf
    flagged = [i for i in np.argsort(-best, kind="stable") if best[i] >= low]
    report["pairs"] = [
        {
            "test_id": test[i].id,
            "train_id": train[nearest[i]].id,
            "similarity": round(float(best[i]), 6),
        }
        for i in flagged
    ]
    return report


# --------------------------------------------------------------------------- build


@dataclass(frozen=True)
class Built:
    """What `build` made of the items: the splits and everything reported about them."""

    splits: dict[str, list[QAItem]]
    counts: dict[str, int]  # before_dedup, after_exact_dedup, after_semantic_dedup, per split
    dedup_report: list[dict[str, Any]]  # one row per removed item (stage exact | semantic)
    audit: dict[str, Any]  # see `leakage_audit`
    topics: dict[str, Any] | None  # the inferred topics' report; None: topics not inferred


def build(items: Sequence[QAItem], embed: Embed, opts: DatasetOptions, *, infer: bool) -> Built:
    """Exact dedup -> embed -> semantic dedup -> (topics) -> lineage split -> leakage audit.

    Args:
        items: Loaded (and synthesised) items in file order.
        embed: Unit-normalised question embeddings, one row per text (the embedder's cache).
        opts: The dataset options.
        infer: Whether to infer topics (the file maps no topic column and topics.infer is on).

    Returns:
        The splits (file order within each), counts, dedup report, audit and topic report.
    """
    counts = {"before_dedup": len(items)}
    items, exact_pairs = exact_dedup(items, opts.normalize)
    counts["after_exact_dedup"] = len(items)
    vectors = embed([it.question for it in items])
    kept, semantic_pairs = similarity.semantic_dedup(vectors, opts.semantic_dedup_threshold)
    report = _dedup_report(items, exact_pairs, semantic_pairs)
    items, vectors = [items[i] for i in kept], vectors[kept]
    counts["after_semantic_dedup"] = len(items)
    inferred = None
    if infer:
        t = opts.topics
        items, inferred = topics.infer_topics(
            items, vectors, min_k=t.min_k, max_k=t.max_k, seed=t.seed, terms=t.terms
        )
    splits = _split(items, vectors, opts.split)
    position = {it.id: i for i, it in enumerate(items)}
    audit = leakage_audit(
        splits["train"],
        splits["test"],
        vectors[[position[it.id] for it in splits["train"]]],
        vectors[[position[it.id] for it in splits["test"]]],
    )
    counts.update({name: len(splits[name]) for name in SPLIT_NAMES})
    return Built(splits, counts, report, audit, inferred)


def _split(
    items: Sequence[QAItem], vectors: np.ndarray, opts: SplitOptions
) -> dict[str, list[QAItem]]:
    """`split_items` with lineage groups (group strategy) from seeds and near-duplicates."""
    group = opts.strategy == "group"
    return split_items(
        items,
        opts.strategy,
        train=opts.train,
        val=opts.val,
        seed=opts.seed,
        groups=lineage.lineage_groups(items, vectors, opts.group_threshold) if group else None,
        stratify=opts.stratify if group else None,
    )


def _dedup_report(
    items: Sequence[QAItem],
    exact_pairs: Sequence[tuple[QAItem, QAItem]],
    semantic_pairs: Sequence[tuple[int, int, float]],
) -> list[dict[str, Any]]:
    """One row per removed item, naming what it repeated (`items`: after exact dedup)."""
    pairs = [("exact", r, k, 1.0) for r, k in exact_pairs] + [
        ("semantic", items[r], items[k], round(float(s), 4)) for r, k, s in semantic_pairs
    ]
    return [
        {
            "stage": stage,
            "removed_id": removed.id,
            "removed": removed.question,
            "kept_id": kept.id,
            "kept": kept.question,
            "similarity": sim,
        }
        for stage, removed, kept, sim in pairs
    ]
