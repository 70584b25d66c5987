"""Start/stop a single-node SLURM cluster in a project-local folder, for tests and for trying it.

    python scripts/slurm.py start  [--dir .slurm] [--port 6817]
    python scripts/slurm.py stop   [--dir .slurm]
    python scripts/slurm.py status [--dir .slurm]

munged (with a key generated here), slurmctld and slurmd run on this machine in the foreground of
their own sessions; slurm.conf is written from what `slurmd -C` reports (cores, memory), with one
partition and `select/cons_tres`. Config, munge key and socket, state, spool, logs and the three
daemons' pids all live in --dir; stop ends exactly those pids. Jobs run as root (slurmd starts
each job as its submitter, which needs root), so this is for a machine or container of your own.

There is no accounting database (slurmdbd + MySQL) here, and submitit reads job states with
`sacct`: <dir>/bin/sacct answers submitit's one query (`-o JobID,State,NodeList --parsable2 -j`)
from squeue, which keeps finished jobs for MinJobAge. Put <dir>/bin first on PATH and point
SLURM_CONF at <dir>/slurm.conf (`source <dir>/env` does both). Plain stdlib (no qa_lab import).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")  # started in this order, stopped in reverse
READY_TIMEOUT_S = 60  # slurmctld + slurmd register within ~3 s here; generous for a loaded box
PARTITION = "local"
MIN_JOB_AGE_S = 3600  # finished jobs stay visible to squeue (and so to bin/sacct) this long
# seconds between SIGTERM and SIGKILL for a cancelled or timed-out job (SLURM's default: 30)
KILL_WAIT_S = 5


def _need(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        sys.exit(f"error: {name} not found: install SLURM (apt-get install slurm-wlm munge)")
    return found


def _node_line() -> str:
    """`slurmd -C`'s NodeName line (cores, sockets, memory), without the uptime."""
    out = subprocess.run([_need("slurmd"), "-C"], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("NodeName="))
    return f"{line} NodeAddr=127.0.0.1 State=UNKNOWN"


def _slurm_conf(state: Path, port: int) -> str:
    node = _node_line()
    name = node.split()[0].removeprefix("NodeName=")
    s = state.resolve()
    return f"""# Written by scripts/slurm.py start: a single-node cluster in {s}.
ClusterName=qalab
SlurmctldHost={name}(127.0.0.1)
SlurmctldPort={port}
SlurmdPort={port + 1}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={s}/run/munge.socket
CredType=cred/munge
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/run/slurmctld.daemon.pid
SlurmdPidFile={s}/run/slurmd.daemon.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
# no cgroups in a container: track job processes by parent pid, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait={KILL_WAIT_S}
MinJobAge={MIN_JOB_AGE_S}
# MB per allocated core when a job asks for no memory (else one job takes the whole node)
DefMemPerCPU=1024
{node}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


SACCT = """#!/bin/sh
# Written by scripts/slurm.py: this cluster has no accounting database (slurmdbd), so sacct
# is answered from squeue, which keeps finished jobs for MinJobAge seconds. Only the query
# submitit makes is understood: sacct -o JobID,State,NodeList --parsable2 -j IDS
ids=""
while [ $# -gt 0 ]; do
  case "$1" in -j) ids="$2"; shift ;; esac
  shift
done
echo "JobID|State|NodeList"
[ -n "$ids" ] && squeue --states=all --noheader --format='%i|%T|%N' --jobs="$ids" 2>/dev/null
exit 0
"""


def _prepare(state: Path, port: int) -> None:
    """Folders (munge wants its key dir private and its socket dir world-searchable), key, conf."""
    state.chmod(state.stat().st_mode | 0o111)  # munged: every folder above its socket searchable
    for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o700), ("spool", 0o755)):
        (state / sub).mkdir(parents=True, exist_ok=True)
        (state / sub).chmod(mode)
    for sub in ("log", "bin"):
        (state / sub).mkdir(exist_ok=True)
    key = state / "munge" / "munge.key"
    if not key.is_file():
        subprocess.run([_need("mungekey"), "--create", f"--keyfile={key}"], check=True)
    (state / "slurm.conf").write_text(_slurm_conf(state, port))
    sacct = state / "bin" / "sacct"
    sacct.write_text(SACCT)
    sacct.chmod(0o755)
    s = state.resolve()
    (state / "env").write_text(
        f"export SLURM_CONF={s}/slurm.conf\nexport PATH={s}/bin:$PATH\n"  # `source .slurm/env`
    )


def environment(state: Path) -> dict[str, str]:
    """The environment SLURM's commands need to reach this cluster (and the sacct stand-in)."""
    s = state.resolve()
    path = f"{s}/bin{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "SLURM_CONF": f"{s}/slurm.conf", "PATH": path}


def _command(name: str, state: Path) -> list[str]:
    s = state.resolve()
    if name == "munged":
        return [
            _need("munged"), "--foreground", f"--key-file={s}/munge/munge.key",
            f"--socket={s}/run/munge.socket", f"--pid-file={s}/run/munged.daemon.pid",
            f"--log-file={s}/log/munged.log", f"--seed-file={s}/munge/munged.seed",
        ]  # fmt: skip
    return [_need(name), "-D", "-f", f"{s}/slurm.conf"]


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _launch(name: str, state: Path) -> None:
    pid_file = state / "run" / f"{name}.pid"
    if _alive(pid_file):
        return
    with open(state / "log" / f"{name}.out", "ab") as log:
        proc = subprocess.Popen(
            _command(name, state), stdout=log, stderr=log, start_new_session=True
        )
    pid_file.write_text(str(proc.pid))
    if name == "munged":
        _wait(lambda: (state / "run" / "munge.socket").exists(), state, name)


def _wait(ready: Callable[[], bool], state: Path, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        if time.monotonic() > deadline:
            stop(state)
            out = state / "log" / f"{what}.out"
            tail = (out.read_text().strip().splitlines() or ["?"])[-1] if out.is_file() else "?"
            sys.exit(f"error: {what} did not come up: {tail} (see {out})")
        time.sleep(0.3)


def _node_idle(state: Path) -> bool:
    out = subprocess.run(
        ["sinfo", "--noheader", "--format=%T"], env=environment(state), capture_output=True
    )
    return out.returncode == 0 and out.stdout.decode().strip() in ("idle", "mixed", "allocated")


def start(state: Path, port: int) -> None:
    """Start munged, slurmctld and slurmd; wait until the node takes jobs."""
    if os.geteuid() != 0:
        sys.exit("error: the local SLURM needs root (slurmd starts each job as its submitter)")
    for name in (*DAEMONS, "mungekey", "sinfo", "squeue"):
        _need(name)
    state.mkdir(parents=True, exist_ok=True)
    if not all(_alive(state / "run" / f"{n}.pid") for n in DAEMONS):
        _prepare(state, port)
        for name in DAEMONS:
            _launch(name, state)
    _wait(lambda: _node_idle(state), state, "slurmd")
    print(f"SLURM cluster up: partition {PARTITION}; source {state}/env  (SLURM_CONF and PATH)")


def _cancel_jobs(state: Path) -> None:
    """Cancel this cluster's jobs first: their processes belong to slurmd's steps, not to us."""
    env = environment(state)
    subprocess.run(["scancel", "--full", "--state=RUNNING"], env=env, capture_output=True)
    subprocess.run(["scancel", "--state=PENDING"], env=env, capture_output=True)
    for _ in range(4 * KILL_WAIT_S + 20):
        out = subprocess.run(
            ["squeue", "--noheader", "--states=RUNNING,COMPLETING"], env=env, capture_output=True
        )
        if out.returncode != 0 or not out.stdout.strip():
            return
        time.sleep(0.5)


def stop(state: Path) -> None:
    """Cancel running jobs, then end the daemons whose pids this folder records (last first)."""
    pids = {n: _alive(state / "run" / f"{n}.pid") for n in DAEMONS}
    if pids["slurmctld"] and pids["slurmd"]:
        _cancel_jobs(state)
    for name in reversed(DAEMONS):
        pid = pids[name]
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            for _ in range(40):
                if _alive(state / "run" / f"{name}.pid") is None:
                    break
                time.sleep(0.25)
            else:
                os.kill(pid, signal.SIGKILL)
            print(f"stopped {name} (pid {pid})")
        (state / "run" / f"{name}.pid").unlink(missing_ok=True)


def status(state: Path) -> int:
    """Print which daemons run; exit 0 only when the node takes jobs."""
    up = {n: _alive(state / "run" / f"{n}.pid") is not None for n in DAEMONS}
    ok = all(up.values()) and _node_idle(state)
    states = ", ".join(f"{n}: {'up' if u else 'down'}" for n, u in up.items())
    print(f"{states} (node {socket.gethostname()})")
    if ok:
        print(f"source {shlex.quote(str(state / 'env'))}")
    return 0 if ok else 1


def main() -> None:
    """Command line: start | stop | status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=Path(".slurm"), help="state folder")
    parser.add_argument(
        "--port", type=int, default=6817, help="slurmctld port (slurmd takes the next one)"
    )
    args = parser.parse_args()
    if args.command == "start":
        start(args.dir, args.port)
    elif args.command == "stop":
        stop(args.dir)
    else:
        sys.exit(status(args.dir))


if __name__ == "__main__":
    main()
