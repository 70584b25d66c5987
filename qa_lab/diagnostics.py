"""Diagnostics per answer: empty, truncated, runaway (an invented new turn), unfinished, abstained.

Each is a 0/1 flag per item (NaN where it cannot be known), so its mean is a rate with a CI.
"""

from __future__ import annotations

import math
import re

# A new turn the model invented after (or instead of) its answer, matched at the start of any
# line. Fine-tuned models trained on "Question:/Answer:" text keep going with
# "\n\nQuestion:\n..." until the token limit; chat models emit their role markers.
RUNAWAY_PATTERNS: tuple[str, ...] = (
    r"^[ \t]*(?:\*\*)?Question[ \t]*:",
    r"^[ \t]*(?:\*\*)?Q[ \t]*:",
    r"^[ \t]*#{1,6}[ \t]*Question\b",
    r"^[ \t]*(?:\*\*)?User[ \t]*:",
    r"^[ \t]*<\|im_start\|>",
    r"^[ \t]*\[INST\]",
)
# "Answer:" only counts after the first line: an answer that opens with "Answer:" merely echoes
# the prompt's cue, one that has it on a later line has started a second exchange.
RUNAWAY_AFTER_FIRST_LINE: tuple[str, ...] = (r"^[ \t]*(?:\*\*)?Answer[ \t]*:",)
_RUNAWAY_RE = re.compile("|".join(RUNAWAY_PATTERNS), re.MULTILINE)
_RUNAWAY_LATER_RE = re.compile("|".join(RUNAWAY_AFTER_FIRST_LINE), re.MULTILINE)

# Abstentions: "I don't know", "cannot answer", "not sure", "no information" (any case, straight
# or curly apostrophe).
IDK_PATTERN = (
    r"\b(?:don['\u2019]?t\s+know|do\s+not\s+know|can(?:not|['\u2019]t|\s+not)\s+answer"
    r"|not\s+sure|no\s+information)\b"
)
_IDK_RE = re.compile(IDK_PATTERN, re.IGNORECASE)

# Last characters of a finished answer: sentence punctuation, closing brackets and quotes,
# a code fence's backtick, bold markdown, a colon before a list.
SENTENCE_END = ".!?)]}\"'`*:;"


def is_empty(prediction: str) -> float:
    """1.0 when the answer is blank after stripping whitespace."""
    return float(not prediction.strip())


def is_truncated(
    stop_reason: str | None = None,
    generated_tokens: int | None = None,
    max_new_tokens: int | None = None,
) -> float:
    """1.0 when generation hit the token limit; NaN when nothing says how it stopped.

    The recorded `stop_reason` wins; without it, reaching `max_new_tokens` counts as cut off.
    NaN (not 0) for unknown keeps imported prediction files from reporting a 0% rate.
    """
    if stop_reason is not None and stop_reason != "":
        return float(stop_reason == "length")
    if generated_tokens is not None and max_new_tokens is not None:
        return float(int(generated_tokens) >= int(max_new_tokens))
    return math.nan


def is_runaway(prediction: str) -> float:
    """1.0 when the answer goes on to invent a new turn (see `RUNAWAY_PATTERNS`)."""
    if _RUNAWAY_RE.search(prediction):
        return 1.0
    _, newline, rest = prediction.lstrip().partition("\n")
    return float(bool(newline) and _RUNAWAY_LATER_RE.search(rest) is not None)


def length_ratio(prediction: str, reference: str) -> float:
    """Whitespace words in the prediction per word in the reference (reference floored at 1)."""
    return len(prediction.split()) / max(len(reference.split()), 1)


def is_unfinished(prediction: str) -> float:
    """1.0 when a non-empty answer stops mid-sentence (no closing punctuation).

    Files scored without token counts cannot say whether generation hit its limit; an answer
    cut mid-sentence is the visible trace of that, so this stands in for the truncation rate.
    """
    text = prediction.rstrip()
    return float(bool(text) and text[-1] not in SENTENCE_END)


def is_idk(prediction: str) -> float:
    """1.0 when the answer abstains ("I don't know", "cannot answer", ...; `IDK_PATTERN`)."""
    return float(_IDK_RE.search(prediction) is not None)


def throughput(n_answers: int, generated_tokens: int, seconds: float) -> dict[str, float]:
    """Answers and generated tokens per second of wall time (NaN when no time was measured)."""
    if seconds <= 0:
        return {"answers_per_s": math.nan, "tokens_per_s": math.nan}
    return {"answers_per_s": n_answers / seconds, "tokens_per_s": generated_tokens / seconds}
