"""Pod and container health (MDB5xx) through the Kubernetes runtime, over real HTTP.

Against the stand-in API server of this tier (tests/cluster/apiserver.py: the
official client, real JSON, real 403s; a real kube-apiserver test bed is being
built): pod statuses are set the way a kubelet reports them, container logs are
files the server's pods/log serves, and ``meridio-debug analyze -n red`` must
name each failure with the right code on the right pod, with the container, the
reason, the exit code and the log lines as evidence, and the healthy trench must
be clean. The stand-in serves no cluster-scope pod list, so NSM/Spire are
reported unreadable (MDB542): the partial-failure path, by accident of the bed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meridio_debug.controller import lab
from tests.cluster.apiserver import StandInApiServer
from tests.cluster.conftest import CLI

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the lab's namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]


@dataclass
class Cluster:
    """This module's own bed until it moves to the real API server (tests/cluster/conftest.py)."""

    server: StandInApiServer
    kubeconfig: Path
    spec: Any
    work: Path

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args, "--kubeconfig", str(self.kubeconfig)],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    prefix = f"mdh{os.getpid() % 1000}-"
    spec = lab.build_spec(prefix)
    work = tmp_path_factory.mktemp("standin")
    server = StandInApiServer(work)
    try:
        lab.up(spec)
        server.start()
        server.add_lab([(p.name, p.role, p.netns) for p in spec.pods], "red")
        yield Cluster(server, server.kubeconfig(work / "kubeconfig"), spec, work)
    finally:
        server.stop()
        lab.down(prefix)


def analyze(cluster: Cluster, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = cluster.cli("analyze", "-n", "red", "-o", "json", *extra, timeout=180)
    assert proc.returncode in (0, 3), proc.stderr
    return proc.returncode, json.loads(proc.stdout), proc.stderr


def health(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(f["code"], f["pod"]) for f in doc["findings"] if f["code"].startswith("MDB5")}


def _pod(cluster: Cluster, lab_name: str) -> tuple[str, dict[str, Any]]:
    name = cluster.server.pod_by_lab("red", lab_name)
    return name, cluster.server.pods[("red", name)]


def _status(pod: dict[str, Any], container: str) -> dict[str, Any]:
    return next(c for c in pod["status"]["containerStatuses"] if c["name"] == container)


def test_healthy_trench_is_clean_and_summarised(cluster: Cluster) -> None:
    rc, doc, err = analyze(cluster)
    assert health(doc) <= {("MDB542", "")}
    assert rc == 0
    assert "✔ LB/FE pods ready (2)" in err and "✔ NSP/IPAM/NSE pods ready (2)" in err


def test_failures_are_named_on_their_pods(cluster: Cluster) -> None:
    server = cluster.server
    lb, lb_pod = _pod(cluster, "lb-fe-a")
    tgt, tgt_pod = _pod(cluster, "target-a1")
    img, img_pod = _pod(cluster, "target-b2")
    prx, prx_pod = _pod(cluster, "proxy-b")
    saved = json.dumps([lb_pod["status"], tgt_pod["status"], img_pod["status"], prx_pod["status"]])
    log = server._log_path(("red", tgt), "tapa")
    try:
        with server._lock:
            _status(lb_pod, "frontend")["ready"] = False
            _status(tgt_pod, "tapa").update(
                ready=False,
                restartCount=6,
                state={"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}},
                lastState={
                    "terminated": {
                        "reason": "Error",
                        "exitCode": 2,
                        "finishedAt": "2026-01-01T00:00:00Z",
                    }
                },
            )
            _status(img_pod, "example-target").update(
                ready=False,
                state={
                    "waiting": {
                        "reason": "ImagePullBackOff",
                        "message": 'Back-off pulling image "example-target:nope"',
                    }
                },
            )
            prx_pod["status"]["phase"] = "Pending"
            prx_pod["status"]["conditions"] = [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/2 nodes are available: 2 Insufficient memory.",
                }
            ]
        log.write_text("tapa starting\nnsp: connection refused (nsp-service-trench-a:7778)\n")
        rc, doc, err = analyze(cluster)
    finally:
        statuses = json.loads(saved)
        with server._lock:
            for p, st in zip((lb_pod, tgt_pod, img_pod, prx_pod), statuses, strict=True):
                p["status"] = st
        log.unlink(missing_ok=True)
    assert rc == 3
    assert health(doc) - {("MDB542", "")} == {
        ("MDB511", lb),
        ("MDB522", tgt),
        ("MDB531", img),
        ("MDB502", prx),
    }
    by = {(f["code"], f["pod"]): f for f in doc["findings"]}
    crash = by[("MDB522", tgt)]["evidence"]
    assert crash["container"] == "tapa" and crash["last_exit_code"] == 2
    # the log lines the pods/log endpoint served are in the evidence
    assert "nsp: connection refused (nsp-service-trench-a:7778)" in crash["log"]
    assert by[("MDB511", lb)]["evidence"]["container"] == "frontend"
    assert "Insufficient memory" in by[("MDB502", prx)]["summary"]
    assert ("MDB002", prx) in {(f["code"], f["pod"]) for f in doc["findings"]}  # no agent in it
    assert f"✘ LB/FE pods: 1 of 2 not ready: {lb} 1/2 Running" in err


def test_e2e_hook_on_failure_in_the_cluster(cluster: Cluster) -> None:
    out = cluster.work / "e2e-output"
    proc = cluster.cli(
        "e2e-hook",
        "on_failure",
        "1764000000000000000",
        "-n",
        "red",
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
