"""Pod and container health (MDB5xx), logs and configuration (MDB6xx) through a real API server.

The failures are made the way they happen, and the node side (kubelet.py)
reports them as a kubelet does: a container whose PID 1 is killed is
reported terminated with its real exit code (the kernel's), backs off in
CrashLoopBackOff and is started again, its previous instance's log kept
apart; an FE whose bird has no Established session to a gateway fails its
readiness probe; a pod whose image cannot be pulled cycles ErrImagePull <->
ImagePullBackOff and stays Pending; a pod no Node's labels fit is left
unscheduled with the scheduler's message. The trench's Meridio CRs are
created in the namespace (the CRDs are installed by the bed), and a Flow
edited behind nfqlb's back is reported on the LBs. ``meridio-debug analyze``
runs as deploy/rbac.yaml's service account plus deploy/rbac-optional.yaml
(CRs, cluster-wide pod list), and must name each failure with the right code
on the right pod, evidence included, and find the healthy trench clean.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s_client

from meridio_debug.controller.lab.containers import find_container
from meridio_debug.controller.lab.state import bird_paths, state_dir
from meridio_debug.controller.lab.trench_crs import lab_config
from meridio_debug.controller.model.meridio_config import to_crs
from tests.cluster.conftest import CLI, RBAC, SA, Cluster
from tests.cluster.kube import REPO
from tests.cluster.kubelet import BACKOFF_S, wait_for
from tests.cluster.pods import REG, meridio_pod

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the lab's namespaces)"),
    pytest.mark.skipif(shutil.which("birdc") is None, reason="bird2 not installed"),
]

TRENCH = "trench-a"  # what tests/cluster/pods.py names in the pods' env
OPTIONAL = [d for d in yaml.safe_load_all((REPO / "deploy/rbac-optional.yaml").read_text()) if d]


@pytest.fixture(scope="module")
def bed(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster plus the trench's CRs, the optional rights and an NSM pod."""
    red, green = cluster.ns["red"], cluster.ns["green"]
    rbac = k8s_client.RbacAuthorizationV1Api(cluster.plane.admin)
    binding = f"meridio-debug-pods-{red}"
    nsmgr = meridio_pod(green, "nsmgr-x", "other", f"{cluster.spec.prefix}node-a")
    try:
        config = dataclasses.replace(lab_config(cluster.spec), trench=TRENCH)
        cluster.plane.apply(to_crs(config, red), namespace=red)
        cluster.plane.apply(OPTIONAL, namespace=red)
        cluster.plane.apply(
            [
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": {"name": binding},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": "meridio-debug-pods",
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": red}],
                }
            ]
        )
        cluster.core.create_namespaced_pod(green, nsmgr)
        cluster.wait_running("green", [nsmgr["metadata"]["name"]])
        yield cluster
    finally:
        with contextlib.suppress(k8s_client.ApiException):
            cluster.delete_pod("green", nsmgr["metadata"]["name"])
        with contextlib.suppress(k8s_client.ApiException):
            rbac.delete_cluster_role_binding(binding)
        with contextlib.suppress(k8s_client.ApiException):
            rbac.delete_cluster_role("meridio-debug-pods")


def analyze(c: Cluster, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = c.cli("analyze", "-n", c.ns["red"], "-o", "json", *extra, timeout=180)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def codes(doc: dict[str, Any], family: str) -> set[tuple[str, str]]:
    return {(f["code"], f["pod"]) for f in doc["findings"] if f["code"].startswith(family)}


def status_of(c: Cluster, pod: str, container: str) -> dict[str, Any]:
    st = c.read_pod("red", pod).get("status", {})
    return next((s for s in st.get("containerStatuses") or [] if s["name"] == container), {})


def pid1(c: Cluster, lab_pod: str, container: str) -> int:
    found = find_container(str(c.spec.netns(lab_pod)), container)
    assert found is not None, f"no {container} in {lab_pod}"
    return found[0]


def say(pid: int, line: str) -> None:
    """A line on the container's stdout (as ``kubectl exec -- sh -c 'echo ... >/proc/1/fd/1'``)."""
    with open(f"/proc/{pid}/fd/1", "a") as out:
        out.write(line + "\n")


def birdc(c: Cluster, lab_pod: str, *args: str) -> None:
    ctl = bird_paths(state_dir(c.spec.prefix), lab_pod)["ctl"]
    subprocess.run(["birdc", "-s", str(ctl), *args], check=True, capture_output=True)


def test_healthy_trench_is_clean_and_summarised(bed: Cluster) -> None:
    rc, doc, err = analyze(bed)
    assert codes(doc, "MDB5") == set(), err
    assert codes(doc, "MDB6") == set(), err  # the CRs say what nfqlb, bird and nft do
    assert rc == 0, err
    assert "configuration not read" not in err
    for line in (
        "✔ LB/FE pods ready (2)",
        "✔ proxy pods ready (2)",
        "✔ target pods ready (4)",
        "✔ NSP/IPAM/NSE pods ready (2)",
        "✔ NSM pods ready (1)",  # cluster-wide, through the optional ClusterRole
    ):
        assert line in err, err


def test_failures_are_named_on_their_pods(bed: Cluster) -> None:
    k = bed.kubelet
    red = bed.ns["red"]
    lb = bed.pod_by_lab("red", "lb-fe-a")
    crash = bed.pod_by_lab("red", "target-a1")
    again = bed.pod_by_lab("red", "target-b1")
    bad_image = f"{REG}/example-target:no-such-tag"
    img = meridio_pod(red, "target-b9", "target", f"{bed.spec.prefix}node-b")
    img["spec"]["containers"][0]["image"] = bad_image
    unschedulable = meridio_pod(red, "target-a9", "target", "")
    del unschedulable["spec"]["nodeName"]
    unschedulable["spec"]["nodeSelector"] = {"disktype": "ssd"}
    k.backoff = (0.3, 600.0)  # the first crash restarts at once, the second backs off
    try:
        # target-b1's tapa dies once and runs again: restarted, two logs
        pid = pid1(bed, "target-b1", "tapa")
        say(pid, "tapa: instance 1: lost the NSP stream (nsp-service-trench-a:7778)")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: status_of(bed, again, "tapa").get("restartCount") == 1, what="restart")
        wait_for(lambda: "running" in status_of(bed, again, "tapa")["state"], what="running")
        say(pid1(bed, "target-b1", "tapa"), "tapa: instance 2: registered to stream-a")
        # target-a1's tapa dies twice: restarted once, then CrashLoopBackOff
        for n in (1, 2):
            pid = pid1(bed, "target-a1", "tapa")
            say(pid, f"tapa: instance {n}: nsp: connection refused")
            os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda n=n: (
                    status_of(bed, crash, "tapa").get("restartCount") == 1
                    and ("running" if n == 1 else "waiting")
                    in status_of(bed, crash, "tapa")["state"]
                ),
                what=f"crash {n}",
            )
        # lb-fe-a's FE loses both gateway sessions: its readiness probe fails
        birdc(bed, "lb-fe-a", "disable", '"NBR-gateway-v4-a"')
        birdc(bed, "lb-fe-a", "disable", '"NBR-gateway-v6-a"')
        wait_for(lambda: status_of(bed, lb, "frontend").get("ready") is False, what="unready")
        # a new target whose image does not exist, and one that fits no node
        k.bad_images.add(bad_image)
        bed.core.create_namespaced_pod(red, img)
        bed.core.create_namespaced_pod(red, unschedulable)
        img_name, pending = img["metadata"]["name"], unschedulable["metadata"]["name"]
        wait_for(
            lambda: "waiting" in status_of(bed, img_name, "example-target").get("state", {}),
            what="image pull",
        )
        wait_for(
            lambda: any(
                c.get("reason") == "Unschedulable"
                for c in bed.read_pod("red", pending).get("status", {}).get("conditions") or []
            ),
            what="unschedulable",
        )

        rc, doc, err = analyze(bed)
    finally:
        k.backoff = BACKOFF_S
        k.bad_images.discard(bad_image)
        for p in (img, unschedulable):
            with contextlib.suppress(k8s_client.ApiException):
                bed.delete_pod("red", p["metadata"]["name"])
        birdc(bed, "lb-fe-a", "enable", '"NBR-gateway-v4-a"')
        birdc(bed, "lb-fe-a", "enable", '"NBR-gateway-v6-a"')
        k.expire_backoffs()
    assert rc == 3
    assert codes(doc, "MDB5") == {
        ("MDB522", crash),
        ("MDB521", again),
        ("MDB511", lb),
        ("MDB531", img_name),
        ("MDB502", img_name),
        ("MDB502", pending),
    }, err
    by = {(f["code"], f["pod"]): f for f in doc["findings"]}

    looping = by[("MDB522", crash)]["evidence"]
    assert looping["container"] == "tapa" and looping["reason"] == "CrashLoopBackOff"
    assert looping["last_exit_code"] == 137  # SIGKILL, as the kernel reported the exit
    assert looping["restarts"] == 1
    assert "tapa: instance 2: nsp: connection refused" in looping["previous_log"]

    restarted = by[("MDB521", again)]["evidence"]
    assert restarted["container"] == "tapa" and restarted["restarts"] == 1
    assert (
        "tapa: instance 1: lost the NSP stream (nsp-service-trench-a:7778)"
        in (restarted["previous_log"])
    )
    assert restarted["log"] == ["tapa: instance 2: registered to stream-a"]

    fe = by[("MDB511", lb)]
    assert fe["evidence"]["container"] == "frontend" and fe["evidence"]["ready_count"] == "2/3"
    assert "the FE has no gateway" in fe["summary"] and fe["evidence"]["see"]
    assert ("MDB101", lb) in codes(doc, "MDB1")

    assert by[("MDB531", img_name)]["evidence"]["container"] == "example-target"
    assert bad_image in by[("MDB531", img_name)]["summary"]
    assert "didn't match Pod's node affinity/selector" in by[("MDB502", pending)]["summary"]
    assert f"✘ LB/FE pods: 1 of 2 not ready: {lb} 2/3 Running" in err

    # and it heals: every container of the lab's pods ready again
    def healed() -> bool:
        for (ns, _lab), name in bed.lab_pods.items():
            if ns != red:
                continue
            st = bed.read_pod("red", name).get("status", {})
            if not all(c.get("ready") for c in st.get("containerStatuses") or [{}]):
                return False
        return True

    wait_for(healed, timeout=60, what="the trench ready again")


def test_flow_whose_ports_differ_from_nfqlb_is_named_on_each_lb(bed: Cluster) -> None:
    custom = k8s_client.CustomObjectsApi(bed.plane.admin)
    red = bed.ns["red"]
    flow = custom.get_namespaced_custom_object("meridio.nordix.org", "v1", red, "flows", "flow-a")
    edited = copy.deepcopy(flow)
    edited["spec"]["destination-ports"] = ["4000-4001"]
    custom.replace_namespaced_custom_object(
        "meridio.nordix.org", "v1", red, "flows", "flow-a", edited
    )
    try:
        rc, doc, err = analyze(bed)
    finally:
        current = custom.get_namespaced_custom_object(
            "meridio.nordix.org", "v1", red, "flows", "flow-a"
        )
        current["spec"] = flow["spec"]
        custom.replace_namespaced_custom_object(
            "meridio.nordix.org", "v1", red, "flows", "flow-a", current
        )
    lbs = {bed.pod_by_lab("red", "lb-fe-a"), bed.pod_by_lab("red", "lb-fe-b")}
    assert codes(doc, "MDB6") == {("MDB602", p) for p in lbs}, err
    assert rc == 3
    for p in lbs:
        f = next(f for f in doc["findings"] if f["code"] == "MDB602" and f["pod"] == p)
        differs = f["evidence"]["differs"]
        assert differs == {"dports": {"config": ["4000-4001"], "nfqlb": ["4000-4003"]}}
        assert f["evidence"]["config_source"] == f"CRs in namespace {red}"


def test_e2e_hook_on_failure_in_the_cluster(bed: Cluster) -> None:
    out = bed.work / "e2e-output"
    proc = bed.cli(
        "e2e-hook",
        "on_failure",
        "1764000000000000000",
        "-n",
        bed.ns["red"],
        "--output-path",
        str(out),
        "--output-id",
        "c1",
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        f"meridio-debug-c1.{e}" for e in ("html", "json", "tar.gz", "xml")
    ]
    replay = subprocess.run(  # no --kubeconfig: a bundle replays without the cluster
        [*CLI, "analyze", "--from", str(out / "meridio-debug-c1.tar.gz"), "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    hook = json.loads((out / "meridio-debug-c1.json").read_text())
    assert json.loads(replay.stdout)["findings"] == hook["findings"]


def test_optional_rights_are_the_ones_used(bed: Cluster) -> None:
    """Last: everything our user did here is granted by rbac.yaml + rbac-optional.yaml."""
    user = f"system:serviceaccount:{bed.ns['red']}:{SA}"
    used = bed.plane.allowed_requests(user)

    def granted(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {
            (verb, res)
            for d in docs
            if d["kind"] in ("Role", "ClusterRole")
            for rule in d["rules"]
            for res in rule["resources"]
            for verb in rule["verbs"]
        }

    assert used <= granted(RBAC) | granted(OPTIONAL), used - granted(RBAC) - granted(OPTIONAL)
    meridio = {r for r in OPTIONAL[0]["rules"][0]["resources"]}
    assert {r for v, r in used if v == "list"} >= meridio | {"pods"}
