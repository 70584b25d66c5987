"""Strict JSONL reading (errors name file:line) and atomic writes.

Everything the pipeline writes goes through a temp sibling and `os.replace`, so a killed run
never leaves a half-written file where a later run would trust it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qa_lab.errors import QaLabError


def read_jsonl(path: str | Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read a JSONL file of objects; blank lines are skipped, anything else malformed is fatal."""
    path = Path(path)
    if not path.is_file():
        raise QaLabError(f"{path}: file not found")
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode(encoding)
            except UnicodeDecodeError as err:
                raise QaLabError(
                    f"{path}:{lineno}: not valid {encoding} (byte {err.start} of the line); "
                    "set dataset.encoding= to the file's encoding"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise QaLabError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise QaLabError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to `path` through a temp sibling so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (UTF-8, non-ASCII kept as is)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write_text(path, text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write one JSON document atomically, indented for people."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
