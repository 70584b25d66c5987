"""The one prompt builder: training and every evaluation config go through it.

Vanilla and fine-tuned models see the same prompt; only the retrieved context differs. Prompts
are chat messages rendered by the model's own chat template, and the answer is exactly the newly
generated tokens (never text split off at an "Answer:" marker). The fine-tune learns the
template's end-of-turn token, which is what makes it stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qa_lab import checks
from qa_lab.records import Passage, QAItem

# Bump when the wording or layout below changes: it is part of every prediction's cache key.
TEMPLATE_VERSION = 1
PASSAGE_OPEN = "<passage {n}>"
PASSAGE_CLOSE = "</passage {n}>"


@dataclass(frozen=True)
class PromptOptions:
    """The `prompt` node: the system message and the line above the retrieved passages."""

    system: str
    context_header: str

    @classmethod
    def from_cfg(cls, node: Any) -> PromptOptions:
        """Read `prompt`; both values must be text (a bare `prompt.system=3` is refused)."""
        return cls(
            system=str(checks.text(node.system, "prompt.system")),
            context_header=str(checks.text(node.context_header, "prompt.context_header")),
        )


def format_context(passages: Sequence[Passage], header: str) -> str:
    """Numbered, delimited passages so the context cannot be mistaken for the answer.

    A chunk shows its text (a markdown chunk starts with its heading line); a training pair
    shows as Q/A.
    """
    blocks = [
        f"{PASSAGE_OPEN.format(n=i)}\n{_body(p)}\n{PASSAGE_CLOSE.format(n=i)}"
        for i, p in enumerate(passages, start=1)
    ]
    return header.strip() + "\n" + "\n".join(blocks)


def _body(passage: Passage) -> str:
    return passage.text.strip() if passage.text else f"Q: {passage.question}\nA: {passage.answer}"


def build_messages(
    question: str, passages: Sequence[Passage], *, system: str, context_header: str
) -> list[dict[str, str]]:
    """System message, then one user turn: the context (if any) above the question.

    The system message is always given: some templates (SmolLM2's) insert a default one
    otherwise, which would make the prompt depend on the template rather than on the config.
    """
    user = f"Question: {question.strip()}"
    if passages:
        user = format_context(passages, context_header) + "\n\n" + user
    return [{"role": "system", "content": system.strip()}, {"role": "user", "content": user}]


def sft_example(
    item: QAItem, passages: Sequence[Passage], *, system: str, context_header: str
) -> dict[str, Any]:
    """Conversational prompt/completion example: TRL puts the loss on the completion only."""
    return {
        "prompt": build_messages(
            item.question, passages, system=system, context_header=context_header
        ),
        "completion": [{"role": "assistant", "content": item.answer.strip()}],
    }


def fit_template(tokenizer: Any, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages in a form the model's chat template accepts.

    Some templates (Mistral-7B-Instruct-v0.2's) raise on a system turn. For those the system
    text goes on top of the first user turn, the way their model cards prompt them, so every
    model sees the same instructions.
    """
    if not messages or messages[0]["role"] != "system" or _takes_system(tokenizer):
        return messages
    return fold_system(messages)


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system turn's text on top of the first user turn (no system turn left)."""
    if len(messages) < 2 or messages[0]["role"] != "system":
        return messages
    system, first, *rest = messages
    return [{"role": "user", "content": f"{system['content']}\n\n{first['content']}"}, *rest]


def _takes_system(tokenizer: Any) -> bool:
    from jinja2.exceptions import TemplateError

    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        return False
    return True


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """Prompt text exactly as the model sees it, ending where the assistant turn starts."""
    return tokenizer.apply_chat_template(
        fit_template(tokenizer, messages), tokenize=False, add_generation_prompt=True
    )


# The LLM judge's rubric (its hash is logged and keys the judge cache: edit = re-judge).
JUDGE_SYSTEM = (
    "You grade answers to computer-science interview questions against a reference answer. "
    "Reply with one JSON object only."
)
JUDGE_USER = (
    "Question: {question}\n\nReference answer: {reference}\n\nCandidate answer: {prediction}\n\n"
    "Grade the candidate answer against the reference. It is correct if it states the "
    "reference's key facts without contradicting them, partially_correct if it gets some key "
    "facts right but misses or garbles others, and incorrect if it is wrong, off-topic, empty "
    "or only restates the question. Score from 1 (wrong) to 5 (complete and accurate).\n"
    'Reply in exactly this format: {{"verdict": "correct" | "partially_correct" | "incorrect", '
    '"score": 1-5}}'
)
# One worked example turn: small models echo the candidate answer without it (SmolLM2-135M).
JUDGE_EXAMPLE = (
    {
        "question": "What does a mutex guarantee?",
        "reference": "Only one thread at a time can hold it, so the critical section it guards "
        "never runs concurrently.",
        "prediction": "A mutex makes a program faster by running threads in parallel.",
    },
    '{"verdict": "incorrect", "score": 1}',
)
# Sent once after an unparseable reply, with that reply as the assistant turn.
JUDGE_REPAIR = (
    "That was not the requested format. Reply with only the JSON object, for example "
    '{"verdict": "partially_correct", "score": 3}'
)


def judge_messages(question: str, reference: str, prediction: str) -> list[dict[str, str]]:
    """The judge's chat prompt: rubric, question, reference and the answer under review."""
    example, verdict = JUDGE_EXAMPLE
    user = JUDGE_USER.format(
        question=question.strip(), reference=reference.strip(), prediction=prediction.strip()
    )
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_USER.format(**example)},
        {"role": "assistant", "content": verdict},
        {"role": "user", "content": user},
    ]


def judge_repair_messages(messages: list[dict[str, str]], bad_reply: str) -> list[dict[str, str]]:
    """The one retry after an unparseable verdict: the bad reply, then a format reminder.

    Repeating the same greedy request would return the same reply; a reminder turn does not.
    """
    return [
        *messages,
        {"role": "assistant", "content": bad_reply},
        {"role": "user", "content": JUDGE_REPAIR},
    ]
