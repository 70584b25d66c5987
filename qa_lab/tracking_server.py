"""Reaching a tracking server: one quick health check before any work, bounded retries.

Stdlib only (no mlflow import), so scripts and the sweep callback can check a server before
any work; `tracking` re-exports these. A sweep job that finds the server down (a restart while
jobs run) waits for it as long as MLflow's own retries would; a script started by hand fails
at once, naming the URI.
"""

from __future__ import annotations

import os
from typing import Any

from qa_lab.errors import QaLabError

# tracking.retry keys -> the MLflow client's environment variables (read per request)
RETRY_ENV = {
    "max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}


def is_server(tracking_cfg: Any) -> bool:
    """Whether the store is a tracking server (http/https), not a local file."""
    return str(tracking_cfg.uri).startswith(("http://", "https://"))


def check_server(tracking_cfg: Any) -> None:
    """Fail fast, naming the URI, when a tracking server does not answer; set its retries.

    Stdlib only (no mlflow import), so scripts can call it before any work. The retry
    settings go to MLflow's own HTTP client through its environment variables: each request
    is retried with exponential backoff for a bounded time (`tracking.retry`), which rides
    out a server restart, then fails.
    """
    if not is_server(tracking_cfg):
        return
    for name, value in (tracking_cfg.get("retry") or {}).items():
        if name not in RETRY_ENV or not isinstance(value, int) or value < 0:
            raise QaLabError(
                f"tracking.retry.{name}={value!r}: expected a whole number >= 0 for one of "
                f"{', '.join(RETRY_ENV)}"
            )
        os.environ[RETRY_ENV[name]] = str(value)
    uri = str(tracking_cfg.uri)
    if not server_answers(uri) and not _comes_back(uri, tracking_cfg.get("retry") or {}):
        raise QaLabError(
            f"tracking.uri={uri}: tracking server unreachable; start it with `make server` "
            "or point MLFLOW_TRACKING_URI at a running one"
        )


def _comes_back(uri: str, retry: Any) -> bool:
    """In a sweep job, wait for a restarting server as long as MLflow's own retries would.

    The sweep found the server up when it started, so a job that finds it down (a restart
    while jobs run) waits 2, 4, 8, ... s (tracking.retry; capped at 120 s, about 4 minutes by
    default) instead of failing; a script started by hand still fails at once.
    """
    import time

    from qa_lab.tracking import current_parent_run_id

    if current_parent_run_id() is None:
        return False
    factor, retries = int(retry.get("backoff_factor", 2)), int(retry.get("max_retries", 7))
    for attempt in range(retries):
        time.sleep(min(120, factor * 2**attempt))
        if server_answers(uri):
            return True
    return False


def server_answers(uri: str, timeout_s: float = 5.0) -> bool:
    """One GET of the server's /health endpoint."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            return resp.status == 200
    except OSError:
        return False
