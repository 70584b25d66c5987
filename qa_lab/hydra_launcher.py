"""The SLURM launcher for sweeps: jobs as one array, failed jobs reported, reruns resubmit gaps.

hydra-submitit-launcher's SLURM launcher submits the sweep as a job array and then asks each
job for its result: the first job that was cancelled, killed at its time limit or that failed
raises there, the sweep stops with a traceback and the parent run stays RUNNING. This one waits
for every job, and when some failed, closes the sweep through `hydra_callbacks.fail_sweep`
(runs FAILED with the reason in a tag, the missing configs named, exit 2). Rerunning the same
command (same `hydra.sweep.dir`) submits only the jobs without a completion marker; those
resume from the caches (dataset, adapter, per-item answers), so no finished answer is
generated twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from qa_lab import hydra_callbacks, tracking
from qa_lab.config import PROJECT_ROOT

INIT_KEYS = {"submitit_folder", "max_num_timeout"}  # executor arguments, not job parameters


class ResumableSlurmLauncher(SlurmLauncher):
    """`SlurmLauncher` that survives failed jobs and skips the ones a previous try finished."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        """Submit the jobs not yet done as one array, wait for all; close the sweep on failures."""
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        jobs = [(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        todo = [
            (idx, o) for idx, o in jobs if not hydra_callbacks.done_marker(sweep_dir, o).is_file()
        ]
        print(f"SLURM: submitting {len(todo)} of {len(jobs)} jobs", flush=True)
        returns = {}
        missing = []
        for (idx, overrides), job in zip(todo, self._submit(todo) if todo else []):
            ret, reason = _outcome(job)
            if reason:
                name = _swept(overrides, self.config.hydra.sweeper.get("params") or {})
                missing.append((name, str(job.job_id), reason))
            returns[idx] = ret
        if missing:
            hydra_callbacks.fail_sweep(self.config, missing)
        done = JobStatus.COMPLETED  # skipped jobs: a previous try completed them
        return [returns.get(idx) or JobReturn(overrides=o, status=done) for idx, o in jobs]

    def _submit(self, todo: list[tuple[int, list[str]]]) -> list[Any]:
        """The plugin's own submission (same executor settings), for the given jobs only."""
        import submitit

        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=params["submitit_folder"],
            slurm_max_num_timeout=params.get("max_num_timeout", 0),
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                k if k in base else f"{self._EXECUTOR}_{k}": v
                for k, v in params.items()
                if k not in INIT_KEYS
            }
        )
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        # jobs unpickle this launcher from hydra_plugins/ at the project root; sbatch passes
        # the submitter's environment on (--export=ALL), so they find it from any folder
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), path]))
        for idx, overrides in todo:
            print(f"\t#{idx} : {' '.join(filter_overrides(overrides))}", flush=True)
        state = Singleton.get_state()
        args = [(o, "hydra.sweep.dir", idx, f"job_id_for_{idx}", state) for idx, o in todo]
        return executor.map_array(self, *zip(*args))


def _swept(overrides: list[str], params: Any) -> str:
    """A job's name for people: its values of the swept keys (`hydra.sweeper.params`)."""
    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in params]
    return " ".join(own or filter_overrides(overrides))


def _outcome(job: Any) -> tuple[JobReturn | None, str | None]:
    """The job's JobReturn when it completed, else None and one line saying why it did not."""
    from submitit.core.utils import UncompletedJobError

    try:
        ret = job.results()[0]  # waits for the job
    except UncompletedJobError as err:  # no result: cancelled, killed at the limit, exit 2
        state = job.watcher.get_state(job.job_id, mode="force")
        first = str(err).strip().splitlines()[0]
        why = _error_line(job) or first
        return None, f"SLURM job {job.job_id} {state}{_past_limit(job)}: {why}"[:500]
    if ret.status != JobStatus.COMPLETED:  # the task raised (e.g. submitit's timeout signal)
        why = tracking.failure_reason(ret._return_value)
        return None, f"SLURM job {job.job_id}{_past_limit(job)}: {why}"[:500]
    return ret, None


def _past_limit(job: Any) -> str:
    """Say "past its time limit" when the finished job's log shows SLURM's warning signal.

    submitit logs "this job is timed-out" on the SIGUSR2 before the limit; the error it then
    raises may surface as another one (inside a lazy import it became a ModuleNotFoundError).
    """
    return " past its time limit" if "this job is timed-out" in (job.stderr() or "") else ""


def _error_line(job: Any) -> str | None:
    """The job's last `error: …` line (what qa-lab printed before exiting 2), if any."""
    text = job.stderr() or ""
    lines = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    return lines[-1] if lines else None
