"""Agents see what an ephemeral container sees, in the lab's pods-as-pods.

An agent of the lab runtime joins an LB/FE pod as an ephemeral container
targeting ``frontend`` would (agent/ephemeral.py): the pod's network namespace,
frontend's PID namespace only, a mount namespace of its own. What a user
notices: the snapshot lists frontend's processes and nothing of the
stateless-lb container, bird comes "from container frontend", and nfqlb --
invisible as a process -- is still reported, from container stateless-lb,
through the pod's @nfqlb socket and /dev/shm (issue 11's measured failure was
"nfqlb: ABSENT" there). One lab for the module, always removed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
NFQLB_CANDIDATES = ("/var/cache/meridio-debug/nfqlb-1.2.0/nfqlb",)


def nfqlb_binary() -> str | None:
    found = shutil.which("nfqlb")
    return found or next((p for p in NFQLB_CANDIDATES if os.access(p, os.X_OK)), None)


_started: list[subprocess.Popen[bytes]] = []


@pytest.fixture(scope="module")
def lab(lab_prefix):
    prefix = lab_prefix()
    spec = build_spec(prefix=prefix)
    try:
        up(spec)
        yield spec
    finally:
        down(prefix)  # ends every container, and what the tests started inside them
        for proc in _started:
            proc.wait(timeout=10)


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


def ensure_nfqlb(prefix: str, binary: str) -> None:
    """nfqlb in lb-fe-a's stateless-lb as Meridio runs it, unless the lab already does."""
    pid = container_pid(prefix, "lb-fe-a", "stateless-lb")
    if "nfqlb" in in_container(pid, "ps", "-e", "-o", "comm=").stdout.split():
        return
    flowlb = [binary, "flowlb", "--promiscuous_ping", "--queue=0:3", "--qlength=1024"]
    proc = subprocess.Popen(
        ["nsenter", "-t", str(pid), "-n", "-m", "-p", "--", *flowlb, "--hash_mode=0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _started.append(proc)
    deadline = time.monotonic() + 5
    while "@nfqlb" not in Path(f"/proc/{pid}/net/unix").read_text():
        assert time.monotonic() < deadline, "nfqlb flowlb did not listen on @nfqlb"
        time.sleep(0.05)
    in_container(pid, binary, "init", "--ownfw=0", "--shm=tshm-stream-a", "--M=400", "--N=4")
    for ident in (1, 2, 3, 4):
        in_container(
            pid,
            binary,
            "activate",
            f"--index={ident - 1}",
            "--shm=tshm-stream-a",
            str(5000 + ident),
        )
    in_container(
        pid,
        binary,
        "flow-set",
        "--name=flow-a",
        "--prio=1",
        "--protocols=tcp,udp",
        "--dst=20.0.0.1/32,2000::1/128",
        "--dport=4000-4003",
        "--target=tshm-stream-a",
    )


def test_agent_targeting_frontend_reports_nfqlb_of_stateless_lb(lab):
    binary = nfqlb_binary()
    if binary is None:
        pytest.skip("nfqlb 1.2.0 not built (scripts/setup builds it)")
    ensure_nfqlb(lab.prefix, binary)
    doc = snapshot(lab.prefix, "lb-fe-a", "processes", "nfqlb")
    # The process is not visible from frontend...
    assert "nfqlb" not in {p["name"] for p in doc["processes"]}
    # ...and nfqlb's state still is, attributed to the container that runs it.
    st = status_of(doc, "nfqlb")
    assert st["container"] == "stateless-lb", st
    assert "@nfqlb" in st["source"] and "/dev/shm" in st["source"]
    flows = doc["nfqlb"]["flows"]
    assert any(f["user_ref"] == "tshm-stream-a" and "20.0.0.1/32" in f["dests"] for f in flows), (
        flows
    )
