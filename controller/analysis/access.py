"""MDB0xx: what the agents could and could not see.

Why these come first: every other rule is only as good as its input. A pod
that could not be reached, or a section a collector could not read, must be
said out loud (partial failure is data) -- and the other rules skip that
missing data instead of reporting false problems from it.
"""

from __future__ import annotations

from collections.abc import Iterator

from meridio_debug.controller.analysis._base import pod_check
from meridio_debug.controller.analysis._view import PodView, TrenchView
from meridio_debug.controller.analysis.findings import Check, Issue, Severity
from meridio_debug.controller.model import TrenchState

_SECTION_HINTS = {
    "bird": "bird runs in the frontend container; the agent reaches its control socket "
    "through /proc/PID/root (needs SYS_PTRACE)",
    "nfqlb": "nfqlb runs in the stateless-lb container; the agent needs SYS_PTRACE to reach it",
    "nftables": "nft needs NET_ADMIN in the pod's network namespace",
}


_ABSENT_HINT = (
    "expected when the component does not run in this pod (a lab built with --marking "
    "nft-jhash marks with nftables instead of nfqlb); rules that need it were skipped"
)
_ABSENT_HINTS = {
    ("lb-fe", "bird"): "bird must run in the frontend container: if it does, the agent cannot "
    "see it (inject the agent targeting the frontend container to share its PID namespace); "
    "the BGP/BFD checks were skipped",
    ("lb-fe", "nfqlb"): "Meridio runs nfqlb in the stateless-lb container; when nftables "
    "queues the VIP traffic to it, its absence drops that traffic (MDB119); the marks are "
    "unknown and MDB113 was skipped",
}

# Components Meridio runs only in some roles: their absence elsewhere is the normal
# state, not worth a finding (bird and nfqlb belong to the LB/FE pod).
_ONLY_IN_ROLES = {"bird": frozenset({"lb-fe"}), "nfqlb": frozenset({"lb-fe"})}


@pod_check("MDB001", Severity.WARNING, "a collector could not read its section", roles=())
def check_section_errors(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Sections in ERROR: the collector failed (permission, missing tool, parse error)."""
    for status in pod.snap.sections:
        if status.state != "ERROR":
            continue
        yield Issue(
            summary=f"section {status.name} could not be read: {status.message or 'no reason'}",
            evidence={"section": status.name, "state": status.state, "message": status.message},
            hint=_SECTION_HINTS.get(
                status.name,
                "rules that need this section were skipped for this pod; re-run with the "
                "privileged profile (--profile privileged) or check the agent's GetInfo",
            ),
        )


def _unreachable(state: TrenchState) -> Iterator[Issue]:
    for result in state.pods:
        if result.snapshot is not None:
            continue
        yield Issue(
            pod=result.pod,
            summary=f"no snapshot: {result.error or 'agent not reachable'}",
            evidence={"pod": result.pod, "namespace": result.namespace, "error": result.error},
            hint="check the ephemeral agent container (kubectl describe pod: PSA 'forbidden', "
            "image pull, timeout) and RBAC for pods/ephemeralcontainers and pods/portforward; "
            "nothing about this pod was analysed",
        )


check_unreachable = Check(
    code="MDB002",
    severity=Severity.ERROR,
    title="pod not reachable",
    roles=(),
    scope="pod",
    run=_unreachable,
    unreachable_too=True,
)


@pod_check("MDB003", Severity.INFO, "optional component absent", roles=())
def check_absent_sections(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Sections ABSENT: the component is not there (nfqlb in the lab, bird outside FEs)."""
    for status in pod.snap.sections:
        if status.state != "ABSENT":
            continue
        roles = _ONLY_IN_ROLES.get(status.name)
        if roles is not None and pod.role not in roles and pod.role != "unknown":
            continue
        hint = _ABSENT_HINTS.get((pod.role, status.name), _ABSENT_HINT)
        yield Issue(
            summary=f"{status.name} absent: {status.message or 'not running here'}",
            evidence={"section": status.name, "state": status.state, "message": status.message},
            hint=hint,
        )


CHECKS: tuple[Check, ...] = (check_section_errors, check_unreachable, check_absent_sections)
