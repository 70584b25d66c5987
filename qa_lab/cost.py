"""What a config costs to run: per 1,000 answers, plus its one-off training, and the Pareto front.

RAG makes every prompt longer; fine-tuning costs training time. Both come from measured
per-config figures (tokens and seconds per answer, training wall seconds). With a price table
(per 1k prompt / completion tokens, per CPU / GPU hour) the cost is money in the table's
currency; without one it is device hours, which still ranks local configs. Pure arithmetic:
the measuring happens in the stages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from qa_lab import checks
from qa_lab.errors import QaLabError

ANSWERS = 1000  # costs are quoted per this many answers
_HOUR_S = 3600.0


@dataclass(frozen=True)
class Usage:
    """A config's measured figures, means per answer (tokens, seconds) and its training."""

    prompt_tokens: float  # tokens in the prompt, mean per answer
    completion_tokens: float  # tokens generated, mean per answer
    seconds_per_answer: float  # generation wall seconds, mean per answer
    train_seconds: float = 0.0  # training wall seconds (0: no training, e.g. vanilla)
    device: str = "cpu"  # "cpu" | "gpu": which hourly price the time is charged at


@dataclass(frozen=True)
class Prices:
    """A price table: currency per 1k tokens and per device hour (0: not charged)."""

    prompt_per_1k: float = 0.0
    completion_per_1k: float = 0.0
    cpu_hour: float = 0.0
    gpu_hour: float = 0.0
    currency: str = "USD"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], key: str) -> Prices:
        """From a config mapping; `key` names it in errors (e.g. "report.prices")."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise QaLabError(f"{key}: unknown price {unknown[0]!r} (known: {sorted(known)})")
        out = {
            name: checks.text(value, f"{key}.{name}")
            if name == "currency"
            else checks.number(value, f"{key}.{name}", low=0)
            for name, value in values.items()
        }
        return cls(**out)


@dataclass(frozen=True)
class Cost:
    """Cost of 1,000 answers, of the training, and their sum, in `unit`."""

    per_1k_answers: float
    training: float
    unit: str  # the price table's currency, or "device-hours" without one

    @property
    def total(self) -> float:
        """1,000 answers plus training."""
        return self.per_1k_answers + self.training


def _hour_price(usage: Usage, prices: Prices) -> float:
    if usage.device == "cpu":
        return prices.cpu_hour
    if usage.device == "gpu":
        return prices.gpu_hour
    raise ValueError(f"device={usage.device!r} must be 'cpu' or 'gpu'")


def cost(usage: Usage, prices: Prices | None = None) -> Cost:
    """Cost per 1,000 answers and of training; device hours when `prices` is None.

    Answers pay tokens at the token prices plus generation time at the hourly price of
    `usage.device`; training pays its wall time at that hourly price.
    """
    if prices is None:
        per_answer_h = usage.seconds_per_answer / _HOUR_S
        return Cost(ANSWERS * per_answer_h, usage.train_seconds / _HOUR_S, "device-hours")
    hourly = _hour_price(usage, prices)
    per_answer = (
        usage.prompt_tokens / 1000 * prices.prompt_per_1k
        + usage.completion_tokens / 1000 * prices.completion_per_1k
        + usage.seconds_per_answer / _HOUR_S * hourly
    )
    return Cost(ANSWERS * per_answer, usage.train_seconds / _HOUR_S * hourly, prices.currency)


@dataclass(frozen=True)
class Point:
    """A config on the quality-cost plane."""

    config: str
    quality: float  # higher is better (e.g. mean rougeL)
    cost: float  # lower is better (e.g. `Cost.per_1k_answers`)


def pareto_front(points: Sequence[Point]) -> list[str]:
    """Configs that no other config beats on both axes, in input order.

    q dominates p when q.quality >= p.quality and q.cost <= p.cost, one of them strictly.
    Points with a NaN coordinate are left out; exact ties all stay.
    """
    finite = [p for p in points if math.isfinite(p.quality) and math.isfinite(p.cost)]

    def dominated(p: Point) -> bool:
        return any(
            q.quality >= p.quality
            and q.cost <= p.cost
            and (q.quality > p.quality or q.cost < p.cost)
            for q in finite
        )

    return [p.config for p in finite if not dominated(p)]
