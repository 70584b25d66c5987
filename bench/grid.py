"""The whole 2x2 study (`make run`), cold then warm, per stage, in a fresh temporary store.

    .venv/bin/python bench/grid.py                  # the study exactly as `make run` runs it
    .venv/bin/python bench/grid.py --smoke          # tiny sizes, to check the script works
    .venv/bin/python bench/grid.py -- eval.limit=8  # any extra Hydra overrides after `--`

Cold: an empty cache (dataset, index, adapter, answers) and an empty MLflow store in a temp
folder; warm: the same command again on what the cold run left. The materialised embedded
model is shared with the project (`--cold-models` materialises it afresh too, as a fresh
clone would). Per-stage times come from the MLflow runs the study writes (read straight from
its SQLite store): each run's own duration, and the time since the previous run ended, which
also holds the work done before a run opens (building the dataset before the dataset run logs
it, the FAISS index and model loading before an evaluation run); for evaluation runs also the
seconds spent generating answers and publishing item traces (the runs' `generation_wall_s`
and `trace_publish_s`).
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine  # noqa: E402

# Small enough to finish in a few minutes on a loaded 2-core machine; checks the script only.
SMOKE = [
    "eval.limit=4",
    "eval.train_sample=8",
    "generation.max_new_tokens=16",
    "dataset.synthesis.backend=none",
    "metrics=lexical",
    "metrics.bootstrap.resamples=100",
    "++model.max_train_rows=16",
    "++model.epochs=1",
]
RUNS_SQL = """
SELECT r.start_time, r.end_time, r.name,
       (SELECT value FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'qa_lab.stage'),
       (SELECT value FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = 'qa_lab.variant'),
       (SELECT value FROM latest_metrics m
        WHERE m.run_uuid = r.run_uuid AND m.key = 'generation_wall_s'),
       (SELECT value FROM latest_metrics m
        WHERE m.run_uuid = r.run_uuid AND m.key = 'trace_publish_s')
FROM runs r WHERE r.start_time >= ? ORDER BY r.end_time
"""


def study(root: Path, extra: list[str], cold_models: bool) -> list[str]:
    """The `make run` command line, with every output under `root`."""
    from qa_lab.config import PROJECT_ROOT

    shared = PROJECT_ROOT / ".cache" / "models"  # not resolved: it may be a symlink to share
    models = root / "cache" / "models" if cold_models else shared
    return [
        sys.executable,
        "evaluate.py",
        "-m",
        "+experiment=rag_vs_ft",
        f"paths.cache={root / 'cache'}",
        f"paths.models={models}",
        f"paths.mlruns={root / 'mlruns'}",
        f"hydra.sweep.dir={root / 'multirun'}",
        *extra,
    ]


def run_phase(name: str, cmd: list[str], root: Path) -> float:
    """Run the study once; print its per-stage times from the runs it wrote; return wall s."""
    from qa_lab.config import PROJECT_ROOT

    started_ms = int(time.time() * 1000)
    start = time.perf_counter()
    log = root / f"{name}.log"
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        sys.exit(f"{name} run failed (exit {done.returncode}), end of {log}:\n{tail}")
    with sqlite3.connect(root / "mlruns" / "mlflow.db") as db:
        runs = db.execute(RUNS_SQL, (started_ms,)).fetchall()
    print(f"{name}: {wall:.1f}s wall for the whole command")
    header = f"{'stage':14} {'variant':9} {'run s':>8} {'since prev s':>13}"
    print(f"  {header} {'generate s':>11} {'traces s':>9}  run name")
    previous, publish = started_ms, 0.0
    for start_ms, end_ms, run_name, stage, variant, generate_s, traces_s in runs:
        end_ms = end_ms or start_ms
        own, since = (end_ms - start_ms) / 1000, (end_ms - previous) / 1000
        line = f"{stage or '-':14} {variant or '-':9} {own:8.1f} {since:13.1f}"
        print(f"  {line} {_seconds(generate_s):>11} {_seconds(traces_s):>9}  {run_name}")
        previous, publish = max(previous, end_ms), publish + (traces_s or 0.0)
    print(f"  item traces published in {publish:.1f}s in all ({publish / wall:.1%} of the wall)")
    return wall


def _seconds(value: float | None) -> str:
    """A per-run metric for the table; '-' where the run did not log it (cached, other stage)."""
    return "-" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: " + " ".join(SMOKE))
    parser.add_argument("--cold-models", action="store_true", help="materialise SmolLM2 too")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder, print it")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    args = parser.parse_args()
    extra = (SMOKE if args.smoke else []) + args.overrides
    print(machine())
    tmp = tempfile.mkdtemp(prefix="qa-lab-grid-")
    root = Path(tmp)
    cmd = study(root, extra, args.cold_models)
    print("command:", " ".join(cmd[1:]), flush=True)
    cold = run_phase("cold", cmd, root)
    warm = run_phase("warm", cmd, root)
    print(f"warm/cold: {warm / cold:.1%} (goal < 10%); cold {cold / 60:.1f} min (goal < 30 min)")
    if args.keep:
        print(f"outputs kept in {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
