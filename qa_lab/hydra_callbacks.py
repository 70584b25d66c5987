"""Hydra callback that groups a --multirun sweep under one MLflow parent run.

The parent run is created before any job starts and its id is written to the sweep folder,
where every job (in this process or a joblib/submitit worker) reads it and nests its run under
it explicitly. At the end of the sweep the comparison report is built on the parent.

A tracking server that is down stops a run or sweep here, in a second, before any work; a
parallel launcher aimed at the local SQLite store is refused (cluster) or warned about (one
machine), since SQLite lets one writer in at a time and lives on one machine.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qa_lab import tracking
from qa_lab.errors import QaLabError, cli_errors


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

        sweep_dir = tracking.sweep_parent_file(config.hydra.sweep.dir).parent
        sweep_dir.mkdir(parents=True, exist_ok=True)
        overrides = list(config.hydra.overrides.task)
        name = f"sweep-{config.stage}-{sweep_dir.name}"
        run_id = tracking.create_parent_run(
            config.tracking,
            name,
            {"stage": f"{config.stage}_sweep", "overrides": " ".join(overrides)[:500]},
        )
        tracking.sweep_parent_file(sweep_dir).write_text(json.dumps({"run_id": run_id}))
        print(f"MLflow parent run {run_id} ({name})", flush=True)

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
        except Exception as err:
            # Hydra turns a callback's exception into a warning and exits 0; a sweep whose
            # report failed must not look finished, so say it in one line and exit 2.
            status = "FAILED"
            print(f"error: report for sweep run {run_id} failed: {err}", file=sys.stderr)
            raise SystemExit(2) from err
        finally:
            tracking.end_run_by_id(run_id, status)


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
    if target.endswith(".SlurmLauncher"):
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
