"""Pod and container health (MDB5xx) on recorded pod objects, as a kubelet reports them.

The pod objects below have the shape of ``kubectl get pod -o json`` for each failure
(CrashLoopBackOff after exit 1, ImagePullBackOff, Pending Unschedulable, a frontend
not ready while its BGP session is down, ...); they go through the same parser the
Kubernetes runtime uses (runtime/k8s_health.py) and then through analyze. What a
user notices: the right code on the right pod, the container, the reason, the exit
code and the log lines as evidence; the healthy trench is silent.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from lab_fixture import build_lab, change, with_pod

from meridio_debug.controller.analysis import Severity, analyze
from meridio_debug.controller.analysis.health import summary_lines
from meridio_debug.controller.model import KubeState, PodKind, ReadProblem, TrenchState
from meridio_debug.controller.runtime import k8s_health
from meridio_debug.controller.services.bundle import Evidence, read_bundle, write_bundle

NOW = 1_764_000_000.0  # the analysis' "now" (KubeState.read_unix)


def ts(offset: float) -> str:
    import datetime

    when = datetime.datetime.fromtimestamp(NOW + offset, tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def running(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "ready": True,
        "restartCount": 0,
        "state": {"running": {"startedAt": ts(-3600)}},
    }


def pod(name: str, app: str, containers: list[str], **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "red", "labels": {"app": app}},
        "spec": {"nodeName": "node-a", "containers": [{"name": c} for c in containers]},
        "status": {
            "phase": "Running",
            "containerStatuses": [running(c) for c in containers],
            **status,
        },
    }


LB = ["stateless-lb", "frontend"]
HEALTHY_PODS: list[tuple[dict[str, Any], PodKind]] = [
    (pod("lb-fe-a", "stateless-lb-frontend-attractor-a", LB), "lb-fe"),
    (pod("lb-fe-b", "stateless-lb-frontend-attractor-a", LB), "lb-fe"),
    (pod("proxy-a", "proxy-conduit-a", ["proxy"]), "proxy"),
    (pod("proxy-b", "proxy-conduit-a", ["proxy"]), "proxy"),
    (pod("target-a1", "target-a", ["example-target", "tapa"]), "target"),
    (pod("nsp-red-0", "nsp-red", ["nsp"]), "nsp"),
    (pod("ipam-red-0", "ipam-red", ["ipam"]), "ipam"),
    (pod("nsmgr-x1", "nsmgr", ["nsmgr"]), "nsm"),
]


def kube(pods: list[tuple[dict[str, Any], PodKind]], **kw: Any) -> KubeState:
    return KubeState(
        read_unix=NOW,
        pods=tuple(k8s_health.pod_health(p, k) for p, k in pods),
        trench=kw.pop("trench", "red"),
        **kw,
    )


BASE = build_lab()


def state(
    pods: list[tuple[dict[str, Any], PodKind]], base: TrenchState = BASE, **kw: Any
) -> TrenchState:
    return dataclasses.replace(base, kube=kube(pods, **kw))


def broken(name: str, fn: Any) -> list[tuple[dict[str, Any], PodKind]]:
    out = copy.deepcopy(HEALTHY_PODS)
    for p, _k in out:
        if p["metadata"]["name"] == name:
            fn(p)
    return out


def problems(s: TrenchState) -> set[tuple[str, str]]:
    return {(f.code, f.pod) for f in analyze(s).at_least(Severity.WARNING)}


def container(p: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in p["status"]["containerStatuses"] if c["name"] == name)


def crashloop(p: dict[str, Any]) -> None:
    c = container(p, "stateless-lb")
    c.update(
        ready=False,
        restartCount=7,
        state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting"}},
        lastState={"terminated": {"reason": "Error", "exitCode": 1, "finishedAt": ts(-42)}},
    )


def image_pull(p: dict[str, Any]) -> None:
    container(p, "tapa").update(
        ready=False,
        state={
            "waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling "tapa:nope"'}
        },
    )


def pending(p: dict[str, Any]) -> None:
    p["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules.",
            }
        ],
    }


def test_healthy_pods_are_silent_and_summarised() -> None:
    s = state(HEALTHY_PODS, timings=(("LB/FE pods", 0.4),))
    assert problems(s) == set()
    lines = summary_lines(s.kube or kube([]))
    assert lines[0] == "✔ LB/FE pods ready (2) (took 0.4 s)"
    assert "✔ NSP/IPAM/NSE pods ready (2)" in lines and "✔ NSM pods ready (1)" in lines


def test_crash_looping_container_is_mdb522_with_exit_code_and_previous_log() -> None:
    pods = broken("lb-fe-b", crashloop)
    s = state(pods)
    lb = s.kube.pods[1] if s.kube else None
    assert lb is not None
    logs = dataclasses.replace(
        lb.containers[0], previous_log=("starting nfqlb", "nfqlb: shm init failed: ENOSPC")
    )
    assert s.kube is not None
    s = dataclasses.replace(
        s,
        kube=dataclasses.replace(
            s.kube,
            pods=(
                s.kube.pods[0],
                dataclasses.replace(lb, containers=(logs, *lb.containers[1:])),
                *s.kube.pods[2:],
            ),
        ),
    )
    assert problems(s) == {("MDB522", "lb-fe-b")}
    (f,) = [f for f in analyze(s).findings if f.code == "MDB522"]
    assert f.evidence["container"] == "stateless-lb" and f.evidence["last_exit_code"] == 1
    assert f.evidence["previous_log"] == ["starting nfqlb", "nfqlb: shm init failed: ENOSPC"]
    assert "7 restarts" in f.summary and "42 s ago" in f.summary
    assert "✘ LB/FE pods: 1 of 2 not ready: lb-fe-b 1/2 Running, 7 restarts" in summary_lines(
        s.kube
    )


def test_frontend_not_ready_without_gateway_ties_to_mdb101() -> None:
    def fe_not_ready(p: dict[str, Any]) -> None:
        container(p, "frontend")["ready"] = False

    def bgp_down(snap: Any) -> Any:
        return dataclasses.replace(
            snap,
            bird_protocols=change(
                snap.bird_protocols, lambda p: p.is_bgp, state="start", info="Active"
            ),
        )

    base = with_pod(BASE, "lb-fe-a", bgp_down)
    s = state(broken("lb-fe-a", fe_not_ready), base)
    assert {("MDB511", "lb-fe-a"), ("MDB101", "lb-fe-a")} <= problems(s)
    (f,) = [f for f in analyze(s).findings if f.code == "MDB511"]
    assert "the FE has no gateway" in f.summary and f.evidence["container"] == "frontend"
    assert f.evidence["see"] == ["MDB101", "MDB102"] and f.evidence["ready_count"] == "1/2"


@pytest.mark.parametrize(
    ("name", "mutate", "expected"),
    [
        ("target-a1", image_pull, {("MDB531", "target-a1")}),
        ("proxy-b", pending, {("MDB502", "proxy-b")}),
        (
            "nsp-red-0",
            lambda p: container(p, "nsp").update(
                ready=False,
                state={
                    "waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": 'configmap "meridio-configuration-red" not found',
                    }
                },
            ),
            {("MDB532", "nsp-red-0")},
        ),
        (
            "proxy-a",
            lambda p: container(p, "proxy").update(
                restartCount=2,
                lastState={
                    "terminated": {"reason": "Error", "exitCode": 2, "finishedAt": ts(-600)}
                },
            ),
            {("MDB521", "proxy-a")},
        ),
        (
            "lb-fe-a",
            lambda p: container(p, "frontend").update(
                restartCount=1,
                lastState={
                    "terminated": {"reason": "OOMKilled", "exitCode": 137, "finishedAt": ts(-5)}
                },
            ),
            {("MDB522", "lb-fe-a")},
        ),
        (
            "nsmgr-x1",
            lambda p: p["status"].update(phase="Failed", reason="Evicted", message="low memory"),
            {("MDB501", "nsmgr-x1")},
        ),
        (
            "proxy-b",
            lambda p: p["metadata"].update(deletionTimestamp=ts(-300)),
            {("MDB503", "proxy-b")},
        ),
    ],
)
def test_each_failure_is_its_code_on_its_pod(
    name: str, mutate: Any, expected: set[tuple[str, str]]
) -> None:
    assert problems(state(broken(name, mutate))) == expected


def test_pending_says_why_it_is_not_scheduled() -> None:
    (f,) = analyze(state(broken("proxy-b", pending))).at_least(Severity.WARNING)
    assert "didn't match pod anti-affinity rules" in f.summary


def test_restarts_before_the_window_are_not_reported() -> None:
    def restarted(p: dict[str, Any]) -> None:
        container(p, "proxy").update(
            restartCount=1,
            lastState={"terminated": {"reason": "Error", "exitCode": 1, "finishedAt": ts(-600)}},
        )

    pods = broken("proxy-a", restarted)
    assert problems(state(pods, since_unix=NOW - 60)) == set()
    assert problems(state(pods, since_unix=NOW - 3600)) == {("MDB521", "proxy-a")}


def test_missing_nsp_and_unreadable_nsm_are_reported() -> None:
    pods = [(p, k) for p, k in HEALTHY_PODS if k not in ("nsp", "nsm")]
    denied = ReadProblem(
        "NSM pods in all namespaces",
        "list",
        "pods",
        'pods is forbidden: User "x" cannot list resource "pods" at the cluster scope',
    )
    s = state(pods, problems=(denied,))
    assert problems(s) == {("MDB541", "nsp-red"), ("MDB542", "")}
    f = next(f for f in analyze(s).findings if f.code == "MDB542")
    assert "list pods is not allowed" in f.summary


def test_dependency_kinds_and_trench_filter() -> None:
    assert k8s_health.dependency_kind(pod("nsp-red-0", "nsp-red", ["nsp"]), "red") == "nsp"
    assert k8s_health.dependency_kind(pod("nsp-blue-0", "nsp-blue", ["nsp"]), "red") is None
    assert k8s_health.dependency_kind(pod("f", "forwarder-vpp", ["f"])) == "nsm"
    assert k8s_health.dependency_kind(pod("s", "spire-agent", ["s"])) == "spire"
    assert k8s_health.dependency_kind(pod("t", "target-a", ["t"])) is None


def test_bounded_log_tail() -> None:
    text = "\n".join(f"line {i}" for i in range(1000))
    assert k8s_health.bounded_lines(text, 3, 10_000) == ("line 997", "line 998", "line 999")
    assert k8s_health.bounded_lines(text, 100, 20) == ("line 998", "line 999")
    assert k8s_health.bounded_lines(text, 0, 100) == ()


def test_bundle_carries_pod_health_and_logs(tmp_path: Path) -> None:
    s = state(broken("lb-fe-b", crashloop))
    assert s.kube is not None
    path = tmp_path / "b.tar.gz"
    write_bundle(Evidence(items=(), kube=s.kube, source="test"), path)
    back = read_bundle(path)
    assert back.kube == s.kube


# Codes asserted above (test_analysis checks every catalog code is exercised somewhere).
COVERED = {
    "MDB501",
    "MDB502",
    "MDB503",
    "MDB511",
    "MDB521",
    "MDB522",
    "MDB531",
    "MDB532",
    "MDB541",
    "MDB542",
}
