"""Agents see what an ephemeral container sees, in the lab's pods-as-pods.

An agent of the lab runtime joins an LB/FE pod as an ephemeral container
targeting ``frontend`` would (agent/ephemeral.py): the pod's network namespace,
frontend's PID namespace only, a mount namespace of its own. What a user
notices: the snapshot lists frontend's processes and nothing of the
stateless-lb container, bird comes "from container frontend", and nfqlb --
invisible as a process -- is still reported, from container stateless-lb,
through the pod's @nfqlb socket and /dev/shm (issue 11's measured failure was
"nfqlb: ABSENT" there), from *this* pod's /dev/shm, and a dead nfqlb is named
as such. One lab (real nfqlb 1.2.0) for the module, always removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from meridio_debug.controller.lab import build_spec, down, up
from meridio_debug.controller.lab.state import read_state

pytestmark = [
    pytest.mark.netns,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]

CLI = [sys.executable, "-m", "meridio_debug.controller.cli"]


@pytest.fixture(scope="module")
def lab(lab_prefix):
    prefix = lab_prefix()
    spec = build_spec(prefix=prefix)
    try:
        up(spec)
        yield spec
    finally:
        down(prefix)


def container_pid(prefix: str, pod: str, container: str) -> int:
    state = read_state(prefix)
    assert state is not None
    return next(r.pid for r in state.processes if (r.pod, r.container) == (pod, container))


def in_container(pid: int, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", "-t", str(pid), "-n", "-m", "-p", "--", *argv],
        capture_output=True,
        text=True,
        check=check,
        timeout=10,
    )


def snapshot(prefix: str, pod: str, *sections: str) -> dict:
    args = [arg for s in sections for arg in ("--section", s)]
    res = subprocess.run(
        [*CLI, "snapshot", "--lab", pod, "--prefix", prefix, *args, "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    (doc,) = json.loads(res.stdout)["pods"]
    return doc


def status_of(doc: dict, section: str) -> dict:
    return next(s for s in doc["section_status"] if s["name"] == section)


def test_agent_sees_only_the_frontend_containers_processes(lab):
    doc = snapshot(lab.prefix, "lb-fe-a", "processes", "bird")
    procs = {(p["pid"], p["name"]) for p in doc["processes"]}
    assert procs == {(1, "bird")}  # PID 1 of frontend; no stateless-lb, no host process
    for section in ("processes", "bird"):
        assert status_of(doc, section)["container"] == "frontend"
    assert status_of(doc, "bird")["state"] == "OK"
    assert doc["bird"]["pid"] == 1
    established = [p for p in doc["bird"]["protocols"] if p.get("bgp_state") == "Established"]
    assert len(established) == 2


def test_agent_in_a_target_sees_the_application_not_tapa(lab):
    doc = snapshot(lab.prefix, "target-b2", "processes", "bird", "nfqlb")
    names = {p["name"] for p in doc["processes"]}
    assert "tapa" not in names and "python" in names
    bird = status_of(doc, "bird")
    assert bird["state"] == "ABSENT"
    assert "container example-target's PID namespace" in bird["message"]
    nfqlb = status_of(doc, "nfqlb")
    assert nfqlb["state"] == "ABSENT"
    for where in ("example-target", "@nfqlb", "/dev/shm"):
        assert where in nfqlb["message"]


def test_agent_targeting_frontend_reports_nfqlb_of_stateless_lb(lab):
    lb = container_pid(lab.prefix, "lb-fe-a", "stateless-lb")
    assert in_container(lb, "cat", "/proc/1/comm").stdout.strip() == "nfqlb"  # flowlb, PID 1
    doc = snapshot(lab.prefix, "lb-fe-a", "processes", "nfqlb")
    # The process is not visible from frontend...
    assert "nfqlb" not in {p["name"] for p in doc["processes"]}
    # ...and nfqlb's state still is, attributed to the container that runs it.
    st = status_of(doc, "nfqlb")
    assert st["state"] == "OK", st
    assert st["container"] == "stateless-lb"
    assert "@nfqlb" in st["source"] and "/dev/shm" in st["source"]
    flows = doc["nfqlb"]["flows"]
    assert any(f["user_ref"] == "tshm-stream-a" and "20.0.0.1/32" in f["dests"] for f in flows), (
        flows
    )
    shm = next(s for s in doc["nfqlb"]["shms"] if s["name"] == "tshm-stream-a")
    assert sorted(a["fwmark"] for a in shm["active"]) == [5001, 5002, 5003, 5004]


def test_each_lb_reports_its_own_pods_shm(lab):
    """Deactivate a target in lb-fe-b only: lb-fe-a's agent still sees all four Active."""
    lb_b = container_pid(lab.prefix, "lb-fe-b", "stateless-lb")
    nfqlb = os.readlink(f"/proc/{lb_b}/exe")
    in_container(lb_b, nfqlb, "deactivate", "--index=3", "--shm=tshm-stream-a")
    try:
        active = {}
        for pod in ("lb-fe-a", "lb-fe-b"):
            doc = snapshot(lab.prefix, pod, "nfqlb")
            shm = next(s for s in doc["nfqlb"]["shms"] if s["name"] == "tshm-stream-a")
            active[pod] = sorted(a["fwmark"] for a in shm["active"])
        assert active == {"lb-fe-a": [5001, 5002, 5003, 5004], "lb-fe-b": [5001, 5002, 5003]}
    finally:
        in_container(lb_b, nfqlb, "activate", "--index=3", "--shm=tshm-stream-a", "5004")


def test_dead_nfqlb_is_named_with_what_is_left(lab):
    """flowlb gone (its container ended) while the pod's shm remains: absent, and says so.

    Last in the module: it breaks lb-fe-b for good.
    """
    os.kill(container_pid(lab.prefix, "lb-fe-b", "stateless-lb"), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while True:
        doc = snapshot(lab.prefix, "lb-fe-b", "nfqlb")
        st = status_of(doc, "nfqlb")
        if st["state"] != "OK" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert st["state"] == "ABSENT", st
    # What was looked for, where, and what the stopped nfqlb left behind.
    for where in ("container frontend's PID namespace", "@nfqlb", "tshm-stream-a"):
        assert where in st["message"], st["message"]
