"""Automatic analysis: every pod's snapshot in, coded findings out.

Why a single registry: the CLI lists the checks (``analyze --list``), JUnit
reports one testcase per check and pod, ``--suppress`` works on codes, and
the catalog (shared/findings-catalog.md) is the contract -- so every check is
registered here, once, with its code and severity.

Everything below is pure: ``analyze(TrenchState) -> AnalysisResult`` does no
I/O, reads no clock, talks to no agent. Public entry points::

    from meridio_debug.controller.analysis import analyze, CHECKS, Finding, Severity

    result = analyze(TrenchState(pods=(PodResult(pod="lb-fe-a", role="lb-fe",
                                                 snapshot=snap), ...)),
                     suppress=["MDB003", "MDB116=lb-fe-*"])
    result.findings        # sorted by pod, code
    result.runs            # which check ran (or was skipped, and why) for which pod
    result.summary()       # {"error": n, "warning": n, "info": n}
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meridio_debug.controller.analysis import (
    access,
    config,
    flaps,
    health,
    lbfe,
    nfqlb,
    proxy,
    target,
    trench,
)
from meridio_debug.controller.analysis._view import release
from meridio_debug.controller.analysis.findings import (
    Check,
    CheckRun,
    Finding,
    Issue,
    Severity,
)
from meridio_debug.controller.model import TrenchState

__all__ = [
    "CHECKS",
    "INTERNAL_ERROR_CODE",
    "AnalysisResult",
    "Check",
    "CheckRun",
    "Finding",
    "Issue",
    "Severity",
    "analyze",
    "check_by_code",
]

CHECKS: tuple[Check, ...] = (
    access.CHECKS
    + lbfe.CHECKS
    + nfqlb.CHECKS
    + proxy.CHECKS
    + target.CHECKS
    + trench.CHECKS
    + config.CHECKS
    + health.CHECKS
    + flaps.CHECKS
)

# Not in the catalog's rule list: a rule that raised on unexpected data. Reported
# (never swallowed) so one odd snapshot cannot take the whole analysis down.
INTERNAL_ERROR_CODE = "MDB004"

_BY_CODE: Mapping[str, Check] = {check.code: check for check in CHECKS}


def check_by_code(code: str) -> Check | None:
    return _BY_CODE.get(code)


@dataclass(frozen=True, slots=True)
class AnalysisResult:
    findings: tuple[Finding, ...]
    runs: tuple[CheckRun, ...]
    suppressed: tuple[Finding, ...] = ()

    def summary(self) -> dict[str, int]:
        counts = {severity.label: 0 for severity in sorted(Severity, reverse=True)}
        for finding in self.findings:
            counts[finding.severity.label] += 1
        return counts

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def at_least(self, severity: Severity) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity >= severity)

    def for_pod(self, pod: str) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.pod == pod)


def _suppressed(finding: Finding, patterns: Sequence[tuple[str, str]]) -> bool:
    for code_glob, pod_glob in patterns:
        if fnmatch.fnmatchcase(finding.code, code_glob) and fnmatch.fnmatchcase(
            finding.pod, pod_glob
        ):
            return True
    return False


def _parse_suppress(suppress: Iterable[str]) -> list[tuple[str, str]]:
    """``CODE`` or ``CODE=POD`` (globs allowed: ``MDB1*``, ``MDB116=lb-fe-*``)."""
    out: list[tuple[str, str]] = []
    for item in suppress:
        code, _sep, pod = item.strip().partition("=")
        if code:
            out.append((code, pod or "*"))
    return out


def analyze(
    state: TrenchState,
    suppress: Iterable[str] = (),
    checks: Sequence[Check] = CHECKS,
) -> AnalysisResult:
    """Run every check over the trench; findings sorted by pod then code."""
    patterns = _parse_suppress(suppress)
    findings: list[Finding] = []
    runs: list[CheckRun] = []
    for check in checks:
        for result in state.pods:
            if check.applies_to(result):
                runs.append(CheckRun(check.code, result.pod, check.skip_reason(result)))
        try:
            findings.extend(check(state))
        except Exception as exc:  # a rule bug must not hide every other finding
            findings.append(
                Finding(
                    code=INTERNAL_ERROR_CODE,
                    severity=Severity.WARNING,
                    pod="",
                    role="unknown",
                    summary=f"check {check.code} failed: {type(exc).__name__}: {exc}",
                    evidence={"check": check.code, "error": f"{type(exc).__name__}: {exc}"},
                    hint="an analysis bug on unexpected data; please report it with the bundle "
                    "(analyze --from BUNDLE reproduces it)",
                )
            )
    release(state)
    kept = [f for f in findings if not _suppressed(f, patterns)]
    dropped = [f for f in findings if _suppressed(f, patterns)]
    order = {check.code: i for i, check in enumerate(checks)}

    def key(f: Finding) -> tuple[str, str, int, str]:
        return (f.pod, f.code, order.get(f.code, len(order)), f.summary)

    return AnalysisResult(
        findings=tuple(sorted(kept, key=key)),
        runs=tuple(runs),
        suppressed=tuple(sorted(dropped, key=key)),
    )
