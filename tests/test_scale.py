"""Scale-out against a real PostgreSQL-backed MLflow server started by scripts/server.py.

The 2x2 sweep runs under the joblib launcher (2 workers, fresh cache: the adapter is trained
once while both LoRA jobs want it) and under submitit_local (separate processes), with a server
restart in between; a server that drops mid-run fails the job in one line with its generations
kept; several processes log thousands of metrics at once and every one arrives.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from qa_lab import tracking
from qa_lab.cache import ItemCache
from qa_lab.config import PROJECT_ROOT
from tests.conftest import MODELS_DIR
from tests.test_sweeps import _free_port, _sweep

pytestmark = pytest.mark.slow
SERVER = [sys.executable, str(PROJECT_ROOT / "scripts" / "server.py")]
VARIANTS = ["lora", "rag", "rag_lora", "vanilla"]
EVAL_ARTIFACTS = {"eval_items.json", "per_item.jsonl", "metrics.json", "per_topic.png"}
if shutil.which("initdb") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
    pytest.skip("PostgreSQL is not installed (.ci/run installs it)", allow_module_level=True)


def _server(command: str, state: Path, port: int) -> None:
    cmd = [*SERVER, command, "--dir", str(state), "--port", str(port)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def server():
    """A fresh PostgreSQL cluster + mlflow server on a free port; stopped and removed after."""
    # not pytest's tmp dir: when tests run as root PostgreSQL runs as `postgres`, which must be
    # able to enter the folder (pytest's base is 0700)
    state = Path(tempfile.mkdtemp(prefix="qa-lab-server-"))
    if os.geteuid() == 0:
        state.chmod(0o711)
    port = _free_port()
    _server("start", state, port)
    try:
        yield state, port, f"http://127.0.0.1:{port}"
    finally:
        _server("stop", state, port)
        shutil.rmtree(state, ignore_errors=True)


def _on_server(url: str, experiment: str) -> list[str]:
    return ["tracking=server", f"tracking.uri={url}", f"tracking.experiment={experiment}"]


def _runs(url: str, experiment: str, where: str = "") -> list:
    mlflow.set_tracking_uri(url)
    exp = mlflow.get_experiment_by_name(experiment)
    return mlflow.search_runs([exp.experiment_id], filter_string=where, output_format="list")


def _check_sweep(url: str, experiment: str) -> list:
    """One finished parent holding four evaluate children, each with metrics and artifacts."""
    parents = _runs(url, experiment, "tags.`qa_lab.stage` = 'evaluate_sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = _runs(url, experiment, f"tags.mlflow.parentRunId = '{parent}'")
    evals = [c for c in children if c.data.tags["qa_lab.stage"] == "evaluate"]
    assert sorted(c.data.tags["qa_lab.variant"] for c in evals) == VARIANTS
    client = mlflow.MlflowClient()
    for c in evals:
        assert c.info.status == "FINISHED" and "rougeL_f1_ci_low" in c.data.metrics
        assert {a.path for a in client.list_artifacts(c.info.run_id)} >= EVAL_ARTIFACTS
        rows = mlflow.artifacts.load_text(f"runs:/{c.info.run_id}/per_item.jsonl").splitlines()
        assert len(rows) == 6
    assert "## Grid" in mlflow.artifacts.load_text(f"runs:/{parent}/report/report.md")
    return children


def _sweep_on(tmp: Path, cache: Path, url: str, experiment: str, *launcher: str) -> None:
    _sweep(tmp, cache, *_on_server(url, experiment), "generation.threads=1", *launcher)


@pytest.fixture(scope="module")
def joblib_sweep(server, tmp_path_factory):
    """The 2x2 sweep, joblib with 2 workers, on a fresh cache (the adapter is built in it)."""
    _, _, url = server
    tmp = tmp_path_factory.mktemp("joblib")
    _sweep_on(
        tmp, tmp / "cache", url, "scale-joblib", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    return tmp


def test_joblib_sweep_on_server_trains_adapter_once(server, joblib_sweep):
    _, _, url = server
    children = _check_sweep(url, "scale-joblib")
    trains = [c for c in children if c.data.tags["qa_lab.stage"] == "train"]
    # both LoRA jobs asked for the adapter at once: one trained it, any other reused it
    assert [c.data.tags["qa_lab.reused"] for c in trains].count("false") == 1
    # and the dataset both parallel jobs built once is logged once
    assert [c.data.tags["qa_lab.stage"] for c in children].count("dataset") == 1
    built = next(c for c in trains if c.data.tags["qa_lab.reused"] == "false")
    assert "train/loss" in built.data.metrics
    adapter_files = {
        a.path for a in mlflow.MlflowClient().list_artifacts(built.info.run_id, "adapter")
    }
    assert "adapter/adapter_config.json" in adapter_files
    assert len([p for p in (joblib_sweep / "cache" / "adapters").iterdir() if p.is_dir()]) == 1


def _snapshot(url: str, experiment: str) -> dict[str, tuple]:
    return {
        r.info.run_id: (r.info.status, r.info.run_name, sorted(r.data.metrics.items()))
        for r in _runs(url, experiment)
    }


def test_restart_then_submitit_sweep_loses_nothing(server, joblib_sweep, tmp_path):
    state, port, url = server
    before = _snapshot(url, "scale-joblib")
    _server("stop", state, port)
    assert not tracking.server_answers(url, timeout_s=2)
    _server("start", state, port)
    _sweep_on(
        tmp_path, joblib_sweep / "cache", url, "scale-submitit", "hydra/launcher=submitit_local"
    )
    assert _snapshot(url, "scale-joblib") == before
    _check_sweep(url, "scale-joblib")  # artifacts of the first sweep still served
    children = _check_sweep(url, "scale-submitit")
    # the shared cache held the adapter: the second sweep trained nothing
    trains = [c for c in children if c.data.tags["qa_lab.stage"] == "train"]
    assert all(c.data.tags["qa_lab.reused"] == "true" for c in trains)


def _evaluate(tmp: Path, url: str) -> subprocess.Popen:
    """A single evaluation, as a user runs it, on the server."""
    cmd = [
        sys.executable,
        "evaluate.py",
        *_on_server(url, "scale-drop"),
        "tracking.retry.max_retries=2",
        "tracking.retry.backoff_factor=1",
        "tracking.retry.timeout_s=5",
        f"paths.cache={tmp / 'cache'}",
        f"paths.models={MODELS_DIR}",
        f"hydra.run.dir={tmp / 'outputs'}",
        f"dataset.source={PROJECT_ROOT / 'data' / 'seed' / 'cs_interview.jsonl'}",
        "dataset.synthesis.backend=none",
        "eval.limit=6",
        "eval.train_sample=0",
        "generation.batch_size=1",  # one answer per batch: each lands in the cache on its own
        "generation.max_new_tokens=64",
        "generation.threads=1",
        "metrics=lexical",
        "metrics.bootstrap.resamples=100",
    ]
    return subprocess.Popen(
        cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _cached_answers(cache: Path) -> int:
    store = ItemCache(cache / "answers.sqlite")
    try:
        return len(store)
    finally:
        store.close()


def test_server_drop_mid_run_fails_clearly_and_keeps_generations(server, tmp_path):
    state, port, url = server
    cache = tmp_path / "cache"
    before = _cached_answers(cache)
    proc = _evaluate(tmp_path, url)
    deadline = time.monotonic() + 600
    while _cached_answers(cache) == before:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    _server("stop", state, port)  # generation goes on; logging the results finds no server
    try:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: tracking.uri={url}: the tracking server stopped answering")
        assert "Traceback" not in err
        assert _cached_answers(cache) == before + 6
    finally:
        _server("start", state, port)
    # the rerun generates nothing: every answer comes from the local cache
    rerun = _evaluate(tmp_path, url)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    finished = _runs(url, "scale-drop", "attributes.status = 'FINISHED'")
    evals = [r for r in finished if r.data.tags["qa_lab.stage"] == "evaluate"]
    assert len(evals) == 1 and evals[0].data.metrics["answers_generated"] == 0


STEPS, KEYS_PER_PROCESS, PROCESSES = 100, 10, 4  # 4000 values in 400 requests


def _log_load(url: str, run_id: str, worker: int) -> None:
    tracking.configure(OmegaConf.create({"uri": url, "experiment": "scale-load"}))
    with tracking.resume_run(run_id):
        for step in range(STEPS):
            tracking.log_metrics(
                {f"load/p{worker}/m{k}": float(step * k) for k in range(KEYS_PER_PROCESS)},
                step=step,
            )


def test_load_parallel_processes_log_thousands_of_metrics_all_arrive(server):
    _, _, url = server
    experiment_id = tracking.configure(OmegaConf.create({"uri": url, "experiment": "scale-load"}))
    run_id = mlflow.MlflowClient().create_run(experiment_id).info.run_id
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        pool.starmap(_log_load, [(url, run_id, w) for w in range(PROCESSES)])
    arrived = sum(
        len(tracking.metric_history(run_id, f"load/p{w}/m{k}"))
        for w in range(PROCESSES)
        for k in range(KEYS_PER_PROCESS)
    )
    assert arrived == STEPS * KEYS_PER_PROCESS * PROCESSES  # 4000


def _script(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    store = [f"paths.cache={tmp / 'cache'}", f"paths.mlruns={tmp / 'mlruns'}"]
    cmd = [sys.executable, "evaluate.py", *args, *store, f"hydra.sweep.dir={tmp / 'multirun'}"]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)


def test_server_down_at_start_is_one_line_before_any_work(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    for args in (["tracking=server"], ["-m", "tracking=server", "hydra/launcher=joblib"]):
        proc = _script(tmp_path, *args, f"tracking.uri={url}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [
            f"error: tracking.uri={url}: tracking server unreachable; start it with `make server` "
            "or point MLFLOW_TRACKING_URI at a running one"
        ]
        assert not (tmp_path / "cache").exists()


def test_cluster_launcher_refuses_the_local_sqlite_store(tmp_path):
    proc = _script(tmp_path, "-m", "hydra/launcher=submitit_slurm_cluster")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: hydra/launcher=submitit_slurm_cluster runs jobs on other")
    assert "tracking=server" in proc.stderr
    assert not list(tmp_path.rglob(".submitit"))
