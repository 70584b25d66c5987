"""The report's side-by-side answers: fixed items, each config's answer as a card.

The same items for every config (seeded by id), so a reader compares answers, not questions.
Each card keeps the answer verbatim (its line breaks, any prompt markup it echoed, as text)
with its per-item headline score and the diagnostic flags it raised.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from qa_lab.diagnostics import raised_flags
from qa_lab.report_blocks import Answer, AnswerCards, Block, Heading, Text

SIDE_BY_SIDE = 6  # items shown
SIDE_BY_SIDE_SEED = 0
# Longest answer shown, in characters: the default 96 new tokens make ~500 characters; a
# served model with a larger limit is cut here, with the cut said.
MAX_ANSWER_CHARS = 2000


def sample_ids(item_ids: Sequence[str], count: int, seed: int) -> list[str]:
    """The same qualitative samples for every run on one eval set (chosen by id, seeded)."""
    ordered = sorted(item_ids)
    return sorted(random.Random(seed).sample(ordered, min(count, len(ordered))))


def _shown(text: str) -> str:
    if len(text) <= MAX_ANSWER_CHARS:
        return text
    return text[:MAX_ANSWER_CHARS] + f"\n[… {len(text) - MAX_ANSWER_CHARS} more characters]"


def _score(scores: dict[str, float] | None, metric: str | None) -> str:
    value = (scores or {}).get(metric or "")
    return f"{metric} {value:.3f}" if value is not None else "unscored"


def side_by_side_section(runs: list[dict[str, Any]], headline: str | None) -> list[Block]:
    """`SIDE_BY_SIDE` fixed items: question and reference, then every config's answer card."""
    by_id = [{it.item_id: it for it in r["items"]} for r in runs]
    blocks: list[Block] = [
        Heading("Side by side"),
        Text(
            f"{SIDE_BY_SIDE} items fixed by id (seeded), every config's answer verbatim, with "
            f"its {headline or 'headline'} score and the diagnostic flags it raised."
        ),
    ]
    for item_id in sample_ids(list(by_id[0]), SIDE_BY_SIDE, SIDE_BY_SIDE_SEED):
        first = by_id[0][item_id]
        answers = []
        for r, items in zip(runs, by_id):
            it = items.get(item_id)
            if it is None:
                continue
            answers.append(
                Answer(
                    label=r["label"],
                    text=_shown(it.prediction),
                    score=_score(it.scores, headline),
                    flags=tuple(raised_flags(it.scores)),
                )
            )
        blocks.append(AnswerCards(item_id, first.question, first.reference, tuple(answers)))
    return blocks
