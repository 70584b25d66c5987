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
    # Where the answer is written in the knowledge corpus: {document, section?, quote?, chunk?}
    # (`dataset.columns.evidence`; synthesis from the corpus sets `chunk`). None: not named.
    evidence: dict[str, str] | None = field(default=None, hash=False)

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
    """A retrieved passage and the retriever's score: a corpus chunk or a training pair.

    A training pair (`corpus=train_qa`) fills `question` and `answer`; a chunk fills `text`,
    `document` and `heading`. `content` is what the generator could copy from either.
    """

    item_id: str
    question: str = ""
    answer: str = ""
    score: float = 0.0
    text: str = ""
    document: str = ""
    heading: str = ""

    @property
    def content(self) -> str:
        """The passage's knowledge: a pair's answer, or a chunk's text."""
        return self.text or self.answer

    def to_dict(self) -> dict[str, Any]:
        """The serialised passage of an evaluated row (a pair keeps its historical shape).

        Its `gold` flag is added by `evidence.mark` once the row's gold passages are known.
        """
        if self.text:
            out: dict[str, Any] = {
                "item_id": self.item_id,
                "document": self.document,
                "heading": self.heading,
                "text": self.text,
            }
        else:
            out = {"item_id": self.item_id, "question": self.question, "answer": self.answer}
        out["score"] = round(self.score, 4)
        return out


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


# EvalRow fields written only when set: a row from a predictions file lacks most of them.
_SERIALISED_ORDER = (
    "item_id",
    "question",
    "reference",
    "references",
    "prediction",
    "topic",
    "difficulty",
    "seed_id",
    "stop_reason",
    "prompt_tokens",
    "generated_tokens",
    "max_new_tokens",
    "seconds",
    "cached",
    "retrieved",
    "gold",
    "gold_source",
    "prompt",
    "messages",
    "nearest_train_cosine",
    "near_dup",
    "judge_reply",
    "repeat",
    "repeat_answers",
    "scores",
)
_TUPLES = (
    "references",
    "retrieved",
    "messages",
    "gold",
    "repeat_answers",
)  # lists in JSON, tuples in the frozen record


@dataclass(frozen=True, kw_only=True)
class EvalRow:
    """One evaluated item: what was asked, what came back, how, from which context, its scores.

    Built by the evaluate stage (or from a predictions file), read by metrics, tracking,
    traces and reporting. `to_dict` is the serialised form (a line of per_item.jsonl, a row of
    the eval_items table): fields in `_SERIALISED_ORDER`, unset (None) ones left out, so files
    written before this record existed read back the same. `extra` keeps a predictions file's
    other columns and `order` its column order, so a scored file writes its rows back as given.
    """

    item_id: str
    question: str
    reference: str
    prediction: str
    references: tuple[str, ...] | None = None  # all references when the item has several
    topic: str | None = None
    difficulty: str | None = None
    seed_id: str | None = None  # the bootstrap's cluster; the item's own id when it has none
    stop_reason: str | None = None  # eos | stop_string | length
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    max_new_tokens: int | None = None
    seconds: float | None = None  # the item's share of its batch's generation time
    cached: bool | None = None  # answer read from the per-item cache
    # Passage.to_dict of each retrieved passage, with its `gold` flag when the item has gold
    retrieved: tuple[dict[str, Any], ...] | None = None
    gold: tuple[str, ...] | None = None  # the corpus chunk ids that hold the answer
    gold_source: str | None = None  # evidence (named by the QA row) | inferred (most similar)
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    nearest_train_cosine: float | None = None
    near_dup: bool | None = None
    judge_reply: str | None = None
    repeat: int | None = None  # which sampled answer this is, with generation.repeats > 1
    # the item's other sampled answers, once its scores are pooled (mean over every repeat)
    repeat_answers: tuple[str, ...] | None = None
    scores: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = ()

    @classmethod
    def answered(
        cls,
        item: QAItem,
        pred: Prediction,
        passages: list[Passage],
        messages: list[dict[str, str]],
        prompt: str,
        max_new_tokens: int,
    ) -> EvalRow:
        """The row of an item answered by the evaluate stage: question, answer, how, context."""
        return cls(
            item_id=item.id,
            question=item.question,
            reference=item.answer,
            references=item.references or None,
            prediction=pred.prediction,
            topic=item.topic,
            difficulty=item.difficulty,
            seed_id=item.seed_id or item.id,
            stop_reason=pred.stop_reason,
            prompt_tokens=pred.prompt_tokens,
            generated_tokens=pred.generated_tokens,
            max_new_tokens=max_new_tokens,
            seconds=pred.seconds,
            cached=pred.extra.get("cached", False),
            retrieved=tuple(x.to_dict() for x in passages),
            prompt=prompt,
            messages=tuple(messages),
        )

    def to_dict(self) -> dict[str, Any]:
        """The serialised row (JSON types: tuples become lists)."""
        out: dict[str, Any] = {}
        for name in _SERIALISED_ORDER:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if name in _TUPLES else value
        out.update(self.extra)
        if self.order:
            first = {k: out[k] for k in self.order if k in out}
            out = {**first, **{k: v for k, v in out.items() if k not in first}}
        return out

    @classmethod
    def from_dict(cls, row: dict[str, Any], *, where: str = "row") -> EvalRow:
        """Parse a serialised row (per_item.jsonl, a predictions file); unknown keys -> extra.

        Raises a one-line `QaLabError` naming `where` when question, prediction or reference
        is missing.
        """
        from qa_lab.errors import QaLabError

        for name in ("question", "prediction", "reference"):
            if row.get(name) is None:
                raise QaLabError(
                    f"{where}: missing {name!r} (rows need question, prediction, reference)"
                )
        known = {k: row[k] for k in _SERIALISED_ORDER if k in row}
        for name in _TUPLES:
            if known.get(name) is not None:
                known[name] = tuple(known[name])
        extra = {k: v for k, v in row.items() if k not in known}
        return cls(**{"item_id": "", **known}, extra=extra, order=tuple(row))
