"""The degeneration diagnostics on hand-made answers: loops, restatements, echoed prompt markup.

Each looping answer below is written the way SmolLM2 loops (one phrase to the token limit);
each normal one is a kind of answer that repeats words without looping (a comparison, a
restated sentence, a list), the cases a looser rule would flag.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qa_lab import diagnostics, prompts
from qa_lab.jsonl import read_jsonl
from qa_lab.records import Passage
from tests.test_metrics import metrics_cfg, score

LOOPS = {
    "phrase": "A set is a collection of unordered collections of unordered collections of "
    "unordered collections of unordered collections of unordered collections of unordered",
    "one word": "The answer is the " + "the " * 30,
    "late loop": "Paging splits memory into fixed-size pages that map to frames. The page "
    "table maps each page to its frame, and the page table maps each page to its frame, and "
    "the page table maps each page to its frame, and the page table maps each page to",
    "lines": "Use an index.\n" + "- An index speeds up reads on the column.\n" * 6,
}
NORMAL = {
    "prose": "A mutex is a lock that lets only one thread at a time enter the critical "
    "section, so shared data is never written by two threads at once; the others block.",
    "comparison": "Optimistic locking assumes conflicts are rare and checks at commit; "
    "pessimistic locking assumes conflicts are common and locks first. Optimistic locking is "
    "faster under low contention, pessimistic locking is safer under high contention.",
    "restated": "Alert thresholds define conditions under which dashboards raise alerts. In "
    "short, alert thresholds define conditions under which dashboards raise alerts for review.",
    "list": "1. Atomicity: all or nothing.\n2. Consistency: rules hold.\n3. Isolation: "
    "transactions do not interfere.\n4. Durability: committed data survives a crash.",
    "short loop": "yes yes yes yes yes yes",  # under REPEAT_MIN_WORDS: too short to call a loop
    "empty": "",
}


@pytest.mark.parametrize("name", LOOPS)
def test_looping_answers_are_flagged(name):
    text = LOOPS[name]
    assert diagnostics.repeated_share(text) >= diagnostics.REPEAT_SHARE, name
    assert diagnostics.is_repetition(text) == 1.0, name


@pytest.mark.parametrize("name", NORMAL)
def test_normal_answers_are_not(name):
    assert diagnostics.is_repetition(NORMAL[name]) == 0.0, name


def test_repeated_share_by_hand():
    # 8 words -> 5 four-grams: (a b c d) (b c d a) (c d a b) (d a b c) (a b c d): one repeat
    assert diagnostics.repeated_share("a b c d a b c d") == pytest.approx(1 / 5)
    assert diagnostics.repeated_share("A b C d. a B c D") == pytest.approx(1 / 5)  # case, marks
    assert diagnostics.repeated_share("one two three") == 0.0  # no 4-gram at all
    # the restatement repeats its 4-grams twice only: a large share, but no loop
    restated = NORMAL["restated"]
    assert diagnostics.repeated_share(restated) > diagnostics.REPEAT_SHARE
    assert diagnostics.is_repetition(restated) == 0.0


def test_markup_echo_of_the_real_prompt_format():
    context = prompts.format_context(
        [Passage(item_id="c1", text="Pages map to frames."), Passage("t1", "What?", "This.")],
        "Context:",
    )
    assert "<passage 1>" in context and "</passage 2>" in context and "\nQ: What?" in context
    echoed = [
        "Pages map to frames.\n</passage 1>",  # a closing tag copied after the answer
        "Paging maps pages.\n<passage 7",  # a tag cut off by the token limit
        "See <PASSAGE 2> above.",
        "Pages map to frames.\nQ: What is a TLB?\nA: A cache.",  # an invented Q/A turn
        "**A:** This.",
        context,
    ]
    for text in echoed:
        assert diagnostics.is_markup_echo(text) == 1.0, text
    clean = [
        "Pages map to frames.",
        "A passage of text is not markup.",
        "Quality: good. Answer: yes.",  # words that start with Q or A, a colon mid-line
        "Trade-off: A: is a drive letter on Windows.",
    ]
    for text in clean:
        assert diagnostics.is_markup_echo(text) == 0.0, text


def test_raised_flags_in_flag_order():
    scores = {"repetition": 1.0, "empty": 0.0, "truncated": 1.0, "markup_echo": float("nan")}
    assert diagnostics.raised_flags(scores) == ["truncated", "repetition"]
    assert diagnostics.raised_flags(None) == []


def test_score_items_logs_repetition_and_markup_echo_rates():
    rows = [
        {"id": "loop", "question": "q", "prediction": LOOPS["phrase"], "reference": "a set"},
        {"id": "echo", "question": "q", "prediction": "x\n</passage 3>", "reference": "x"},
        {"id": "ok", "question": "q", "prediction": NORMAL["prose"], "reference": "a lock"},
        {"id": "ok2", "question": "q", "prediction": NORMAL["list"], "reference": "acid"},
    ]
    result = score(rows, metrics_cfg(groups=["diagnostics"]))
    assert [r["repetition"] for r in result.per_item] == [1.0, 0.0, 0.0, 0.0]
    assert [r["markup_echo"] for r in result.per_item] == [0.0, 1.0, 0.0, 0.0]
    assert result.corpus["repetition_rate"] == pytest.approx(0.25)
    assert result.corpus["markup_echo_rate"] == pytest.approx(0.25)


# The default study's vanilla answers (SmolLM2-135M, 96 new tokens; `make run`, 2026-12-01):
# the eight that the rule flags of its 56, then near misses (a sentence restated twice, a
# phrase repeated thrice at a low share) and three plain answers. id, prediction, reference.
FIXTURE = Path(__file__).parent / "fixtures" / "vanilla_loops.jsonl"
FLAGGED = {"ds-016", "os-043", "db-002", "db-002-syn1", "ds-029", "os-028", "algo-019", "db-004"}


def test_the_default_studys_looping_vanilla_answers_are_flagged_by_id():
    rows = read_jsonl(FIXTURE)
    flagged = {r["id"] for r in rows if diagnostics.is_repetition(r["prediction"]) == 1.0}
    assert flagged == FLAGGED
    assert len(rows) - len(flagged) == 7  # the near misses and plain answers stay unflagged
    by_id = {r["id"]: r["prediction"] for r in rows}
    assert "collections of unordered collections of" in by_id["ds-016"]  # the example
    assert diagnostics.repeated_share(by_id["ds-036"]) > diagnostics.REPEAT_SHARE  # restated
