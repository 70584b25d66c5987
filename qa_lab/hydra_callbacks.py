"""Hydra callback that groups a --multirun sweep under one MLflow parent run.

The parent run is created before any job starts and its id is written to the sweep folder,
where every job (in this process or a joblib/submitit worker) reads it and nests its run under
it explicitly. At the end of the sweep the comparison report is built on the parent.
"""

from __future__ import annotations

import json
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qa_lab import tracking


class MlflowSweepCallback(Callback):
    """`on_multirun_start` opens the parent run; `on_multirun_end` reports and closes it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Create the parent run and leave its id in the sweep folder for the jobs."""
        import qa_lab.config  # noqa: F401  (resolver for paths.root)

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
        except Exception:
            status = "FAILED"
            raise
        finally:
            tracking.end_run_by_id(run_id, status)
