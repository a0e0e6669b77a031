"""The nfqlb collector against the real nfqlb 1.2.0 of a running lab.

The lab runs ``nfqlb flowlb`` in each LB/FE pod as Meridio's stateless-lb does, with the
stream's shm in the pod's private /dev/shm. The collector runs in the LB's network namespace
(``ip netns exec``, a mount namespace of its own) and must report what ``nfqlb flow-list`` and
``nfqlb show --shm=tshm-stream-a`` say there, plus the whole Maglev lookup table and the
flow's match counter as traffic passes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meridio_debug.agent.collectors import nfqlb
from meridio_debug.controller.lab import build_spec, down, traffic, up
from meridio_debug.controller.lab.containers import exec_argv
from meridio_debug.controller.lab.jhash import lab_lookup
from meridio_debug.controller.lab.spec import LabSpec
from meridio_debug.controller.lab.state import read_state

pytestmark = [
    pytest.mark.netns,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]

COLLECT = """\
from google.protobuf.json_format import MessageToJson
from meridio_debug.agent.collectors import run_collectors
from meridio_debug.agent.collectors.nfqlb import NfqlbCollector
from meridio_debug.protos import agent_pb2 as pb
snap = pb.Snapshot()
run_collectors([NfqlbCollector(timeout=3.0)], snap)
print(MessageToJson(snap))
"""


@pytest.fixture(scope="module")
def lab(lab_prefix: Callable[[], str]) -> Iterator[LabSpec]:
    spec = build_spec(prefix=lab_prefix())
    try:
        up(spec)
        yield spec
    finally:
        down(spec.prefix)


def collect_in(ns: str) -> dict[str, Any]:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", COLLECT],
        capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    snap: dict[str, Any] = json.loads(done.stdout)
    return snap


def section(snap: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in snap["sections"] if s["name"] == "nfqlb")


def flowlb_pid(spec: LabSpec, pod: str) -> int:
    state = read_state(spec.prefix)
    assert state is not None
    return next(p.pid for p in state.processes if p.kind == "nfqlb" and p.pod == pod)


def nfqlb_in(pid: int, *args: str) -> str:
    """The lab's nfqlb run with ``args`` inside the container whose PID 1 is flowlb ``pid``."""
    argv = exec_argv("nsenter", pid, [os.readlink(f"/proc/{pid}/exe"), *args])
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout


def test_collector_reports_real_flows_and_shm(lab: LabSpec) -> None:
    pid = flowlb_pid(lab, "lb-fe-a")
    snap = collect_in(lab.netns("lb-fe-a"))
    assert section(snap)["state"] == "OK", section(snap)
    out = snap["nfqlb"]
    assert out["pid"] == pid
    assert out["cmdline"][1:] == [
        "flowlb", "--promiscuous_ping", "--queue=0:3", "--qlength=1024", "--hash_mode=0"
    ]  # fmt: skip
    # flow-list, as nfqlb itself prints it in the pod
    (flow,) = out["flows"]
    (real,) = json.loads(nfqlb_in(pid, "flow-list"))
    assert flow["name"] == real["name"] == "tshm-stream-a-flow-a"
    assert flow["dests"] == ["20.0.0.1/32", "2000::1/128"]  # nfqlb prints ::ffff:20.0.0.1/128
    assert flow["dports"] == real["dports"] == ["4000-4003"]
    assert flow["protocols"] == real["protocols"] == ["tcp", "udp"]
    assert flow["userRef"] == "tshm-stream-a"
    # show --shm, parsed from nfqlb's own output, equals what the collector decoded
    (shm,) = out["shms"]
    shown = nfqlb.parse_show(nfqlb_in(pid, "show", "--shm=tshm-stream-a"), "tshm-stream-a")
    assert (shm["m"], shm["n"]) == (shown.m, shown.n) == (9973, 100)
    active = [(a["fwmark"], a.get("index", 0)) for a in shm["active"]]
    assert active == [(a.fwmark, a.index) for a in shown.active]
    assert active == [(5001, 0), (5002, 1), (5003, 2), (5004, 3)]
    # the whole lookup table, which is what nfqlb init computes
    assert tuple(shm["lookup"]) == lab_lookup(lab)


def test_flow_match_counter_grows_under_traffic(lab: LabSpec) -> None:
    def matches() -> int:
        counts = 0
        for fe in lab.frontends:
            (flow,) = collect_in(lab.netns(fe.pod))["nfqlb"]["flows"]
            counts += int(flow.get("matchesCount", 0))
        return counts

    before = matches()
    result = traffic(lab.prefix, connections=16)
    assert not result.failures
    # every probe's packets pass one LB's nfqlb (at least the SYN or the datagram)
    assert matches() - before >= len(result.results)


def test_deactivated_target_is_gone_from_the_collected_shm(lab: LabSpec) -> None:
    pid = flowlb_pid(lab, "lb-fe-a")
    nfqlb_in(pid, "deactivate", "--index=1", "--shm=tshm-stream-a")
    try:
        (shm,) = collect_in(lab.netns("lb-fe-a"))["nfqlb"]["shms"]
        assert [a["fwmark"] for a in shm["active"]] == [5001, 5003, 5004]
        assert 1 not in shm["lookup"]
        (other,) = collect_in(lab.netns("lb-fe-b"))["nfqlb"]["shms"]
        assert [a["fwmark"] for a in other["active"]] == [5001, 5002, 5003, 5004]
    finally:
        nfqlb_in(pid, "activate", "--index=1", "--shm=tshm-stream-a", "5002")


def test_no_nfqlb_outside_the_lbs(lab: LabSpec) -> None:
    got = section(collect_in(lab.netns("proxy-a")))
    assert got["state"] == "ABSENT"
    assert "nfqlb not running" in got["message"]
