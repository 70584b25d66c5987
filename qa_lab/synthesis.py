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
from pathlib import Path
from typing import Any

import numpy as np

from qa_lab import checks, keys
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

        def key(name: str) -> str:
            return f"dataset.synthesis.{name}"

        def cosine(name: str) -> float:
            return checks.number(node[name], key(name), low=-1, high=1)

        return cls(
            backend=backend,
            mode=node.mode if backend == "none" else check_mode(node.mode),
            per_seed=checks.whole(node.per_seed, key("per_seed"), low=1),
            model=node.model,
            base_url=node.base_url,
            api_key_env=node.api_key_env,
            temperature=checks.number(node.temperature, key("temperature"), low=0),
            max_new_tokens=checks.whole(node.max_new_tokens, key("max_new_tokens"), low=1),
            batch_size=checks.whole(node.batch_size, key("batch_size"), low=1),
            seed=checks.whole(node.seed, key("seed")),
            min_chars=checks.whole(node.min_chars, key("min_chars"), low=0),
            max_chars=checks.whole(node.max_chars, key("max_chars"), low=1),
            min_topic_similarity=cosine("min_topic_similarity"),
            max_seed_similarity=cosine("max_seed_similarity"),
            min_support=checks.number(node.min_support, key("min_support"), low=0, high=1),
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
        return Candidate(seed, clean_question(question), answer)
    first = next((line for line in text.strip().splitlines() if line.strip()), "")
    return Candidate(seed, clean_question(first), None)


def clean_question(text: str) -> str:
    """A generated question without its label ("Question:"), quotes and extra whitespace."""
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


def synthesize(
    opts: SynthesisOptions,
    seeds: Sequence[QAItem],
    embed: Callable[[Sequence[str]], np.ndarray],
    *,
    cache_dir: str | Path,
    models_dir: str | Path,
) -> tuple[list[QAItem], Counter[str]]:
    """Grow the seeds with the configured generator; returns valid rows and reject counts.

    Answers go through the per-item answer cache (see `generate`).
    """
    if opts.mode == "from_corpus":
        raise QaLabError(
            "dataset.synthesis.mode=from_corpus writes pairs from corpus chunks, not seed rows "
            "(synthesize_from_corpus)"
        )
    jobs = [(seed, j) for seed in seeds for j in range(opts.per_seed)]
    outputs = generate(
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


def generate(
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
