"""Reports: one analysis result, rendered for people (table, html) and for pipelines (json, junit).

Why a package of pure renderers: the same ``AnalysisResult`` goes to stdout
(``-o``) and to a second file (``--report FILE``, format by extension), from a
live run or a bundle, and must look the same either way. So every renderer is
a function of a ``Report`` (plain data: result, trench state, thresholds,
times passed in) returning text -- no clock, no I/O, no terminal probing; the
CLI decides colour and where the text goes.

    report = Report(result=..., state=..., fail_on=Severity.ERROR, source="lab mdl-",
                    created="2026-11-20T23:30:00", hostname="ci-7")
    text = render("junit", report)
    render_format_for_path("out/report.html")  # -> "html"

Formats: ``table`` (people, optional ANSI colour), ``json`` (the catalog's
output contract plus ``checks_run``), ``junit`` (one testsuite per pod, one
testcase per check that ran; validates against the Ant/Jenkins JUnit XSD),
``html`` (one self-contained page: the trench as a picture plus the findings).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Final

from meridio_debug.controller.report import htmlpage, jsondoc, junit, table
from meridio_debug.controller.report._model import Report, check_runs, failing

FORMATS: Final = ("table", "json", "junit", "html")

_EXTENSIONS: Final = {
    ".json": "json",
    ".xml": "junit",
    ".html": "html",
    ".htm": "html",
    ".txt": "table",
}

__all__ = ["FORMATS", "Report", "check_runs", "failing", "format_for_path", "render"]


def format_for_path(path: str) -> str | None:
    """The report format a file name asks for (.json, .xml, .html, .txt), None if unknown."""
    return _EXTENSIONS.get(PurePath(path).suffix.lower())


def render(fmt: str, report: Report, *, color: bool = False) -> str:
    """``report`` as ``fmt`` text (ValueError for an unknown format)."""
    if fmt == "table":
        return table.render(report, color=color)
    if fmt == "json":
        return jsondoc.render(report)
    if fmt == "junit":
        return junit.render(report)
    if fmt == "html":
        return htmlpage.render(report)
    raise ValueError(f"unknown report format {fmt!r} (choose {', '.join(FORMATS)})")
