"""watch, capture and trace with ``-n``: the commands a user runs against a cluster.

Same real API server, kubelet and lab as the runtime tests (tests/cluster/conftest.py);
here the point is that the streaming commands (watch, capture) and the trace
work through injection + port-forward exactly as they do on the lab, and that
what they report comes from the pod the user named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meridio_debug.controller.lab.jhash import predict_target
from tests.cluster.conftest import Cluster

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for the lab's network namespaces"),
]


def lab_ns(cluster: Cluster, lab_name: str) -> str:
    return str(cluster.spec.netns(lab_name))


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float = 60) -> str:
    """Read stderr until a line containing ``needle`` (the CLI's progress) appears."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} on stderr; got: {''.join(seen)[-2000:]}")


def test_watch_with_namespace_streams_the_named_pods_changes(cluster: Cluster) -> None:
    pod = cluster.pod_by_lab("red", "proxy-a")
    ns = lab_ns(cluster, "proxy-a")
    proc = cluster.popen(
        "watch", "-n", cluster.ns["red"], pod, "--image", "agent:watch", "--kind", "route",
        "--duration", "20", "-o", "json",
    )  # fmt: skip
    try:
        wait_for_line(proc, "watching")
        subprocess.run(
            ["ip", "-n", ns, "route", "add", "198.51.100.77/32", "dev", "lo", "table", "77"],
            check=True,
        )
        subprocess.run(
            ["ip", "-n", ns, "route", "del", "198.51.100.77/32", "dev", "lo", "table", "77"],
            check=True,
        )
        assert proc.stdout is not None
        events = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(events) < 2:
            line = proc.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if "198.51.100.77" in json.dumps(event):
                events.append(event)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert [e["pod"] for e in events] == [pod, pod]
    assert [e["action"] for e in events] == ["new", "del"], events


def test_capture_with_namespace_writes_one_pcapng_per_pod_interface(
    cluster: Cluster, tmp_path: Path
) -> None:
    lb = cluster.pod_by_lab("red", "lb-fe-a")
    out = tmp_path / "cap.pcapng"
    proc = cluster.popen(
        "capture", "-n", cluster.ns["red"], lb, "--image", "agent:capture", "-f", "udp port 9999",
        "--duration", "30", "-c", "3", "-w", str(out),
    )  # fmt: skip
    fe = cluster.spec.frontends[0]
    try:
        wait_for_line(proc, "capturing")
        send = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"for i in range(3): s.sendto(b'probe%d' % i, ('{fe.ipv4}', 9999))"
        )
        gw_ns = lab_ns(cluster, cluster.spec.gateway.pod)
        subprocess.run(["ip", "netns", "exec", gw_ns, sys.executable, "-c", send], check=True)
        _, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    rows = subprocess.run(
        ["tshark", "-r", str(out), "-T", "fields", "-e", "frame.interface_name", "-e", "data.data"],
        capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    packets = [r.split("\t") for r in rows if r]
    assert packets == [
        [f"{lb}/{fe.ext_ifname}", bytes(f"probe{i}", "ascii").hex()] for i in range(3)
    ], packets


def test_trace_with_namespace_follows_the_flow_and_names_a_broken_hop(cluster: Cluster) -> None:
    """No gateway pod in a cluster: every LB is a possible entry; the target is still exact."""
    flow = "tcp 200.100.0.7:40000 -> 20.0.0.1:4000"
    args = (
        "trace",
        "-n",
        cluster.ns["red"],
        "--image",
        "agent:trace",
        "--flow",
        flow,
        "-o",
        "json",
    )
    res = cluster.cli(*args)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    (chosen,) = [p for p in doc["paths"] if p["chosen"]]
    want = predict_target(cluster.spec, "200.100.0.7", proto="tcp", sport=40000, dport=4000)
    assert cluster.lab_of("red", chosen["target"]) == want
    assert doc["first_broken"] is None
    roles = {(h["role"], h["direction"]) for h in chosen["hops"]}
    assert roles >= {("lb-fe", "forward"), ("proxy", "forward"), ("target", "forward")}
    assert roles >= {("target", "return"), ("proxy", "return"), ("lb-fe", "return")}

    # the target loses the VIP: the trace names that pod, forward, MDB301, exit 3
    ns = lab_ns(cluster, want)
    subprocess.run(["ip", "-n", ns, "addr", "del", "20.0.0.1/32", "dev", "nsm-0"], check=True)
    try:
        res = cluster.cli(*args)
    finally:
        subprocess.run(["ip", "-n", ns, "addr", "add", "20.0.0.1/32", "dev", "nsm-0"], check=True)
    assert res.returncode == 3, res.stderr
    broken = json.loads(res.stdout)["first_broken"]
    assert (broken["pod"], broken["direction"], broken["code"]) == (
        chosen["target"],
        "forward",
        "MDB301",
    )
    assert "reusing" in res.stderr and "injecting" not in res.stderr


def test_active_trace_with_namespace_probes_from_the_lb(cluster: Cluster) -> None:
    """No gateway pod: an LB sends the probes with the flow's mark; the packets agree."""
    flow = "udp 200.100.0.7:40000 -> 20.0.0.1:4000"
    res = cluster.cli(
        "trace", "-n", cluster.ns["red"], "--image", "agent:trace", "--active", "--probe", "3",
        "--flow", flow, "-o", "json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    active = doc["active"]
    assert cluster.lab_of("red", active["target"]) == predict_target(
        cluster.spec, "200.100.0.7", proto="udp", sport=40000, dport=4000
    )
    assert doc["first_broken"] is None
