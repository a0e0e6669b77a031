"""Pod and container health (MDB5xx): what Kubernetes says about the trench's pods.

Why first: Meridio's troubleshooting guide starts here -- "All PODs must be
Running and all containers ready, like 3/3 for the load-balancer. And
preferably no restarts" -- and an LB/FE that is not ready usually means its
frontend has no gateway (MDB101/MDB102). The data plane checks see a crash
looping container only indirectly, if at all; these see it directly, with the
container, the reason, the exit code, when, and the last log lines as evidence.

Input is ``TrenchState.kube`` (runtime/k8s_health.py builds it from pod
objects); its ``read_unix`` is "now", so the rules read no clock. Pods here
include the trench's NSP, IPAM and NSE pods and, where RBAC allowed, NSM and
Spire pods cluster-wide; what could not be read is MDB542 (with the verb).
"""

from __future__ import annotations

from collections.abc import Iterator

from meridio_debug.controller.analysis._base import trench_check
from meridio_debug.controller.analysis._view import TrenchView
from meridio_debug.controller.analysis.findings import Issue, Severity
from meridio_debug.controller.model import ContainerHealth, KubeState, PodHealth

# A pod whose deletion timestamp is this far in the past is stuck (finalizer, dead node).
TERMINATING_TOO_LONG_S = 60.0
LOG_LINES_IN_EVIDENCE = 12

_CRASH_REASONS = frozenset({"CrashLoopBackOff", "OOMKilled"})
_PULL_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
)
_CONFIG_REASONS = frozenset(
    {"CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreStartHookError"}
)
_FRONTEND = frozenset({"frontend", "fe"})


def _kube(trench: TrenchView) -> KubeState | None:
    return trench.state.kube


def _where(pod: PodHealth) -> dict[str, object]:
    return {"pod": pod.name, "namespace": pod.namespace, "kind": pod.kind, "node": pod.node}


def _ago(kube: KubeState, unix: float) -> str:
    if not unix:
        return "at an unknown time"
    seconds = max(0, int(kube.read_unix - unix))
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def _log_evidence(c: ContainerHealth, previous: bool) -> dict[str, object]:
    out: dict[str, object] = {}
    if previous and c.previous_log:
        out["previous_log"] = list(c.previous_log[-LOG_LINES_IN_EVIDENCE:])
    if c.log:
        out["log"] = list(c.log[-LOG_LINES_IN_EVIDENCE:])
    return out


def _container(c: ContainerHealth) -> dict[str, object]:
    out: dict[str, object] = {
        "container": c.name,
        "ready": c.ready,
        "state": c.state,
        "restarts": c.restart_count,
    }
    if c.reason:
        out["reason"] = c.reason
    if c.message:
        out["message"] = c.message
    if c.exit_code is not None:
        out["exit_code"] = c.exit_code
    if c.last_reason:
        out["last_reason"] = c.last_reason
    if c.last_exit_code is not None:
        out["last_exit_code"] = c.last_exit_code
    if c.init:
        out["init"] = True
    return out


def _pods(trench: TrenchView) -> Iterator[tuple[KubeState, PodHealth]]:
    kube = _kube(trench)
    if kube is None:
        return
    for pod in kube.pods:
        yield kube, pod


# --------------------------------------------------------------------------- pods


@trench_check("MDB501", Severity.ERROR, "pod not Running", roles=())
def check_pod_phase(trench: TrenchView) -> Iterator[Issue]:
    """A pod in phase Failed, Unknown or Succeeded (Meridio pods run forever)."""
    for _kube_state, pod in _pods(trench):
        if pod.phase in ("Running", "Pending"):
            continue
        reason = f" ({pod.reason}: {pod.message})" if pod.reason else ""
        yield Issue(
            pod=pod.name,
            summary=f"{pod.kind} pod {pod.name} is {pod.phase}{reason}",
            evidence={
                **_where(pod),
                "phase": pod.phase,
                "reason": pod.reason,
                "message": pod.message,
            },
            hint="kubectl describe pod: Evicted means node pressure, Unknown a lost node; the "
            "owning Deployment/DaemonSet should replace it",
        )


@trench_check("MDB502", Severity.ERROR, "pod Pending", roles=())
def check_pending(trench: TrenchView) -> Iterator[Issue]:
    """A Pending pod, with the scheduler's reason or the containers' waiting reasons."""
    for _kube_state, pod in _pods(trench):
        if pod.phase != "Pending":
            continue
        waiting = {c.name: c.reason for c in pod.containers if c.state == "waiting" and c.reason}
        if pod.unschedulable:
            why = f"not scheduled: {pod.unschedulable}"
        elif waiting:
            why = "containers waiting: " + ", ".join(f"{k} {v}" for k, v in waiting.items())
        else:
            why = "no reason reported yet"
        yield Issue(
            pod=pod.name,
            summary=f"{pod.kind} pod {pod.name} is Pending ({why})",
            evidence={**_where(pod), "unschedulable": pod.unschedulable, "waiting": waiting},
            hint="unschedulable: check node resources, the LB/FE anti-affinity (at most one per "
            "node) and taints; waiting: see the container findings (MDB53x)",
        )


@trench_check("MDB503", Severity.WARNING, "pod terminating for too long", roles=())
def check_terminating(trench: TrenchView) -> Iterator[Issue]:
    """A pod whose deletion was requested more than a minute ago and that is still there."""
    for kube, pod in _pods(trench):
        if not pod.deleting_since_unix:
            continue
        stuck = kube.read_unix - pod.deleting_since_unix
        if stuck < TERMINATING_TOO_LONG_S:
            continue
        yield Issue(
            pod=pod.name,
            summary=f"{pod.kind} pod {pod.name} has been terminating for {int(stuck)} s",
            evidence={**_where(pod), "terminating_s": int(stuck)},
            hint="a finalizer or an unreachable node keeps it: check the node's kubelet; the "
            "replacement may not start until it is gone (LB/FE anti-affinity)",
        )


# --------------------------------------------------------------------------- containers


def _fe_without_gateway(trench: TrenchView, pod: str) -> list[str]:
    """The FE's gateway trouble seen in its snapshot (what MDB101/MDB102 report)."""
    view = trench.by_name.get(pod)
    if view is None or not view.ok("bird"):
        return []
    out = [
        f"{p.name} {p.state} {p.info}".strip()
        for p in view.snap.bird_protocols
        if p.is_bgp and p.name.startswith("NBR-") and not p.is_established
    ]
    out += [f"BFD {s.address} {s.state}" for s in view.snap.bfd_sessions if not s.is_up]
    return out


@trench_check("MDB511", Severity.ERROR, "container not ready", roles=())
def check_not_ready(trench: TrenchView) -> Iterator[Issue]:
    """A running container that is not ready (waiting ones: MDB522/MDB53x).

    For an LB/FE whose frontend is not ready, the usual cause is that the FE has no
    gateway: the finding names the gateway protocols that are down (MDB101/MDB102).
    """
    for kube, pod in _pods(trench):
        if pod.phase != "Running" or pod.deleting_since_unix:
            continue
        ready = sum(1 for c in pod.containers if c.ready and not c.init)
        total = sum(1 for c in pod.containers if not c.init)
        for c in pod.containers:
            if c.init or c.ready or c.state != "running":
                continue
            evidence: dict[str, object] = {
                **_where(pod),
                **_container(c),
                "ready_count": f"{ready}/{total}",
                **_log_evidence(c, False),
            }
            summary = f"container {c.name} of {pod.name} is not ready ({ready}/{total})"
            hint = "its readiness probe fails: kubectl describe pod and the container's log"
            if pod.kind == "lb-fe" and c.name in _FRONTEND:
                down = _fe_without_gateway(trench, pod.name)
                if down:
                    evidence["gateway"] = down
                    evidence["see"] = ["MDB101", "MDB102"]
                    summary += ": the FE has no gateway (" + "; ".join(down[:2]) + ")"
                hint = (
                    "the frontend is ready only with a gateway up: check BGP/BFD to the "
                    "gateway (MDB101/MDB102, birdc show protocols all in the frontend)"
                )
            yield Issue(pod=pod.name, summary=summary, evidence=evidence, hint=hint)
        del kube


@trench_check("MDB521", Severity.WARNING, "container restarted", roles=())
def check_restarts(trench: TrenchView) -> Iterator[Issue]:
    """Restarts (in the window when one is given): count, last reason, exit code, when."""
    for kube, pod in _pods(trench):
        for c in pod.containers:
            if c.restart_count <= 0 or c.reason in _CRASH_REASONS or c.last_reason == "OOMKilled":
                continue  # crash loops and OOM kills are MDB522
            if kube.since_unix and c.last_finished_unix and c.last_finished_unix < kube.since_unix:
                continue
            last = f"{c.last_reason or 'unknown reason'}"
            if c.last_exit_code is not None:
                last += f", exit code {c.last_exit_code}"
            yield Issue(
                pod=pod.name,
                summary=f"container {c.name} of {pod.name} restarted {c.restart_count} times "
                f"(last: {last}, {_ago(kube, c.last_finished_unix)})",
                evidence={
                    **_where(pod),
                    **_container(c),
                    "last_finished_ago": _ago(kube, c.last_finished_unix),
                    **_log_evidence(c, True),
                },
                hint="the previous instance's log says why it ended (kubectl logs --previous); "
                "a restarted LB/FE loses its nfqlb state, a restarted proxy its bridge ports",
            )


@trench_check("MDB522", Severity.ERROR, "container crash-looping or OOM-killed", roles=())
def check_crashloop(trench: TrenchView) -> Iterator[Issue]:
    """CrashLoopBackOff, or a last termination by the OOM killer."""
    for kube, pod in _pods(trench):
        for c in pod.containers:
            crashing = c.reason == "CrashLoopBackOff"
            oom = c.last_reason == "OOMKilled" or c.reason == "OOMKilled"
            if not (crashing or oom):
                continue
            what = "is in CrashLoopBackOff" if crashing else "was OOM-killed"
            last = f"last: {c.last_reason or '?'}"
            if c.last_exit_code is not None:
                last += f", exit code {c.last_exit_code}"
            yield Issue(
                pod=pod.name,
                summary=f"container {c.name} of {pod.name} {what} ({c.restart_count} restarts, "
                f"{last}, {_ago(kube, c.last_finished_unix)})",
                evidence={**_where(pod), **_container(c), **_log_evidence(c, True)},
                hint="OOMKilled: raise the container's memory limit; otherwise the previous log's "
                "last lines say why it exits (shown here; kubectl logs --previous)",
            )


def _waiting_containers(trench: TrenchView, reasons: frozenset[str], hint: str) -> Iterator[Issue]:
    """One issue per container waiting with one of ``reasons`` (its message as the kubelet said)."""
    for _kube_state, pod in _pods(trench):
        for c in pod.containers:
            if c.reason not in reasons:
                continue
            yield Issue(
                pod=pod.name,
                summary=f"container {c.name} of {pod.name}: {c.reason}"
                + (f" ({c.message})" if c.message else ""),
                evidence={**_where(pod), **_container(c)},
                hint=hint,
            )


@trench_check("MDB531", Severity.ERROR, "container image cannot be pulled", roles=())
def check_image_pull(trench: TrenchView) -> Iterator[Issue]:
    """ErrImagePull / ImagePullBackOff / InvalidImageName."""
    return _waiting_containers(
        trench,
        _PULL_REASONS,
        "check the image name and tag, the registry's reachability from the node "
        "and the pod's imagePullSecrets",
    )


@trench_check("MDB532", Severity.ERROR, "container cannot be created (configuration)", roles=())
def check_config_error(trench: TrenchView) -> Iterator[Issue]:
    """CreateContainerConfigError and friends: a missing ConfigMap/Secret/key, a bad mount."""
    return _waiting_containers(
        trench,
        _CONFIG_REASONS,
        "the message names the missing ConfigMap, Secret or key (for Meridio: the "
        "trench's ConfigMap meridio-configuration-<trench>); kubectl describe pod",
    )


# --------------------------------------------------------------------------- dependencies


@trench_check("MDB541", Severity.ERROR, "trench dependency pod missing", roles=())
def check_dependencies(trench: TrenchView) -> Iterator[Issue]:
    """The trench's NSP and IPAM pods exist (every Meridio pod depends on them)."""
    kube = _kube(trench)
    if kube is None or not kube.trench:
        return
    meridio = [p for p in kube.pods if p.kind in ("lb-fe", "proxy", "target")]
    if not meridio:
        return
    for kind in ("nsp", "ipam"):
        if any(p.kind == kind for p in kube.pods):
            continue
        yield Issue(
            pod=f"{kind}-{kube.trench}",
            summary=f"no {kind.upper()} pod of trench {kube.trench} in namespace "
            f"{meridio[0].namespace}",
            evidence={
                "kind": kind,
                "trench": kube.trench,
                "namespace": meridio[0].namespace,
                "pods": sorted(p.name for p in kube.pods),
            },
            hint=f"the trench's {kind.upper()} StatefulSet ({kind}-{kube.trench}) is missing or "
            "scaled to 0: LBs and targets cannot register or get addresses",
        )


@trench_check("MDB542", Severity.WARNING, "Kubernetes state not readable (RBAC)", roles=())
def check_unreadable(trench: TrenchView) -> Iterator[Issue]:
    """What the runtime could not read, and the verb on the resource it lacks."""
    kube = _kube(trench)
    if kube is None:
        return
    for problem in kube.problems:
        denied = "forbidden" in problem.message.lower() or "cannot" in problem.message
        why = f"{problem.verb} {problem.resource} is not allowed" if denied else problem.message
        yield Issue(
            pod="",
            summary=f"could not read {problem.what}: {why}",
            evidence={
                "what": problem.what,
                "verb": problem.verb,
                "resource": problem.resource,
                "message": problem.message,
            },
            hint=(
                f"grant {problem.verb!r} on {problem.resource!r} (deploy/rbac.yaml) to see it; "
                if denied
                else "the API server did not answer this request; "
            )
            + "the other checks ran without it",
        )


CHECKS = (
    check_pod_phase,
    check_pending,
    check_terminating,
    check_not_ready,
    check_restarts,
    check_crashloop,
    check_image_pull,
    check_config_error,
    check_dependencies,
    check_unreadable,
)


_GROUP_ORDER = (
    ("LB/FE pods", ("lb-fe",)),
    ("proxy pods", ("proxy",)),
    ("target pods", ("target",)),
    ("NSP/IPAM/NSE pods", ("nsp", "ipam", "nse")),
    ("NSM pods", ("nsm",)),
    ("Spire pods", ("spire",)),
)


def _pod_ok(pod: PodHealth) -> bool:
    return (
        pod.phase == "Running"
        and not pod.deleting_since_unix
        and all(c.ready for c in pod.containers if not c.init)
    )


def summary_lines(kube: KubeState) -> list[str]:
    """One line per check group, apostate style: ``✔ LB/FE pods ready (took 0.4 s)``."""
    took = dict(kube.timings)
    unreadable = {p.what for p in kube.problems}
    lines: list[str] = []
    for group, kinds in _GROUP_ORDER:
        pods = [p for p in kube.pods if p.kind in kinds]
        timing = f" (took {took[group]:.1f} s)" if group in took else ""
        if not pods:
            if any(group.split()[0] in what for what in unreadable):
                lines.append(f"? {group}: not readable (RBAC)")
            continue
        bad = [p for p in pods if not _pod_ok(p)]
        restarts = sum(c.restart_count for p in pods for c in p.containers)
        note = f", {restarts} restarts" if restarts else ""
        if bad:
            names = ", ".join(
                f"{p.name} {sum(c.ready for c in p.containers if not c.init)}/"
                f"{sum(1 for c in p.containers if not c.init)} {p.phase}"
                for p in bad[:3]
            )
            lines.append(f"✘ {group}: {len(bad)} of {len(pods)} not ready: {names}{note}{timing}")
        else:
            lines.append(f"✔ {group} ready ({len(pods)}{note}){timing}")
    return lines
