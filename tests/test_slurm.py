"""The cluster path for real: a single-node SLURM (scripts/slurm.py) and the PostgreSQL server.

The 2x2 sweep goes through `hydra/launcher=submitit_slurm_local` (the cluster launcher sized for
one CPU node) as a SLURM array, with the tracking server restarted while its jobs run. Then a
two-job sweep without adapter (closed-book and RAG, on the first sweep's cache) in which one job
is cancelled mid-run (`scancel`) and the other passes its time limit: both end FAILED with their
reasons, both missing configs are named, and one rerun submits only those two and generates no
answer twice. One cluster and one server for the module (each start costs seconds, a sweep
minutes). Skipped where SLURM cannot start (no slurm-wlm/munge, not root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from qa_lab.config import PROJECT_ROOT
from tests import test_scale
from tests.conftest import MODELS_DIR, TINY_RUN, write_small_source
from tests.test_scale import _cached_answers, _check_sweep, _on_server, _runs, _server
from tests.test_sweeps import _free_port

pytestmark = pytest.mark.slow
server = test_scale.server  # the PostgreSQL-backed MLflow server, one per module
SLURM = [sys.executable, str(PROJECT_ROOT / "scripts" / "slurm.py")]
if shutil.which("slurmctld", path="/usr/sbin:/usr/bin") is None or os.geteuid() != 0:
    pytest.skip(
        "SLURM cannot start here: needs root and slurm-wlm + munge (.ci/run installs them)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def slurm():
    """A fresh single-node cluster in a temp folder on free ports; the env that reaches it."""
    state = Path(tempfile.mkdtemp(prefix="qa-lab-slurm-"))
    port = _free_port()
    proc = subprocess.run(
        [*SLURM, "start", "--dir", str(state), "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"SLURM did not start: {(proc.stderr or proc.stdout).strip()[-300:]}")
    env = {
        **os.environ,
        "SLURM_CONF": str(state / "slurm.conf"),
        "PATH": f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }
    try:
        yield env
    finally:
        subprocess.run([*SLURM, "stop", "--dir", str(state)], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _sweep_cmd(tmp: Path, cache: Path, url: str, experiment: str, *extra: str) -> list[str]:
    source = tmp / "small.jsonl"
    if not source.exists():
        write_small_source(source)
    return [
        sys.executable,
        "evaluate.py",
        "-m",
        "+experiment=rag_vs_ft",
        "hydra/launcher=submitit_slurm_local",
        *_on_server(url, experiment),
        f"paths.cache={cache}",
        f"paths.models={MODELS_DIR}",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        f"dataset.source={source}",
        *TINY_RUN,
        "metrics=lexical",
        "generation.threads=1",
        *extra,
    ]


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # the child keeps its own copies of the two files: closing ours right away is safe
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=err, text=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 1800) -> tuple[int, str, str]:
    rc = proc.wait(timeout=timeout)
    return rc, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def _running_job(url: str, experiment: str, deadline: float) -> tuple[str, str]:
    """Wait for an evaluate run that a SLURM job has open: (SLURM job id, run id)."""
    while time.monotonic() < deadline:
        running = (
            _runs(url, experiment, "attributes.status = 'RUNNING'")
            if _exists(url, experiment)
            else []
        )
        for r in running:
            if r.data.tags.get("qa_lab.stage") == "evaluate" and "qa_lab.slurm_job" in r.data.tags:
                return r.data.tags["qa_lab.slurm_job"], r.info.run_id
        time.sleep(1)
    raise AssertionError(f"no evaluate run of {experiment} started in time")


def _exists(url: str, experiment: str) -> bool:
    mlflow.set_tracking_uri(url)
    return mlflow.get_experiment_by_name(experiment) is not None


@pytest.fixture(scope="module")
def slurm_sweep(slurm, server, tmp_path_factory):
    """The 2x2 sweep through SLURM on a fresh cache; the tracking server restarts mid-sweep."""
    state, port, url = server
    tmp = tmp_path_factory.mktemp("slurm")
    log = tmp / "sweep"
    started = time.monotonic()
    cmd = _sweep_cmd(tmp, tmp / "cache", url, "slurm", "generation.max_new_tokens=12")
    proc = _start(cmd, slurm, log)
    job, _ = _running_job(url, "slurm", time.monotonic() + 900)
    _server("stop", state, port)  # the jobs' MLflow clients retry (tracking.retry) meanwhile
    _server("start", state, port)
    rc, out, err = _finish(proc, log)
    assert rc == 0, err[-3000:]
    return tmp, out, job, time.monotonic() - started


def test_sweep_as_slurm_array_survives_server_restart(server, slurm_sweep):
    _, _, url = server
    tmp, out, restarted_during, wall_s = slurm_sweep
    print(f"SLURM sweep: {wall_s:.0f} s; server restarted while job {restarted_during} ran")
    assert "SLURM: submitting 4 of 4 jobs" in out
    children = _check_sweep(url, "slurm")  # one parent, four evaluate children, all FINISHED
    stages = [c.data.tags["qa_lab.stage"] for c in children]
    assert stages.count("dataset") == 1
    trains = [c for c in children if c.data.tags["qa_lab.stage"] == "train"]
    assert [c.data.tags["qa_lab.reused"] for c in trains].count("false") == 1
    jobs = {c.data.tags["qa_lab.slurm_job"] for c in children}
    assert len({j.split("_")[0] for j in jobs}) == 1  # one array ...
    assert len([c for c in children if c.data.tags["qa_lab.stage"] == "evaluate"]) == 4
    for job in jobs:  # ... whose job logs sit in the sweep folder
        assert (tmp / "multirun" / ".submitit" / job / f"{job}_0_log.out").is_file()
    assert len([p for p in (tmp / "cache" / "adapters").iterdir() if p.is_dir()]) == 1


def _evaluate_runs(url: str, experiment: str) -> list:
    return [r for r in _runs(url, experiment) if r.data.tags.get("qa_lab.stage") == "evaluate"]


def _parent(url: str, experiment: str):
    (parent,) = _runs(url, experiment, "tags.`qa_lab.stage` = 'evaluate_sweep'")
    return parent


def _array_id(proc: subprocess.Popen, env: dict[str, str], deadline: float) -> str:
    """The sweep's array id, once its first task runs."""
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before its jobs ran"
        out = subprocess.run(
            ["squeue", "--noheader", "--states=RUNNING", "--format=%i"],
            env=env,
            capture_output=True,
            text=True,
        ).stdout.split()
        if out:
            return out[0].split("_")[0]
        time.sleep(0.3)
    raise AssertionError("no array task ran in time")


def _state(env: dict[str, str], job: str) -> str:
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--array", "--format=%T", f"--jobs={job}"],
        env=env,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _mid_run(proc: subprocess.Popen, env: dict[str, str], url: str, job: str) -> str | None:
    """Wait until SLURM job `job` has an evaluate run and has cached an answer since (the run
    id), or has ended before that (None)."""
    cache = _cache_of(proc)
    run_id, opened = None, 0
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended early"
        if run_id is None:
            run_id = next((r.info.run_id for r in _job_runs(url, job)), None)
            opened = _cached_answers(cache)
        elif _cached_answers(cache) > opened:
            return run_id
        state = _state(env, job)  # "" while squeue does not list the task yet
        if state and state not in ("PENDING", "CONFIGURING", "RUNNING"):
            return None
        time.sleep(0.2)
    raise AssertionError(f"job {job} cached no answer in time")


def _cache_of(proc: subprocess.Popen) -> Path:
    (arg,) = [a for a in proc.args if a.startswith("paths.cache=")]
    return Path(arg.split("=", 1)[1])


def _job_runs(url: str, job: str) -> list:
    runs = _evaluate_runs(url, "slurm-fail") if _exists(url, "slurm-fail") else []
    return [r for r in runs if r.data.tags.get("qa_lab.slurm_job") == job]


def test_cancelled_and_timed_out_jobs_fail_clearly_and_rerun_submits_only_them(
    slurm, server, slurm_sweep
):
    """Two jobs without adapter, one after the other: one past its time limit, one cancelled."""
    _, _, url = server
    cache = slurm_sweep[0] / "cache"  # dataset and index cached; new answers (48 tokens)
    tmp = Path(tempfile.mkdtemp(prefix="qa-lab-fail-", dir=slurm_sweep[0]))
    cmd = _sweep_cmd(
        tmp,
        cache,
        url,
        "slurm-fail",
        "hydra.sweeper.params.model=vanilla",  # jobs _0 (retriever=none) and _1 (faiss)
        "hydra.launcher.array_parallelism=1",  # _1 waits while _0 runs
        "generation.batch_size=1",  # each answer lands in the cache on its own
        "generation.max_new_tokens=48",
    )
    names = {"vanilla": "model=vanilla retriever=none", "rag": "model=vanilla retriever=faiss"}
    baseline = _cached_answers(cache)
    # a 1 min limit (SLURM's smallest); SLURM warns with SIGUSR2 signal_delay_s before it, at
    # slurmctld's first 30 s check past limit - delay - 30 s: 29-59 s into the job here
    limits = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=1"]
    proc = _start([*cmd, *limits], slurm, tmp / "first")
    array = _array_id(proc, slurm, time.monotonic() + 600)
    limited, cancelled = f"{array}_0", f"{array}_1"
    # the waiting job gets an hour from SLURM, so that it runs until it is cancelled
    subprocess.run(
        ["scontrol", "update", f"JobId={cancelled}", "TimeLimit=60"], env=slurm, check=True
    )
    if _mid_run(proc, slurm, url, limited):
        # SLURM's warning, sent at a fixed moment mid-run unless SLURM's own came first: the
        # 30 s check may fall after the job's last answer on a fast machine
        subprocess.run(["scancel", "--signal=USR2", limited], env=slurm, capture_output=True)
    run_id = _mid_run(proc, slurm, url, cancelled)
    assert run_id is not None, "the job to cancel ended on its own"
    subprocess.run(["scancel", cancelled], env=slurm, check=True)
    rc, _, err = _finish(proc, tmp / "first", timeout=600)
    assert rc == 2, err[-3000:]
    runs = {r.info.run_id: r for r in _evaluate_runs(url, "slurm-fail")}
    assert all(r.info.status == "FAILED" and r.data.tags["qa_lab.failure"] for r in runs.values())
    assert f"SLURM job {cancelled} CANCELLED" in runs[run_id].data.tags["qa_lab.failure"]
    parent = _parent(url, "slurm-fail")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["qa_lab.missing"] == f"{names['vanilla']}; {names['rag']}"
    missing = [ln for ln in err.splitlines() if ln.startswith("missing: ")]
    assert len(missing) == 2, err[-3000:]
    assert missing[0].startswith(f"missing: {names['vanilla']}: SLURM job {limited}")
    assert "past its time limit" in missing[0], missing[0]
    assert missing[1].startswith(f"missing: {names['rag']}: SLURM job {cancelled} CANCELLED")
    assert err.strip().splitlines()[-1].startswith(f"error: sweep run {parent.info.run_id}: 2")
    before = _cached_answers(cache)
    # the same command (the default limit): only the two missing configs, from the caches
    rc, out, err = _finish(_start(cmd, slurm, tmp / "rerun"), tmp / "rerun", timeout=600)
    assert rc == 0, err[-3000:]
    assert "SLURM: submitting 2 of 2 jobs" in out
    assert _parent(url, "slurm-fail").info.status == "FINISHED"
    rerun = [r for r in _evaluate_runs(url, "slurm-fail") if r.info.run_id not in runs]
    assert len(rerun) == 2 and all(r.info.status == "FINISHED" for r in rerun)
    per_item = [f"runs:/{r.info.run_id}/per_item.jsonl" for r in rerun]
    items = sum(len(mlflow.artifacts.load_text(uri).splitlines()) for uri in per_item)
    generated = sum(int(r.data.metrics["answers_generated"]) for r in rerun)
    # the answers the failed jobs finished came from the cache, only the rest was generated
    assert generated == items - (before - baseline) and before > baseline
    assert _cached_answers(cache) == before + generated
