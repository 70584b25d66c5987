"""The `metrics.decision` node, read once: the report's power, cost and verdict settings.

Read with the rest of `metrics` (`metrics.MetricsOptions.decision`), so a bad value is refused
by the scripts' boundary check before a sweep runs, not after it when its report is built.
Every key is checked and named in a one-line error (`metrics.decision.alpha=2 must be <= 1`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qa_lab import checks
from qa_lab.cost import Prices
from qa_lab.errors import QaLabError
from qa_lab.report_stats import PAIRED

KEY = "metrics.decision"
KEYS = ("alpha", "power", "min_effect", "prices")
PRICE_KEYS = ("prompt_per_1k", "completion_per_1k", "cpu_hour", "gpu_hour", "currency")


@dataclass(frozen=True)
class DecisionOptions:
    """Power at `power` and level `alpha`; smallest effects of interest; an optional price table.

    `min_effect` maps a paired metric to its smallest effect of interest in the metric's own
    absolute units (0.02 = two ROUGE-L points); a metric without one is never flagged
    underpowered. `prices` None: costs in device hours. The defaults here (no smallest
    effects) are for callers without a config; conf/metrics/default.yaml sets them.
    """

    alpha: float = 0.05
    power: float = 0.8
    min_effect: Mapping[str, float] = field(default_factory=dict)
    prices: Prices | None = None

    @classmethod
    def from_cfg(cls, node: Any) -> DecisionOptions:
        """Read and check the `metrics.decision` node (a plain mapping or a DictConfig)."""
        values = _mapping(node, KEY, KEYS)
        return cls(
            alpha=_fraction(values.get("alpha"), f"{KEY}.alpha"),
            power=_fraction(values.get("power"), f"{KEY}.power"),
            min_effect=_min_effect(values.get("min_effect")),
            prices=_prices(values.get("prices")),
        )


def _mapping(node: Any, key: str, known: tuple[str, ...]) -> dict[str, Any]:
    """`node` (a mapping or a DictConfig, which is one) as a dict with only `known` keys."""
    if node is None:
        raise QaLabError(f"{key} is not set (see conf/metrics/default.yaml)")
    if not isinstance(node, Mapping):
        raise QaLabError(f"{key}={node!r} is not a mapping")
    values = dict(node)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise QaLabError(f"{key}.{unknown[0]} is not a known key (known: {', '.join(known)})")
    return values


def _fraction(value: Any, key: str) -> float:
    """A number strictly between 0 and 1 (a level or a power)."""
    out = checks.number(value, key, low=0, high=1, above=True)
    if out == 1:
        raise QaLabError(f"{key}={value!r} must be < 1")
    return out


def _min_effect(node: Any) -> dict[str, float]:
    """Metric -> smallest effect of interest (> 0), for the paired metrics only."""
    key = f"{KEY}.min_effect"
    values = {} if node is None else _mapping(node, key, PAIRED)
    return {
        str(metric): checks.number(v, f"{key}.{metric}", low=0, above=True)
        for metric, v in values.items()
    }


def _prices(node: Any) -> Prices | None:
    """The price table; None when every price is null (costs then in device hours)."""
    key = f"{KEY}.prices"
    values = {} if node is None else _mapping(node, key, PRICE_KEYS)
    set_ = {k: v for k, v in values.items() if v is not None}
    if not set_.keys() - {"currency"}:
        return None
    if "currency" in set_:
        set_["currency"] = checks.text(set_["currency"], f"{key}.currency")
    return Prices.from_mapping(set_, key)
