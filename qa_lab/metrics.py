"""Scoring composition: which metric groups score a run, per-item scores, CIs and breakdowns.

Per-item outputs are the product: every metric yields one float per item, in item order, so
that CIs, paired tests and the 2x2 decomposition can be derived from them later. The groups
live in their own modules (`lexical`, `semantic` for BERTScore, `diagnostics`,
`retrieval_metrics`; `judge` asks an LLM server); `score_items` runs the configured ones
through `GROUP_SCORERS`, a plain dict, and `score_rows` adds the judge, the failure
attribution (`correct` per item; with gold chunks, whether a miss was the retriever's or the
generator's), the bootstrap CIs (clusters: seed lineages) and the per-topic and near-duplicate
means a run logs.

BERTScore is loaded lazily (torch/transformers only when the semantic group is asked for).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab import checks, diagnostics, lexical
from qa_lab import retrieval_metrics as rm
from qa_lab.errors import QaLabError, require_choice
from qa_lab.records import EvalRow
from qa_lab.report_options import DecisionOptions

METRICS_VERSION = 1
# `judge` asks an LLM server (qa_lab.judge); score_rows runs it after score_items.
METRIC_GROUPS = ("lexical", "semantic", "diagnostics", "retrieval", "judge")
# Per-item 0/1 flags whose corpus value is a rate, under the name the MLflow runs use.
RATE_NAMES = {
    "unfinished": "unfinished_rate",
    "empty": "empty_rate",
    "truncated": "truncation_rate",
    "runaway": "runaway_rate",
    "idk": "idk_rate",
    "repetition": "repetition_rate",
    "markup_echo": "markup_echo_rate",
    "copied": "copy_rate",
}
# Per-item columns logged under a prefix: the ranking metrics against the gold chunks (and
# whether the context holds the answer's words), and the failure attribution. MLflow 3.17
# refuses "@" in metric names ("retrieval/R@5" is rejected), hence recall_at_k.
PREFIXED = {
    **{name: f"retrieval/{name}" for name in (*rm.RANKING_COLUMNS, "answer_in_context")},
    **{name: f"attribution/{name}" for name in ("correct", *rm.ATTRIBUTION_CELLS.values())},
}
# Every per-item column's run-level name (a column not listed keeps its own).
RUN_NAMES = {**RATE_NAMES, **PREFIXED}
# The per-item columns that say how good an answer is, by group: `metrics.attribution.metric`
# must be one of the configured groups' columns.
ANSWER_SCORES = {
    "lexical": ("sentence_bleu", "rougeL_f1", "exact_match", "token_f1"),
    "semantic": ("bertscore_f1", "bertscore_f1_raw", "bertscore_precision", "bertscore_recall"),
    "judge": ("judge_score", "judge_correct"),
}
# Direction of each corpus metric, for tables (True: higher is better).
HIGHER_IS_BETTER: dict[str, bool] = {
    "bleu": True,
    "sentence_bleu": True,
    "rougeL_f1": True,
    "exact_match": True,
    "token_f1": True,
    "bertscore_f1": True,
    "bertscore_f1_raw": True,
    "bertscore_precision": True,
    "bertscore_recall": True,
    "bertscore_precision_raw": True,
    "bertscore_recall_raw": True,
    "empty_rate": False,
    "truncation_rate": False,
    "runaway_rate": False,
    "unfinished_rate": False,
    "idk_rate": False,
    "repetition_rate": False,
    "markup_echo_rate": False,
    "retrieval_top1_score": True,
    "retrieval_best_rougeL": True,
    "retrieval_best_cosine": True,
    "answers_per_s": True,
    "tokens_per_s": True,
    "judge_correct": True,
    "judge_partially_correct": True,
    "judge_incorrect": False,
    "judge_unparseable": False,
    "judge_score": True,
    "retrieval/recall_at_k": True,
    "retrieval/ndcg_at_k": True,
    "retrieval/mrr": True,
    "retrieval/gold_retrieved": True,
    "retrieval/answer_in_context": True,
    "attribution/correct": True,
    "attribution/retriever_miss": False,
    "attribution/generator_miss": False,
    "attribution/parametric_hit": True,
    "attribution/both_right": True,
}


# --------------------------------------------------------------------------------------------
# options


def validate_groups(groups: str | Iterable[str]) -> tuple[str, ...]:
    """Check `metrics.groups` against the known groups (a comma string or a list).

    Raises a one-line `QaLabError` naming the key and the allowed names, so a typo in a sweep
    override fails before any scoring work starts.
    """
    if isinstance(groups, str):
        groups = [g for g in (part.strip() for part in groups.split(",")) if g]
    out: list[str] = []
    for group in groups:
        require_choice("metrics.groups", group, METRIC_GROUPS)
        if group not in out:
            out.append(str(group))
    return tuple(out)


def _plain(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, Mapping) and not hasattr(cfg, "_get_node"):
        return dict(cfg)
    from qa_lab.config import to_dict

    return to_dict(cfg)


def _need(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            raise QaLabError(f"metrics.{dotted} is missing; set it in conf/metrics/")
        node = node[part]
    return node


@dataclass(frozen=True)
class BertScoreOptions:
    """`metrics.bertscore`: the model, its layer, baseline pairs and batch (conf/metrics/)."""

    model: str
    num_layers: int
    baseline_pairs: int
    batch_size: int
    device: str | None  # optional key: None scores on the CPU


@dataclass(frozen=True)
class BootstrapOptions:
    """`metrics.bootstrap`: resamples, confidence level and seed of every CI and paired test."""

    resamples: int
    confidence: float
    seed: int


@dataclass(frozen=True)
class MetricsOptions:
    """The `metrics` config node, read once (each key documented in conf/metrics/default.yaml).

    `from_cfg` fails on the first missing or invalid key with a one-line error naming it,
    before any scoring work. `judge` stays the config node: `judge.judge_rows` reads it.
    """

    groups: tuple[str, ...]
    bleu_smooth: str
    bleu_tokenize: str
    rouge_stemmer: bool
    copy_threshold: float
    exact_match: str
    bertscore: BertScoreOptions
    bootstrap: BootstrapOptions
    sample_count: int
    sample_seed: int
    attribution: rm.AttributionOptions
    judge: Any = None
    decision: DecisionOptions = DecisionOptions()  # the report's power, cost, verdict

    @classmethod
    def from_cfg(cls, metrics_cfg: Any) -> MetricsOptions:
        """Read and check a `metrics` node (a DictConfig or a plain mapping)."""
        cfg = _plain(metrics_cfg)
        groups = validate_groups(_need(cfg, "groups"))

        def read(dotted: str, convert: Any, **bounds: Any) -> Any:
            return convert(_need(cfg, dotted), f"metrics.{dotted}", **bounds)

        def choice(dotted: str, allowed: Any) -> str:
            return str(require_choice(f"metrics.{dotted}", _need(cfg, dotted), allowed))

        return cls(
            groups=groups,
            bleu_smooth=choice("bleu_smooth", lexical.BLEU_SMOOTH_METHODS),
            bleu_tokenize=read("bleu_tokenize", checks.text),
            rouge_stemmer=read("rouge_stemmer", checks.flag),
            copy_threshold=read("copy_threshold", checks.number, low=0, high=1),
            exact_match=choice("exact_match", lexical.EXACT_MATCH_MODES),
            bertscore=BertScoreOptions(
                model=read("bertscore.model", checks.text),
                num_layers=read("bertscore.num_layers", checks.whole, low=1),
                baseline_pairs=read("bertscore.baseline_pairs", checks.whole, low=1),
                batch_size=read("bertscore.batch_size", checks.whole, low=1),
                device=_need(cfg, "bertscore").get("device"),
            ),
            bootstrap=BootstrapOptions(
                resamples=read("bootstrap.resamples", checks.whole, low=1),
                confidence=read("bootstrap.confidence", checks.number, low=0, high=1, above=True),
                seed=read("bootstrap.seed", checks.whole),
            ),
            sample_count=read("samples.count", checks.whole, low=0),
            sample_seed=read("samples.seed", checks.whole),
            attribution=rm.AttributionOptions.from_cfg(
                cfg.get("attribution"), groups, ANSWER_SCORES
            ),
            judge=metrics_cfg.get("judge"),  # the node itself: judge reads it as config
            decision=DecisionOptions.from_cfg(cfg.get("decision")),
        )


# --------------------------------------------------------------------------------------------
# per-item scores


@dataclass
class ScoreResult:
    """Per-item scores (one dict per row, in row order) and corpus-level values.

    `corpus` holds the corpus metrics (bleu, bleu_signature, BERTScore model/layer/baseline)
    and the mean of every per-item metric under its run-level name (`runaway` ->
    `runaway_rate`; NaN items ignored). `bleu_stats` lets a bootstrap recompute corpus BLEU.
    """

    per_item: list[dict[str, float]]
    corpus: dict[str, Any]
    topics: list[str | None]
    bleu_stats: np.ndarray | None = None
    bleu_smooth: str = "none"

    def metric_names(self) -> list[str]:
        """Per-item metric names, in first-seen order."""
        return list(dict.fromkeys(name for row in self.per_item for name in row))

    def column(self, metric: str) -> np.ndarray:
        """One per-item metric as a float array in item order (NaN where an item lacks it)."""
        return np.array([row.get(metric, math.nan) for row in self.per_item], dtype=float)

    def corpus_bleu(self, indices: Sequence[int] | np.ndarray) -> float:
        """Corpus BLEU over a subset or resample of items (for `stats.bootstrap_corpus_ci`)."""
        if self.bleu_stats is None:
            raise ValueError("no BLEU statistics: the lexical group was not scored")
        return lexical.corpus_bleu_from_stats(
            self.bleu_stats[np.asarray(indices, dtype=int)], smooth=self.bleu_smooth
        )

    def pooled(self, n: int) -> ScoreResult:
        """One entry per item, the mean over its repeats (entry r * n + i: item i, repeat r).

        Corpus BLEU pools the statistics of all of an item's answers (a bootstrap resample
        draws an item with every repeat of it); the run-level means are recomputed.
        """
        repeats = len(self.per_item) // n
        per_item = []
        for i in range(n):
            answers = [self.per_item[r * n + i] for r in range(repeats)]
            names = dict.fromkeys(name for scores in answers for name in scores)
            per_item.append(
                {name: finite_mean([s.get(name, math.nan) for s in answers]) for name in names}
            )
        stats = None
        if self.bleu_stats is not None:
            stats = self.bleu_stats.reshape(repeats, n, -1).sum(axis=0)
        corpus = {**self.corpus, **_means(per_item)}
        topics = self.topics[:n]
        return replace(self, per_item=per_item, corpus=corpus, topics=topics, bleu_stats=stats)

    def repeat_spread(self, n: int) -> dict[str, float]:
        """Per metric (run-level name): the mean over items of the SD across their repeats."""
        repeats = len(self.per_item) // n
        out: dict[str, float] = {}
        for name in self.metric_names():
            sd = within_item_sd(self.column(name).reshape(repeats, n))
            if math.isfinite(sd):
                out[RUN_NAMES.get(name, name)] = sd
        return out

    def topic_means(self) -> dict[str, dict[str, float]]:
        """Per-topic means of every per-item metric, plus corpus BLEU and n per topic."""
        return self.group_means(self.topics or [None] * len(self.per_item))

    def group_means(self, labels: Sequence[str | None]) -> dict[str, dict[str, float]]:
        """Means of every per-item metric, corpus BLEU and n within each label's items.

        Items labelled None or "" belong to no group.
        """
        out: dict[str, dict[str, float]] = {}
        topics = np.array([t if t else "" for t in labels])
        for topic in sorted(set(topics.tolist()) - {""}):
            idx = np.flatnonzero(topics == topic)
            means = _means([self.per_item[i] for i in idx])
            if self.bleu_stats is not None:
                means["bleu"] = self.corpus_bleu(idx)
            means["n"] = float(len(idx))
            out[topic] = means
        return out


def finite_mean(values: Iterable[float]) -> float:
    """The mean of the finite values (NaN when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def within_item_sd(values: np.ndarray) -> float:
    """Mean over items (columns) of the sd across their repeats (rows), ddof 1.

    Items with fewer than two finite values have no sd and are left out; NaN when none has.
    """
    ok = np.isfinite(values).sum(axis=0) >= 2
    return float(np.nanstd(values[:, ok], axis=0, ddof=1).mean()) if ok.any() else math.nan


def _means(per_item: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in dict.fromkeys(key for row in per_item for key in row):  # first-seen order
        values = np.array([row.get(name, math.nan) for row in per_item], dtype=float)
        if np.isfinite(values).any():
            out[RUN_NAMES.get(name, name)] = float(np.nanmean(values))
    return out


@dataclass(frozen=True)
class _Batch:
    """What every group scorer reads: the rows, their answers and references, the embedder."""

    rows: Sequence[EvalRow]
    predictions: list[str]
    ref_lists: list[list[str]]  # every reference of each item (BLEU, ROUGE-L, EM, token F1)
    references: list[str]  # the first one (BERTScore, length ratio, retrieval)
    embedder: str
    cache_dir: str | Path | None


def _put(per_item: list[dict[str, float]], name: str, values: Iterable[float]) -> None:
    for row, value in zip(per_item, values):
        row[name] = float(value)


def put_columns(per_item: list[dict[str, float]], columns: Mapping[str, Iterable[float]]) -> None:
    """Named per-item columns (a group module's output) into the items' scores, in order."""
    for name, values in columns.items():
        _put(per_item, name, values)


def _score_lexical(batch: _Batch, opts: MetricsOptions, result: ScoreResult) -> None:
    preds, refs = batch.predictions, batch.ref_lists
    bleu = lexical.bleu_scores(preds, refs, tokenize=opts.bleu_tokenize, smooth=opts.bleu_smooth)
    result.corpus["bleu"] = bleu.corpus
    result.corpus["bleu_signature"] = bleu.signature
    result.bleu_stats, result.bleu_smooth = bleu.stats, opts.bleu_smooth
    per_item = result.per_item
    _put(per_item, "sentence_bleu", bleu.sentence)
    _put(per_item, "rougeL_f1", lexical.rouge_l_f1(preds, refs, stemmer=opts.rouge_stemmer))
    _put(
        per_item,
        "exact_match",
        (lexical.exact_match(p, r, opts.exact_match) for p, r in zip(preds, refs)),
    )
    _put(per_item, "token_f1", (lexical.token_f1(p, r) for p, r in zip(preds, refs)))


def _score_semantic(batch: _Batch, opts: MetricsOptions, result: ScoreResult) -> None:
    from qa_lab.models import pick_device
    from qa_lab.semantic import bertscore

    o = opts.bertscore
    bs = bertscore(
        batch.predictions,
        batch.references,
        model=o.model,
        num_layers=o.num_layers,
        baseline_pairs=o.baseline_pairs,
        batch_size=o.batch_size,
        device=pick_device(str(o.device or "cpu")),
    )
    for name in ("f1", "f1_raw", "precision", "recall", "precision_raw", "recall_raw"):
        _put(result.per_item, f"bertscore_{name}", getattr(bs, name))
    result.corpus.update(
        bertscore_model=bs.model,
        bertscore_num_layers=bs.num_layers,
        bertscore_baseline_precision=bs.baseline[0],
        bertscore_baseline_recall=bs.baseline[1],
        bertscore_baseline_f1=bs.baseline[2],
        bertscore_baseline_source=bs.baseline_source,
    )


def _score_diagnostics(batch: _Batch, opts: MetricsOptions, result: ScoreResult) -> None:
    preds, per_item = batch.predictions, result.per_item
    _put(per_item, "empty", (diagnostics.is_empty(p) for p in preds))
    _put(
        per_item,
        "truncated",
        (
            diagnostics.is_truncated(r.stop_reason, r.generated_tokens, r.max_new_tokens)
            for r in batch.rows
        ),
    )
    _put(per_item, "runaway", (diagnostics.is_runaway(p) for p in preds))
    _put(per_item, "unfinished", (diagnostics.is_unfinished(p) for p in preds))
    _put(
        per_item,
        "length_ratio",
        (diagnostics.length_ratio(p, r) for p, r in zip(preds, batch.references)),
    )
    _put(per_item, "idk", (diagnostics.is_idk(p) for p in preds))
    _put(per_item, "repetition", (diagnostics.is_repetition(p) for p in preds))
    _put(per_item, "markup_echo", (diagnostics.is_markup_echo(p) for p in preds))


def _score_retrieval(batch: _Batch, opts: MetricsOptions, result: ScoreResult) -> None:
    """`retrieval_metrics.retrieval_columns`: nothing when no row retrieved (vanilla, LoRA)."""
    columns = rm.retrieval_columns(
        batch.rows,
        batch.references,
        batch.predictions,
        copy_threshold=opts.copy_threshold,
        stemmer=opts.rouge_stemmer,
        embedder=batch.embedder,
        cache_dir=batch.cache_dir,
    )
    put_columns(result.per_item, columns)


# One scorer per metric group, run in this order (the per-item columns' order) whatever the
# order of `metrics.groups`. `judge` needs a server and runs in `score_rows`.
GROUP_SCORERS: dict[str, Callable[[_Batch, MetricsOptions, ScoreResult], None]] = {
    "lexical": _score_lexical,
    "semantic": _score_semantic,
    "diagnostics": _score_diagnostics,
    "retrieval": _score_retrieval,
}


def _references(row: EvalRow) -> list[str]:
    """`references` when the row has several, else its one `reference`."""
    return [str(r) for r in row.references] if row.references else [str(row.reference)]


def score_items(
    rows: Sequence[EvalRow],
    opts: MetricsOptions,
    *,
    embedder: str,
    cache_dir: str | Path | None = None,
) -> ScoreResult:
    """Score predictions against references with the configured metric groups.

    `embedder` (the `embedder` group's model) embeds retrieved answers for the retrieval
    group; `cache_dir` holds the embedding cache.
    """
    if not rows:
        raise QaLabError("metrics: no items to score")
    ref_lists = [_references(r) for r in rows]
    batch = _Batch(
        rows=rows,
        predictions=[str(r.prediction) for r in rows],
        ref_lists=ref_lists,
        references=[refs[0] for refs in ref_lists],
        embedder=embedder,
        cache_dir=cache_dir,
    )
    result = ScoreResult(
        per_item=[{} for _ in rows],
        corpus={"metrics_version": METRICS_VERSION, "n_items": len(rows)},
        topics=[r.topic for r in rows],
    )
    for group, scorer in GROUP_SCORERS.items():
        if group in opts.groups:
            scorer(batch, opts, result)
    corpus = result.corpus
    corpus.update({k: v for k, v in _means(result.per_item).items() if k not in corpus})
    return result


# --------------------------------------------------------------------------------------------
