"""Diagnostics per answer: empty, truncated, runaway, unfinished, abstained, looping, echoed markup.

Runaway is an invented new turn, looping a phrase repeated to the token limit (`repetition`),
echoed markup the prompt's passage tags copied into the answer (`markup_echo`).

Each is a 0/1 flag per item (NaN where it cannot be known), so its mean is a rate with a CI.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from qa_lab.prompts import PASSAGE_OPEN

# The per-item 0/1 flags, in the order the report and the item traces list an answer's flags.
FLAGS = ("empty", "truncated", "runaway", "unfinished", "idk", "repetition", "markup_echo")


def raised_flags(scores: dict[str, float] | None) -> list[str]:
    """The flags an item's scores raise (value 1.0), in `FLAGS` order."""
    return [f for f in FLAGS if (scores or {}).get(f) == 1.0]


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


# An answer loops when one word 4-gram (lowercased) occurs at least REPEAT_MIN_COUNT times and
# at least REPEAT_SHARE of its 4-grams repeat an earlier one. A loop of period p words repeated
# r times repeats every 4-gram r times, and all but the first p of them: the rule flags a loop
# that fills the last third of an answer. Both conditions are needed: on the original study's
# 4 x 272 answers (shared/reference, no loop among them) the highest repeated share is 0.31 (a
# restated sentence, each 4-gram twice) and the highest with a 4-gram thrice 0.26 (a
# comparison: "optimistic locking assumes ... pessimistic locking assumes ..."); none is
# flagged. The default study's vanilla run (SmolLM2-135M, 2026-12-01) has 8 of 56 flagged, all
# loops or sentences restated 3+ times (tests/fixtures/vanilla_loops.jsonl). Answers under
# REPEAT_MIN_WORDS words are too short to loop and are never flagged.
REPEAT_N = 4
REPEAT_SHARE = 0.3
REPEAT_MIN_COUNT = 3
REPEAT_MIN_WORDS = 12
_WORD_RE = re.compile(r"\w+")


def _ngrams(prediction: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD_RE.findall(prediction.lower())
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def repeated_share(prediction: str, n: int = REPEAT_N) -> float:
    """Share of the answer's word n-grams (lowercased) that already occurred earlier in it."""
    grams = _ngrams(prediction, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def is_repetition(prediction: str) -> float:
    """1.0 when the answer loops (the rule above `REPEAT_N`: a 4-gram thrice, 30% repeated).

    Why: a degenerate answer ("a collection of unordered collections of unordered collections
    of ...") repeats one phrase to the token limit; `runaway_rate` does not see it (no new
    turn), and a low ROUGE-L does not say why. Repeated n-grams measure the looping itself,
    cheaply, with no reference or model; the count condition keeps an answer that restates
    one sentence (each 4-gram twice) from counting as a loop.
    """
    grams = _ngrams(prediction, REPEAT_N)
    if len(grams) + REPEAT_N - 1 < REPEAT_MIN_WORDS:
        return 0.0
    most = max(Counter(grams).values())
    return float(most >= REPEAT_MIN_COUNT and repeated_share(prediction) >= REPEAT_SHARE)


# The prompt's own markup echoed in an answer: a passage tag, opening or closing, complete or
# cut off (`</passage 6>`, `<passage 7`), or a line that starts a "Q:"/"A:" turn the way a
# training pair is shown in the context (prompts.format_context).
_PASSAGE_TAG = re.escape(PASSAGE_OPEN.split("{", 1)[0].strip().lstrip("<"))
_MARKUP_RE = re.compile(
    rf"(?i:</?[ \t]*{_PASSAGE_TAG}\b)|^[ \t]*(?:\*\*)?[QA][ \t]*:", re.MULTILINE
)


def is_markup_echo(prediction: str) -> float:
    """1.0 when the answer repeats the prompt's passage markup or Q:/A: turns (see `_MARKUP_RE`)."""
    return float(_MARKUP_RE.search(prediction) is not None)


def throughput(n_answers: int, generated_tokens: int, seconds: float) -> dict[str, float]:
    """Answers and generated tokens per second of wall time (NaN when no time was measured)."""
    if seconds <= 0:
        return {"answers_per_s": math.nan, "tokens_per_s": math.nan}
    return {"answers_per_s": n_answers / seconds, "tokens_per_s": generated_tokens / seconds}
