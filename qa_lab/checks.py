"""Config value conversions that refuse a bad value in one line naming its dotted key.

A value typed on the command line (`model.learning_rate=abc`) reaches the code as a string, and
a bare `float()` deep inside a stage ends in a `ValueError` traceback after minutes of work.
Every option builder converts through these few helpers instead, so every refusal has the
shape the project's errors already use, `<key>=<value> <what is allowed>`, and
`qa_lab.validate` can run them all before any stage starts:

    model.learning_rate='abc' is not a number
    retriever.k=-1 must be >= 0
    chunking.strategy='foo' is not one of: sections, fixed   (errors.require_choice)
"""

from __future__ import annotations

import glob
import math
from pathlib import Path
from typing import Any

from qa_lab.errors import QaLabError


def _refuse(key: str, value: Any, why: str) -> QaLabError:
    return QaLabError(f"{key}={value!r} {why}")


def _bounds(key: str, raw: Any, low: float | None, high: float | None, above: bool) -> None:
    """Refuse a number outside [low, high] ((low, high] when `above`), as the user wrote it."""
    value = float(raw)
    if low is not None and (value <= low if above else value < low):
        raise _refuse(key, raw, f"must be {'>' if above else '>='} {low:g}")
    if high is not None and value > high:
        raise _refuse(key, raw, f"must be <= {high:g}")


def number(
    value: Any,
    key: str,
    *,
    low: float | None = None,
    high: float | None = None,
    above: bool = False,
) -> float:
    """`value` as a finite float in [low, high] (`above`: strictly greater than `low`).

    Numeric strings are accepted (a YAML `1e-4` without a dot reads as a string); booleans are
    not numbers here, though Python says they are.
    """
    if value is None:
        raise QaLabError(f"{key} is not set")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _refuse(key, value, "is not a number")
    try:
        out = float(value)
    except ValueError:
        raise _refuse(key, value, "is not a number") from None
    if not math.isfinite(out):
        raise _refuse(key, value, "is not a finite number")
    _bounds(key, value, low, high, above)
    return out


def whole(value: Any, key: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high]; `2.0` is accepted, `2.5` is not."""
    out = number(value, key)
    if out != int(out):
        raise _refuse(key, value, "is not a whole number")
    _bounds(key, value, low, high, above=False)
    return int(out)


def maybe_whole(value: Any, key: str, *, low: int | None = None) -> int | None:
    """`whole`, with null (None) allowed: the keys whose null means "off" or "all"."""
    return None if value is None else whole(value, key, low=low)


def flag(value: Any, key: str) -> bool:
    """`value` when it is a boolean (true/false; a string "no" would read as true)."""
    if not isinstance(value, bool):
        raise _refuse(key, value, "is not true or false")
    return value


def text(value: Any, key: str, *, optional: bool = False) -> str | None:
    """`value` when it is a string (None allowed with `optional`); numbers are not text."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _refuse(key, value, "is not a string")
    return value


def existing_path(value: Any, key: str, *, pattern: bool = False) -> str:
    """`value` when it names a file or folder that exists (`pattern`: or a glob matching one)."""
    path = str(value)
    if Path(path).exists() or (pattern and any(glob.iglob(path, recursive=True))):
        return path
    raise _refuse(key, path, "matches no file" if pattern else "does not exist")
