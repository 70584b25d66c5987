"""The report's first screen: the headline metric's best config and the main effects, in words.

Every sentence is generated from the numbers the tables below carry (the grid's CIs, the paired
comparisons, the 2x2 effects, the per-item flags), so a reader can decide from the summary and
drill down to check it. "A real difference" means the Holm-adjusted p is below 0.05.
"""

from __future__ import annotations

from typing import Any

from qa_lab.report_blocks import SIGNIFICANCE, Block, Bullets, Heading, arrow, fmt_ci
from qa_lab.report_stats import EFFECTS, constant_value, headline_metric, paired_metrics

# Per-item flags the summary counts, and how it names them.
SUMMARY_FLAGS = {
    "repetition": "looping answers (`repetition_rate`)",
    "markup_echo": "answers echoing the prompt's passage markup (`markup_echo_rate`)",
    "runaway": "answers inventing a new turn (`runaway_rate`)",
}
EFFECT_NAMES = {"rag": "Retrieval", "ft": "Fine-tuning"}


def summary(
    runs: list[dict[str, Any]], comparisons: list[dict[str, Any]], eff: list[dict[str, Any]]
) -> list[Block]:
    """The summary heading and its sentences (best config, effects, constants, degeneration)."""
    metric = headline_metric(runs)
    lines = []
    if metric is None:
        lines.append("No paired metric varies across the configs: there is nothing to rank.")
    else:
        lines.append(best_sentence(runs, comparisons, metric))
        lines += effect_sentences(eff, metric)
    lines += constant_sentences(runs)
    lines += flag_sentences(runs)
    return [Heading("Summary"), Bullets(tuple(lines))]


def _verdict(p_holm: float) -> str:
    if p_holm < SIGNIFICANCE:
        return f"Holm p = {p_holm:.4f}: a real difference"
    return f"Holm p = {p_holm:.4f}: not distinguishable from chance on these items"


def best_sentence(
    runs: list[dict[str, Any]], comparisons: list[dict[str, Any]], metric: str
) -> str:
    """The best config on the headline metric, and how sure its lead over the next one is."""
    from qa_lab.metrics import HIGHER_IS_BETTER

    higher = HIGHER_IS_BETTER.get(metric, True)
    scored = [r for r in runs if metric in r["ci"]]
    ranked = sorted(scored, key=lambda r: r["ci"][metric]["mean"], reverse=higher)
    best = ranked[0]
    text = (
        f"**{best['label']}** scores best on {metric} {arrow(metric)} (the headline metric): "
        f"{fmt_ci(best['ci'][metric], 3)}."
    )
    if len(ranked) < 2:
        return text
    second = ranked[1]
    row = next(
        (
            c
            for c in comparisons
            if c["metric"] == metric and {c["a"], c["b"]} == {best["label"], second["label"]}
        ),
        None,
    )
    if row is None:
        return text
    sign = 1.0 if row["b"] == best["label"] else -1.0
    low, high = sorted((sign * row["ci_low"], sign * row["ci_high"]))
    return (
        f"{text} Its lead over {second['label']} ({second['ci'][metric]['mean']:.3f}): "
        f"{sign * row['diff']:+.3f} [{low:+.3f}, {high:+.3f}], {_verdict(row['p_holm'])}."
    )


def effect_sentences(eff: list[dict[str, Any]], metric: str) -> list[str]:
    """The 2x2's main effects and interaction on the headline metric, one sentence each."""
    by_name = {e["effect"]: e for e in eff if e["metric"] == metric}
    return [_effect_sentence(n, by_name[n], metric) for n in EFFECTS if n in by_name]


def _effect_sentence(name: str, e: dict[str, Any], metric: str) -> str:
    numbers = f"{e['estimate']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"
    p = f"Holm p = {e['p_holm']:.4f}"
    significant = e["p_holm"] < SIGNIFICANCE
    if name == "interaction" and significant:
        more = "more" if e["estimate"] > 0 else "less"
        return f"Retrieval helps {more} after fine-tuning: interaction {numbers} ({p})."
    if name == "interaction":
        return (
            "No distinguishable interaction: retrieval's gain is about the same with and "
            f"without fine-tuning ({numbers}, {p})."
        )
    if significant:
        verb = "raises" if e["estimate"] > 0 else "lowers"
        return (
            f"{EFFECT_NAMES[name]} {verb} {metric} by {numbers} on average over the other "
            f"factor's two levels ({p})."
        )
    return f"{EFFECT_NAMES[name]}: no distinguishable change in {metric} ({numbers}, {p})."


def constant_sentences(runs: list[dict[str, Any]]) -> list[str]:
    """One line per paired metric that takes one value on every item of every config."""
    out = []
    for m in paired_metrics(runs):
        value = constant_value(runs, m)
        if value is not None:
            out.append(
                f"{m} is {value:.3f} on every item of every config: it separates nothing and "
                "is left out of the comparisons."
            )
    return out


def flag_sentences(runs: list[dict[str, Any]]) -> list[str]:
    """How many answers each config has of the degenerate kinds in `SUMMARY_FLAGS`."""
    out = []
    for flag, name in SUMMARY_FLAGS.items():
        counts = [
            (r["label"], sum(it.scores.get(flag) == 1.0 for it in r["items"]), len(r["items"]))
            for r in runs
            if any(flag in it.scores for it in r["items"])
        ]
        flagged = [f"{label} {k} of {n}" for label, k, n in counts if k]
        if flagged:
            out.append(f"{name[0].upper()}{name[1:]}: {', '.join(flagged)}.")
        elif counts:
            out.append(f"No {name} in any config.")
    return out
