"""Findings, severities and check metadata: the vocabulary of automatic analysis.

Why its own module: reports (table, JSON, JUnit) and the CLI's ``--fail-on`` /
``--suppress`` need the Finding shape and the list of checks without running
or importing any rule. A check is a plain function of the whole TrenchState
wrapped with its metadata (code, severity, title, roles); the wrapper fills
code, severity, pod and role into every finding, so a rule cannot report a
code with the wrong severity (findings-catalog.md is the contract).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from meridio_debug.controller.model import PodResult, Role, TrenchState

__all__ = [
    "Check",
    "CheckRun",
    "Finding",
    "Issue",
    "Scope",
    "Severity",
]


class Severity(enum.IntEnum):
    """info < warning < error; compare with ``<`` / ``>=`` (e.g. ``--fail-on warning``)."""

    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    def __str__(self) -> str:
        return self.label

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            choices = ", ".join(s.label for s in cls)
            raise ValueError(f"unknown severity {text!r} (choose {choices})") from None


@dataclass(frozen=True, slots=True)
class Finding:
    """One coded observation about one pod (``pods`` names every pod involved)."""

    code: str
    severity: Severity
    pod: str
    role: Role
    summary: str
    # JSON-able (str, int, bool, lists/dicts of those); excluded from the hash.
    evidence: Mapping[str, object] = field(default_factory=dict, hash=False)
    hint: str = ""
    pods: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """The output contract's shape (findings-catalog.md, "Output contract")."""
        return {
            "code": self.code,
            "severity": self.severity.label,
            "pod": self.pod,
            "role": self.role,
            "summary": self.summary,
            "evidence": dict(self.evidence),
            "hint": self.hint,
            "pods": list(self.pods or (self.pod,)),
        }


@dataclass(frozen=True, slots=True)
class Issue:
    """What a rule reports; the Check turns it into a Finding with its code and severity.

    ``pod`` is needed only for trench-scope checks (per-pod checks know their pod).
    """

    summary: str
    evidence: Mapping[str, object] = field(default_factory=dict, hash=False)
    hint: str = ""
    pod: str = ""
    pods: tuple[str, ...] = ()


Scope = Literal["pod", "trench"]


@dataclass(frozen=True, slots=True)
class CheckRun:
    """That a check ran for a pod (one JUnit testcase), or why it was skipped."""

    code: str
    pod: str
    skipped: str = ""  # reason, "" when it ran


@dataclass(frozen=True, slots=True)
class Check:
    """A registered rule: metadata plus ``run(state) -> issues``.

    Calling a Check with a TrenchState returns its Findings, so every rule is
    usable on its own: ``check_bgp(state) -> list[Finding]``.
    """

    code: str
    severity: Severity
    title: str
    roles: tuple[Role, ...]  # pods this check is about; () means every pod
    scope: Scope
    run: Callable[[TrenchState], Iterable[Issue | Finding]] = field(compare=False, repr=False)
    # Sections a pod must have read (OK) for a per-pod check to mean anything.
    needs: tuple[str, ...] = ()
    unreachable_too: bool = False  # MDB002: runs for pods without a snapshot

    def applies_to(self, result: PodResult) -> bool:
        if result.snapshot is None and not self.unreachable_too:
            return False
        return not self.roles or result.effective_role in self.roles

    def skip_reason(self, result: PodResult) -> str:
        """Why this check cannot judge the pod ("" when it can)."""
        snap = result.snapshot
        if snap is None:
            return "" if self.unreachable_too else f"pod unreachable: {result.error}"
        for name in self.needs:
            status = snap.section(name)
            if status is None:
                return f"section {name} not collected"
            if status.state != "OK":
                return f"section {name} {status.state}: {status.message}".rstrip(": ")
        return ""

    def __call__(self, state: TrenchState) -> list[Finding]:
        roles = {result.pod: result.effective_role for result in state.pods}
        findings: list[Finding] = []
        for item in self.run(state):
            if isinstance(item, Finding):
                findings.append(item)
                continue
            findings.append(
                Finding(
                    code=self.code,
                    severity=self.severity,
                    pod=item.pod,
                    role=roles.get(item.pod, "unknown"),
                    summary=item.summary,
                    evidence=item.evidence,
                    hint=item.hint,
                    pods=item.pods or (item.pod,),
                )
            )
        return findings
