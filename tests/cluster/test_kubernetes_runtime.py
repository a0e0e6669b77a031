"""The Kubernetes runtime end to end: the official client against the stand-in API server.

One lab and one stand-in server for the module (tests/cluster/conftest.py:
``red`` operator-named pods, ``blue`` Helm-named under Pod Security baseline,
``green`` for destructive tests). Each test uses its own agent image so agents
(and their ports) never interfere.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from meridio_debug.controller.errors import AccessDenied, InjectionError, PodNotFound
from meridio_debug.controller.runtime import k8s_spec
from meridio_debug.controller.session import snapshot_all
from meridio_debug.controller.tls import create_ca, issue_client, load_or_create
from meridio_debug.protos import agent_pb2 as pb
from meridio_debug.protos import agent_pb2_grpc as pb_grpc
from tests.cluster.apiserver import StandInApiServer
from tests.cluster.conftest import Cluster

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the lab's network namespaces"),
]

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]
REPO = Path(__file__).resolve().parents[2]


def ephemeral_patches(server: StandInApiServer, image: str) -> list[tuple[str, str, Any]]:
    return [
        (pod, ctype, body)
        for pod, res, ctype, body in server.patches
        if res == "pods/ephemeralcontainers"
        and body.get("spec", {}).get("ephemeralContainers", [{}])[0].get("image") == image
    ]


def test_discovery_both_naming_schemes_and_roles(cluster: Cluster) -> None:
    for ns in ("red", "blue"):
        pods = cluster.runtime(ns).meridio_pods()
        roles = sorted(p.role for p in pods)
        assert roles == ["lb-fe"] * 2 + ["proxy"] * 2 + ["target"] * 4, (ns, pods)
        assert not any(p.name.startswith(("nsp-", "ipam-")) for p in pods)
        by_role = {p.role: p.target_container for p in pods}
        lb = "frontend" if ns == "red" else "fe"
        assert by_role == {"lb-fe": lb, "proxy": "proxy", "target": "example-target"}
    rt = cluster.runtime("red", selector="app=proxy-conduit-a")
    assert [p.role for p in rt.meridio_pods()] == ["proxy", "proxy"]
    assert {p.trench for p in cluster.runtime("red").meridio_pods() if p.role != "target"} == {
        "trench-a"
    }
    assert cluster.runtime("red", trench="other").meridio_pods() == [
        p for p in cluster.runtime("red").meridio_pods() if p.role == "target"
    ]


def test_snapshot_injects_first_container_then_analyze_reuses(cluster: Cluster) -> None:
    image = "ghcr.io/nordix/meridio-debug-agent:e2e"
    srv = cluster.server
    before = {k: json.dumps(p["metadata"]["labels"]) for k, p in srv.pods.items()}
    assert not any("ephemeralContainers" in srv.pods[k]["spec"] for k in srv.pods if k[0] == "red")
    res = cluster.cli("snapshot", "-n", "red", "--image", image, "-o", "json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert len(doc["pods"]) == 8
    for pod in doc["pods"]:
        assert pod["error"] is None and pod["runtime"] == "kubernetes"
        assert pod["location"] == f"red/{pod['pod']}"
        assert pod["links"], pod["pod"]
    lb = next(p for p in doc["pods"] if p["role"] == "lb-fe")
    assert any(r["fwmark"] for r in lb["rules"]), "the LB's fwmark rules come from its netns"
    assert "injecting" in res.stderr
    patches = ephemeral_patches(srv, image)
    assert len(patches) == 8
    for _pod, ctype, body in patches:
        # strategic merge, the shape that works when the pod has no ephemeral container yet
        assert ctype == "application/strategic-merge-patch+json"
        assert list(body) == ["spec"] and list(body["spec"]) == ["ephemeralContainers"]
    after = {k: json.dumps(p["metadata"]["labels"]) for k, p in srv.pods.items()}
    assert before == after, "pod labels are never touched"
    red = [
        p
        for k, p in srv.pods.items()
        if k[0] == "red" and k[1].startswith(("state", "proxy", "target"))
    ]
    for pod in red:
        records = k8s_spec.annotation_records(pod)
        assert [r["image"] for r in records.values()] == [image]

    # analyze (or snapshot again) reuses the running agents: no new ephemeral container
    help_ = subprocess.run([*CLI, "--help"], capture_output=True, text=True, check=False)
    cmd = "analyze" if " analyze " in help_.stdout else "snapshot"
    res = cluster.cli(cmd, "-n", "red", "--image", image, "-o", "json")
    assert res.returncode in (0, 3), res.stderr
    assert "reusing" in res.stderr and "injecting" not in res.stderr
    assert len(ephemeral_patches(srv, image)) == 8

    res = cluster.cli("agents", "-n", "red", "-o", "json")
    assert res.returncode == 0, res.stderr
    agents = [a for a in json.loads(res.stdout)["agents"] if a["image"] == image]
    assert len(agents) == 8 and {a["state"] for a in agents} == {"running"}


def test_profile_fields_target_container_and_privileged(cluster: Cluster) -> None:
    image = "ghcr.io/nordix/meridio-debug-agent:e2e"
    patches = ephemeral_patches(cluster.server, image)
    assert patches, "runs after the e2e test"
    roles = {p.name: p for p in cluster.runtime("red").meridio_pods()}
    for pod, _ctype, body in patches:
        (c,) = body["spec"]["ephemeralContainers"]
        assert c["securityContext"]["capabilities"] == {
            "add": ["NET_ADMIN", "NET_RAW", "SYS_PTRACE"]
        }
        assert "privileged" not in c["securityContext"]
        assert c["securityContext"]["runAsUser"] == 0
        assert not {"ports", "resources", "lifecycle", "readinessProbe"} & set(c)
        assert c["args"][:2] == ["--listen", f"tcp:127.0.0.1:{k8s_spec.agent_port(c['name'])}"]
        assert "--idle-timeout" in c["args"]
        want = {"lb-fe": "frontend", "proxy": "proxy", "target": "example-target"}[roles[pod].role]
        assert c["targetContainerName"] == want
    rt = cluster.runtime(
        "red", image="ghcr.io/nordix/meridio-debug-agent:priv", profile="privileged"
    )
    name = rt.meridio_pods()[0].name
    handle = asyncio.run(rt.inject(name))
    assert handle.injected
    ((_pod, _ct, body),) = ephemeral_patches(
        cluster.server, "ghcr.io/nordix/meridio-debug-agent:priv"
    )
    sc = body["spec"]["ephemeralContainers"][0]["securityContext"]
    assert sc["privileged"] is True and "capabilities" not in sc
    assert handle.name != patches[0][2]["spec"]["ephemeralContainers"][0]["name"]


def test_pod_security_refusal_says_why_for_every_pod(cluster: Cluster) -> None:
    res = cluster.cli("snapshot", "-n", "blue", "--image", "img:psa", "-o", "json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    assert len(doc["pods"]) == 8
    for pod in doc["pods"]:
        assert "Pod Security Admission refuses the agent" in pod["error"], pod
        assert 'violates PodSecurity "baseline:latest"' in pod["error"]
        assert '"NET_ADMIN"' in pod["error"]
    rt = cluster.runtime("blue", image="img:psa2", profile="privileged")
    with pytest.raises(InjectionError, match=r"privileged \(container"):
        asyncio.run(rt.inject(rt.meridio_pods()[0].name))


def test_422_forbidden_fields_and_changed_container(cluster: Cluster) -> None:
    rt = cluster.runtime("red", image="img:422")
    pod = rt.meridio_pods()[2].name
    bad = rt._container_for("meridio-debug-x422", "proxy")
    with pytest.raises(InjectionError, match="ports: Forbidden: cannot be set for an Ephemeral"):
        asyncio.run(rt.patch_ephemeral(pod, {**bad, "ports": [{"containerPort": 1}]}))
    with pytest.raises(InjectionError, match="resources: Forbidden"):
        asyncio.run(rt.patch_ephemeral(pod, {**bad, "resources": {"limits": {"cpu": "1"}}}))
    cluster.server.stuck_images.add("img:422")
    asyncio.run(rt.patch_ephemeral(pod, bad))
    changed = {**bad, "args": [*bad["args"], "--log-level", "DEBUG"]}
    with pytest.raises(
        InjectionError,
        match='existing ephemeral containers "meridio-debug-x422" may not be changed',
    ):
        asyncio.run(rt.patch_ephemeral(pod, changed))


def test_rbac_denials_name_the_missing_verb(cluster: Cluster) -> None:
    srv = cluster.server
    try:
        srv.denied = {("patch", "pods/ephemeralcontainers")}
        rt = cluster.runtime("red", image="img:rbac")
        with pytest.raises(
            AccessDenied, match=r"not allowed to patch pods/ephemeralcontainers .*grant verb"
        ):
            asyncio.run(rt.inject(rt.meridio_pods()[0].name))

        srv.denied = {("list", "pods")}
        res = cluster.cli("snapshot", "-n", "red", "--image", "img:rbac")
        assert res.returncode == 1 and "not allowed to list pods" in res.stderr

        srv.denied = {("create", "pods/portforward")}
        rt = cluster.runtime("red", image="ghcr.io/nordix/meridio-debug-agent:e2e", start_timeout=3)
        rt.opts.names = [rt.meridio_pods()[0].name]
        rt._pods = None
        (item,) = asyncio.run(snapshot_all(rt))
        assert "not allowed to create pods/portforward" in (item.error or ""), item.error

        srv.denied = {("patch", "pods")}  # annotation only: the injection still works
        events: list[tuple[str, str, str]] = []
        rt = cluster.runtime("red", image="img:noannot", events=events)
        handle = asyncio.run(rt.inject(rt.meridio_pods()[1].name))
        assert handle.injected
        assert any(s == "warning" and "patch pods" in d for _p, s, d in events), events
    finally:
        srv.denied = set()


def test_pod_deleted_mid_run_fails_that_pod_only(cluster: Cluster) -> None:
    srv = cluster.server
    rt = cluster.runtime("green", image="img:deleted")
    victim = rt.meridio_pods()[3].name
    srv.hooks["before-ephemeral-patch"] = lambda ns, name: (
        srv.delete_pod(ns, name) if name == victim else None
    )
    try:
        items = asyncio.run(snapshot_all(rt))
    finally:
        srv.hooks.clear()
    errors = {i.pod.name: i.error for i in items}
    assert "pod not found" in (errors.pop(victim) or "")
    assert not any(errors.values()), errors
    with pytest.raises(PodNotFound):
        asyncio.run(rt.inject(victim))


def test_image_pull_error_and_start_timeout(cluster: Cluster) -> None:
    srv = cluster.server
    srv.bad_images.add("registry.invalid/agent:nope")
    srv.stuck_images.add("img:stuck")
    rt = cluster.runtime("red", image="registry.invalid/agent:nope")
    t0 = time.monotonic()
    with pytest.raises(InjectionError, match=r"cannot be pulled \((ErrImagePull|ImagePullBackOff)"):
        asyncio.run(rt.inject(rt.meridio_pods()[0].name))
    assert time.monotonic() - t0 < 10, "a pull error fails at once, not at the timeout"
    rt = cluster.runtime("red", image="img:stuck", start_timeout=1.0)
    with pytest.raises(
        InjectionError, match=r"did not start within 1 s \(last state: ContainerCreating"
    ):
        asyncio.run(rt.inject(rt.meridio_pods()[0].name))
    res = cluster.cli("agents", "-n", "red", "-o", "json")
    states = {a["image"]: a["state"] for a in json.loads(res.stdout)["agents"]}
    assert states["registry.invalid/agent:nope"] == "zombie"
    assert states["img:stuck"] == "starting"


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
    res = cluster.cli("agents", "-n", "red", pod)
    assert res.returncode == 0
    line = next(ln for ln in res.stdout.splitlines() if f"{first.name} " in ln)
    assert "terminated" in line and "Completed, exit code 0" in line


def test_direct_mutual_tls_and_wrong_client_rejected(cluster: Cluster, tmp_path: Path) -> None:
    tls = load_or_create(tmp_path / "tls")
    rt = cluster.runtime("red", image="img:direct", direct=True, tls=tls)
    rt.opts.names = [rt.meridio_pods()[2].name]
    rt._pods = None
    (item,) = asyncio.run(snapshot_all(rt))
    assert not item.error and item.snapshot is not None and item.snapshot.links
    ((_pod, _ct, body),) = ephemeral_patches(cluster.server, "img:direct")
    c = body["spec"]["ephemeralContainers"][0]
    assert c["env"][0]["name"] == k8s_spec.CLIENT_CA_ENV
    assert "PRIVATE KEY" not in json.dumps(body), "no private key in the pod spec"
    # the same CA finds the same agent again
    rt2 = cluster.runtime(
        "red", image="img:direct", direct=True, tls=load_or_create(tmp_path / "tls")
    )
    assert rt2.key == rt.key

    pod = cluster.server.pods[("red", rt.opts.names[0])]
    ip, port = pod["status"]["podIP"], k8s_spec.port_of(c)
    log = cluster.server._log_path(("red", pod["metadata"]["name"]), c["name"]).read_bytes()
    from meridio_debug.controller.tls import agent_certificate

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
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(call(None, None))


def test_role_grants_exactly_the_verbs_the_code_used(cluster: Cluster) -> None:
    """Last on purpose: the requests of every test above, against deploy/rbac.yaml."""
    used = cluster.server.used_verbs()
    docs = list(yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text()))
    (role,) = [d for d in docs if d and d["kind"] == "Role"]
    granted = {
        (verb, res) for rule in role["rules"] for res in rule["resources"] for verb in rule["verbs"]
    }
    assert used == granted
