"""The Kubernetes runtime's pure decisions, on pod objects shaped like the API's (no cluster)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meridio_debug.agent.errors import ListenError
from meridio_debug.agent.main import tls_config
from meridio_debug.controller.runtime import k8s_spec as s
from meridio_debug.controller.runtime.tls import (
    agent_certificate,
    create_ca,
    fingerprint,
    issue_client,
)


def pod(
    name: str, containers: list[str], labels: dict[str, str] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "red", "labels": labels or {}, **extra},
        "spec": {"containers": [{"name": c} for c in containers]},
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    }


@pytest.mark.parametrize(
    ("p", "role", "target"),
    [
        (
            pod(
                "stateless-lb-frontend-attractor-a-1-x",
                ["stateless-lb", "frontend"],
                {"app": "stateless-lb-frontend-attractor-a-1", "app-type": "stateless-lb-frontend"},
            ),
            "lb-fe",
            "frontend",
        ),
        (
            pod(
                "load-balancer-trench-a-abc12-xyz98",
                ["load-balancer", "fe", "nsc"],
                {"app": "load-balancer-trench-a"},
            ),
            "lb-fe",
            "fe",
        ),
        (pod("whatever", ["stateless-lb", "frontend"]), "lb-fe", "frontend"),
        (pod("proxy-conduit-a-x1", ["proxy"], {"app": "proxy-conduit-a"}), "proxy", "proxy"),
        (pod("meridio-proxy-trench-a-x1", ["proxy"]), "proxy", "proxy"),
        (
            pod("target-a-1-x", ["example-target", "tapa"], {"app": "target-a"}),
            "target",
            "example-target",
        ),
        (pod("nsp-trench-a-0", ["nsp"], {"app": "nsp-trench-a"}), None, None),
        (pod("ipam-trench-a-0", ["ipam"], {"app": "ipam-trench-a"}), None, None),
    ],
)
def test_classify_both_naming_schemes(
    p: dict[str, Any], role: str | None, target: str | None
) -> None:
    assert s.classify(p) == role
    if role:
        assert s.target_container(p, role) == target


def test_trench_from_labels_env_and_legacy_names() -> None:
    lb = pod("x", ["stateless-lb", "frontend"])
    lb["spec"]["containers"][0]["env"] = [
        {"name": "NSM_SERVICE_NAME", "value": "conduit-a.trench-b.red"}
    ]
    assert s.trench_of(lb, "lb-fe") == "trench-b"
    px = pod("p", ["proxy"], {"app": "proxy-c"})
    px["spec"]["containers"][0]["env"] = [
        {"name": "NSM_SERVICE_NAME", "value": "proxy.c.trench-c.red"}
    ]
    assert s.trench_of(px, "proxy") == "trench-c"
    assert (
        s.trench_of(pod("load-balancer-trench-a-abc12-xyz98", ["load-balancer", "fe"]), "lb-fe")
        == "trench-a"
    )
    assert s.trench_of(pod("t", ["tapa"], {"trench": "t1"}), "target") == "t1"
    pods = [
        lb,
        px,
        pod("t", ["app", "tapa"]),
        pod("gone", ["tapa"], deletionTimestamp="2026-01-01T00:00:00Z"),
    ]
    found = s.discover(pods, trench="trench-b")
    assert [(p.name, p.role) for p in found] == [("x", "lb-fe"), ("t", "target")]


def test_agent_container_has_only_allowed_fields_and_the_profile() -> None:
    c = s.agent_container(
        "meridio-debug-abc",
        image="i:1",
        profile="netadmin",
        target="frontend",
        idle_timeout=90,
        direct=False,
        client_ca_pem="PEM",
    )
    assert not {
        "ports",
        "resources",
        "lifecycle",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
    } & set(c)
    assert c["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW", "SYS_PTRACE"]
    assert c["targetContainerName"] == "frontend"
    assert s.port_of(c) == s.agent_port("meridio-debug-abc")
    assert "127.0.0.1" in c["args"][1]
    # port-forward mode too: the pod's containers share loopback, so the agent requires mTLS
    assert c["env"] == [
        {"name": s.CLIENT_CA_ENV, "value": "PEM"},
        {"name": s.TARGET_CONTAINER_ENV, "value": "frontend"},  # sections name it
    ]
    assert "--tls-client-ca-env" in c["args"]
    p = s.agent_container(
        "n",
        image="i",
        profile="privileged",
        target=None,
        idle_timeout=1,
        direct=True,
        client_ca_pem="PEM",
    )
    assert p["securityContext"]["privileged"] is True and "capabilities" not in p["securityContext"]
    assert p["env"] == [{"name": s.CLIENT_CA_ENV, "value": "PEM"}] and "[::]" in p["args"][1]
    with pytest.raises(ValueError):
        s.agent_container("n", image="i", profile="root", target=None, idle_timeout=1, direct=False)


def with_agents(statuses: list[tuple[str, dict[str, Any] | None]]) -> dict[str, Any]:
    p = pod("lb", ["stateless-lb", "frontend"])
    p["spec"]["ephemeralContainers"] = [{"name": n, "image": "i"} for n, _st in statuses]
    p["status"]["ephemeralContainerStatuses"] = [
        {"name": n, "state": st} for n, st in statuses if st is not None
    ]
    return p


def test_plan_reuses_running_and_never_reuses_a_terminated_name() -> None:
    key = s.agent_key("i", "netadmin", "port-forward")
    base = s.agent_name(key)
    assert s.plan(with_agents([]), key) == s.Plan(base, True, None)
    running = s.plan(with_agents([(base, {"running": {"startedAt": "t"}})]), key)
    assert running.name == base and not running.inject
    starting = s.plan(with_agents([(base, None)]), key)
    assert starting.name == base and not starting.inject
    done = with_agents(
        [(base, {"terminated": {"exitCode": 0}}), (base + "-2", {"terminated": {"exitCode": 1}})]
    )
    assert s.plan(done, key) == s.Plan(base + "-3", True, None)
    states = [a.state for a in s.agents_of(done)]
    assert states == ["terminated", "zombie"]
    # the kubelet keeps retrying a pull: the agent is still starting and is reused, not replaced
    pull = with_agents([(base, {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off"}})])
    assert s.agents_of(pull)[0].state == "starting"
    assert s.plan(pull, key).name == base and not s.plan(pull, key).inject
    bad = with_agents([(base, {"waiting": {"reason": "InvalidImageName"}})])
    assert s.agents_of(bad)[0].state == "zombie"
    assert s.plan(bad, key).name == base + "-2"
    assert s.agent_key("i", "netadmin", "direct", "ca1") != s.agent_key(
        "i", "netadmin", "direct", "ca2"
    )


def test_annotation_patch_touches_only_the_annotation() -> None:
    p = pod("x", ["proxy"], {"app": "proxy-a"}, annotations={"other": "1"})
    patch = s.annotation_patch(p, {"name": "meridio-debug-a", "image": "i"})
    assert list(patch["metadata"]) == ["annotations"]
    assert list(patch["metadata"]["annotations"]) == [s.ANNOTATION]
    p["metadata"]["annotations"].update(patch["metadata"]["annotations"])
    again = s.annotation_patch(p, {"name": "meridio-debug-b", "image": "i"})
    assert [r["name"] for r in json.loads(again["metadata"]["annotations"][s.ANNOTATION])] == [
        "meridio-debug-a",
        "meridio-debug-b",
    ]


def test_rbac_message_names_verb_and_resource() -> None:
    msg = 'pods "x" is forbidden: User "u" cannot patch resource "pods/ephemeralcontainers" in API group "" in the namespace "red"'
    assert s.rbac_denial(msg) == ("patch", "pods/ephemeralcontainers")
    assert s.status_message(json.dumps({"kind": "Status", "message": msg})) == msg
    assert s.rbac_denial("violates PodSecurity") is None
    # 1.35+: a refused port-forward upgrade says no reason; the request names it
    empty = 'pods "x" is forbidden: '
    assert s.rbac_denial(empty) is None
    assert s.rbac_denial(empty, ("create", "pods/portforward")) == ("create", "pods/portforward")
    assert s.rbac_denial("pods is forbidden: quota", ("get", "pods")) is None


def test_agent_tls_flags_and_the_printed_certificate(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_config(None, None, None, None) is None
    ca, _key = create_ca()
    monkeypatch.setenv("CA_PEM", ca.decode())
    cfg = tls_config(None, "CA_PEM", None, None)
    assert cfg is not None and cfg.client_ca_pem == ca
    printed = agent_certificate(capsys.readouterr().err.encode())
    assert printed is not None and fingerprint(printed) == fingerprint(cfg.cert_pem)
    with pytest.raises(ListenError, match="unset or empty"):
        tls_config(None, "NOPE_UNSET", None, None)
    leaf, _k = issue_client(ca, _key)
    (tmp_path / "leaf.pem").write_bytes(leaf)
    with pytest.raises(ListenError, match="not a CA"):
        tls_config(str(tmp_path / "leaf.pem"), None, None, None)
    with pytest.raises(ListenError, match="go together"):
        tls_config(None, "CA_PEM", "c.pem", None)
