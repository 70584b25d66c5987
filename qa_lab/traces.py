"""Per-item MLflow traces: one trace per evaluated item with its spans and assessments.

Split from `tracking` (runs, params, artifacts) because traces are their own concern: what an
item's trace holds so MLflow's evaluation view pairs two runs item by item. Like `tracking`,
this module imports mlflow (inside functions); those two are the only ones that do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow
from qa_lab.tracking import TAG_PREFIX, log_metrics

# Root span inputs: exactly these keys, identical for every config on one split, so MLflow's
# "compare to" pairs two runs item by item.
TRACE_INPUT_KEYS = ("item_id", "question")
TRACE_TAG_KEYS = ("variant", "topic", "difficulty", "seed_id")
EXPECTED_RESPONSE = "expected_response"


@contextlib.contextmanager
def _active_span(span: Any) -> Iterator[None]:
    """Make a span started without context the active one, so assessments stay in memory.

    `mlflow.log_assessment` on the active trace appends to the in-memory trace, which is then
    written with the trace in one transaction. Logging them after the export instead costs one
    SQLite transaction each (about 4x slower in total) and needs a flush first.
    """
    from mlflow.tracing.provider import detach_span_from_context, set_span_in_context

    token = set_span_in_context(span)
    try:
        yield
    finally:
        detach_span_from_context(token)


def _documents(passages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Retrieved passages as MLflow `Document`s (the UI renders them as a document list).

    `doc_uri` and `id` are the passage's id (a chunk id, or a training pair's item id),
    `similarity` the retriever's score; a chunk adds its `document` and `heading`, and a
    passage of an item with gold its `gold` flag. The content is a chunk's text, or a pair's
    question and answer.
    """
    from mlflow.entities import Document

    return [
        Document(
            page_content=p.get("text")
            or "\n".join(str(p[k]) for k in ("question", "answer") if p.get(k)),
            metadata={
                "doc_uri": str(p.get("item_id")),
                "similarity": p.get("score"),
                **{k: p[k] for k in ("document", "heading", "gold") if p.get(k) is not None},
            },
            id=str(p.get("item_id")),
        ).to_dict()
        for p in passages
    ]


def _gold_tag(row: EvalRow) -> dict[str, str]:
    """`gold_retrieved: true|false` for an item with gold and passages (a filterable tag)."""
    import math

    from qa_lab.retrieval_metrics import gold_retrieved

    hit = gold_retrieved(row.retrieved, row.gold)
    return {} if math.isnan(hit) else {"gold_retrieved": str(hit == 1.0).lower()}


def _flags_tag(row: EvalRow) -> dict[str, str]:
    """`flags: repetition,runaway` for an item a diagnostic flags (filter: tags.flags LIKE)."""
    from qa_lab.diagnostics import raised_flags

    flags = raised_flags(row.scores)
    return {"flags": ",".join(flags)} if flags else {}


def _token_usage(row: EvalRow) -> dict[str, int]:
    """MLflow's standard token-usage attribute (feeds the Overview's token charts)."""
    if row.prompt_tokens is None or row.generated_tokens is None:
        return {}
    prompt, generated = int(row.prompt_tokens), int(row.generated_tokens)
    return {
        "mlflow.chat.tokenUsage": {
            "input_tokens": prompt,
            "output_tokens": generated,
            "total_tokens": prompt + generated,
        }
    }


def _child_span(
    root: Any,
    kind: tuple[str, str],
    inputs: Any,
    outputs: Any,
    times_ns: tuple[int, int],
    attributes: dict[str, Any] | None = None,
) -> None:
    """A finished child span (name, span type) under the item's root span."""
    import mlflow

    name, span_type = kind
    span = mlflow.start_span_no_context(
        name,
        span_type=span_type,
        parent_span=root,
        inputs=inputs,
        attributes=attributes,
        start_time_ns=times_ns[0],
    )
    span.end(outputs=outputs, end_time_ns=times_ns[1])


def _publish_item(
    row: EvalRow,
    *,
    experiment_id: str,
    tags: Mapping[str, str],
    model: str,
    sources: tuple[Any, Any],
) -> None:
    """One trace: root {item_id, question} -> answer, retriever and LLM children, assessments.

    Answers are generated in batches; the LLM span lasts the item's share of its batch
    (`seconds`), the retriever span has no timing of its own (retrieval is batched too).
    """
    import time

    import mlflow
    from mlflow.entities import SpanType

    start = time.time_ns()
    end = start + int(float(row.seconds or 0.0) * 1e9)
    answer = row.prediction
    root = mlflow.start_span_no_context(
        "qa_item",
        span_type=SpanType.CHAIN,
        inputs={k: str(getattr(row, k)) for k in TRACE_INPUT_KEYS},
        experiment_id=experiment_id,
        start_time_ns=start,
        tags=dict(tags),
    )
    if row.retrieved:
        _child_span(
            root,
            ("retrieve", SpanType.RETRIEVER),
            {"query": row.question},
            _documents(list(row.retrieved)),
            (start, start),
        )
    if row.messages:
        _child_span(
            root,
            ("generate", SpanType.LLM),
            {"messages": list(row.messages)},
            answer,
            # 1 µs after retrieval, so the UI lists the spans in the order they ran
            (start + 1000, end + 1000),
            attributes={
                "mlflow.llm.model": model,
                **_token_usage(row),
                "stop_reason": row.stop_reason,
                "cached": bool(row.cached),
            },
        )
    _assess(root, row, sources)
    root.end(outputs=answer, end_time_ns=end + 1000)


def _assess(root: Any, row: EvalRow, sources: tuple[Any, Any]) -> None:
    """The reference as the expectation and every finite score as feedback, on the root span."""
    import math

    import mlflow
    from mlflow.entities import Expectation, Feedback

    expectation_source, feedback_source = sources
    with _active_span(root):
        mlflow.log_assessment(
            root.trace_id,
            Expectation(
                EXPECTED_RESPONSE, row.reference, source=expectation_source, span_id=root.span_id
            ),
        )
        for name, value in (row.scores or {}).items():
            if value is not None and math.isfinite(float(value)):
                mlflow.log_assessment(
                    root.trace_id,
                    Feedback(name, float(value), source=feedback_source, span_id=root.span_id),
                )


def publish_item_traces(
    rows: list[EvalRow],
    *,
    model: str,
    metrics_version: int,
) -> int:
    """One trace per evaluated item on the active run, for MLflow's evaluation view.

    Rows carry their per-item `scores`; `retrieved` passages and chat
    `messages` (with token counts and stop reason) add a retriever and an LLM span. Every
    finite per-item score becomes a CODE feedback named after its metric; NaN scores (a
    metric that does not apply to the item) are left out, not faked. Returns how many traces
    reached the store.
    """
    import time

    import mlflow
    from mlflow.entities import AssessmentSource

    run = mlflow.active_run()
    started = time.perf_counter()
    variant = run.data.tags.get(f"{TAG_PREFIX}variant", "")
    sources = (
        AssessmentSource(source_type="HUMAN", source_id="qa-lab dataset"),
        AssessmentSource(source_type="CODE", source_id=f"qa-lab metrics v{metrics_version}"),
    )
    for row in rows:
        tags = {
            "variant": variant,
            **{k: getattr(row, k) for k in TRACE_TAG_KEYS[1:]},
            **_gold_tag(row),
            **_flags_tag(row),
        }
        _publish_item(
            row,
            experiment_id=run.info.experiment_id,
            tags={k: str(v) for k, v in tags.items() if v},
            model=model,
            sources=sources,
        )
    mlflow.flush_trace_async_logging()
    traces = mlflow.search_traces(
        locations=[run.info.experiment_id], run_id=run.info.run_id, return_type="list"
    )
    spans = sum(len(t.data.spans) for t in traces)
    expected = sum(1 + bool(r.retrieved) + bool(r.messages) for r in rows)
    seconds = time.perf_counter() - started
    log_metrics({"traces_published": len(traces), "trace_publish_s": seconds})
    print(f"traces: {len(traces)} items, {spans} spans published in {seconds:.1f} s", flush=True)
    if (len(traces), spans) != (len(rows), expected):
        raise QaLabError(
            f"tracking.uri={mlflow.get_tracking_uri()}: {len(traces)}/{len(rows)} item traces "
            f"and {spans}/{expected} spans arrived (metrics and artifacts are logged; "
            "tracking.traces=false skips traces)"
        )
    return len(traces)
