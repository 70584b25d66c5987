"""Synthetic QA pairs written by an LLM, with validation and counted rejects.

Three modes: `paraphrase` (a new wording of the seed question that keeps the seed's reference
answer), `qa` (a new related question with an answer written by the generator, as the
original study did) and `from_corpus` (a question and answer written from one documentation
chunk, for a user with docs but no QA pairs). Every candidate is validated, and each reject is
counted by its reason so a weak generator shows up in the manifest instead of silently
polluting the dataset.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np

from qa_lab import keys
from qa_lab.errors import QaLabError, require_choice
from qa_lab.records import Prediction, QAItem

MODES = ("paraphrase", "qa", "from_corpus")
SYNTHESIS_BACKENDS = ("none", "local", "openai")
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


@dataclass(frozen=True)
class SynthesisOptions:
    """`dataset.synthesis`: the generator, its sampling, and the validation bounds."""

    backend: str
    mode: str
    per_seed: int
    model: str
    base_url: str | None
    api_key_env: str | None
    temperature: float
    max_new_tokens: int
    batch_size: int
    seed: int
    min_chars: int
    max_chars: int
    min_topic_similarity: float
    max_seed_similarity: float
    min_support: float

    @classmethod
    def from_cfg(cls, node: Any) -> SynthesisOptions:
        """Read `dataset.synthesis`; the backend (and, when used, the mode) fail fast."""
        backend = require_choice("dataset.synthesis.backend", node.backend, SYNTHESIS_BACKENDS)
        return cls(
            backend=backend,
            mode=node.mode if backend == "none" else check_mode(node.mode),
            per_seed=int(node.per_seed),
            model=node.model,
            base_url=node.base_url,
            api_key_env=node.api_key_env,
            temperature=float(node.temperature),
            max_new_tokens=int(node.max_new_tokens),
            batch_size=int(node.batch_size),
            seed=int(node.seed),
            min_chars=int(node.min_chars),
            max_chars=int(node.max_chars),
            min_topic_similarity=float(node.min_topic_similarity),
            max_seed_similarity=float(node.max_seed_similarity),
            min_support=float(node.min_support),
        )


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
                # a paraphrase keeps the seed's answer, so the seed's evidence holds it too
                evidence=cand.seed.evidence if cand.answer is None else None,
            )
        )
    return items


def check_mode(mode: str) -> str:
    """Validate `dataset.synthesis.mode`."""
    if mode not in MODES:
        raise QaLabError(f"dataset.synthesis.mode={mode!r} is not one of: {', '.join(MODES)}")
    return mode


# --------------------------------------------------------------------------- from a corpus


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
    return _clean_question(match.group(1)), " ".join(match.group(2).split())


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


def synthesize(
    opts: SynthesisOptions,
    seeds: Sequence[QAItem],
    embed: Callable[[Sequence[str]], np.ndarray],
    *,
    cache_dir: str | Path,
    models_dir: str | Path,
) -> tuple[list[QAItem], Counter[str]]:
    """Grow the seeds with the configured generator; returns valid rows and reject counts.

    Answers go through the per-item answer cache (see `_generate`).
    """
    if opts.mode == "from_corpus":
        raise QaLabError(
            "dataset.synthesis.mode=from_corpus writes pairs from corpus chunks, not seed rows "
            "(synthesize_from_corpus)"
        )
    jobs = [(seed, j) for seed in seeds for j in range(opts.per_seed)]
    outputs = _generate(
        opts,
        [f"{seed.id}#{j}" for seed, j in jobs],
        [messages_for(seed, opts.mode) for seed, _ in jobs],
        [j for _, j in jobs],
        cache_dir=cache_dir,
        models_dir=models_dir,
    )
    candidates = [parse(seed, out.prediction, opts.mode) for (seed, _), out in zip(jobs, outputs)]
    kept, rejects = validate(
        candidates,
        embed([c.question or "-" for c in candidates]),
        embed([s.question for s, _ in jobs]),
        min_chars=opts.min_chars,
        max_chars=opts.max_chars,
        min_topic_similarity=opts.min_topic_similarity,
        max_seed_similarity=opts.max_seed_similarity,
    )
    print(f"synthesis: {len(kept)}/{len(candidates)} candidates kept, rejects {dict(rejects)}")
    return to_items(candidates, kept, opts.model), rejects


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
    outputs = _generate(
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


def _generate(
    opts: SynthesisOptions,
    ids: Sequence[str],
    messages: Sequence[list[dict[str, str]]],
    samples: Sequence[int],
    *,
    cache_dir: str | Path,
    models_dir: str | Path,
) -> list[Prediction]:
    """The backend's reply to each prompt; `samples[i]` is its repeat number.

    Replies go through the per-item answer cache (`<cache_dir>/answers.sqlite`), so a rerun
    or a killed build regenerates nothing it already has.
    """
    from qa_lab.cache import ItemCache
    from qa_lab.generation import generate_cached

    params = _gen_params(opts)
    prompt_texts, model_key, make = _backend(opts, params, messages, samples, models_dir)
    return generate_cached(
        ids,
        prompt_texts,
        params,
        make,
        ItemCache(Path(cache_dir) / "answers.sqlite"),
        model_key,
        salts=[str(j) for j in samples],
    )


def _gen_params(opts: SynthesisOptions) -> Any:
    from qa_lab.generation import GenParams

    return GenParams(
        max_new_tokens=opts.max_new_tokens,
        do_sample=True,
        temperature=opts.temperature,
        # a paraphrase is one line: stopping there saves most of the generation time
        stop_strings=("\n",) if opts.mode == "paraphrase" else (),
        seed=opts.seed,
    )


def _backend(
    opts: SynthesisOptions,
    params: Any,
    messages: Sequence[list[dict[str, str]]],
    samples: Sequence[int],
    models_dir: str | Path,
) -> tuple[list[str], str, Callable[[], Any]]:
    """The cached prompt texts, the model key and a (lazy) generator for the backend."""
    if opts.backend == "openai":
        from qa_lab.openai_client import OpenAIGenerator, chat_request

        # one seed per sample: the server would otherwise return one answer per seed row
        texts = [chat_request(m, params.seed + j) for m, j in zip(messages, samples)]
        node = {"base_url": opts.base_url, "api_key_env": opts.api_key_env}
        return (
            texts,
            f"openai:{opts.model}",
            lambda: OpenAIGenerator.from_cfg(node, "dataset.synthesis", params, opts.model),
        )
    from omegaconf import DictConfig

    from qa_lab import models, prompts
    from qa_lab.local_engine import LocalGenerator

    # the generator's own settings, not the study's `llm` group: float32, no 4-bit
    llm_cfg = DictConfig(
        {
            "name": opts.model,
            "revision": None,
            "dtype": "float32",
            "device": "auto",
            "load_in_4bit": False,
        }
    )
    tokenizer = models.load_tokenizer(llm_cfg, models_dir)

    def make() -> Any:
        return LocalGenerator(
            models.load_llm(llm_cfg, models_dir), tokenizer, params, opts.batch_size
        )

    model_key = keys.local_model_key(opts.model, device=models.pick_device("auto"), merged=None)
    return [prompts.render_prompt(tokenizer, m) for m in messages], model_key, make
