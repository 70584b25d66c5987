"""LLM-as-judge scoring through an OpenAI-compatible server: verdicts, 1-5 scores, rates.

The judge sees question, reference and prediction and must answer with a strict JSON object
`{"verdict": correct|partially_correct|incorrect, "score": 1-5}`. Parsing tolerates extra text
around it (small and chatty models wrap JSON in prose or code fences). A reply that still cannot
be parsed is retried once with a format reminder, then counted as `judge_unparseable`: it never
receives a made-up verdict or score.

Replies go through the per-item answer cache keyed by (judge model, rubric hash, exact request),
so rescoring the same predictions asks the server nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qa_lab import checks, prompts
from qa_lab.cache import ItemCache, stable_hash
from qa_lab.errors import QaLabError
from qa_lab.records import EvalRow

# Per-item columns: judge_<verdict> 0/1 flags (their means are the verdict rates),
# judge_unparseable 0/1 and judge_score 1-5 (NaN when unparseable, so it is left out of the mean).
VERDICTS = ("correct", "partially_correct", "incorrect")
_OBJECT = re.compile(r"\{[^{}]*\}", re.S)
_VERDICT_FIELD = re.compile(r"verdict\W{0,5}([a-z][a-z _-]{4,30})", re.I)
_SCORE_FIELD = re.compile(r"score\W{0,5}([1-5](?:\.0)?)\b", re.I)


def prompt_hash() -> str:
    """Identity of the rubric (system, template, example, repair turn): logged, in cache keys."""
    return stable_hash(
        [prompts.JUDGE_SYSTEM, prompts.JUDGE_USER, prompts.JUDGE_EXAMPLE, prompts.JUDGE_REPAIR]
    )


def _verdict(value: Any) -> str | None:
    words = re.sub(r"[^a-z]+", "_", str(value).lower()).strip("_")
    if words.startswith("partial"):
        return "partially_correct"
    return words if words in VERDICTS else None


def _score(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and 1 <= number <= 5 else None


def parse_verdict(text: str) -> dict[str, Any] | None:
    """`{"verdict", "score"}` from a judge reply, or None when it holds no valid pair.

    The first JSON object with both fields valid wins; failing that, `verdict: ...` and
    `score: N` written as loose text are accepted. Out-of-range scores are invalid, not clipped.
    """
    for match in _OBJECT.finditer(text):
        try:
            obj = json.loads(match.group(0))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            fields = {str(k).lower(): v for k, v in obj.items()}
            verdict, score = _verdict(fields.get("verdict")), _score(fields.get("score"))
            if verdict and score:
                return {"verdict": verdict, "score": score}
    verdict_m, score_m = _VERDICT_FIELD.search(text), _SCORE_FIELD.search(text)
    if verdict_m and score_m:
        verdict = _verdict(verdict_m.group(1).split(",")[0].strip())
        score = _score(score_m.group(1))
        if verdict and score:
            return {"verdict": verdict, "score": score}
    return None


def item_scores(parsed: dict[str, Any] | None) -> dict[str, float]:
    """The per-item judge columns for one parsed verdict (None: counted as unparseable)."""
    verdict = parsed["verdict"] if parsed else None
    return {
        **{f"judge_{v}": float(verdict == v) for v in VERDICTS},
        "judge_unparseable": float(parsed is None),
        "judge_score": float(parsed["score"]) if parsed else math.nan,
    }


@dataclass(frozen=True)
class JudgeOptions:
    """The `metrics.judge` node (conf/metrics/judge.yaml): the model, its budget, its server."""

    model: str
    temperature: float = 0.0  # 0: greedy, reproducible verdicts
    max_tokens: int = 64  # the JSON verdict needs ~20 tokens
    client: Any = None  # openai_client.ClientOptions
    repeats: int = 1  # verdicts per answer (needs temperature > 0); the item's is their mean

    @classmethod
    def from_cfg(cls, node: Any) -> JudgeOptions:
        """Read and check the node; the model is required (the server only when asked)."""
        from qa_lab.openai_client import ClientOptions

        where = "metrics.judge"
        if node is None or not node.get("model"):
            raise QaLabError(
                f"{where}.model is missing: use metrics=judge (conf/metrics/judge.yaml) and set "
                f"{where}.model and {where}.base_url"
            )
        temperature, max_tokens = node.get("temperature"), node.get("max_tokens")
        temperature = (
            cls.temperature
            if temperature is None
            else checks.number(temperature, f"{where}.temperature", low=0)
        )
        return cls(
            model=str(checks.text(node.model, f"{where}.model")),
            temperature=temperature,
            max_tokens=cls.max_tokens
            if max_tokens is None
            else checks.whole(max_tokens, f"{where}.max_tokens", low=1),
            client=ClientOptions.from_cfg(node, where),
            repeats=_repeats(node, where, temperature),
        )


def _repeats(node: Any, where: str, temperature: float) -> int:
    """`metrics.judge.repeats`, refused above 1 with greedy verdicts (each would be the same)."""
    repeats = checks.whole(node.get("repeats", 1), f"{where}.repeats", low=1)
    if repeats > 1 and temperature <= 0:
        raise QaLabError(
            f"{where}.repeats={repeats} needs {where}.temperature > 0: greedy verdicts repeat"
        )
    return repeats


def judge_rows(
    rows: Sequence[EvalRow], judge_cfg: Any, cache_dir: str | Path
) -> tuple[list[dict[str, float]], list[str], dict[str, Any]]:
    """Judge every row: per-item columns, the final reply texts (row order), run-level info.

    `judge_cfg` is the `metrics.judge` node (model, base_url, api_key_env, temperature,
    max_tokens, timeout, retries, concurrency).
    """
    from qa_lab.generation import GenParams, generate_cached
    from qa_lab.openai_client import OpenAIGenerator, chat_request

    opts = JudgeOptions.from_cfg(judge_cfg)
    temperature = opts.temperature
    params = GenParams(
        max_new_tokens=opts.max_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
    )
    model = opts.model
    model_key = f"judge:{model}:{prompt_hash()}"
    cache = ItemCache(Path(cache_dir) / "answers.sqlite")

    def ask(ids: list[str], chats: list[list[dict[str, str]]], repeat: int) -> list[str]:
        replies = generate_cached(
            ids,
            # repeat 0 is the request a single verdict sends; repeat r its own seed and entry
            [chat_request(m, params.seed + repeat if repeat else None) for m in chats],
            params,
            lambda: OpenAIGenerator.from_cfg(judge_cfg, "metrics.judge", params, model),
            cache,
            model_key,
            progress=False,
        )
        return [r.prediction for r in replies]

    ids = [str(r.item_id or i) for i, r in enumerate(rows)]
    chats = [
        prompts.judge_messages(str(r.question), str(r.reference), str(r.prediction)) for r in rows
    ]
    verdicts = [_verdicts(ask, ids, chats, repeat) for repeat in range(opts.repeats)]
    scores = [_mean_scores([item_scores(v[0][i]) for v in verdicts]) for i in range(len(rows))]
    retried = sum(v[2] for v in verdicts)
    replies = verdicts[0][1]
    info = {
        "judge_model": model,
        "judge_prompt_hash": prompt_hash(),
        "judge_temperature": str(temperature),
        "judge_retried": float(retried),
        "judge_repeats": float(opts.repeats),
    }
    if opts.repeats > 1:
        info["judge_repeat_sd"] = _correct_spread([v[0] for v in verdicts])
    return scores, replies, info


def _verdicts(
    ask: Any, ids: list[str], chats: list[list[dict[str, str]]], repeat: int
) -> tuple[list[dict[str, Any] | None], list[str], int]:
    """One verdict per answer (`repeat`: which of the judge's repeats), and how many retried.

    An unparseable reply is asked once more with a reminder of the format; what is still
    unparseable stays None (counted as such, never guessed).
    """
    replies = ask(ids, chats, repeat)
    parsed = [parse_verdict(text) for text in replies]
    retry = [i for i, p in enumerate(parsed) if p is None]
    if retry:
        again = ask(
            [ids[i] for i in retry],
            [prompts.judge_repair_messages(chats[i], replies[i]) for i in retry],
            repeat,
        )
        for i, text in zip(retry, again):
            parsed[i], replies[i] = parse_verdict(text), text
    return parsed, replies, len(retry)


def _mean_scores(per_repeat: list[dict[str, float]]) -> dict[str, float]:
    """An answer's judge columns: the mean over the judge's repeats (NaN ones left out)."""
    from qa_lab.metrics import finite_mean

    return {name: finite_mean(s[name] for s in per_repeat) for name in per_repeat[0]}


def _correct_spread(verdicts: list[list[dict[str, Any] | None]]) -> float:
    """Mean over answers of the SD of the judge's `correct` call across its repeats."""
    import numpy as np

    from qa_lab.metrics import within_item_sd

    calls = [[item_scores(p)["judge_correct"] for p in repeat] for repeat in verdicts]
    return within_item_sd(np.array(calls, dtype=float))
