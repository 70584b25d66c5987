"""Hydra callback that groups a --multirun sweep under one MLflow parent run.

The parent run is created before any job starts and its id is written to the sweep folder,
where every job (in this process or a joblib/submitit worker) reads it and nests its run under
it explicitly. At the end of the sweep the comparison report is built on the parent.

A tracking server that is down stops a run or sweep here, in a second, before any work; a
parallel launcher aimed at the local SQLite store is refused (cluster) or warned about (one
machine), since SQLite lets one writer in at a time and lives on one machine.

Each job that completes leaves a marker in the sweep folder. On a cluster, where jobs get
cancelled, hit their time limit or lose their node, the SLURM launcher (`hydra_launcher.py`)
closes a sweep with missing jobs through `fail_sweep`, and the same command resumes it: the
parent run is reopened and only the jobs without a marker are submitted again.

After the report the parent gets its description (the configs ranked by `tracking.rank_by`) and
its children's dataset inputs, and with `tracking.register=<name>` the sweep's best LoRA adapter
is registered under that name with the alias `best`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from qa_lab import logged_models, tracking
from qa_lab.cache import stable_hash
from qa_lab.errors import EXIT_USER_ERROR, QaLabError, cli_errors
from qa_lab.jsonl import write_json

RESUMABLE_LAUNCHER = "hydra_plugins.qa_lab_launcher.ResumableSlurmLauncher"
DONE_DIR = ".qa_lab_done"  # in the sweep folder: one file per completed job


class MlflowSweepCallback(Callback):
    """`on_multirun_start` opens the parent run; `on_multirun_end` reports and closes it."""

    @cli_errors
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check a tracking server answers before a single run does any work."""
        tracking.check_server(config.tracking)

    @cli_errors
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Create the parent run and leave its id in the sweep folder for the jobs."""
        import qa_lab.config  # noqa: F401  (resolver for paths.root)

        check_parallel_store(config)
        logged_models.check_registration(config.tracking)

        sweep_dir = tracking.sweep_parent_file(config.hydra.sweep.dir).parent
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if resumes(config) and tracking.sweep_parent_file(sweep_dir).is_file():
            run_id = json.loads(tracking.sweep_parent_file(sweep_dir).read_text())["run_id"]
            tracking.configure(config.tracking)
            tracking.reopen_run(run_id)
            print(f"MLflow parent run {run_id} resumed (finished jobs are not resubmitted)")
            return
        overrides = list(config.hydra.overrides.task)
        name = f"sweep-{config.stage}-{sweep_dir.name}"
        run_id = tracking.create_parent_run(
            config.tracking,
            name,
            {"stage": f"{config.stage}_sweep", "overrides": " ".join(overrides)[:500]},
        )
        tracking.sweep_parent_file(sweep_dir).write_text(json.dumps({"run_id": run_id}))
        print(f"MLflow parent run {run_id} ({name})", flush=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Mark a sweep job that completed, so that a resumed sweep does not resubmit it."""
        if config.hydra.mode == RunMode.MULTIRUN and job_return.status == JobStatus.COMPLETED:
            overrides = list(config.hydra.overrides.task)
            write_json(done_marker(config.hydra.sweep.dir, overrides), {"overrides": overrides})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Build the comparison report on the parent run, then mark it finished."""
        path = tracking.sweep_parent_file(config.hydra.sweep.dir)
        if not path.is_file():
            return
        run_id = json.loads(path.read_text())["run_id"]
        tracking.configure(config.tracking)
        status = "FINISHED"
        try:
            if config.stage == "evaluate":
                from qa_lab import reporting

                reporting.report_sweep(config, run_id)
                finish_sweep(config, run_id)
        except Exception as err:
            # Hydra turns a callback's exception into a warning and exits 0; a sweep whose
            # report failed must not look finished, so say it in one line and exit 2.
            status = "FAILED"
            print(f"error: report for sweep run {run_id} failed: {err}", file=sys.stderr)
            raise SystemExit(2) from err
        finally:
            tracking.end_run_by_id(run_id, status)


def finish_sweep(config: DictConfig, run_id: str) -> None:
    """After the report: the parent's description and dataset inputs, the best adapter.

    The adapter is registered only when `tracking.register` names a model; both rank the
    configs by `tracking.rank_by`.
    """
    from qa_lab import run_logging

    metric = str(config.tracking.get("rank_by") or "rougeL_f1")
    run_logging.describe_sweep(run_id, metric)
    if config.tracking.get("register"):
        logged_models.register_best(run_id, str(config.tracking.register), metric)


def resumes(config: DictConfig) -> bool:
    """Whether this sweep's launcher resubmits only what a previous try left missing."""
    return str(config.hydra.launcher.get("_target_", "")) == RESUMABLE_LAUNCHER


def done_marker(sweep_dir: str | Path, overrides: list[str]) -> Path:
    """The file a completed job leaves in the sweep folder, named by its overrides."""
    return Path(sweep_dir) / DONE_DIR / f"{stable_hash(list(overrides))}.json"


def fail_sweep(config: DictConfig, missing: list[tuple[str, str, str]]) -> NoReturn:
    """Close a sweep some of whose jobs failed: runs and parent FAILED with reasons, exit 2.

    `missing` holds (config name, cluster job id, reason) per failed job. Runs a killed job left
    RUNNING end FAILED with the reason; the parent ends FAILED naming the missing configs;
    stderr lists them and the command that resubmits only those (the same one).
    """
    run_id = json.loads(tracking.sweep_parent_file(config.hydra.sweep.dir).read_text())["run_id"]
    tracking.configure(config.tracking)
    for _, job_id, reason in missing:
        tracking.fail_abandoned_runs(run_id, job_id, reason)
    names = [name for name, _, _ in missing]
    tracking.end_run_by_id(
        run_id,
        "FAILED",
        {"missing": "; ".join(names), "failure": f"{len(missing)} job(s) failed: {missing[0][2]}"},
    )
    for name, (_, _, reason) in zip(names, missing):
        print(f"missing: {name}: {reason}", file=sys.stderr)
    print(
        f"error: sweep run {run_id}: {len(missing)} config(s) missing (listed above); rerun the "
        f"same command with hydra.sweep.dir={config.hydra.sweep.dir} to resubmit only those",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(EXIT_USER_ERROR)


def check_parallel_store(config: DictConfig) -> None:
    """Refuse (cluster) or warn (one machine) when parallel jobs would share the SQLite store.

    The basic launcher runs jobs one after another in this process: SQLite is fine. Other
    launchers run jobs in several processes at once; SQLite then serialises their writes
    (and may answer "database is locked" under load), and jobs on other machines cannot
    reach the file at all. The tracking server takes all writers.
    """
    target = str(config.hydra.launcher.get("_target_", ""))
    if target.endswith(".BasicLauncher") or tracking.is_server(config.tracking):
        return
    launcher = config.hydra.runtime.choices.get("hydra/launcher", target)
    where = f"tracking.uri={config.tracking.uri}"
    if target.endswith("SlurmLauncher"):
        raise QaLabError(
            f"hydra/launcher={launcher} runs jobs on other machines, which cannot share the "
            f"local SQLite store ({where}): run `make server` where the nodes reach it and "
            "add tracking=server (MLFLOW_TRACKING_URI=http://<host>:<port>)"
        )
    print(
        f"warning: hydra/launcher={launcher} runs jobs in parallel processes that all write "
        f"the local SQLite store ({where}); SQLite takes one writer at a time and may fail "
        "with 'database is locked' under load: start `make server` and add tracking=server",
        file=sys.stderr,
        flush=True,
    )
