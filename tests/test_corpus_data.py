"""Checks on the shipped documentation corpus (data/corpus) and its evidence links.

Plain Python, no qa_lab imports: the markdown is parsed here. A section's text runs from its
heading line to the next heading of the same or higher level (fenced code is not parsed for
headings). Every seed QA pair must link to one section that quotes the answer's main fact
verbatim and contains most of the answer's content words.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "corpus"
SEEDS = ROOT / "data" / "seed" / "cs_interview.jsonl"

MIN_PAGES = 40
MIN_WORD_COVERAGE = 0.5
HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$")
SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*\.md$")
_STOPWORD_TEXT = """
this that with from they them their there these those when what which while where have has
been being were will would could should into onto than then also only such each other some
more most much many very about over under after before between both does done just like make
makes made using used uses because through without within upon your yours
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def content_words(text: str) -> set[str]:
    return {t for t in re.findall(r"[a-z0-9]+", text.lower()) if len(t) >= 4 and t not in STOPWORDS}


def headings(lines: list[str]) -> list[tuple[int, int, str]]:
    """(line index, level, text) for every heading outside fenced code blocks."""
    found, in_fence = [], False
    for i, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        m = None if in_fence else HEADING.match(line)
        if m:
            found.append((i, len(m.group(1)), m.group(2)))
    return found


def sections(text: str) -> dict[str, str]:
    """Heading text -> section text (heading line up to the next heading of level <= its own)."""
    lines = text.split("\n")
    heads = headings(lines)
    out: dict[str, str] = {}
    for n, (start, level, title) in enumerate(heads):
        end = next((i for i, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        out.setdefault(title, "\n".join(lines[start:end]))
    return out


def load_pages() -> dict[str, str]:
    return {
        p.relative_to(CORPUS).as_posix(): p.read_text(encoding="utf-8")
        for p in sorted(CORPUS.glob("*/*.md"))
    }


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def check_row(row: dict, answer: str, pages: dict[str, str]) -> list[str]:
    """Problems with one evidence row (empty when the row is sound)."""
    doc, section, quote = row.get("document"), row.get("section"), row.get("quote")
    if not (isinstance(doc, str) and isinstance(section, str) and isinstance(quote, str)):
        return [f"{row.get('id')}: document, section and quote must be strings"]
    if not quote.strip():
        return [f"{row['id']}: empty quote"]
    if doc not in pages:
        return [f"{row['id']}: no such document {doc!r}"]
    secs = sections(pages[doc])
    if section not in secs:
        return [f"{row['id']}: no section {section!r} in {doc}"]
    text = secs[section]
    problems = []
    if quote not in text:
        problems.append(f"{row['id']}: quote not found verbatim in section {section!r}")
    wanted = content_words(answer)
    coverage = len(wanted & content_words(text)) / max(1, len(wanted))
    if coverage < MIN_WORD_COVERAGE:
        problems.append(f"{row['id']}: section covers only {coverage:.0%} of the answer's words")
    return problems


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return load_pages()


@pytest.fixture(scope="module")
def seeds() -> list[dict]:
    return load_jsonl(SEEDS)


@pytest.fixture(scope="module")
def evidence(seeds) -> list[dict]:
    """Each seed row's `evidence` field with the row's id, one row per seed pair."""
    return [{"id": r["id"], **r["evidence"]} for r in seeds if "evidence" in r]


def test_enough_pages_with_slug_names(pages):
    assert len(pages) >= MIN_PAGES, f"only {len(pages)} pages"
    bad = [name for name in pages if not SLUG.match(name.split("/")[1])]
    assert not bad, f"page names must be lowercase slugs: {bad}"


def test_pages_have_one_title_and_sections(pages):
    problems = []
    for name, text in pages.items():
        levels = [lv for _, lv, _ in headings(text.split("\n"))]
        if levels.count(1) != 1:
            problems.append(f"{name}: {levels.count(1)} '# ' titles")
        if levels.count(2) < 2:
            problems.append(f"{name}: only {levels.count(2)} '## ' sections")
    assert not problems, "\n".join(problems)


def test_every_seed_pair_has_exactly_one_evidence_row(seeds, evidence):
    seed_ids = [r["id"] for r in seeds]
    ev_ids = [r["id"] for r in evidence]
    unknown = sorted(set(ev_ids) - set(seed_ids))
    missing = sorted(set(seed_ids) - set(ev_ids))
    dupes = sorted({i for i in ev_ids if ev_ids.count(i) > 1})
    assert not unknown, f"evidence rows for unknown ids: {unknown}"
    assert not missing, f"seed ids without evidence: {missing}"
    assert not dupes, f"seed ids with several evidence rows: {dupes}"


def test_evidence_supports_answers(seeds, evidence, pages):
    answers = {r["id"]: r["answer"] for r in seeds}
    problems = [
        p
        for row in evidence
        if row["id"] in answers
        for p in check_row(row, answers[row["id"]], pages)
    ]
    assert not problems, "\n".join(problems)


def test_checker_rejects_broken_rows(seeds, evidence, pages):
    """The checks above can fail: corrupt a sound row in each way and expect a problem."""
    answers = {r["id"]: r["answer"] for r in seeds}
    row = evidence[0]
    answer = answers[row["id"]]
    assert check_row(row, answer, pages) == []
    assert check_row({**row, "section": row["section"] + " (typo)"}, answer, pages)
    assert check_row({**row, "document": "nowhere/missing.md"}, answer, pages)
    assert check_row({**row, "quote": row["quote"] + " NOT IN THE TEXT"}, answer, pages)
    # a quote that exists in the page but only in another (disjoint) section is rejected
    secs = sections(pages[row["document"]])
    own = secs[row["section"]]
    other = next(t for h, t in secs.items() if own not in t and t not in own)
    foreign = next(line for line in other.split("\n")[1:] if len(line) > 40 and line not in own)
    assert check_row({**row, "quote": foreign}, answer, pages)
    # a section unrelated to the answer fails the word-coverage check
    unrelated = {
        "id": row["id"],
        "document": "software_engineering/delivery-and-maintenance.md",
        "section": "Semantic Versioning",
        "quote": "MAJOR.MINOR.PATCH",
    }
    assert check_row(unrelated, answer, pages)


def test_sections_are_parsed_to_the_next_heading_of_same_or_higher_level():
    text = "# T\nintro\n## A\na text\n### A1\nsub\n## B\nb text\n```\n# not a heading\n```\n"
    secs = sections(text)
    assert set(secs) == {"T", "A", "A1", "B"}
    assert "sub" in secs["A"] and "b text" not in secs["A"]
    assert secs["A1"] == "### A1\nsub"
    assert "# not a heading" in secs["B"]
