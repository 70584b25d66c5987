"""Content hashing, stage folders with manifests, file locks and the per-item answer cache.

A stage's key is a hash of exactly the config that changes its output plus its upstream keys
and a version integer. Same key, same bytes: reuse. A stage folder counts as finished only when
its `manifest.json` exists, and it is built in a temp sibling then renamed into place, so
neither a killed run nor a parallel twin can leave something half-written that looks done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

MANIFEST = "manifest.json"


def _drop_nulls(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _drop_nulls(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_drop_nulls(v) for v in obj]
    return obj


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys, `null`s dropped and no whitespace: the thing that gets hashed."""
    return json.dumps(_drop_nulls(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def stable_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of `obj`, shortened to `length` hex characters."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    """Full sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(folder: str | Path) -> str:
    """Hash of a folder's files (e.g. a saved HF dataset) by relative path and content."""
    folder = Path(folder)
    return stable_hash(
        {
            str(p.relative_to(folder)): file_sha256(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
    )


def stage_key(
    config: Mapping[str, Any],
    *,
    version: int,
    exclude: Iterable[str] = (),
    upstream: Mapping[str, str] | None = None,
) -> str:
    """Key of a stage: its config minus keys that provably do not change outputs, plus inputs.

    `exclude` names top-level keys of `config` (e.g. batch sizes, devices, progress bars).
    """
    excluded = set(exclude)
    semantic = {k: v for k, v in config.items() if k not in excluded}
    return stable_hash({"config": semantic, "upstream": dict(upstream or {}), "version": version})


def is_finished(folder: Path) -> bool:
    """A stage folder exists for callers only once its manifest has been written."""
    return (folder / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load a finished stage folder's manifest."""
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def lock(path: Path, purpose: str) -> FileLock:
    """A lock file beside `path`, for check-then-act steps that parallel jobs share."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{path}.{purpose}.lock")


def build_once(folder: Path, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """Build a stage folder once, even when parallel jobs ask for it at the same time.

    `build(tmp)` writes the outputs into an empty temp folder and returns the manifest body;
    file hashes are added here, the manifest is written last and the folder renamed into
    place. Returns the folder and whether this call built it (False: it was reused).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    if is_finished(folder):
        return folder, False
    with FileLock(str(folder) + ".lock"):
        if is_finished(folder):  # a parallel job finished it while we waited
            return folder, False
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            manifest = dict(build(tmp))
            manifest["files"] = {
                str(p.relative_to(tmp)): file_sha256(p)
                for p in sorted(tmp.rglob("*"))
                if p.is_file()
            }
            with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=2, sort_keys=True, default=str)
            if folder.exists():  # an unfinished leftover from a killed run
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder, True


class ItemCache:
    """A per-item key/value store (SQLite), committed per batch, safe across processes.

    Generation writes each finished batch here, so an interrupted run resumes where it stopped
    and a rerun of the same config generates nothing.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, value TEXT)")
        self._conn.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Return the cached values for those keys that are present."""
        keys = list(keys)
        found: dict[str, Any] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT key, value FROM items WHERE key IN ({marks})", chunk
            ).fetchall()
            found.update({k: json.loads(v) for k, v in rows})
        return found

    def put_many(self, values: Mapping[str, Any]) -> None:
        """Store values and commit at once (one transaction per batch)."""
        self._conn.executemany(
            "INSERT OR REPLACE INTO items (key, value) VALUES (?, ?)",
            [(k, json.dumps(v, ensure_ascii=False)) for k, v in values.items()],
        )
        self._conn.commit()

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()
