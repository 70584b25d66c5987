"""Plain records passed between stages; per-item outputs keyed by item id are the product."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class QAItem:
    """One question/answer pair with its lineage (which seed it came from, who wrote it)."""

    id: str
    question: str
    answer: str
    topic: str = ""
    difficulty: str = ""
    seed_id: str | None = None
    source: str = "seed"
    generator: str | None = None
    # All reference answers when the file gives several (`answer` is the first); None: one.
    references: tuple[str, ...] | None = None
    topic_source: str | None = None  # mapped (a file column) | inferred (clustered questions)

    def to_dict(self) -> dict[str, Any]:
        """Serialise with `None` fields dropped, so files stay minimal and hashes stable."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> QAItem:
        """Build from a dict that carries at least id, question and answer."""
        known = {k: row[k] for k in cls.__dataclass_fields__ if k in row}
        if known.get("references") is not None:
            known["references"] = tuple(known["references"])  # JSON gives a list
        return cls(**known)


@dataclass(frozen=True)
class Passage:
    """A retrieved training pair and how similar its document is to the query."""

    item_id: str
    question: str
    answer: str
    score: float


@dataclass(frozen=True)
class Prediction:
    """A generated answer: exactly the new tokens, with why generation stopped."""

    item_id: str
    prediction: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    stop_reason: str = "eos"  # eos | stop_string | length
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
