"""Item traces on a real SQLite MLflow store: what MLflow's evaluation view pairs and shows.

Every count is checked against what the run itself scored (its per_item.jsonl artifact), so a
trace, span or assessment that MLflow drops on the way makes a test fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest

from qa_lab import run_logging, stages
from qa_lab.config import PROJECT_ROOT
from qa_lab.errors import QaLabError
from qa_lab.jsonl import read_jsonl, write_jsonl
from qa_lab.metrics import METRICS_VERSION
from qa_lab.records import EvalRow
from tests.conftest import compose_cfg

SEEDS = PROJECT_ROOT / "data" / "seed" / "cs_interview.jsonl"
LIMIT = 2


def _run_traces(run_id: str) -> tuple[list, list[dict]]:
    """The run's traces (by item id) and the per-item rows the run logged as an artifact."""
    exp_id = mlflow.get_run(run_id).info.experiment_id
    traces = mlflow.search_traces(locations=[exp_id], run_id=run_id, return_type="list")
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/per_item.jsonl")
    rows = [json.loads(line) for line in text.splitlines()]
    return traces, rows


def _root(trace):
    return next(s for s in trace.data.spans if s.parent_id is None)


def _check_assessments(traces: list, rows: list[dict]) -> None:
    """One trace per row; the reference as expectation; every finite score as CODE feedback."""
    assert len(traces) == len(rows)
    by_item = {_root(t).inputs["item_id"]: t for t in traces}
    assert sorted(by_item) == sorted(str(r["item_id"]) for r in rows)
    for row in rows:
        trace = by_item[str(row["item_id"])]
        expectations = [a for a in trace.info.assessments if a.expectation is not None]
        assert [(a.name, a.value) for a in expectations] == [
            ("expected_response", row["reference"])
        ]
        feedback = {a.name: a for a in trace.info.assessments if a.feedback is not None}
        finite = {k: v for k, v in row["scores"].items() if v is not None and math.isfinite(v)}
        assert finite and set(feedback) == set(finite)
        for name, value in finite.items():
            assert feedback[name].value == pytest.approx(value)
            assert feedback[name].source.source_type == "CODE"
            assert feedback[name].source.source_id == f"qa-lab metrics v{METRICS_VERSION}"
        assert _root(trace).outputs == row["prediction"]


def _root_inputs(traces: list) -> list[str]:
    return sorted(json.dumps(_root(t).inputs, sort_keys=True) for t in traces)


@pytest.mark.slow
def test_two_evaluate_runs_publish_paired_item_traces(store, tmp_path):
    rows = read_jsonl(SEEDS)
    source = tmp_path / "small.jsonl"
    write_jsonl(source, [r for i, r in enumerate(rows) if i % 5 == 0][:50])
    common = [
        *store,
        f"dataset.source={source}",
        "dataset.synthesis.backend=none",
        "corpus=train_qa",  # RAG over the training pairs: no corpus to embed
        f"eval.limit={LIMIT}",
        "eval.train_sample=0",
        "generation.max_new_tokens=8",
        "metrics=lexical",
        "metrics.bootstrap.resamples=50",
    ]
    vanilla = stages.evaluate(compose_cfg("evaluate", common))
    rag = stages.evaluate(compose_cfg("evaluate", [*common, "retriever=faiss", "retriever.k=2"]))

    model = compose_cfg("evaluate").llm.name
    runs = {"vanilla": _run_traces(vanilla), "rag": _run_traces(rag)}
    for variant, (traces, rows) in runs.items():
        _check_assessments(traces, rows)
        assert mlflow.get_run(dict(vanilla=vanilla, rag=rag)[variant]).data.metrics[
            "traces_published"
        ] == len(rows)
        by_item = {_root(t).inputs["item_id"]: t for t in traces}
        for row in rows:
            trace = by_item[row["item_id"]]
            assert set(_root(trace).inputs) == {"item_id", "question"}
            assert trace.info.tags["variant"] == variant
            assert trace.info.tags["seed_id"] == row["seed_id"]
            assert trace.info.tags["topic"] == row["topic"]
            spans = {s.span_type: s for s in trace.data.spans if s.parent_id is not None}
            # counted, not assumed: MLflow can keep a trace but lose its spans
            assert len(trace.data.spans) == (3 if variant == "rag" else 2)
            llm = spans["LLM"]
            assert llm.inputs == {"messages": row["messages"]}
            assert llm.outputs == row["prediction"]
            assert llm.get_attribute("mlflow.chat.tokenUsage") == {
                "input_tokens": row["prompt_tokens"],
                "output_tokens": row["generated_tokens"],
                "total_tokens": row["prompt_tokens"] + row["generated_tokens"],
            }
            assert llm.get_attribute("mlflow.llm.model") == model
            assert llm.get_attribute("stop_reason") == row["stop_reason"]
            if variant == "rag":
                docs = spans["RETRIEVER"].outputs
                assert [(d["id"], d["metadata"]["similarity"]) for d in docs] == [
                    (p["item_id"], p["score"]) for p in row["retrieved"]
                ]
                assert len(docs) == 2 and all(d["metadata"]["doc_uri"] == d["id"] for d in docs)
    assert _root_inputs(runs["vanilla"][0]) == _root_inputs(runs["rag"][0])


def _predictions(path: Path, answers: list[str]) -> Path:
    questions = ["What is a mutex?", "What is a B-tree?", "What does TCP add over IP?"]
    references = ["A lock.", "A balanced search tree.", "Reliable ordered delivery."]
    write_jsonl(
        path,
        [
            {"id": f"q{i}", "question": q, "reference": r, "prediction": a, "topic": "cs"}
            for i, (q, r, a) in enumerate(zip(questions, references, answers))
        ],
    )
    return path


def test_predictions_files_publish_root_only_traces_and_can_be_switched_off(store, tmp_path):
    first = _predictions(tmp_path / "a.jsonl", ["A lock.", "A tree.", "Nothing at all"])
    second = _predictions(tmp_path / "b.jsonl", ["A mutual exclusion lock.", "", "Ordering."])
    run_ids = []
    for path in (first, second):
        stages.score_predictions_file(
            compose_cfg("evaluate", [*store, f"predictions={path}", "metrics=lexical"])
        )
        run_ids.append(mlflow.last_active_run().info.run_id)
    published = [_run_traces(r) for r in run_ids]
    for traces, rows in published:
        _check_assessments(traces, rows)
        # the file has no retrieval and no prompt: the root span alone
        assert all(len(t.data.spans) == 1 for t in traces)
        assert {t.info.tags["topic"] for t in traces} == {"cs"}
    assert _root_inputs(published[0][0]) == _root_inputs(published[1][0])

    third = _predictions(tmp_path / "c.jsonl", ["x", "y", "z"])
    stages.score_predictions_file(
        compose_cfg(
            "evaluate", [*store, f"predictions={third}", "metrics=lexical", "tracking.traces=false"]
        )
    )
    off = mlflow.last_active_run().info.run_id
    assert mlflow.get_run(off).data.metrics["exact_match"] == 0.0  # scored and logged
    assert _run_traces(off)[0] == []


# --------------------------------------------------------------------------- per-item payloads

# The keys of a per_item.jsonl line as the evaluate stage wrote them before EvalRow existed:
# reports rebuilt from older runs read these back.
EVALUATE_KEYS = [
    "item_id", "question", "reference", "prediction", "topic", "difficulty", "seed_id",
    "stop_reason", "prompt_tokens", "generated_tokens", "max_new_tokens", "seconds", "cached",
    "retrieved", "prompt", "messages", "nearest_train_cosine", "near_dup", "scores",
]  # fmt: skip


def _evaluate_row() -> EvalRow:
    return EvalRow(
        item_id="t1",
        question="What is a mutex?",
        reference="A lock.",
        prediction="A mutual exclusion lock.",
        topic="os",
        difficulty="easy",
        seed_id="s1",
        stop_reason="eos",
        prompt_tokens=40,
        generated_tokens=6,
        max_new_tokens=24,
        seconds=0.25,
        cached=False,
        retrieved=({"item_id": "tr1", "question": "Lock?", "answer": "A mutex.", "score": 0.9},),
        prompt="<prompt>",
        messages=({"role": "user", "content": "What is a mutex?"},),
        nearest_train_cosine=0.8123,
        near_dup=True,
        scores={"rougeL_f1": 0.5, "exact_match": 0.0},
    )


def test_per_item_line_keeps_its_keys_and_reads_back_equal():
    row = _evaluate_row()
    line = run_logging.per_item_jsonl([row])
    assert line.endswith("\n") and line.count("\n") == 1
    parsed = json.loads(line)
    assert list(parsed) == EVALUATE_KEYS
    assert parsed["retrieved"] == [dict(row.retrieved[0])]
    assert EvalRow.from_dict(parsed) == replace(row, order=tuple(EVALUATE_KEYS))
    several = replace(row, references=("A lock.", "A mutex."))
    assert list(several.to_dict())[3:5] == ["references", "prediction"]


def test_table_row_shows_passages_as_text_then_scores():
    cells = run_logging._table_row(_evaluate_row())
    assert "prompt" not in cells and "messages" not in cells and "scores" not in cells
    assert list(cells)[-3:] == ["retrieved", "rougeL_f1", "exact_match"]
    assert cells["retrieved"] == "[0.9] Lock? -> A mutex."
    assert (cells["near_dup"], cells["rougeL_f1"]) == (True, 0.5)


def test_predictions_file_row_keeps_the_file_column_order():
    raw = {"id": 7, "question": "q", "prediction": "p", "reference": "r", "topic": "cs"}
    row = EvalRow.from_dict({**raw, "item_id": "7"}, where="f.jsonl:1")
    scored = replace(row, judge_reply="{}", scores={"token_f1": 1.0})
    assert list(scored.to_dict()) == [*raw, "item_id", "judge_reply", "scores"]
    assert scored.to_dict()["id"] == 7 and scored.extra == {"id": 7}
    with pytest.raises(QaLabError, match=r"f.jsonl:2: missing 'reference'"):
        EvalRow.from_dict({"question": "q", "prediction": "p"}, where="f.jsonl:2")
