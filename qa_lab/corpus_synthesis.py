"""QA pairs written from documentation chunks (`dataset.synthesis.mode=from_corpus`).

For a user with docs and no QA pairs: the generator writes one question and its answer from
each chunk, and a pair is kept only if the chunk supports its answer (a stated share of the
answer's content words found in the chunk) and its question is not a copied sentence; each
kept item names its chunk as evidence and lineage group. The generation itself (backends, the
answer cache) is shared with the seed-based modes in `qa_lab.synthesis`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from difflib import SequenceMatcher
from pathlib import Path, PurePosixPath
from typing import Protocol

from qa_lab.records import QAItem
from qa_lab.synthesis import SynthesisOptions, clean_question, generate, reads_as_question

CORPUS_SYSTEM = "You write quiz questions about technical documentation. Reply in the format asked."
CORPUS_INSTRUCTION = (
    "Passage from {source}:\n\n{text}\n\nWrite one question that a reader of this passage "
    "could answer from it, and its answer in one to three sentences. Reply with two lines:\n"
    "Question: <the question>\nAnswer: <its answer>"
)
# SmolLM2-135M, two samples on each of three data/corpus/databases sections: without a worked
# example 1 of 6 replies had both a question and an answer (it summarised the passage instead);
# with one, 3 of 6 ("in exactly this format: Question: ...") and 5 of 6 ("two lines").
CORPUS_EXAMPLE = (
    "Stacks - Stack Operations",
    "A stack is a last-in, first-out collection. Push adds an element on top and pop removes "
    "the top element; both take O(1) time.",
    "Question: How long do push and pop take on a stack?\nAnswer: Both take O(1) time: push "
    "adds an element on top and pop removes the top element.",
)
# The answer ends at a blank line or where the model starts another pair.
QA_PAIR = re.compile(
    r"question\s*:\s*(.+?)\s*answer\s*:\s*(.+?)(?=\n\s*\n|\n\s*question\s*:|\Z)", re.I | re.S
)
# A question sharing this many consecutive words with its passage is a copied sentence.
COPIED_RUN_WORDS = 12
WORD = re.compile(r"[a-z0-9]+")


class ChunkLike(Protocol):
    """What corpus synthesis reads of a chunk (`qa_lab.chunking.Chunk` has these and more)."""

    id: str
    document: str  # path under the corpus root, e.g. "databases/indexing.md"
    title: str
    heading: str
    text: str


def corpus_messages(chunk: ChunkLike) -> list[dict[str, str]]:
    """The chat prompt asking for one question a reader of the chunk can answer, and its answer."""
    source, text, reply = CORPUS_EXAMPLE
    where = " - ".join(part for part in (chunk.title, chunk.heading) if part) or chunk.document
    return [
        {"role": "system", "content": CORPUS_SYSTEM},
        {"role": "user", "content": CORPUS_INSTRUCTION.format(source=source, text=text)},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": CORPUS_INSTRUCTION.format(source=where, text=chunk.text)},
    ]


def parse_pair(text: str) -> tuple[str, str]:
    """(question, answer) from a reply in the "Question: ... Answer: ..." format; ("", ""): none."""
    match = QA_PAIR.search(text)
    if not match:
        return "", ""
    return clean_question(match.group(1)), " ".join(match.group(2).split())


def words(text: str) -> list[str]:
    """Lowercased alphanumeric tokens, in order."""
    return WORD.findall(text.lower())


def support(answer: str, passage: str) -> float:
    """Share of the answer's distinct content words found in the passage (0 when it has none).

    Content words as the retrieval metrics count them (`answer_in_context`), so "supported by
    its chunk" and "the answer is in the context" are one measure.
    """
    from qa_lab.retrieval_metrics import content_words

    wanted = content_words(answer)
    return len(wanted & content_words(passage)) / len(wanted) if wanted else 0.0


def longest_common_run(question: str, passage: str) -> int:
    """Length in words of the longest word sequence the question shares with the passage."""
    q, p = words(question), words(passage)
    # autojunk would ignore words frequent in a long passage ("the"), breaking runs
    return SequenceMatcher(None, q, p, autojunk=False).find_longest_match(0, len(q), 0, len(p)).size


def validate_corpus(
    chunk: ChunkLike,
    pairs: Sequence[tuple[str, str]],
    *,
    min_chars: int,
    max_chars: int,
    min_support: float,
) -> tuple[list[int], Counter[str]]:
    """Indices of the chunk's (question, answer) pairs that pass, and rejects by first failure.

    A pair is kept only if its answer is supported by the chunk: at least `min_support` of the
    answer's distinct content words (`retrieval_metrics.content_words`) occur in the chunk
    text. Its question must have `min_chars`..`max_chars` characters, read as a question,
    share fewer than `COPIED_RUN_WORDS` consecutive words with the chunk (else it is a copied
    sentence) and differ from the chunk's earlier kept questions after
    `normalize_question(.., "robust")`.
    """
    from qa_lab.dataset import normalize_question  # dataset imports this module

    kept: list[int] = []
    seen: set[str] = set()
    rejects: Counter[str] = Counter()
    for i, (question, answer) in enumerate(pairs):
        key = normalize_question(question, "robust")
        if not question or not answer:
            reason = "unparseable"
        elif len(question) < min_chars:
            reason = "too_short"
        elif len(question) > max_chars:
            reason = "too_long"
        elif not reads_as_question(question):
            reason = "not_a_question"
        elif longest_common_run(question, chunk.text) >= COPIED_RUN_WORDS:
            reason = "copied_question"
        elif support(answer, chunk.text) < min_support:
            reason = "unsupported"
        elif key in seen:
            reason = "duplicate"
        else:
            kept.append(i)
            seen.add(key)
            continue
        rejects[reason] += 1
    return kept, rejects


def corpus_item(chunk: ChunkLike, j: int, question: str, answer: str, generator: str) -> QAItem:
    """The dataset row of sample `j` of a chunk; the chunk is its lineage group and evidence."""
    parts = PurePosixPath(chunk.document).parts
    evidence = {"document": chunk.document, "section": chunk.heading, "chunk": chunk.id}
    return QAItem(
        id=f"{chunk.id}~q{j}",
        question=question,
        answer=answer,
        topic=parts[0] if len(parts) > 1 else "",
        # questions of one chunk share its facts: they must stay on one side of the split
        seed_id=chunk.id,
        source="synthetic",
        generator=generator,
        evidence={k: v for k, v in evidence.items() if v},
    )


# --------------------------------------------------------------------------- the run


def synthesize_from_corpus(
    opts: SynthesisOptions,
    chunks: Sequence[ChunkLike],
    *,
    cache_dir: str | Path,
    models_dir: str | Path,
) -> tuple[list[QAItem], Counter[str]]:
    """Write `opts.per_seed` QA pairs per corpus chunk; returns the supported ones and rejects.

    Each candidate passes `validate_corpus` or is counted under its reason (unparseable,
    too_short, too_long, not_a_question, copied_question, unsupported, duplicate), so kept +
    rejects == chunks x per_seed. Item `j` of a chunk is `<chunk id>~q<j>` whether or not its
    siblings were kept. Replies go through the same per-item answer cache as `synthesize`: a
    fixed `seed` gives the same rows on every run.
    """
    jobs = [(chunk, j) for chunk in chunks for j in range(opts.per_seed)]
    outputs = generate(
        opts,
        [f"{chunk.id}#{j}" for chunk, j in jobs],
        [corpus_messages(chunk) for chunk, _ in jobs],
        [j for _, j in jobs],
        cache_dir=cache_dir,
        models_dir=models_dir,
    )
    items: list[QAItem] = []
    rejects: Counter[str] = Counter()
    for n, chunk in enumerate(chunks):
        replies = outputs[n * opts.per_seed : (n + 1) * opts.per_seed]
        pairs = [parse_pair(out.prediction) for out in replies]
        kept, chunk_rejects = validate_corpus(
            chunk,
            pairs,
            min_chars=opts.min_chars,
            max_chars=opts.max_chars,
            min_support=opts.min_support,
        )
        items += [corpus_item(chunk, j, *pairs[j], opts.model) for j in kept]
        rejects += chunk_rejects
    print(f"synthesis: {len(items)}/{len(jobs)} candidates kept, rejects {dict(rejects)}")
    return items, rejects
