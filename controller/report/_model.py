"""The renderers' shared input and the few derived views every format needs.

Why here: "which checks ran for which pod, with which findings" and "which
findings fail the run" must mean the same thing in the table, the JSON
``checks_run``, the JUnit testcases and the HTML picture.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from meridio_debug.controller.analysis import (
    CHECKS,
    AnalysisResult,
    Finding,
    Severity,
    check_by_code,
)
from meridio_debug.controller.model import TrenchState


@dataclass(frozen=True)
class Report:
    """Everything a renderer may use. Times are passed in: rendering reads no clock."""

    result: AnalysisResult
    state: TrenchState
    fail_on: Severity | None = Severity.ERROR  # None: --fail-on never
    source: str = ""  # "lab mdl-", "netns a,b", "bundle x.tar.gz (...)"
    created: str = ""  # ISO 8601 of the evidence, "YYYY-MM-DDTHH:MM:SS" (UTC)
    hostname: str = "localhost"
    tool_version: str = ""

    def pod_names(self) -> list[str]:
        """Pods in trench order, then any pod only findings name (e.g. "" for trench-wide)."""
        names = [p.pod for p in self.state.pods]
        for f in self.result.findings:
            if f.pod not in names:
                names.append(f.pod)
        return names

    def role_of(self, pod: str) -> str:
        result = self.state.pod(pod)
        if result is not None:
            return result.effective_role
        for f in self.result.findings:
            if f.pod == pod:
                return f.role
        return "unknown"

    @property
    def failed(self) -> bool:
        """True when the run should exit 3 (findings at or above --fail-on)."""
        return bool(self.fail_on is not None and self.result.at_least(self.fail_on))


def failing(finding: Finding, fail_on: Severity | None) -> bool:
    """A JUnit failure: every error, plus warnings when --fail-on warning (or info)."""
    if finding.severity >= Severity.ERROR:
        return True
    return fail_on is not None and finding.severity >= fail_on


@dataclass(frozen=True)
class CheckOutcome:
    """One check for one pod: what ran, what it found."""

    code: str
    pod: str
    title: str
    skipped: str  # reason, "" when the check ran
    findings: tuple[Finding, ...]

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        return "findings" if self.findings else "ok"


def check_runs(result: AnalysisResult, state: TrenchState | None = None) -> list[CheckOutcome]:
    """Every (check, pod) that ran or was skipped, with its findings, in run order.

    A finding whose check did not register a run for its pod (a trench-wide
    finding, an internal analysis error) gets an outcome of its own, so no
    finding is ever missing from a per-check view. With ``state``, an
    unreachable pod also lists the checks of its role as skipped (analysis
    records only MDB002 for it), so a CI view shows what could not be judged.
    """
    by_key: dict[tuple[str, str], list[Finding]] = defaultdict(list)
    for f in result.findings:
        by_key[(f.code, f.pod)].append(f)
    out: list[CheckOutcome] = []
    seen: set[tuple[str, str]] = set()
    for run in result.runs:
        key = (run.code, run.pod)
        if key in seen:
            continue
        seen.add(key)
        out.append(
            CheckOutcome(
                run.code, run.pod, _title(run.code), run.skipped, tuple(by_key.get(key, ()))
            )
        )
    for pod in state.pods if state is not None else ():
        if pod.reachable:
            continue
        for check in CHECKS:
            key = (check.code, pod.pod)
            if key in seen or (check.roles and pod.effective_role not in check.roles):
                continue
            seen.add(key)
            reason = f"pod unreachable: {pod.error}" if pod.error else "pod unreachable"
            out.append(
                CheckOutcome(check.code, pod.pod, check.title, reason, tuple(by_key.get(key, ())))
            )
    for key, findings in by_key.items():
        if key not in seen:
            seen.add(key)
            out.append(CheckOutcome(key[0], key[1], _title(key[0]), "", tuple(findings)))
    return out


def _title(code: str) -> str:
    check = check_by_code(code)
    return check.title if check is not None else "analysis"


def evidence_lines(evidence: object) -> list[str]:
    """Evidence as ``key: value`` lines (lists joined by "; ") for people."""
    if not isinstance(evidence, dict):
        return [str(evidence)]
    lines = []
    for key, value in evidence.items():
        lines.append(f"{key}: {_value_text(value)}")
    return lines


def _value_text(value: object) -> str:
    if isinstance(value, list | tuple):
        return "; ".join(_value_text(v) for v in value) if value else "(none)"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value_text(v)}" for k, v in value.items()) or "(none)"
    if value is None or value == "":
        return "-"
    return str(value)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_text(counts: dict[str, int]) -> str:
    return ", ".join(
        plural(counts.get(k, 0), name)
        for k, name in (("error", "error"), ("warning", "warning"), ("info", "info"))
    ).replace("infos", "info")


def by_pod(findings: Sequence[Finding]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        out[f.pod].append(f)
    return out
