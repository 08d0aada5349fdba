"""Rendering for :mod:`relevance.evaluation.report`: cells, markdown tables, and one section list
rendered as Markdown and as self-contained HTML, so the two outputs cannot disagree."""

from __future__ import annotations

import base64
import html
from typing import Any

SIGNIFICANT = "✱ significant"
UNDEFINED = "n/a (one class)"
DEGENERATE = "⚠ degenerate"  # appended to the AUC of a market whose predictions carry no signal
CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}.sig{color:#b00;font-weight:600}
.warn{color:#b00;font-weight:700}img{max-width:100%}td.prose{text-align:left;max-width:40em}"""

Table = tuple[list[str], list[list[str]]]
Section = tuple[str, Any]  # ("h", "## text") | ("p", text) | ("table", Table) | ("img", file name)


def fmt_interval(point: float | None, lo: float | None, hi: float | None, signed: bool = False) -> str:
    """``0.812 [0.790, 0.833]`` (``+0.012 […]`` when signed); :data:`UNDEFINED` without a point."""
    if point is None:
        return UNDEFINED
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(point)} [{f.format(lo)}, {f.format(hi)}]"


def md_table(table: Table) -> str:
    header, rows = table
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_md(sections: list[Section]) -> str:
    out = []
    for kind, payload in sections:
        if kind in ("h", "p"):
            out.append(f"{payload}\n")
        elif kind == "table":
            out.append(md_table(payload) + "\n")
        elif kind == "img":
            out.append(f"![ROC-AUC by market]({payload})\n")
    return "\n".join(out)


def render_html(sections: list[Section], png: bytes) -> str:
    """The same sections as HTML with inline CSS and the chart as base64: no network needed."""
    body = []
    for kind, payload in sections:
        if kind == "h":
            level = len(payload) - len(payload.lstrip("#"))
            text = html.escape(payload.lstrip("# ").replace("`", ""))
            body.append(f"<h{level}>{text}</h{level}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(payload).replace('`', '')}</p>")
        elif kind == "table":
            header, rows = payload
            head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
            trs = "".join("<tr>" + "".join(_html_cell(c) for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            b64 = base64.b64encode(png).decode("ascii")
            body.append(f'<img alt="ROC-AUC by market" src="data:image/png;base64,{b64}">')
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Per-market AUC report</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _html_cell(text: str) -> str:
    bold = text.startswith("**") and text.endswith("**")
    inner = html.escape(text.strip("*") if bold else text)
    inner = inner.replace(SIGNIFICANT, f'<span class="sig">{SIGNIFICANT}</span>')
    inner = inner.replace(DEGENERATE, f'<span class="warn">{DEGENERATE}</span>')
    prose = ' class="prose"' if len(text) > 60 else ""  # sentences (the "why" column) read left-aligned
    return f"<td{prose}><b>{inner}</b></td>" if bold else f"<td{prose}>{inner}</td>"
