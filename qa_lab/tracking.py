"""MLflow: store URI, experiments, runs and nesting, params/tags/metrics/tables/artifacts.

With `traces` (per-item traces) and `logged_models` (adapters as models), the only module that
imports mlflow; reaching a server (`tracking_server`) is re-exported here. Sweeps get one parent
run (created by the Hydra callback before any job starts); its id reaches every job through a
file in the sweep folder, read here and passed explicitly as `parent_run_id` — never through
MLFLOW_RUN_ID, which silently takes precedence over it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from qa_lab.config import flatten, redact
from qa_lab.errors import QaLabError
from qa_lab.provenance import git_state, library_versions

# reaching a server: re-exported, callers use tracking.check_server etc.
from qa_lab.tracking_server import RETRY_ENV, check_server, is_server, server_answers

PARENT_FILE = "mlflow_parent_run.json"
FAILURE_TAG = "failure"  # qa_lab.failure: why a FAILED run failed, in one line
JOB_TAG = "slurm_job"  # qa_lab.slurm_job: the SLURM job (array task) that ran the run
NOTE_TAG = "mlflow.note.content"  # the run page's description (markdown)
PARAM_VALUE_LIMIT = 500
TAG_PREFIX = "qa_lab."


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


def _artifact_uri(tracking_cfg: Any) -> str | None:
    location = tracking_cfg.get("artifact_location")
    if not location:
        return None
    return Path(location).resolve().as_uri()


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


def end_run_by_id(
    run_id: str, status: str = "FINISHED", tags: Mapping[str, str] | None = None
) -> None:
    """Close a run that is not the active one (the sweep parent), with qa_lab. tags if given."""
    import mlflow

    client = mlflow.MlflowClient()
    for name, value in (tags or {}).items():
        client.set_tag(run_id, f"{TAG_PREFIX}{name}", str(value)[:PARAM_VALUE_LIMIT])
    client.set_terminated(run_id, status=status)


def reopen_run(run_id: str) -> None:
    """Mark a closed run RUNNING again (a resumed sweep's parent, until its rerun ends)."""
    import mlflow

    mlflow.MlflowClient().update_run(run_id, status="RUNNING")


@contextlib.contextmanager
def start_run(
    cfg: Any,
    *,
    stage: str,
    key: str,
    variant: str | None = None,
    tags: Mapping[str, str] | None = None,
    log_config: bool = True,
    detail: str | None = None,
    description: str | None = None,
) -> Iterator[str]:
    """Open a run (nested under the sweep parent in a multirun) with params, tags and config.

    `description`: the run page's description, e.g. the config in a line.

    A job that raises ends its run as FAILED and still uploads its Hydra log. When the cause
    is a tracking server that stopped answering (MLflow's retries are spent), the job fails
    with one line instead: finished work stays in the local cache and a rerun resumes from it.
    """
    import mlflow

    from qa_lab.config import to_dict

    experiment_id = configure(cfg.tracking)
    parent = current_parent_run_id()
    # `detail` (e.g. the retriever and k) makes runs of one variant tell apart in the runs table
    name = "-".join(filter(None, (stage, variant, detail, key[:8])))
    all_tags = _run_tags(stage, key, variant, tags, description)
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
    except BaseException as err:
        if is_server(cfg.tracking) and not server_answers(str(cfg.tracking.uri)):
            raise _server_gone(cfg) from None
        _log_hydra_log()
        mlflow.set_tag(f"{TAG_PREFIX}{FAILURE_TAG}", failure_reason(err))
        mlflow.end_run(status="FAILED")
        raise
    _log_hydra_log()
    mlflow.end_run()


def _run_tags(
    stage: str,
    key: str,
    variant: str | None,
    tags: Mapping[str, str] | None,
    description: str | None,
) -> dict[str, str]:
    """A run's tags: stage, key, the caller's tags, the checkout, library versions, the job."""
    all_tags = {
        f"{TAG_PREFIX}stage": stage,
        f"{TAG_PREFIX}key": key,
        **{f"{TAG_PREFIX}{k}": str(v) for k, v in (tags or {}).items()},
        **{f"{TAG_PREFIX}{k}": v for k, v in git_state().items()},
        **{f"{TAG_PREFIX}version.{k}": v for k, v in library_versions().items()},
    }
    if variant:
        all_tags[f"{TAG_PREFIX}variant"] = variant
    if description:
        all_tags[NOTE_TAG] = description
    if cluster_job_id():
        all_tags[f"{TAG_PREFIX}{JOB_TAG}"] = cluster_job_id()
    return all_tags


def _server_gone(cfg: Any) -> QaLabError:
    """The one line for a tracking server that stopped answering mid-run (retries spent)."""
    # no second round of retries: MLflow's exit hook would end the run over HTTP
    os.environ[RETRY_ENV["max_retries"]] = "0"
    return QaLabError(
        f"tracking.uri={cfg.tracking.uri}: the tracking server stopped answering and "
        f"did not come back within tracking.retry; finished work (generations, adapters, "
        f"datasets) is kept under paths.cache={cfg.paths.cache}: rerun the same command "
        "once the server is back"
    )


def cluster_job_id() -> str | None:
    """This process's SLURM job as squeue names it (`<array>_<task>` in an array), else None."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def failure_reason(err: BaseException) -> str:
    """One line for the failure tag: the exception's type and first line."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"[:PARAM_VALUE_LIMIT]


def fail_abandoned_runs(parent_run_id: str, job_id: str, reason: str) -> list[str]:
    """End as FAILED, with the reason in a tag, the runs a killed cluster job left RUNNING.

    A job that SLURM cancels or kills at its time limit gets SIGKILL after KillWait (submitit
    ignores the SIGTERM before it), so its own `start_run` never closes its run; the sweep
    closes it from the job's state once the job is gone.
    """
    import mlflow

    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and "
            f"tags.`{TAG_PREFIX}{JOB_TAG}` = '{job_id}' and attributes.status = 'RUNNING'"
        ),
    )
    for run in runs:
        client.set_tag(run.info.run_id, f"{TAG_PREFIX}{FAILURE_TAG}", reason[:PARAM_VALUE_LIMIT])
        client.set_terminated(run.info.run_id, status="FAILED")
    return [r.info.run_id for r in runs]


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


def log_metrics(
    metrics: Mapping[str, float], step: int | None = None, model_id: str | None = None
) -> None:
    """Log numeric metrics on the active run (non-finite values are skipped, not faked).

    They link to `model_id`, or to the active logged model (`logged_models.evaluating`). When
    linked, the run is named by id: MLflow then reads it afresh and adds the model to its
    inputs once, not again on every call (it would from the run object cached at its start).
    """
    import math

    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if clean:
        linked = model_id or mlflow.get_active_model_id()
        run_id = mlflow.active_run().info.run_id if linked else None
        mlflow.log_metrics(clean, step=step, model_id=model_id, run_id=run_id)


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


def set_description(text: str, run_id: str | None = None) -> None:
    """A run page's description (MLflow's `mlflow.note.content`), on the active run or by id."""
    import mlflow

    mlflow.MlflowClient().set_tag(run_id or mlflow.active_run().info.run_id, NOTE_TAG, text)


def copy_dataset_inputs(from_run_ids: list[str], to_run_id: str) -> None:
    """Log the dataset inputs of some runs (each name and digest once) on another (a parent)."""
    import mlflow

    client = mlflow.MlflowClient()
    inputs = {
        (i.dataset.name, i.dataset.digest): i
        for run_id in from_run_ids
        for i in client.get_run(run_id).inputs.dataset_inputs
    }
    if inputs:
        client.log_inputs(to_run_id, datasets=list(inputs.values()))


def log_input(rows: list[dict[str, Any]], name: str, context: str, digest: str) -> None:
    """A dataset split as an MLflow input (shows in the run's Datasets panel)."""
    import mlflow
    import pandas as pd

    with warnings.catch_warnings():
        # the schema hint about integer columns concerns model inputs, not a logged dataset
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
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
