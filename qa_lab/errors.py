"""One-line, user-facing errors and the boundary that prints them.

Library exceptions are caught where the user's input met them (a file, a model spec, a config
key) and re-raised as `QaLabError` with that context, so scripts can print one line and exit 2
instead of a traceback from deep inside a dependency.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USER_ERROR = 2


class QaLabError(Exception):
    """An error caused by the user's input or environment, explained in one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def cli_errors(fn: F) -> F:
    """Turn a `QaLabError` escaping `fn` into `error: <line>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QaLabError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


def require_choice(key: str, value: Any, choices: list[str] | tuple[str, ...]) -> str:
    """Validate a config value against its allowed options, naming the key when it is wrong."""
    if value not in choices:
        raise QaLabError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
    return str(value)
