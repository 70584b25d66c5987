"""report.html: the sweep report's blocks as one self-contained page.

Figures are embedded as base64 PNGs and the stylesheet is inline, so the page renders the same
from disk, from MLflow's artifact viewer or as a mail attachment. Every text is HTML-escaped:
an answer that echoes the prompt's `</passage 6>` shows it as text inside that answer's card.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qa_lab.report_blocks import (
    AnswerCards,
    Beside,
    Block,
    Bullets,
    Figure,
    Fold,
    Heading,
    Table,
    Text,
)

# Readable widths (a 1100 px column, 75-character paragraphs), right-aligned numbers, table
# headers that stay visible while a long table scrolls inside its frame, wide tables scrolling
# in their frame rather than the page, answer cards that keep their line breaks.
STYLE = """
:root{--fg:#1f2328;--muted:#57606a;--line:#d0d7de;--bg2:#f6f8fa;--mark:#fff8c5;--accent:#0969da}
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);
 max-width:1100px;margin:0 auto;padding:24px 20px}
h1{font-size:26px;margin:0 0 8px}
h2{font-size:20px;margin:36px 0 8px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}
p,ul{max-width:80ch}
code{background:var(--bg2);padding:0 4px;border-radius:4px;font-size:90%}
h2#verdict+ul,h2#summary+ul{background:var(--bg2);border-left:4px solid var(--accent);
 max-width:none;padding:10px 16px 10px 32px;margin:0}
.frame{overflow:auto;max-height:75vh;margin:8px 0 16px;max-width:100%}
table{border-collapse:separate;border-spacing:0;font-size:13px}
th,td{border-bottom:1px solid var(--line);border-right:1px solid var(--line);padding:4px 8px;
 vertical-align:top}
th:first-child,td:first-child{border-left:1px solid var(--line)}
th{position:sticky;top:0;z-index:1;background:var(--bg2);text-align:left;white-space:nowrap;
 border-top:1px solid var(--line)}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.sig td{background:var(--mark)}
figure{margin:8px 0}
figure img{max-width:100%;height:auto;display:block}
figcaption{color:var(--muted);font-size:13px}
details{border:1px solid var(--line);border-radius:6px;padding:4px 12px;margin:8px 0}
summary{cursor:pointer;font-weight:600;padding:2px 0}
.beside{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.beside>*{flex:1 1 440px;min-width:0}
.item{border:1px solid var(--line);border-radius:8px;padding:4px 14px 14px;margin:16px 0}
.keep{white-space:pre-wrap;overflow-wrap:anywhere}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:10px}
.card{border:1px solid var(--line);border-radius:6px;padding:8px;min-width:0}
.card pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:6px 0 0;
 font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,monospace}
.score{color:var(--muted);font-size:12px}
.flag{display:inline-block;background:#ffebe9;color:#82071e;border-radius:10px;
 padding:0 7px;font-size:12px;margin:2px 2px 0 0}
"""
# A cell that reads as a number (a mean, a CI, a count, a p-value): right-aligned.
_NUMERIC = re.compile(r"^[+\-−]?\.?\d")


def png_base64(fig: Any) -> str:
    """A figure as base64 PNG, for the self-contained report.html."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode()


def page(blocks: Sequence[Block], figures: Mapping[str, Any]) -> str:
    """The self-contained HTML page of the report's blocks, figures inline."""
    images = {name: png_base64(fig) for name, fig in figures.items()}
    body = "\n".join(_html(b, images) for b in blocks)
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>qa-lab report</title><style>{STYLE}</style></head><body>\n{body}\n</body></html>"
    )


def inline(text: str) -> str:
    """Escaped text with `**bold**` and `` `code` `` turned into tags."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _html(block: Block, images: Mapping[str, str]) -> str:
    if isinstance(block, Heading):
        level = block.level
        return f"<h{level} id='{_slug(block.text)}'>{inline(block.text)}</h{level}>"
    if isinstance(block, Text):
        return f"<p>{inline(block.text)}</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{inline(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Table):
        return _table(block)
    if isinstance(block, Figure):
        return _figure(block, images)
    if isinstance(block, Fold):
        inner = "\n".join(_html(b, images) for b in block.blocks)
        opened = " open" if block.open else ""
        return f"<details{opened}><summary>{inline(block.title)}</summary>{inner}</details>"
    if isinstance(block, Beside):
        return (
            "<div class='beside'>"
            + "".join(f"<div>{_html(b, images)}</div>" for b in block.blocks)
            + "</div>"
        )
    return _cards(block)


def _table(t: Table) -> str:
    head = "".join(f"<th>{inline(h)}</th>" for h in t.header)
    rows = []
    for i, row in enumerate(t.rows):
        cells = "".join(
            f"<td class='num'>{inline(c)}</td>" if _NUMERIC.match(c) else f"<td>{inline(c)}</td>"
            for c in row
        )
        rows.append(f"<tr class='sig'>{cells}</tr>" if i in t.marked else f"<tr>{cells}</tr>")
    return (
        f"<div class='frame'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _figure(fig: Figure, images: Mapping[str, str]) -> str:
    if fig.name not in images:
        return ""
    caption = html.escape(fig.caption)
    return (
        f"<figure><img alt='{caption}' src='data:image/png;base64,{images[fig.name]}'/>"
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _cards(item: AnswerCards) -> str:
    """An item's question and reference, then one card per config (line breaks kept)."""
    cards = []
    for a in item.answers:
        flags = "".join(f"<span class='flag'>{html.escape(f)}</span>" for f in a.flags)
        cards.append(
            f"<div class='card'><div><strong>{html.escape(a.label)}</strong> "
            f"<span class='score'>{html.escape(a.score)}</span></div>{flags}"
            f"<pre>{html.escape(a.text)}</pre></div>"
        )
    return (
        f"<section class='item' id='item-{_slug(item.item_id)}'>"
        f"<h3>{html.escape(item.item_id)}</h3>"
        f"<p class='keep'><strong>Q:</strong> {html.escape(item.question)}</p>"
        f"<p class='keep'><strong>Reference:</strong> {html.escape(item.reference)}</p>"
        f"<div class='cards'>{''.join(cards)}</div></section>"
    )
