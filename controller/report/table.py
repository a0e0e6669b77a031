"""``-o table``: findings for a person at a terminal, grouped by pod.

Why this layout: the first question is "which pod is broken?", the second
"why, and what do I do?". So every pod gets one header line with its verdict
(healthy pods stay one line), each error/warning shows code, severity,
summary, its evidence and the hint, and info findings stay one line each.
Colour is a parameter: the CLI turns it on only for a TTY (and not with
NO_COLOR), so pipes and files never get escape codes.
"""

from __future__ import annotations

from meridio_debug.controller.analysis import Finding, Severity
from meridio_debug.controller.report._model import (
    Report,
    by_pod,
    evidence_lines,
    plural,
    summary_text,
)

_COLORS = {
    Severity.ERROR: "\x1b[1;31m",
    Severity.WARNING: "\x1b[33m",
    Severity.INFO: "\x1b[2m",
}
_GREEN = "\x1b[32m"
_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"
_INDENT = " " * 18


def _paint(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color else text


def _finding_lines(f: Finding, color: bool) -> list[str]:
    sev = _paint(f"{f.severity.label.upper():<8}", _COLORS[f.severity], color)
    head = f"  {sev}{f.code:<8}{f.summary}"
    if f.severity < Severity.WARNING:
        return [head]
    lines = [head]
    lines += [f"{_INDENT}{line}" for line in evidence_lines(dict(f.evidence))]
    others = [p for p in f.pods if p != f.pod]
    if others:
        lines.append(f"{_INDENT}also involves: {', '.join(others)}")
    if f.hint:
        lines.append(f"{_INDENT}{_paint('hint:', _BOLD, color)} {f.hint}")
    return lines


def render(report: Report, *, color: bool = False) -> str:
    result = report.result
    grouped = by_pod(result.findings)
    runs_per_pod: dict[str, int] = {}
    for run in result.runs:
        runs_per_pod[run.pod] = runs_per_pod.get(run.pod, 0) + 1
    lines: list[str] = []
    pods = report.pod_names()
    header = f"analysis of {report.source or 'the trench'}: {plural(len(pods), 'pod')}, "
    header += f"{plural(len(result.runs), 'check')} run"
    lines.append(_paint(header, _BOLD, color))
    width = max((len(p) for p in pods), default=4) + 2
    for pod in pods:
        findings = grouped.get(pod, [])
        worst = max((f.severity for f in findings), default=None)
        role = report.role_of(pod)
        counts = [
            plural(sum(1 for f in findings if f.severity == sev), sev.label)
            for sev in (Severity.ERROR, Severity.WARNING)
            if any(f.severity == sev for f in findings)
        ]
        result_of_pod = report.state.pod(pod)
        if result_of_pod is not None and not result_of_pod.reachable:
            verdict = _paint(f"UNREACHABLE ({result_of_pod.error})", _COLORS[Severity.ERROR], color)
        elif worst is None or worst < Severity.WARNING:
            verdict = _paint("ok", _GREEN, color)
        else:
            verdict = _paint(", ".join(counts), _COLORS[worst], color)
        name = pod or "(trench)"
        lines.append("")
        lines.append(
            f"{_paint(name.ljust(width), _BOLD, color)}{role:<8} {verdict}"
            f"  ({plural(runs_per_pod.get(pod, 0), 'check')})"
        )
        for f in findings:
            lines.extend(_finding_lines(f, color))
    lines.append("")
    verdict = ""
    if report.fail_on is not None:
        verdict = (
            f" -> FAIL (findings at or above {report.fail_on.label})"
            if report.failed
            else f" -> pass (nothing at or above {report.fail_on.label})"
        )
    suppressed = (
        f", {plural(len(result.suppressed), 'finding')} suppressed" if result.suppressed else ""
    )
    lines.append(f"summary: {summary_text(result.summary())}{suppressed}{verdict}")
    return "\n".join(lines) + "\n"
