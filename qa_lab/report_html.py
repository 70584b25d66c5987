"""report.html: the sweep report as one self-contained page (tables as HTML, figures inline).

Opens from the MLflow artifact view without any other file; built from the report's
markdown, so the page and report.md never disagree.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from typing import Any


def png_base64(fig: Any) -> str:
    """A figure as base64 PNG, for the self-contained report.html."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return base64.b64encode(buf.getvalue()).decode()


def page(md: str, figures: Mapping[str, Any]) -> str:
    """A self-contained HTML page: the markdown's headings, tables and text, figures inline."""
    import html as html_lib

    images = "".join(
        f'<h3>{name}</h3><img src="data:image/png;base64,{png_base64(fig)}"/>'
        for name, fig in figures.items()
    )
    body, table = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cells = [html_lib.escape(c.strip()) for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html_lib.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html_lib.escape(line).replace('**', '')}</p>")
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>qa-lab report</title>"
        f"<style>{style}</style></head><body>{''.join(body)}<h2>Figures</h2>{images}</body></html>"
    )
