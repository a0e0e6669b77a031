"""``-o html``: one self-contained page a person would rather look at than read.

Why self-contained: the page is a CI artifact opened from a browser's file
list or a mail; inline CSS and SVG only, no scripts, no external assets.
"""

from __future__ import annotations

from html import escape

from meridio_debug.controller.report._model import Report, by_pod, evidence_lines, summary_text


def render(report: Report) -> str:
    grouped = by_pod(report.result.findings)
    rows: list[str] = []
    for pod in report.pod_names():
        for f in grouped.get(pod, []):
            ev = "<br>".join(escape(line) for line in evidence_lines(dict(f.evidence)))
            rows.append(
                f"<tr class='{f.severity.label}'><td>{escape(pod)}</td><td>{f.code}</td>"
                f"<td>{f.severity.label}</td><td>{escape(f.summary)}</td><td>{ev}</td>"
                f"<td>{escape(f.hint)}</td></tr>"
            )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>meridio-debug analysis</title>"
        "</head><body>"
        f"<h1>{escape(report.source)}</h1><p>{escape(summary_text(report.result.summary()))}</p>"
        f"<table>{''.join(rows)}</table></body></html>\n"
    )
