"""Ranking metrics against gold chunks, answer-in-context, and the gold flags in traces.

Expected values are worked out by hand below; `ir_measures` called directly on the same qrels
is the second opinion. Rankings are tuple order, whatever the retriever's scores say.
"""

from __future__ import annotations

import math

import ir_measures
import mlflow
import pytest
from ir_measures import RR, R, nDCG

from qa_lab import metrics, traces
from qa_lab.records import EvalRow
from qa_lab.retrieval_metrics import (
    answer_in_context,
    gold_retrieved,
    ranking_scores,
    retrieval_columns,
)
from tests.test_metrics import EMBEDDER, metrics_cfg


def _chunks(*ids: str, score: float = 0.5) -> list[dict]:
    """Chunk passages in ranking order (best first), all with the same retriever score."""
    return [
        {
            "item_id": i,
            "document": f"{i}.md",
            "heading": "H",
            "text": f"text of {i}",
            "score": score,
        }
        for i in ids
    ]


# Five items: k = 4, 2 and 3 passages; one without gold; one with gold but nothing retrieved.
RETRIEVED = [
    _chunks("c1", "g1", "c2", "g2"),
    _chunks("g", "x"),
    _chunks("x", "y", "g"),
    _chunks("a", "b"),
    [],
]
GOLD = [("g1", "g2", "g3"), ("g",), ("g",), None, ("g",)]


def test_ranking_by_hand_with_k_the_number_retrieved():
    out = ranking_scores(RETRIEVED, GOLD)
    # item 0, k=4: gold at ranks 2 and 4 of 3 gold chunks.
    #   recall@4 = 2/3; RR = 1/2 (first gold at rank 2)
    #   DCG@4 = 1/log2(2+1) + 1/log2(4+1) = 0.63093 + 0.43068 = 1.06161
    #   IDCG@4 (3 relevant) = 1/log2(2) + 1/log2(3) + 1/log2(4) = 1 + 0.63093 + 0.5 = 2.13093
    #   nDCG@4 = 1.06161 / 2.13093 = 0.49819
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert out["recall_at_k"][0] == pytest.approx(2 / 3)
    assert out["mrr"][0] == pytest.approx(0.5)
    assert out["ndcg_at_k"][0] == pytest.approx(dcg / idcg) == pytest.approx(0.49819, abs=1e-5)
    # item 1, k=2: the one gold chunk first -> 1, 1, 1
    assert [out[m][1] for m in ("recall_at_k", "mrr", "ndcg_at_k")] == [1.0, 1.0, 1.0]
    # item 2, k=3: gold at rank 3 (found only because k is 3 here, not the 2 of item 1)
    #   recall@3 = 1; RR = 1/3; nDCG@3 = (1/log2(4)) / 1 = 0.5
    assert out["recall_at_k"][2] == 1.0
    assert out["mrr"][2] == pytest.approx(1 / 3)
    assert out["ndcg_at_k"][2] == pytest.approx(0.5)
    assert out["gold_retrieved"][:3] == [1.0, 1.0, 1.0]
    # item 3 has no gold, item 4 retrieved nothing: NaN everywhere
    for name in out:
        assert math.isnan(out[name][3]) and math.isnan(out[name][4]), name


def test_ranking_equals_ir_measures_called_directly():
    out = ranking_scores(RETRIEVED[:3], GOLD[:3])
    for i in range(3):
        k = len(RETRIEVED[i])
        qrels = {"q": {g: 1 for g in GOLD[i]}}
        # distinct scores in tuple order: the library ranks as the retriever did
        run = {"q": {p["item_id"]: float(k - r) for r, p in enumerate(RETRIEVED[i])}}
        direct = ir_measures.calc_aggregate([R @ k, nDCG @ k, RR], qrels, run)
        assert out["recall_at_k"][i] == pytest.approx(direct[R @ k])
        assert out["ndcg_at_k"][i] == pytest.approx(direct[nDCG @ k])
        assert out["mrr"][i] == pytest.approx(direct[RR])


def test_tied_scores_keep_the_tuple_order():
    passages = _chunks("b", "a", "c", score=0.5)  # the retriever put b first, then a
    assert ranking_scores([passages], [("a",)])["mrr"] == [0.5]
    # Handing the tied scores to trec_eval instead ranks by document id (c, b, a): RR 1/3.
    tied = {"q": {p["item_id"]: p["score"] for p in passages}}
    assert ir_measures.calc_aggregate([RR], {"q": {"a": 1}}, tied)[RR] == pytest.approx(1 / 3)


def test_gold_retrieved_none_hit_and_unknown():
    assert gold_retrieved(_chunks("a", "g"), ["g"]) == 1.0
    assert gold_retrieved(_chunks("a", "b"), ["g"]) == 0.0
    assert math.isnan(gold_retrieved(_chunks("a"), None))
    assert math.isnan(gold_retrieved(_chunks("a"), []))
    assert math.isnan(gold_retrieved([], ["g"]))


def test_answer_in_context_counts_content_words():
    reference = (
        "The kernel schedules processes on CPU cores."  # kernel schedules processes cpu cores
    )
    passages = [
        {"item_id": "c", "text": "THE KERNEL picks processes, fairly.", "score": 0.9},
        {"item_id": "p", "question": "q", "answer": "Cores run them.", "score": 0.8},
    ]
    # found: kernel, processes (chunk text), cores (pair answer) -> 3 of 5
    assert answer_in_context(passages, reference) == pytest.approx(3 / 5)
    assert answer_in_context(passages[:1], reference) == pytest.approx(2 / 5)
    assert math.isnan(answer_in_context([], reference))
    assert math.isnan(answer_in_context(passages, "Whatever it is, do it."))  # stop words only


def _scored(rows: list[dict]) -> metrics.ScoreResult:
    records = [EvalRow.from_dict(r) for r in rows]
    opts = metrics.MetricsOptions.from_cfg(metrics_cfg(groups=["retrieval"]))
    return metrics.score_items(records, opts, embedder=EMBEDDER)


def test_retrieval_group_scores_chunks_and_names_run_metrics():
    reference = "A mutex lets one thread into a critical section."
    rows = [
        {
            "item_id": "a",
            "question": "What is a mutex?",
            "prediction": "A lock.",
            "reference": reference,
            "retrieved": [
                {**_chunks("c9")[0], "gold": False},
                {**_chunks("c1")[0], "text": reference, "gold": True},
            ],
            "gold": ["c1"],
            "gold_source": "evidence",
        },
        {"item_id": "b", "question": "q", "prediction": "p", "reference": "r", "retrieved": []},
    ]
    result = _scored(rows)
    first, second = result.per_item
    assert (first["recall_at_k"], first["mrr"], first["gold_retrieved"]) == (1.0, 0.5, 1.0)
    # chunks are compared through their text: the gold chunk is the reference verbatim
    assert first["retrieval_best_rougeL"] == pytest.approx(1.0)
    assert first["answer_in_context"] == 1.0
    assert math.isnan(second["mrr"]) and math.isnan(second["answer_in_context"])
    assert result.corpus["retrieval/mrr"] == 0.5  # the run name; item b is left out
    assert result.corpus["retrieval/answer_in_context"] == 1.0
    # no row with gold (corpus=train_qa): no ranking columns at all, answer_in_context stays
    no_gold = _scored([{k: v for k, v in rows[0].items() if k not in ("gold",)}])
    assert "mrr" not in no_gold.per_item[0] and "answer_in_context" in no_gold.per_item[0]


def test_closed_book_rows_get_no_retrieval_columns():
    """Vanilla and LoRA rows retrieve nothing: the group adds no column, not a NaN one."""
    rows = [{"item_id": "a", "question": "q", "prediction": "p", "reference": "r"}]
    records = [EvalRow.from_dict(r) for r in rows]
    columns = retrieval_columns(
        records, ["r"], ["p"], copy_threshold=0.5, stemmer=False, embedder=EMBEDDER
    )
    assert columns == {}
    assert _scored(rows).per_item == [{}]
    retrieved = [{**rows[0], "retrieved": _chunks("c1")}]
    names = set(_scored(retrieved).per_item[0])
    assert {"retrieval_top1_score", "copied", "answer_in_context"} <= names
    assert "mrr" not in names  # no gold


def test_run_names_are_valid_mlflow_metric_names():
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric_name

    for name in metrics.PREFIXED.values():
        _validate_metric_name(name)
    with pytest.raises(MlflowException):  # why the names say recall_at_k, not R@k
        _validate_metric_name("retrieval/R@5")


def test_traces_carry_gold_flags_and_chunk_metadata(tmp_path):
    passages = [
        {**_chunks("c1")[0], "gold": True},
        {**_chunks("c2")[0], "gold": False},
    ]
    rows = [
        EvalRow(
            item_id="a",
            question="q",
            reference="r",
            prediction="p",
            retrieved=tuple(passages),
            gold=("c1",),
            scores={"token_f1": 0.5},
        ),
        EvalRow(item_id="b", question="q2", reference="r", prediction="p", scores={}),
    ]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        mlflow.set_experiment("traces")
        with mlflow.start_run() as run:
            assert traces.publish_item_traces(rows, model="m", metrics_version=1) == 2
        found = mlflow.search_traces(
            locations=[run.info.experiment_id], run_id=run.info.run_id, return_type="list"
        )
    finally:
        mlflow.set_tracking_uri(None)
    roots = [next(s for s in t.data.spans if s.parent_id is None) for t in found]
    by_item = {root.inputs["item_id"]: t for root, t in zip(roots, found)}
    assert by_item["a"].info.tags["gold_retrieved"] == "true"
    assert "gold_retrieved" not in by_item["b"].info.tags  # no gold: unknown, not "false"
    retriever = next(s for s in by_item["a"].data.spans if s.span_type == "RETRIEVER")
    docs = retriever.outputs
    assert [d["page_content"] for d in docs] == ["text of c1", "text of c2"]
    assert [d["metadata"]["gold"] for d in docs] == [True, False]
    assert docs[0]["metadata"]["document"] == "c1.md" and docs[0]["metadata"]["heading"] == "H"
