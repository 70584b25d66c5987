"""Corpus ingestion: reading, chunking and embedding throughput, side by side in one run.

    .venv/bin/python bench/corpus.py [--copies 4] [--size 128] [--overlap 16]

Reads the shipped documentation corpus (data/corpus, 56 markdown pages) `copies` times over
(copies are written to a temp folder under new names, so reading and chunking scale), chunks it
with both strategies and embeds the chunks with MiniLM, printing pages/s, chunks/s and
embedder tokens/s per step. The embedding cache is not used: every chunk is embedded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, versions  # noqa: E402
from qa_lab.config import PROJECT_ROOT  # noqa: E402

CORPUS = PROJECT_ROOT / "data" / "corpus"


def copy_corpus(copies: int, into: Path) -> Path:
    """`copies` copies of the shipped pages, each under its own folder."""
    for n in range(copies):
        for page in CORPUS.glob("*/*.md"):
            target = into / f"copy{n}" / page.parent.name / page.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(page, target)
    return into


def timed(label: str, fn, count: int, unit: str):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(f"| {label} | {count:,} {unit} | {seconds:.2f} | {count / seconds:,.0f} {unit}/s |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=16)
    args = parser.parse_args()

    from qa_lab import chunking, readers
    from qa_lab.retrieval import embed, embedder_tokenizer

    print(machine())
    print(versions("markdown-it-py", "sentence-transformers", "torch"))
    tokenizer = embedder_tokenizer("all-MiniLM-L6-v2")
    embed(["warm-up"], "all-MiniLM-L6-v2")  # model load is reported apart from throughput
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_corpus(args.copies, Path(tmp))
        pages = len(list(folder.rglob("*.md")))
        print("\n| step | work | seconds | rate |\n|---|---|---|---|")
        read = timed(
            "read (markdown-it headings)", lambda: readers.read_corpus(folder), pages, "pages"
        )
        chunks = {}
        for strategy in chunking.STRATEGIES:
            chunks[strategy] = timed(
                f"chunk: {strategy}, {args.size} tokens, overlap {args.overlap}",
                lambda s=strategy: chunking.chunk_documents(
                    read.documents,
                    strategy=s,
                    size=args.size,
                    overlap=args.overlap,
                    tokenizer=tokenizer,
                ),
                pages,
                "pages",
            )
        sections = chunks["sections"]
        tokens = sum(c.tokens for c in sections)
        timed(
            f"embed sections chunks (MiniLM, {tokens:,} tokens)",
            lambda: embed([c.text for c in sections], "all-MiniLM-L6-v2", batch_size=64),
            len(sections),
            "chunks",
        )
        print(
            f"\n{len(sections):,} sections chunks, {tokens:,} tokens "
            f"({tokens / len(sections):.0f} per chunk)"
        )


if __name__ == "__main__":
    main()
