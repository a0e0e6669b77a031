"""Pod objects (the API server's JSON) into the model's PodHealth: pure, no client calls.

Why apart from kubernetes.py: which pods count (the trench's Meridio pods, its
NSP/IPAM/NSE, NSM and Spire) and how a kubelet status reads (waiting vs
terminated, lastState, PodScheduled=False, deletionTimestamp) are decisions
worth testing on recorded pod objects without a cluster; kubernetes.py only
fetches them (and the logs) and calls these.

Agent containers that meridio-debug injected (ephemeral containers) are left
out: their state is the runtime's business, not the trench's health.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any, Final

from meridio_debug.controller.model import ContainerHealth, PodHealth, PodKind

# Kubernetes labels of NSM's and Spire's pods (deployments of networkservicemesh/deployments-k8s
# and spiffe's spire charts).
NSM_APPS: Final = frozenset(
    {
        "nsmgr",
        "forwarder-vpp",
        "forwarder-ovs",
        "forwarder-sriov",
        "registry-k8s",
        "registry",
        "nsmgr-proxy",
        "admission-webhook-k8s",
    }
)
SPIRE_APPS: Final = frozenset({"spire-server", "spire-agent", "spire-controller-manager"})
NSM_SELECTOR: Final = "app in (" + ",".join(sorted(NSM_APPS)) + ")"
SPIRE_SELECTOR: Final = "app in (" + ",".join(sorted(SPIRE_APPS)) + ")"

GROUPS: Final[Mapping[str, str]] = {
    "lb-fe": "LB/FE pods",
    "proxy": "proxy pods",
    "target": "target pods",
    "nsp": "NSP/IPAM/NSE pods",
    "ipam": "NSP/IPAM/NSE pods",
    "nse": "NSP/IPAM/NSE pods",
    "nsm": "NSM pods",
    "spire": "Spire pods",
}


def unix(ts: Any) -> float:
    """An RFC 3339 timestamp as unix seconds (0.0 when absent or malformed)."""
    if not isinstance(ts, str) or not ts:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _app(pod: Mapping[str, Any]) -> str:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return str(labels.get("app", ""))


def dependency_kind(pod: Mapping[str, Any], trench: str = "") -> PodKind | None:
    """nsp / ipam / nse for the trench's own pods, nsm / spire for the cluster's; else None."""
    app = _app(pod)
    name = str((pod.get("metadata") or {}).get("name", ""))
    key = app or name
    for kind, prefix in (("nsp", "nsp-"), ("ipam", "ipam-"), ("nse", "nse-vlan-")):
        if key.startswith(prefix):
            if trench and kind != "nse" and key != f"{prefix}{trench}":
                return None  # another trench's
            return kind  # type: ignore[return-value]
    if app in NSM_APPS:
        return "nsm"
    if app in SPIRE_APPS:
        return "spire"
    return None


def _container(status: Mapping[str, Any], init: bool) -> ContainerHealth:
    state = status.get("state") or {}
    last = (status.get("lastState") or {}).get("terminated") or {}
    kind = next((k for k in ("waiting", "terminated", "running") if k in state), "waiting")
    detail = state.get(kind) or {}
    exit_code = detail.get("exitCode") if kind == "terminated" else None
    return ContainerHealth(
        name=str(status.get("name", "")),
        ready=bool(status.get("ready", False)),
        state=kind,
        reason=str(detail.get("reason", "")),
        message=str(detail.get("message", ""))[:500],
        exit_code=int(exit_code) if exit_code is not None else None,
        restart_count=int(status.get("restartCount", 0) or 0),
        last_reason=str(last.get("reason", "")),
        last_exit_code=int(last["exitCode"]) if last.get("exitCode") is not None else None,
        last_finished_unix=unix(last.get("finishedAt")),
        init=init,
    )


def pod_health(pod: Mapping[str, Any], kind: PodKind) -> PodHealth:
    """One pod object as PodHealth (containers and init containers, not ephemeral ones)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    unschedulable = ""
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            unschedulable = f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    containers: list[ContainerHealth] = []
    init_statuses = status.get("initContainerStatuses") or ()
    phase = str(status.get("phase", "Unknown"))
    for st in init_statuses:
        c = _container(st, init=True)
        # a finished init container (Completed, exit 0) is what it should be
        if c.state == "terminated" and c.exit_code == 0:
            continue
        if phase == "Running" and c.restart_count == 0:
            continue
        containers.append(c)
    containers += [_container(st, init=False) for st in status.get("containerStatuses") or ()]
    if not status.get("containerStatuses"):  # not started yet: containers from the spec
        spec_containers = (pod.get("spec") or {}).get("containers") or ()
        containers += [
            ContainerHealth(name=str(c.get("name", "")), ready=False, state="waiting")
            for c in spec_containers
        ]
    return PodHealth(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")),
        kind=kind,
        phase=phase,
        node=str((pod.get("spec") or {}).get("nodeName", "")),
        reason=str(status.get("reason", "")),
        message=str(status.get("message", ""))[:500],
        unschedulable=unschedulable,
        deleting_since_unix=unix(meta.get("deletionTimestamp")),
        containers=tuple(containers),
    )


def select(
    items: Iterable[Mapping[str, Any]], roles: Mapping[str, str], trench: str = ""
) -> list[tuple[Mapping[str, Any], PodKind]]:
    """The pods that matter: the discovered Meridio pods (``roles``: name -> role) and deps."""
    out: list[tuple[Mapping[str, Any], PodKind]] = []
    for pod in items:
        name = str((pod.get("metadata") or {}).get("name", ""))
        role = roles.get(name)
        if role in ("lb-fe", "proxy", "target"):
            out.append((pod, role))  # type: ignore[arg-type]
            continue
        kind = dependency_kind(pod, trench)
        if kind is not None:
            out.append((pod, kind))
    return out


def bounded_lines(text: str, lines: int, max_bytes: int) -> tuple[str, ...]:
    """The last ``lines`` lines of ``text`` within ``max_bytes`` (each line cut at 1000 chars)."""
    if lines <= 0 or max_bytes <= 0:
        return ()
    kept: list[str] = []
    used = 0
    for full in reversed(text.splitlines()[-lines:]):
        line = full[:1000]
        used += len(line.encode()) + 1
        if used > max_bytes:
            break
        kept.append(line)
    return tuple(reversed(kept))
