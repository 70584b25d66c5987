"""Synthetic expansion of seed QA pairs by an LLM, with validation and counted rejects.

Two modes: `paraphrase` (a new wording of the seed question that keeps the seed's reference
answer) and `qa` (a new related question with an answer written by the generator, as the
original study did). Every candidate is validated, and each reject is counted by its reason so
a weak generator shows up in the manifest instead of silently polluting the dataset.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qa_lab.errors import QaLabError
from qa_lab.records import QAItem

MODES = ("paraphrase", "qa")
SYSTEM = "You rewrite computer-science interview questions. Reply with the requested text only."
# Small instruct models answer a question put to them instead of rewording it; one worked
# example turn is what makes SmolLM2-135M produce a question.
PARAPHRASE_EXAMPLE = (
    "What is the difference between a process and a thread?",
    "How does a process differ from a thread?",
)
PARAPHRASE_INSTRUCTION = "Reword this interview question, keeping its meaning: {question}"
QA_INSTRUCTION = (
    "Here is an interview question about {topic} and its answer.\n\nQuestion: {question}\n"
    "Answer: {answer}\n\nWrite one new, different interview question on the same subject and "
    "its answer in one to three sentences, in exactly this format:\nQuestion: ...\nAnswer: ..."
)
QUESTION_START = re.compile(
    r"^(what|how|why|when|where|which|who|whom|whose|is|are|can|could|does|do|did|should|"
    r"would|will|explain|describe|define|compare|contrast|name|list|give|discuss|outline|"
    r"differentiate|distinguish|implement|design|write|state|in what|under what)\b",
    re.IGNORECASE,
)
LEADING_LABEL = re.compile(r"^\s*(rewritten question|new question|question|q)\s*[:.\-]\s*", re.I)


@dataclass(frozen=True)
class Candidate:
    """A parsed generator output for one seed (answer is None in paraphrase mode)."""

    seed: QAItem
    question: str
    answer: str | None


def messages_for(seed: QAItem, mode: str) -> list[dict[str, str]]:
    """The chat prompt asking the generator for one candidate."""
    if mode == "paraphrase":
        example_q, example_a = PARAPHRASE_EXAMPLE
        return [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": PARAPHRASE_INSTRUCTION.format(question=example_q)},
            {"role": "assistant", "content": example_a},
            {"role": "user", "content": PARAPHRASE_INSTRUCTION.format(question=seed.question)},
        ]
    else:
        topic = seed.topic.replace("_", " ") or "computer science"
        user = QA_INSTRUCTION.format(topic=topic, question=seed.question, answer=seed.answer)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse(seed: QAItem, text: str, mode: str) -> Candidate:
    """Pull the question (and answer) out of a generator reply; tolerant of labels and quotes."""
    if mode == "qa":
        match = re.search(r"question\s*:\s*(.+?)\s*answer\s*:\s*(.+)", text, re.I | re.S)
        if not match:
            return Candidate(seed, "", None)
        question, answer = match.group(1), " ".join(match.group(2).split())
        return Candidate(seed, _clean_question(question), answer)
    first = next((line for line in text.strip().splitlines() if line.strip()), "")
    return Candidate(seed, _clean_question(first), None)


def _clean_question(text: str) -> str:
    text = LEADING_LABEL.sub("", " ".join(text.split()))
    return text.strip().strip('"').strip("'").strip()


def reads_as_question(text: str) -> bool:
    """A question mark at the end, or an interrogative/imperative opening."""
    return text.endswith("?") or bool(QUESTION_START.match(text))


def validate(
    candidates: Sequence[Candidate],
    question_vecs: np.ndarray,
    seed_vecs: np.ndarray,
    *,
    min_chars: int,
    max_chars: int,
    min_topic_similarity: float,
    max_seed_similarity: float,
) -> tuple[list[int], Counter[str]]:
    """Indices of the candidates that pass, and reject counts by reason (first failing check).

    `question_vecs[i]` and `seed_vecs[i]` are unit embeddings of candidate i and of its seed.
    """
    kept: list[int] = []
    rejects: Counter[str] = Counter()
    sims = np.einsum("ij,ij->i", question_vecs, seed_vecs) if len(candidates) else []
    for i, cand in enumerate(candidates):
        q = cand.question
        if not q:
            reason = "empty"
        elif not min_chars <= len(q) <= max_chars:
            reason = "length"
        elif not reads_as_question(q):
            reason = "not_a_question"
        elif q.casefold().rstrip("?. ") == cand.seed.question.casefold().rstrip("?. ") or (
            sims[i] > max_seed_similarity
        ):
            reason = "copy_of_seed"
        elif sims[i] < min_topic_similarity:
            reason = "off_topic"
        elif cand.answer is not None and not 20 <= len(cand.answer) <= 4 * max_chars:
            reason = "bad_answer"
        else:
            kept.append(i)
            continue
        rejects[reason] += 1
    return kept, rejects


def to_items(candidates: Sequence[Candidate], kept: Sequence[int], generator: str) -> list[QAItem]:
    """Turn validated candidates into dataset rows with their lineage."""
    counters: Counter[str] = Counter()
    items = []
    for i in kept:
        cand = candidates[i]
        counters[cand.seed.id] += 1
        items.append(
            QAItem(
                id=f"{cand.seed.id}-syn{counters[cand.seed.id]}",
                question=cand.question,
                answer=cand.answer if cand.answer is not None else cand.seed.answer,
                topic=cand.seed.topic,
                difficulty=cand.seed.difficulty,
                seed_id=cand.seed.seed_id or cand.seed.id,
                source="synthetic",
                generator=generator,
            )
        )
    return items


def check_mode(mode: str) -> str:
    """Validate `dataset.synthesis.mode`."""
    if mode not in MODES:
        raise QaLabError(f"dataset.synthesis.mode={mode!r} is not one of: {', '.join(MODES)}")
    return mode
