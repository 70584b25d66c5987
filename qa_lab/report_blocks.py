"""The report as typed blocks (headings, text, tables, folds, figures, answer cards) and markdown.

The sections build blocks once; `to_markdown` renders them as report.md and `report_html.page`
as report.html, so the two never disagree. Number formatting shared by the sections lives here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

# Marks a difference whose Holm-adjusted p is below SIGNIFICANCE (0.05, two-sided).
SIGNIFICANCE = 0.05
SIG_MARK = "✱"


@dataclass(frozen=True)
class Heading:
    """A section title (level 1 is the page title)."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A paragraph; `**bold**` and `` `code` `` are the only inline markup."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A list of short sentences (the summary's findings)."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table of formatted cells; `marked` rows (indices) are the significant ones."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    marked: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Figure:
    """A figure of the report's figure dict, by name (report/<name>.png beside report.md)."""

    name: str
    caption: str


@dataclass(frozen=True)
class Fold:
    """A collapsible group (HTML `<details>`); a `### title` subsection in markdown."""

    title: str
    blocks: tuple[Block, ...]
    open: bool = False


@dataclass(frozen=True)
class Beside:
    """Blocks shown side by side on a wide page (a figure beside its table), stacked in md."""

    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Answer:
    """One config's answer to an item, its headline score and the diagnostic flags it raised."""

    label: str
    text: str
    score: str
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class AnswerCards:
    """One item side by side: question and reference, then a card per config."""

    item_id: str
    question: str
    reference: str
    answers: tuple[Answer, ...] = field(default_factory=tuple)


Block = Union[Heading, Text, Bullets, Table, Figure, Fold, Beside, AnswerCards]  # noqa: UP007


def table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], marked: Sequence[int] = ()
) -> Table:
    """A `Table` from any cells (each turned into its text)."""
    return Table(
        tuple(str(h) for h in header),
        tuple(tuple(str(c) for c in row) for row in rows),
        frozenset(marked),
    )


def arrow(metric: str) -> str:
    """Direction of a metric for readers: up is better unless it is a failure rate."""
    from qa_lab.metrics import HIGHER_IS_BETTER

    if metric == "length_ratio":
        return "→1"
    return "↑" if HIGHER_IS_BETTER.get(metric, True) else "↓"


def fmt_ci(c: dict[str, Any], digits: int = 4) -> str:
    """`mean [low, high]` (4 decimals unless told); `mean (no CI)` where the bounds are NaN.

    NaN bounds: a replicated cell's corpus BLEU, the mean of its seeds' values with no
    per-item score to resample.
    """
    if math.isnan(c["low"]) or math.isnan(c["high"]):
        return f"{c['mean']:.{digits}f} (no CI)"
    return f"{c['mean']:.{digits}f} [{c['low']:.{digits}f}, {c['high']:.{digits}f}]"


def fmt_diff(estimate: float, low: float, high: float) -> str:
    """A signed difference with its CI: `+0.0500 [+0.0100, +0.0900]`."""
    return f"{estimate:+.4f} [{low:+.4f}, {high:+.4f}]"


def fmt_p(p: float) -> str:
    """A p-value with 4 decimals, marked when it is below `SIGNIFICANCE`."""
    return f"{p:.4f} {SIG_MARK}" if p < SIGNIFICANCE else f"{p:.4f}"


# ------------------------------------------------------------------------------------ markdown


def to_markdown(blocks: Sequence[Block]) -> str:
    """report.md: the blocks in order (folds as `###` subsections, figures as image links)."""
    return "\n".join(_md(b) for b in blocks).strip() + "\n"


def _md(block: Block) -> str:
    if isinstance(block, Heading):
        return f"\n{'#' * block.level} {block.text}\n"
    if isinstance(block, Text):
        return block.text + "\n"
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items) + "\n"
    if isinstance(block, Table):
        return _md_table(block) + "\n"
    if isinstance(block, Figure):
        return f"![{block.caption}]({block.name}.png)\n"
    if isinstance(block, Fold):
        return f"\n### {block.title}\n\n" + "\n".join(_md(b) for b in block.blocks)
    if isinstance(block, Beside):
        return "\n".join(_md(b) for b in block.blocks)
    return _md_answers(block)


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _md_answers(cards: AnswerCards) -> str:
    """An item: question, reference, then each answer verbatim in a fence (line breaks kept)."""
    parts = [
        f"\n### {cards.item_id}\n",
        f"**Q:** {cards.question}\n",
        f"**Reference:** {cards.reference}\n",
    ]
    for a in cards.answers:
        flags = f"; flags: {', '.join(a.flags)}" if a.flags else ""
        parts.append(f"**{a.label}** ({a.score}{flags})\n\n~~~~text\n{a.text}\n~~~~\n")
    return "\n".join(parts)
