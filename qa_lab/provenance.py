"""What produced a run: the project checkout's commit and dirty flag, the library versions.

Stdlib only (git through subprocess), so the sweep callback and every stage tag their runs
the same way without importing mlflow.
"""

from __future__ import annotations

import subprocess

from qa_lab import __version__
from qa_lab.config import PROJECT_ROOT


def git_state() -> dict[str, str]:
    """Commit and dirty flag of the project checkout ("unknown" outside git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return {"git_sha": sha, "git_dirty": str(bool(dirty)).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git_sha": "unknown", "git_dirty": "unknown"}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour changes results."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"qa_lab": __version__}
    for package in ("torch", "transformers", "peft", "trl", "sentence-transformers", "mlflow"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "absent"
    return out
