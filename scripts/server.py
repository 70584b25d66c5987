"""Start/stop the team tracking server: PostgreSQL (project-local cluster) + `mlflow server`.

    python scripts/server.py start [--dir .server] [--host 127.0.0.1] [--port 5000]
    python scripts/server.py stop  [--dir .server]
    python scripts/server.py status [--dir .server]

PostgreSQL listens on a Unix socket inside its own 0700 data folder and on no TCP address, so
only this user reaches it; `mlflow server` listens on --host (127.0.0.1 by default), stores runs
in that database and serves artifacts from <dir>/artifacts (`--serve-artifacts`), so clients
need no access to the folder. Both pids are recorded; data survives stop/start. Plain stdlib
(no qa_lab import): `make server` works before anything else is configured.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PG_USER = "postgres"  # database role and, when run as root, the OS user PostgreSQL runs as
DB_NAME = "mlflow"
PG_PORT = "5432"  # names the socket file only: no TCP listener
READY_TIMEOUT_S = 180  # first start runs MLflow's schema migrations (slow on a loaded machine)


def _pg_bin(name: str) -> str:
    """A PostgreSQL binary from PATH, else from Debian's versioned folder."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        sys.exit(f"error: {name} not found: install PostgreSQL (apt-get install postgresql)")
    return found


def _as_pg(cmd: list[str], log: Path | None = None) -> None:
    """Run a PostgreSQL tool, as the `postgres` OS user when we are root (initdb refuses root)."""
    user = PG_USER if os.geteuid() == 0 else None
    proc = subprocess.run(cmd, user=user, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        hint = f" (see {log})" if log else ""
        sys.exit(f"error: {Path(cmd[0]).name} failed: {tail[0]}{hint}")


def backend_uri(state: Path) -> str:
    """SQLAlchemy URI over the cluster's socket (+psycopg2: SQLAlchemy 2.1 means psycopg 3)."""
    socket_dir = state.resolve() / "pg"
    return f"postgresql+psycopg2://{PG_USER}@/{DB_NAME}?host={socket_dir}&port={PG_PORT}"


def _start_postgres(state: Path) -> None:
    pgdata = (state / "pg").resolve()
    log = state / "postgres.log"
    pg_ctl = _pg_bin("pg_ctl")
    fresh = not (pgdata / "PG_VERSION").is_file()
    if fresh:
        pgdata.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(pgdata, PG_USER, PG_USER)
            log.touch()
            shutil.chown(log, PG_USER, PG_USER)
        # trust is safe here: the only way in is the socket in this 0700 folder
        _as_pg([_pg_bin("initdb"), "-D", str(pgdata), "-U", PG_USER, "-A", "trust", "-E", "UTF8"])
    if not (pgdata / "postmaster.pid").is_file():
        opts = f"-c listen_addresses='' -c unix_socket_directories='{pgdata}' -p {PG_PORT}"
        _as_pg([pg_ctl, "-D", str(pgdata), "-l", str(log), "-o", opts, "-w", "start"], log)
    if fresh:
        _as_pg([_pg_bin("createdb"), "-h", str(pgdata), "-p", PG_PORT, "-U", PG_USER, DB_NAME])


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


def start(state: Path, host: str, port: int) -> None:
    """Start PostgreSQL, then the MLflow server; wait until it answers /health."""
    for module in ("mlflow", "psycopg2"):  # psycopg2: SQLAlchemy's driver for the database
        if importlib.util.find_spec(module) is None:
            sys.exit(f"error: {module} is not installed: run `make install`")
    state.mkdir(parents=True, exist_ok=True)
    url = f"http://{host}:{port}"
    _start_postgres(state)
    pid_file = state / "mlflow.pid"
    if _alive(pid_file):
        print(f"mlflow server already running: {url} (pid {pid_file.read_text()})")
        return
    (state / "artifacts").mkdir(exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri(state),
        "--serve-artifacts", "--artifacts-destination", str((state / "artifacts").resolve()),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    # With a database store, mlflow server also starts a pool of job-runner processes (huey,
    # for GenAI scorer jobs qa-lab never submits): a dozen idle processes eating a small machine.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(state / "mlflow.log", "ab") as log:
        # own session: stop signals the whole group (mlflow server forks its web server)
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    (state / "url").write_text(url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(state)
            sys.exit(f"error: mlflow server did not come up on {url} (see {state / 'mlflow.log'})")
        time.sleep(1)
    print(f"tracking server: {url}  (export MLFLOW_TRACKING_URI={url}; add tracking=server)")


def stop(state: Path) -> None:
    """Stop the MLflow server (its process group) and PostgreSQL (fast shutdown)."""
    pid_file = state / "mlflow.pid"
    pid = _alive(pid_file)
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        for _ in range(60):
            if _alive(pid_file) is None:
                break
            time.sleep(0.5)
        else:
            os.killpg(pid, signal.SIGKILL)
        print(f"stopped mlflow server (pid {pid})")
    pid_file.unlink(missing_ok=True)
    pgdata = state / "pg"
    if (pgdata / "postmaster.pid").is_file():
        _as_pg([_pg_bin("pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"])
        print("stopped postgresql")


def status(state: Path) -> int:
    """Print what runs; exit 0 only when the MLflow server answers."""
    url = (state / "url").read_text() if (state / "url").is_file() else "(never started)"
    up = _healthy(url) if url.startswith("http") else False
    pg = (state / "pg" / "postmaster.pid").is_file()
    print(f"mlflow server {url}: {'up' if up else 'down'}; postgresql: {'up' if pg else 'down'}")
    return 0 if up else 1


def main() -> None:
    """Command line: start | stop | status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=Path(".server"), help="state folder")
    parser.add_argument("--host", default="127.0.0.1", help="MLflow server address")
    parser.add_argument("--port", type=int, default=5000, help="MLflow server port")
    args = parser.parse_args()
    if args.command == "start":
        start(args.dir, args.host, args.port)
    elif args.command == "stop":
        stop(args.dir)
    else:
        sys.exit(status(args.dir))


if __name__ == "__main__":
    main()
