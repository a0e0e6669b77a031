"""The Kubernetes runtime end to end: the official client against a real kube-apiserver.

One lab per module, the API server and kubelet per run (tests/cluster/conftest.py:
``red`` operator-named pods, ``blue`` Helm-named under Pod Security baseline,
``green`` for destructive tests). The product runs as deploy/rbac.yaml's
service account with a real token. Each test uses its own agent image so agents
(and their ports) never interfere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from meridio_debug.controller.errors import (
    InjectionError,
    PodNotFound,
    RuntimeUnavailable,
)
from meridio_debug.controller.runtime import k8s_spec
from meridio_debug.controller.runtime.kubernetes import KubeOptions, KubernetesRuntime
from meridio_debug.controller.runtime.tls import (
    agent_certificate,
    create_ca,
    issue_client,
    load_or_create,
)
from meridio_debug.controller.services.snapshot import snapshot_all
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import agent_pb2_grpc as pb_grpc
from tests.cluster.conftest import SA, Cluster

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the lab's network namespaces"),
]

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]
REPO = Path(__file__).resolve().parents[2]


def agents_with(cluster: Cluster, namespace: str, image: str) -> list[tuple[str, dict[str, Any]]]:
    """(pod, ephemeral container) for every agent of ``image`` as the API server stored it."""
    pods = cluster.core.list_namespaced_pod(cluster.ns[namespace], _preload_content=False)
    out = []
    for pod in json.loads(pods.data)["items"]:
        for c in pod["spec"].get("ephemeralContainers") or []:
            if c["image"] == image:
                out.append((pod["metadata"]["name"], c))
    return out


def test_discovery_both_naming_schemes_and_roles(cluster: Cluster) -> None:
    for ns in ("red", "blue"):
        pods = cluster.runtime(ns).meridio_pods()
        roles = sorted(p.role for p in pods)
        assert roles == ["lb-fe"] * 2 + ["proxy"] * 2 + ["target"] * 4, (ns, pods)
        assert not any(p.name.startswith(("nsp-", "ipam-")) for p in pods)
        by_role = {p.role: p.target_container for p in pods}
        lb = "frontend" if ns == "red" else "fe"
        assert by_role == {"lb-fe": lb, "proxy": "proxy", "target": "example-target"}
        assert {p.trench for p in pods if p.role != "target"} == {"trench-a"}
    rt = cluster.runtime("red", selector="app=proxy-conduit-a")
    assert [p.role for p in rt.meridio_pods()] == ["proxy", "proxy"]
    assert cluster.runtime("red", trench="other").meridio_pods() == [
        p for p in cluster.runtime("red").meridio_pods() if p.role == "target"
    ]


def test_snapshot_injects_first_container_then_analyze_reuses(cluster: Cluster) -> None:
    image = "ghcr.io/nordix/meridio-debug-agent:e2e"
    red = cluster.ns["red"]
    labels_before = {
        p.metadata.name: p.metadata.labels for p in cluster.core.list_namespaced_pod(red).items
    }
    assert not agents_with(cluster, "red", image)
    res = cluster.cli("snapshot", "-n", red, "--image", image, "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert len(doc["pods"]) == 8
    for pod in doc["pods"]:
        assert pod["error"] is None and pod["runtime"] == "kubernetes"
        assert pod["location"] == f"{red}/{pod['pod']}"
        assert pod["links"], pod["pod"]
    lb = next(p for p in doc["pods"] if p["role"] == "lb-fe")
    assert any(r["fwmark"] for r in lb["rules"]), "the LB's fwmark rules come from its netns"
    assert "injecting" in res.stderr
    stored = agents_with(cluster, "red", image)
    assert len(stored) == 8 and len({p for p, _c in stored}) == 8
    labels_after = {
        p.metadata.name: p.metadata.labels for p in cluster.core.list_namespaced_pod(red).items
    }
    assert labels_before == labels_after, "pod labels are never touched"
    for pod_name, _c in stored:
        records = k8s_spec.annotation_records(cluster.read_pod("red", pod_name))
        assert [r["image"] for r in records.values()] == [image]

    # analyze reuses the running agents: no new ephemeral container
    res = cluster.cli("analyze", "-n", red, "--image", image, "-o", "json")
    assert res.returncode in (0, 3), res.stderr
    assert "reusing" in res.stderr and "injecting" not in res.stderr
    assert len(agents_with(cluster, "red", image)) == 8

    res = cluster.cli("agents", "-n", red, "-o", "json")
    assert res.returncode == 0, res.stderr
    agents = [a for a in json.loads(res.stdout)["agents"] if a["image"] == image]
    assert len(agents) == 8 and {a["state"] for a in agents} == {"running"}


def test_profile_fields_target_container_and_privileged(cluster: Cluster) -> None:
    image = "ghcr.io/nordix/meridio-debug-agent:e2e"
    stored = agents_with(cluster, "red", image)
    assert stored, "runs after the e2e test"
    roles = {p.name: p for p in cluster.runtime("red").meridio_pods()}
    for pod, c in stored:
        sc = c["securityContext"]
        assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW", "SYS_PTRACE"]}
        assert "privileged" not in sc and sc["runAsUser"] == 0
        assert c["args"][:2] == ["--listen", f"tcp:127.0.0.1:{k8s_spec.agent_port(c['name'])}"]
        want = {"lb-fe": "frontend", "proxy": "proxy", "target": "example-target"}[roles[pod].role]
        assert c["targetContainerName"] == want
        # what the API server defaulted, as on any cluster
        assert c["terminationMessagePath"] == "/dev/termination-log"
    priv = "ghcr.io/nordix/meridio-debug-agent:priv"
    rt = cluster.runtime("red", image=priv, profile="privileged")
    name = rt.meridio_pods()[0].name
    handle = asyncio.run(rt.inject(name))
    assert handle.injected
    ((_pod, c),) = agents_with(cluster, "red", priv)
    assert c["securityContext"]["privileged"] is True
    assert "capabilities" not in c["securityContext"]


def test_pod_security_evaluates_the_whole_pod_and_the_hint_says_privileged(
    cluster: Cluster,
) -> None:
    blue = cluster.ns["blue"]
    res = cluster.cli("snapshot", "-n", blue, "--image", "img:psa", "-o", "json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert len(doc["pods"]) == 8
    for pod in doc["pods"]:
        err = pod["error"]
        assert "Pod Security Admission refuses the agent" in err, pod
        assert 'violates PodSecurity "baseline:latest"' in err
        # the whole pod: the Meridio containers' own capabilities and the agent's
        assert "meridio-debug-" in err and '"NET_ADMIN"' in err
        assert "no level but privileged allows NET_ADMIN, NET_RAW, SYS_PTRACE" in err
        assert "enforce=privileged" in err
    lb = next(p for p in doc["pods"] if p["role"] == "lb-fe")
    assert '"stateless-lb"' in lb["error"] and '"fe"' in lb["error"]
    assert not agents_with(cluster, "blue", "img:psa")


def test_422_forbidden_fields_and_changed_container(cluster: Cluster) -> None:
    rt = cluster.runtime("red", image="img:422")
    pod = rt.meridio_pods()[2].name
    bad = rt._container_for("meridio-debug-x422", "proxy")
    with pytest.raises(InjectionError, match="ports: Forbidden: cannot be set for an Ephemeral"):
        asyncio.run(rt.patch_ephemeral(pod, {**bad, "ports": [{"containerPort": 1}]}))
    with pytest.raises(InjectionError, match="resources: Forbidden"):
        asyncio.run(rt.patch_ephemeral(pod, {**bad, "resources": {"limits": {"cpu": "1"}}}))
    cluster.kubelet.stuck_images.add("img:422")
    asyncio.run(rt.patch_ephemeral(pod, bad))
    changed = {**bad, "args": [*bad["args"], "--log-level", "DEBUG"]}
    with pytest.raises(InjectionError, match="may not be changed"):
        asyncio.run(rt.patch_ephemeral(pod, changed))


@pytest.mark.parametrize(
    ("drop", "command", "hint"),
    [
        ({("list", "pods")}, "snapshot", "not allowed to list pods"),
        # a run reads pods by listing them and watching the new agent's; it reads one pod
        # when it cannot watch (and to look again at an agent that does not answer)
        ({("get", "pods"), ("watch", "pods")}, "snapshot", "not allowed to get pods"),
        (
            {("patch", "pods/ephemeralcontainers")},
            "snapshot",
            "not allowed to patch pods/ephemeralcontainers",
        ),
        ({("create", "pods/portforward")}, "snapshot", "not allowed to create pods/portforward"),
        ({("get", "pods/portforward")}, "snapshot", "not allowed to get pods/portforward"),
    ],
)
def test_rbac_denial_names_the_missing_verb(
    cluster: Cluster, drop: set[tuple[str, str]], command: str, hint: str
) -> None:
    red = cluster.ns["red"]
    pod = cluster.pod_by_lab("red", "proxy-a")
    what = "-".join(f"{verb}-{resource.replace('/', '-')}" for verb, resource in sorted(drop))
    image = f"img:rbac-{what}"  # a new agent: every request is made
    try:
        cluster.set_role("red", drop)
        res = cluster.cli(
            command, "-n", red, pod, "--image", image,
            "--start-timeout", "10", "-o", "json",
        )  # fmt: skip
    finally:
        cluster.set_role("red")
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert hint in text and "grant verb" in text, text[-2000:]


def test_annotation_denied_still_injects_with_a_warning(cluster: Cluster) -> None:
    events: list[tuple[str, str, str]] = []
    try:
        cluster.set_role("red", {("patch", "pods")})
        rt = cluster.runtime("red", image="img:noannot", events=events)
        handle = asyncio.run(rt.inject(rt.meridio_pods()[1].name))
    finally:
        cluster.set_role("red")
    assert handle.injected
    assert any(s == "warning" and "patch pods" in d for _p, s, d in events), events


def test_pod_deleted_mid_run_fails_that_pod_only(cluster: Cluster) -> None:
    rt = cluster.runtime("green", image="img:deleted")
    pods = rt.meridio_pods()  # discovered before the deletion
    victim = pods[3].name
    cluster.delete_pod("green", victim)
    items = asyncio.run(snapshot_all(rt))
    errors = {i.pod.name: i.error for i in items}
    assert "pod not found" in (errors.pop(victim) or "")
    assert not any(errors.values()), errors
    with pytest.raises(PodNotFound):
        asyncio.run(rt.inject(victim))


def test_terminating_pod_gets_no_agent(cluster: Cluster) -> None:
    green = cluster.ns["green"]
    pod = cluster.pod_by_lab("green", "target-b2")
    cluster.core.patch_namespaced_pod(pod, green, {"metadata": {"finalizers": ["test/hold"]}})
    try:
        cluster.delete_pod("green", pod, grace=30)
        rt = cluster.runtime("green", image="img:terminating")
        with pytest.raises(RuntimeUnavailable, match="pod is terminating"):
            asyncio.run(rt.inject(pod))
        assert not agents_with(cluster, "green", "img:terminating")
    finally:
        cluster.core.patch_namespaced_pod(pod, green, {"metadata": {"finalizers": None}})


def test_bad_image_is_not_final_and_recovers(cluster: Cluster) -> None:
    image = "registry.invalid/agent:later"
    cluster.kubelet.bad_images.add(image)
    rt = cluster.runtime("red", image=image, start_timeout=3)
    pod = rt.meridio_pods()[0].name
    with pytest.raises(InjectionError, match=r"image cannot be pulled yet \((ErrImagePull|Image)"):
        asyncio.run(rt.inject(pod))
    res = cluster.cli("agents", "-n", cluster.ns["red"], "-o", "json")
    (agent,) = [a for a in json.loads(res.stdout)["agents"] if a["image"] == image]
    assert agent["state"] == "starting", agent
    cluster.kubelet.bad_images.discard(image)  # the registry answers again
    rt = cluster.runtime("red", image=image, start_timeout=20)
    handle = asyncio.run(rt.inject(pod))
    assert not handle.injected and handle.name == agent["agent"], "the same agent, now running"
    assert len(agents_with(cluster, "red", image)) == 1


def pod_requests(cluster: Cluster, pod: str) -> list[dict[str, Any]]:
    """Our user's requests on ``pod`` (get, and watch by field selector), from the audit log."""
    user = f"system:serviceaccount:{cluster.ns['red']}:{SA}"
    out, seen = [], set()
    for line in (cluster.plane.work / "audit.log").read_text().splitlines():
        ev = json.loads(line)
        # a watch is logged at ResponseStarted, and at ResponseComplete only once it ended
        if ev["user"]["username"] != user or ev["auditID"] in seen:
            continue
        seen.add(ev["auditID"])
        ref = ev.get("objectRef") or {}
        if ref.get("resource") != "pods" or ref.get("subresource"):
            continue
        if ref.get("name") == pod or f"metadata.name%3D{pod}" in ev["requestURI"]:
            out.append(ev)
    return out


def inject_while_image_is_pulled(
    cluster: Cluster, image: str, events: list[tuple[str, str, str]]
) -> tuple[str, list[dict[str, Any]]]:
    """Inject an agent whose image pulls fail for 1.5 s, then work: (pod, our requests on it)."""
    cluster.kubelet.bad_images.add(image)
    rt = cluster.runtime("red", image=image, start_timeout=20, events=events)
    pod = rt.meridio_pods()[2].name
    before = len(pod_requests(cluster, pod))

    async def run() -> None:
        async def registry_answers() -> None:
            await asyncio.sleep(1.5)
            cluster.kubelet.bad_images.discard(image)

        await asyncio.gather(rt.inject(pod), registry_answers())

    try:
        asyncio.run(run())
    finally:
        cluster.kubelet.bad_images.discard(image)
    return pod, pod_requests(cluster, pod)[before:]


def test_agent_start_is_watched_not_polled(cluster: Cluster) -> None:
    events: list[tuple[str, str, str]] = []
    pod, reqs = inject_while_image_is_pulled(cluster, "registry.invalid/agent:watched", events)
    watches = [r for r in reqs if r["verb"] == "watch"]
    assert watches, [(r["verb"], r["requestURI"]) for r in reqs]
    assert all("resourceVersion=" in w["requestURI"] for w in watches)
    assert all(w["annotations"]["authorization.k8s.io/decision"] == "allow" for w in watches)
    # 1.5 s of pull failures: polling would have read the pod ~6 times; the watch needs no GET
    gets = [r for r in reqs if r["verb"] == "get"]
    assert len(gets) <= 3, [r["requestURI"] for r in gets]
    # what the kubelet said while pulling still reaches the progress report, then "running"
    # the watch's reading thread ends when the wait does (its response is shut down), not
    # at the watch's server-side timeout (20 s): nothing holds up the CLI's exit
    deadline = time.monotonic() + 2
    streams = ("meridio-debug-watch", "meridio-debug-follow")  # the log followed for the cert
    while any(t.name in streams for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a watch thread outlived the wait"
        time.sleep(0.05)
    states = [(s, d) for p, s, d in events if p == pod]
    assert any(s == "starting" and "ErrImagePull" in d for s, d in states), states
    assert any(s == "starting" and "ImagePullBackOff" in d for s, d in states), states
    assert states[-1][0] == "ready", states


def test_role_without_watch_polls_silently(cluster: Cluster) -> None:
    events: list[tuple[str, str, str]] = []
    try:
        cluster.set_role("red", {("watch", "pods")})
        pod, reqs = inject_while_image_is_pulled(cluster, "registry.invalid/agent:polled", events)
    finally:
        cluster.set_role("red")
    refused = [r for r in reqs if r["verb"] == "watch"]
    assert refused and all(
        r["annotations"]["authorization.k8s.io/decision"] == "forbid" for r in refused
    )
    assert len([r for r in reqs if r["verb"] == "get"]) >= 4  # the wait polled instead
    states = [(s, d) for p, s, d in events if p == pod]
    assert states[-1][0] == "ready", states
    assert not any(s in ("warning", "failed") for s, _d in states), states


def test_stuck_agent_times_out(cluster: Cluster) -> None:
    cluster.kubelet.stuck_images.add("img:stuck")
    rt = cluster.runtime("red", image="img:stuck", start_timeout=1.0)
    with pytest.raises(
        InjectionError, match=r"did not start within 1 s \(last state: ContainerCreating"
    ):
        asyncio.run(rt.inject(rt.meridio_pods()[0].name))


def test_terminated_agent_is_replaced_with_a_new_name(cluster: Cluster) -> None:
    rt = cluster.runtime("red", image="img:idle", idle_timeout=1.0)
    pod = rt.meridio_pods()[4].name
    first = asyncio.run(rt.inject(pod))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        states = {a.name: a.state for a in k8s_spec.agents_of(asyncio.run(rt.get_pod(pod)))}
        if states[first.name] == "terminated":
            break
        time.sleep(0.3)
    assert states[first.name] == "terminated"
    second = asyncio.run(rt.inject(pod))
    assert second.injected and second.name == first.name + "-2"
    res = cluster.cli("agents", "-n", cluster.ns["red"], pod)
    assert res.returncode == 0
    line = next(ln for ln in res.stdout.splitlines() if f"{first.name} " in ln)
    assert "terminated" in line and "Completed, exit code 0" in line


def test_kubeconfig_from_two_files_is_merged(cluster: Cluster, tmp_path: Path) -> None:
    """KUBECONFIG=a:b as kubectl reads it: the context in one file, the user in the other."""
    doc = yaml.safe_load(cluster.kubeconfig.read_text())
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text(yaml.safe_dump({**doc, "users": [], "current-context": doc["current-context"]}))
    b.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Config", "users": doc["users"]}))
    res = cluster.cli(
        "agents", "-n", cluster.ns["red"], "-o", "json", env={"KUBECONFIG": f"{a}:{b}"}
    )
    assert res.returncode == 0, res.stderr
    single = cluster.cli("agents", "-n", cluster.ns["red"], "-o", "json")

    def agents(out: str) -> list[tuple[str, str]]:
        # not the states: an agent of the test before (idle timeout 1 s) may stop in between
        return [(a["pod"], a["agent"]) for a in json.loads(out)["agents"]]

    assert agents(res.stdout) == agents(single.stdout)
    res = cluster.cli("agents", "-n", cluster.ns["red"], env={"KUBECONFIG": f"{a}"})
    assert res.returncode != 0, "the first file alone has no credentials"


def test_unresponsive_node_fails_its_pod_only_and_on_time(cluster: Cluster) -> None:
    """A node whose kubelet does not answer: the other pods' agents are reached meanwhile."""
    image = "ghcr.io/nordix/meridio-debug-agent:e2e"
    rt = cluster.runtime("red", image=image, start_timeout=25)
    pods = rt.meridio_pods()
    victim = next(p for p in pods if p.role == "proxy")
    # the agents run; then the victim's node stops answering the API server
    node = cluster.read_pod("red", victim.name)["spec"]["nodeName"]
    dead = cluster.kubelet.make_unresponsive(node)
    done: dict[str, float] = {}
    t0 = time.monotonic()

    def progress(pod: str, state: str, _detail: str) -> None:
        if state == "done":
            done.setdefault(pod, time.monotonic() - t0)

    try:
        opts = KubeOptions(
            namespace=cluster.ns["red"],
            kubeconfig=str(cluster.kubeconfig),
            image=image,
            start_timeout=25,
        )
        t0 = time.monotonic()
        items = asyncio.run(snapshot_all(KubernetesRuntime(opts, progress=progress)))
    finally:
        cluster.kubelet.make_responsive(node, dead)
    errors = {i.pod.name: i.error for i in items}
    on_node = {p.name for p in pods if cluster.read_pod("red", p.name)["spec"]["nodeName"] == node}
    assert on_node and set(errors) - on_node, (on_node, errors)
    for name, err in errors.items():
        if name in on_node:
            assert err and "cannot reach the pod's node" in err, (name, err)
        else:
            assert not err, (name, errors)
            assert done[name] < 10, f"{name} waited for the dead node: {done}"


def test_direct_mutual_tls_and_wrong_client_rejected(cluster: Cluster, tmp_path: Path) -> None:
    tls = load_or_create(tmp_path / "tls")
    rt = cluster.runtime("red", image="img:direct", direct=True, tls=tls)
    rt.opts.names = [rt.meridio_pods()[2].name]
    rt._pods = None
    (item,) = asyncio.run(snapshot_all(rt))
    assert not item.error and item.snapshot is not None and item.snapshot.links
    ((pod_name, c),) = agents_with(cluster, "red", "img:direct")
    assert c["env"][0]["name"] == k8s_spec.CLIENT_CA_ENV
    assert "PRIVATE KEY" not in json.dumps(c), "no private key in the pod spec"
    rt2 = cluster.runtime(
        "red", image="img:direct", direct=True, tls=load_or_create(tmp_path / "tls")
    )
    assert rt2.key == rt.key
    # a stale pin (a certificate this agent does not have) is read again from the log,
    # in --direct mode too, not a run that waits out --start-timeout
    uid = cluster.read_pod("red", pod_name)["metadata"]["uid"]
    pin = Path(os.environ["XDG_CACHE_HOME"]) / "meridio-debug/agents" / f"{uid}_{c['name']}.pem"
    logged = pin.read_bytes()
    pin.write_bytes(create_ca()[0])
    rt2.opts.names = rt.opts.names
    rt2._pods = None
    (again,) = asyncio.run(snapshot_all(rt2))
    assert not again.error and again.snapshot is not None and again.snapshot.links
    assert pin.read_bytes() == logged

    pod = cluster.read_pod("red", pod_name)
    ip, port = pod["status"]["podIP"], k8s_spec.port_of(c)
    log = cluster.core.read_namespaced_pod_log(
        pod_name, cluster.ns["red"], container=c["name"], _preload_content=False
    ).data
    server_cert = agent_certificate(log)
    assert server_cert is not None

    async def call(cert: bytes | None, key: bytes | None) -> pb.Info:
        creds = grpc.ssl_channel_credentials(server_cert, key, cert)
        async with grpc.aio.secure_channel(
            f"{ip}:{port}",
            creds,
            options=[("grpc.ssl_target_name_override", "meridio-debug-agent")],
        ) as ch:
            return await pb_grpc.AgentStub(ch).GetInfo(pb.InfoRequest(), timeout=5)

    assert asyncio.run(call(tls.cert_pem, tls.key_pem)).agent_version
    other_ca, other_key = create_ca()
    wrong_cert, wrong_key = issue_client(other_ca, other_key)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(call(wrong_cert, wrong_key))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_warm_run_uses_the_pin_and_a_wrong_pin_is_read_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    red = cluster.ns["red"]
    pod = cluster.pod_by_lab("red", "target-a2")
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    image = "img:pinned"
    audit = cluster.plane.work / "audit.log"

    def log_reads(since: int, agent: str) -> list[str]:
        with open(audit, "rb") as f:
            f.seek(since)
            uris = [json.loads(ln)["requestURI"] for ln in f.read().decode().splitlines()]
        return [u for u in uris if "/log?" in u and f"container={agent}" in u]

    offset = audit.stat().st_size
    res = cluster.cli("snapshot", "-n", red, pod, "--image", image, "-o", "json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    ((_pod, agent),) = [(p, c) for p, c in agents_with(cluster, "red", image) if p == pod]
    assert log_reads(offset, agent["name"])  # the new agent's certificate: from its log
    uid = cluster.read_pod("red", pod)["metadata"]["uid"]
    pin = tmp_path / "meridio-debug" / "agents" / f"{uid}_{agent['name']}.pem"
    logged = pin.read_bytes()  # the certificate the agent printed, kept for the next runs
    assert logged.startswith(b"-----BEGIN CERTIFICATE-----")
    pin.write_bytes(create_ca()[0])  # a certificate the agent does not have
    res = cluster.cli("snapshot", "-n", red, pod, "--image", image, "-o", "json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    (item,) = json.loads(res.stdout)["pods"]
    assert item["error"] is None and "reusing" in res.stderr
    assert pin.read_bytes() == logged  # read from the log again
    offset = audit.stat().st_size
    res = cluster.cli("snapshot", "-n", red, pod, "--image", image, "-o", "json", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not log_reads(offset, agent["name"])  # warm: the pin, no log read


def _codes_since(cluster: Cluster, offset: int, user: str) -> list[int]:
    """Response codes of ``user``'s requests in the audit log after byte ``offset``."""
    with open(cluster.plane.work / "audit.log", "rb") as f:
        f.seek(offset)
        lines = f.read().decode().splitlines()
    events = [json.loads(ln) for ln in lines if ln.strip()]
    return [
        int(e.get("responseStatus", {}).get("code", 0))
        for e in events
        if e["user"]["username"] == user and e.get("stage") == "ResponseComplete"
    ]


def test_api_priority_and_fairness_429s_are_retried(cluster: Cluster) -> None:
    """The API server sheds our requests (a priority level of a few seats that rejects the
    rest, for our service account only); the run still succeeds: a 429 is retried after its
    Retry-After (the server did not process it), as client-go does."""
    prefix = cluster.spec.prefix
    user = f"system:serviceaccount:{cluster.ns['red']}:{SA}"
    flow = k8s_client.FlowcontrolApiserverV1Api(cluster.plane.admin)
    level = flow.create_priority_level_configuration(
        {
            "metadata": {"name": f"{prefix}tiny"},
            "spec": {
                "type": "Limited",
                "limited": {
                    "nominalConcurrencyShares": 1,  # ceil(600 * 1 / ~246 shares): 3 seats
                    "lendablePercent": 0,
                    "borrowingLimitPercent": 0,
                    "limitResponse": {"type": "Reject"},
                },
            },
        }
    )
    flow.create_flow_schema(
        {
            "metadata": {"name": f"{prefix}tiny"},
            "spec": {
                "priorityLevelConfiguration": {"name": f"{prefix}tiny"},
                "matchingPrecedence": 100,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [
                    {
                        "subjects": [
                            {
                                "kind": "ServiceAccount",
                                "serviceAccount": {"name": SA, "namespace": cluster.ns["red"]},
                            }
                        ],
                        "resourceRules": [
                            {
                                "verbs": ["*"],
                                "apiGroups": ["*"],
                                "resources": ["*"],
                                "namespaces": ["*"],
                            }
                        ],
                    }
                ],
            },
        }
    )
    try:
        ours = k8s_client.CoreV1Api(k8s_config.new_client_from_config(str(cluster.kubeconfig)))
        deadline = time.monotonic() + 20
        while True:  # until the server classifies our requests into the tiny level
            resp = ours.list_namespaced_pod(cluster.ns["green"], limit=1, _preload_content=False)
            if resp.headers.get("X-Kubernetes-PF-PriorityLevel-UID") == level.metadata.uid:
                break
            assert time.monotonic() < deadline, "the FlowSchema never took effect"
            time.sleep(0.2)
        codes: list[int] = []
        for attempt in range(3):  # new agents each time: a PATCH and an annotation per pod at once
            offset = (cluster.plane.work / "audit.log").stat().st_size
            res = cluster.cli(
                "snapshot", "-n", cluster.ns["green"], "--image", f"img:apf-{attempt}",
                "-o", "json",
            )  # fmt: skip
            assert res.returncode == 0, res.stderr[-2000:]
            pods = json.loads(res.stdout)["pods"]
            assert len(pods) >= 5 and all(p["error"] is None for p in pods), res.stderr[-2000:]
            # nothing was given up: each pod's annotation records its new agent, no warning
            assert "warning" not in res.stderr, res.stderr[-2000:]
            for p in pods:
                records = k8s_spec.annotation_records(cluster.read_pod("green", p["pod"]))
                assert any(r.get("image") == f"img:apf-{attempt}" for r in records.values())
            codes = _codes_since(cluster, offset, user)
            if 429 in codes:
                break
        assert 429 in codes, sorted(set(codes))
    finally:
        with contextlib.suppress(k8s_client.ApiException):
            flow.delete_flow_schema(f"{prefix}tiny")
        with contextlib.suppress(k8s_client.ApiException):
            flow.delete_priority_level_configuration(f"{prefix}tiny")


def test_role_grants_exactly_the_verbs_the_code_used(cluster: Cluster) -> None:
    """Last on purpose: what RBAC allowed our user in every test above (the audit log)."""
    user = f"system:serviceaccount:{cluster.ns['red']}:{SA}"
    used = cluster.plane.allowed_requests(user)
    docs = list(yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()))
    (role,) = [d for d in docs if d and d["kind"] == "Role"]
    granted = {
        (verb, res) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]
    }
    assert used <= granted, used - granted
    # every granted verb is needed: its denial is tested above, or it was used here (the
    # audit log records a port-forward as get only: 1.35's second check, create, is not logged)
    assert {r for _v, r in used} == {r for _v, r in granted}
    assert granted - used <= {("create", "pods/portforward")}, granted - used
