"""MLflow: store URI, experiments, runs and nesting, params/tags/metrics/tables/artifacts.

The only module that imports mlflow. Sweeps get one parent run (created by the Hydra callback
before any job starts); its id reaches every job through a file in the sweep folder, read here
and passed explicitly as `parent_run_id` — never through MLFLOW_RUN_ID, which silently takes
precedence over it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qa_lab import __version__
from qa_lab.config import PROJECT_ROOT, flatten, redact
from qa_lab.errors import QaLabError

PARENT_FILE = "mlflow_parent_run.json"
PARAM_VALUE_LIMIT = 500
TAG_PREFIX = "qa_lab."
# tracking.retry keys -> the MLflow client's environment variables (read per request)
RETRY_ENV = {
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def configure(tracking_cfg: Any) -> str:
    """Point MLflow at the configured store and return the experiment id (created if new).

    A server store is checked first (one quick request) so that a server that is down fails
    in a second with its URI, not after minutes of retries or after the work is done.
    """
    _quiet_mlflow()
    check_server(tracking_cfg)
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = str(tracking_cfg.uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(tracking_cfg.experiment)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return mlflow.create_experiment(
                tracking_cfg.experiment, artifact_location=_artifact_uri(tracking_cfg)
            )
        except MlflowException:  # a parallel job created it first
            return mlflow.get_experiment_by_name(tracking_cfg.experiment).experiment_id
    except MlflowException as err:
        raise QaLabError(f"tracking.uri={uri}: {str(err).splitlines()[0][:200]}") from None
    except Exception as err:  # connection errors surface as requests/urllib3 exceptions
        raise QaLabError(
            f"tracking.uri={uri}: tracking server unreachable ({type(err).__name__})"
        ) from None


def is_server(tracking_cfg: Any) -> bool:
    """Whether the store is a tracking server (http/https), not a local file."""
    return str(tracking_cfg.uri).startswith(("http://", "https://"))


def check_server(tracking_cfg: Any) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer; set its retries.

    Stdlib only (no mlflow import), so scripts can call it before any work. The retry
    settings go to MLflow's own HTTP client through its environment variables: each request
    is retried with exponential backoff for a bounded time (`tracking.retry`), which rides
    out a server restart, then fails.
    """
    if not is_server(tracking_cfg):
        return
    for name, value in (tracking_cfg.get("retry") or {}).items():
        if name not in RETRY_ENV or not isinstance(value, int) or value < 0:
            raise QaLabError(
                f"tracking.retry.{name}={value!r}: expected a whole number >= 0 for one of "
                f"{', '.join(RETRY_ENV)}"
            )
        os.environ[RETRY_ENV[name]] = str(value)
    uri = str(tracking_cfg.uri)
    if not server_answers(uri):
        raise QaLabError(
            f"tracking.uri={uri}: tracking server unreachable; start it with `make server` "
            "or point MLFLOW_TRACKING_URI at a running one"
        )


def server_answers(uri: str, timeout_s: float = 5.0) -> bool:
    """One GET of the server's /health endpoint."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False


def _artifact_uri(tracking_cfg: Any) -> str | None:
    location = tracking_cfg.get("artifact_location")
    if not location:
        return None
    return Path(location).resolve().as_uri()


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the project checkout ("unknown" outside git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return {"git_sha": sha, "git_dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": "unknown", "git_dirty": "unknown"}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour changes results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"qa_lab": __version__}
    for package in ("torch", "transformers", "peft", "trl", "sentence-transformers", "mlflow"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out


def sweep_parent_file(sweep_dir: str | Path) -> Path:
    """Where the multirun callback leaves the parent run id for its jobs."""
    return Path(sweep_dir) / PARENT_FILE


def current_parent_run_id() -> str | None:
    """The sweep's parent run id when this process runs a multirun job, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    path = sweep_parent_file(hydra_cfg.sweep.dir)
    if not path.is_file():
        return None
    return json.loads(path.read_text())["run_id"]


def create_parent_run(tracking_cfg: Any, name: str, tags: Mapping[str, str]) -> str:
    """Create (without activating) a sweep's parent run; jobs nest under it by id."""
    import mlflow

    experiment_id = configure(tracking_cfg)
    client = mlflow.MlflowClient()
    all_tags = {f"{TAG_PREFIX}{k}": str(v) for k, v in tags.items()}
    all_tags.update({f"{TAG_PREFIX}{k}": v for k, v in git_state().items()})
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def end_run_by_id(run_id: str, status: str = "FINISHED") -> None:
    """Close a run that is not the active one (the sweep parent)."""
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status=status)


@contextlib.contextmanager
def start_run(
    cfg: Any,
    *,
    stage: str,
    key: str,
    variant: str | None = None,
    tags: Mapping[str, str] | None = None,
    log_config: bool = True,
) -> Iterator[str]:
    """Open a run (nested under the sweep parent in a multirun) with params, tags and config.

    A job that raises ends its run as FAILED and still uploads its Hydra log. When the cause
    is a tracking server that stopped answering (MLflow's retries are spent), the job fails
    with one line instead: finished work stays in the local cache and a rerun resumes from it.
    """
    import mlflow

    from qa_lab.config import to_dict

    experiment_id = configure(cfg.tracking)
    parent = current_parent_run_id()
    name = f"{stage}-{variant}-{key[:8]}" if variant else f"{stage}-{key[:8]}"
    all_tags = {
        f"{TAG_PREFIX}stage": stage,
        f"{TAG_PREFIX}key": key,
        **{f"{TAG_PREFIX}{k}": str(v) for k, v in (tags or {}).items()},
        **{f"{TAG_PREFIX}{k}": v for k, v in git_state().items()},
        **{f"{TAG_PREFIX}version.{k}": v for k, v in library_versions().items()},
    }
    if variant:
        all_tags[f"{TAG_PREFIX}variant"] = variant
    resolved = redact(to_dict(cfg)) if log_config else {}
    run = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=name,
        tags=all_tags,
        parent_run_id=parent,
        nested=parent is not None,
    )
    try:
        if log_config:
            _log_params(resolved)
            mlflow.log_dict(resolved, "config/config.json")
            _log_hydra_files()
        yield run.info.run_id
    except BaseException:
        if is_server(cfg.tracking) and not server_answers(str(cfg.tracking.uri)):
            # no second round of retries: MLflow's exit hook would end the run over HTTP
            os.environ[RETRY_ENV["max_retries"]] = "0"
            raise QaLabError(
                f"tracking.uri={cfg.tracking.uri}: the tracking server stopped answering and "
                f"did not come back within tracking.retry; finished work (generations, adapters, "
                f"datasets) is kept under paths.cache={cfg.paths.cache}: rerun the same command "
                "once the server is back"
            ) from None
        _log_hydra_log()
        mlflow.end_run(status="FAILED")
        raise
    _log_hydra_log()
    mlflow.end_run()


def _log_params(resolved: dict[str, Any]) -> None:
    import mlflow
    from mlflow.entities import Param

    params = [
        Param(k, str(v)[:PARAM_VALUE_LIMIT])
        for k, v in flatten(resolved).items()
        if not k.startswith("hydra.")
    ]
    client = mlflow.MlflowClient()
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100])


def _hydra_output_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return None


def _log_hydra_files() -> None:
    import mlflow

    out = _hydra_output_dir()
    if out is not None and (out / ".hydra").is_dir():
        mlflow.log_artifacts(str(out / ".hydra"), "config/hydra")


def _log_hydra_log() -> None:
    import mlflow

    out = _hydra_output_dir()
    if out is None:
        return
    for log in out.glob("*.log"):
        mlflow.log_artifact(str(log), "logs")


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric metrics on the active run (non-finite values are skipped, not faked)."""
    import math

    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Tags under the qa_lab. prefix on the active run."""
    import mlflow

    mlflow.set_tags({f"{TAG_PREFIX}{k}": str(v) for k, v in tags.items()})


def log_params(params: Mapping[str, Any]) -> None:
    """Extra params on the active run (values truncated to MLflow's limit)."""
    import mlflow

    mlflow.log_params({k: str(v)[:PARAM_VALUE_LIMIT] for k, v in params.items()})


def log_table(rows: list[dict[str, Any]], name: str) -> None:
    """One table per run (MLflow keeps every table's name in one size-limited tag)."""
    import mlflow
    import pandas as pd

    mlflow.log_table(pd.DataFrame(rows), artifact_file=name)


def log_dict(obj: Any, name: str) -> None:
    """A JSON/YAML artifact."""
    import mlflow

    mlflow.log_dict(obj, name)


def log_text(text: str, name: str) -> None:
    """A text artifact."""
    import mlflow

    mlflow.log_text(text, name)


def log_figure(figure: Any, name: str) -> None:
    """A matplotlib figure as an image artifact."""
    import mlflow

    mlflow.log_figure(figure, name)


def log_artifacts(path: str | Path, artifact_path: str | None = None) -> None:
    """A file or folder as artifacts."""
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path)


def log_input(rows: list[dict[str, Any]], name: str, context: str, digest: str) -> None:
    """A dataset split as an MLflow input (shows in the run's Datasets panel)."""
    import mlflow
    import pandas as pd

    dataset = mlflow.data.from_pandas(pd.DataFrame(rows), name=name, digest=digest[:36])
    mlflow.log_input(dataset, context=context)


def find_finished_run(stage: str, key: str, experiment_id: str | None = None) -> str | None:
    """The newest finished run of a stage with this key (in one experiment, or in any).

    Stages use it to skip logging work already logged; reports use it to find the training
    run behind an adapter key.
    """
    import mlflow

    where = (
        {"experiment_ids": [experiment_id]} if experiment_id else {"search_all_experiments": True}
    )
    runs = mlflow.search_runs(
        **where,
        filter_string=(
            f"tags.`{TAG_PREFIX}stage` = '{stage}' and tags.`{TAG_PREFIX}key` = '{key}' "
            "and attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


def download_artifacts(uri: str) -> Path:
    """Fetch a `runs:/…` (or any MLflow artifact) URI to a local temp folder."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp()))
    except (MlflowException, OSError) as err:
        raise QaLabError(f"{uri}: cannot download ({str(err).splitlines()[0][:160]})") from None


def child_runs(parent_run_id: str) -> list[dict[str, Any]]:
    """Finished runs nested under a parent: id, name, tags, params and latest metrics."""
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "tags": dict(r.data.tags),
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
        }
        for r in runs
    ]


def run_artifact_text(run_id: str, path: str) -> str:
    """Text of one artifact of a run."""
    import mlflow

    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of a metric, in step order."""
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


@contextlib.contextmanager
def resume_run(run_id: str) -> Iterator[None]:
    """Make an existing run active (to log the report on a sweep parent)."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        yield


def ui_command(tracking_cfg: Any) -> str:
    """The command that opens the MLflow UI over this store."""
    uri = str(tracking_cfg.uri)
    if uri.startswith("http"):
        return f"open {uri}"
    return "make ui   # then open http://127.0.0.1:5000"


# --------------------------------------------------------------------------- item traces

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

    `doc_uri` and `id` are the source row's item id in the train split, `similarity` the
    retriever's score.
    """
    from mlflow.entities import Document

    return [
        Document(
            page_content="\n".join(str(p[k]) for k in ("question", "answer") if p.get(k)),
            metadata={"doc_uri": str(p.get("item_id")), "similarity": p.get("score")},
            id=str(p.get("item_id")),
        ).to_dict()
        for p in passages
    ]


def _token_usage(row: Mapping[str, Any]) -> dict[str, int]:
    """MLflow's standard token-usage attribute (feeds the Overview's token charts)."""
    if row.get("prompt_tokens") is None or row.get("generated_tokens") is None:
        return {}
    prompt, generated = int(row["prompt_tokens"]), int(row["generated_tokens"])
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
    row: Mapping[str, Any],
    scores: Mapping[str, float],
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
    import math
    import time

    import mlflow
    from mlflow.entities import Expectation, Feedback, SpanType

    expectation_source, feedback_source = sources
    start = time.time_ns()
    end = start + int(float(row.get("seconds") or 0.0) * 1e9)
    answer = row["prediction"]
    root = mlflow.start_span_no_context(
        "qa_item",
        span_type=SpanType.CHAIN,
        inputs={k: str(row[k]) for k in TRACE_INPUT_KEYS},
        experiment_id=experiment_id,
        start_time_ns=start,
        tags=dict(tags),
    )
    if row.get("retrieved"):
        _child_span(
            root,
            ("retrieve", SpanType.RETRIEVER),
            {"query": row["question"]},
            _documents(row["retrieved"]),
            (start, start),
        )
    if row.get("messages"):
        _child_span(
            root,
            ("generate", SpanType.LLM),
            {"messages": row["messages"]},
            answer,
            # 1 µs after retrieval, so the UI lists the spans in the order they ran
            (start + 1000, end + 1000),
            attributes={
                "mlflow.llm.model": model,
                **_token_usage(row),
                "stop_reason": row.get("stop_reason"),
                "cached": bool(row.get("cached", False)),
            },
        )
    with _active_span(root):
        mlflow.log_assessment(
            root.trace_id,
            Expectation(
                EXPECTED_RESPONSE, row["reference"], source=expectation_source, span_id=root.span_id
            ),
        )
        for name, value in scores.items():
            if value is not None and math.isfinite(float(value)):
                mlflow.log_assessment(
                    root.trace_id,
                    Feedback(name, float(value), source=feedback_source, span_id=root.span_id),
                )
    root.end(outputs=answer, end_time_ns=end + 1000)


def publish_item_traces(
    rows: list[dict[str, Any]],
    per_item: list[dict[str, float]],
    *,
    model: str,
    metrics_version: int,
) -> int:
    """One trace per evaluated item on the active run, for MLflow's evaluation view.

    Each row needs item_id, question, prediction and reference; `retrieved` passages and chat
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
    for row, scores in zip(rows, per_item):
        tags = {"variant": variant, **{k: row.get(k) for k in TRACE_TAG_KEYS[1:]}}
        _publish_item(
            row,
            scores,
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
    expected = sum(1 + bool(r.get("retrieved")) + bool(r.get("messages")) for r in rows)
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
