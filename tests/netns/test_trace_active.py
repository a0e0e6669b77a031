"""Active trace on the real lab: real probes, real captures in every pod, the same verdicts.

One lab per module (``lab_prefix``: short, pid-unique, always removed) with
warm agents. Healthy: the probes reach the target ``lab traffic`` sees
answering the flow, and the active trace agrees with the static one. Each of
the six breaks of test_trace.py (shared in trace_lab.py) is made in turn and
the active trace must name the same first broken hop (pod + direction) as the
static trace, for IPv4 and IPv6; each break is restored and an autouse
fixture insists the path is whole again.

The breaks are traced with UDP flows. Whether the LB a reply takes back is
predictable depends on the kernel (controller/trace/multipath.py): IPv4 UDP
is hashed by its 5-tuple (exact), an IPv6 reply by a hash seeded at boot, a
TCP reply by its socket's random hash. So the tests never lean on a
prediction that a boot can change (issue 10): a break of the reply path
breaks every candidate LB, and assertions name what the packets show.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from trace_lab import BREAKS, FLOWS, SOURCE, SRC4, SRC6, UDP_FLOWS, Lab, running_lab

from meridio_debug.controller import cli
from meridio_debug.controller.lab import predict_target, traffic
from meridio_debug.controller.lab.traffic import plan_probes
from meridio_debug.controller.runtime.local import LocalRuntime
from meridio_debug.controller.services.active_trace import ActiveOptions, active_trace_async
from meridio_debug.controller.services.trace import lab_trace_source
from meridio_debug.controller.trace import parse_flow
from meridio_debug.protos import probe_pb2 as ppb
from meridio_debug.protos import probe_pb2_grpc as ppb_grpc

pytestmark = [
    pytest.mark.netns,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]

PROBE = ActiveOptions(probes=3, interval=0.01, settle=0.5)


@pytest.fixture(scope="module")
def lab(lab_prefix: Callable[[], str]) -> Iterator[Lab]:
    with running_lab(lab_prefix()) as the_lab:
        yield the_lab


@pytest.fixture(autouse=True)
def whole_afterwards(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "lab" not in request.fixturenames:
        return
    the_lab: Lab = request.getfixturevalue("lab")
    # Probes sent during a break leave FAILED neighbours behind (ARP/ND got no answer); the
    # kernel retries only when traffic comes, as it would in a cluster: send some.
    for family in (4, 6):
        traffic(the_lab.spec, connections=8, family=family)
    for result in the_lab.traces(*FLOWS.values(), *UDP_FLOWS.values()):
        assert result.first_broken is None, f"left broken: {result.first_broken}"


# --------------------------------------------------------------------------- healthy


@pytest.mark.parametrize("family", [4, 6])
def test_probes_reach_the_target_that_answers_and_agree_with_static(lab: Lab, family: int) -> None:
    # Traffic first: every target's neighbours are resolved, as in a trench that carries load.
    assert not traffic(lab.spec, connections=16, family=family).failures
    # nfqlb picks by the whole 5-tuple: the probes' flow (source port 40000) is predicted
    # offline from nfqlb's hash and Maglev table, and the packets must go there.
    for p in plan_probes(lab.spec, 2, family=family, udp=False):
        src, dst = (f"[{p.src}]", f"[{p.dst}]") if family == 6 else (p.src, p.dst)
        run = lab.active(f"tcp {src}:40000 -> {dst}:{p.port}", PROBE)
        active = run.active
        assert active is not None
        assert active.first_broken is None, active.first_broken
        want = predict_target(lab.spec, p.src, proto="tcp", sport=40000, dport=p.port)
        assert active.target == want == run.static.chosen.target  # type: ignore[union-attr]
        assert active.agrees_with_static
        # a SYN that meets the previous probe's handshake still open (the client's RST
        # late on a loaded machine) cannot be answered: counted apart, never as a loss
        assert active.packets["sent"] == 3 and active.packets["answered"] >= 1
        assert active.packets["answered"] + active.packets["collided"] == 3
        # the path taken, both ways, with interfaces and times in order
        assert [(h.role, h.direction) for h in active.hops][:5] == [
            ("gateway", "forward"),
            ("lb-fe", "forward"),
            ("proxy", "forward"),
            ("target", "forward"),
            ("target", "return"),
        ]
        assert active.hops[-1].role == "gateway" and active.hops[-1].direction == "return"
        lb = active.hops[1]
        assert lb.in_iface == lab.spec.frontends[0].ext_ifname
        assert lb.out_iface.startswith("conduit-a--")
        times = [s.ts_ns for s in active.sightings]
        assert times == sorted(times) and active.rtt_us is not None and active.rtt_us > 0


@pytest.mark.parametrize("flow", [f"icmp {SRC4} -> 20.0.0.1", f"icmp {SRC6} -> 2000::1"])
def test_icmp_probes(lab: Lab, flow: str) -> None:
    run = lab.active(flow, PROBE)
    assert run.active is not None and run.active.first_broken is None
    assert run.active.agrees_with_static and run.active.packets["answered"] == 3


SIX = [
    (proto, family, src) for proto in ("udp", "tcp", "icmp") for family in (4, 6) for src in (3, 11)
]


@pytest.mark.parametrize(("proto", "family", "src"), SIX)
def test_static_return_claims_hold_against_the_packets(
    lab: Lab, proto: str, family: int, src: int
) -> None:
    """Issue 10's six flows (and ICMP), from several sources: every static claim on the way
    back is what the packets did (exact: IPv4 UDP/ICMP) or a candidate set that holds it."""
    index = (src + SOURCE) % 60 + 1
    if family == 4:
        client, vip = f"200.100.0.{index}", lab.spec.vip4
        flow = f"{proto} {client}:{40000 + index} -> {vip}:4001" if proto != "icmp" else ""
    else:
        client, vip = f"200:100::{index:x}", lab.spec.vip6
        flow = f"{proto} [{client}]:{40000 + index} -> [{vip}]:4001" if proto != "icmp" else ""
    flow = flow or f"icmp {client} -> {vip}"
    run = lab.active(flow, PROBE)
    active, static = run.active, run.static
    assert active is not None
    if proto == "icmp":  # nfqlb hashes the echo identifier, which a flow does not give
        assert static.chosen is None and active.target in {p.target for p in static.paths}
    else:  # nfqlb's hash of the 5-tuple in the shm's Maglev table: the exact target
        assert static.chosen is not None and active.target == static.chosen.target
    assert static.verdict == "whole" and active.first_broken is None, active.first_broken
    assert active.packets["answered"] + active.packets["collided"] == PROBE.probes
    assert active.lbs_back and set(active.lbs_back) <= set(active.static_back)
    exact = family == 4 and proto in ("udp", "icmp")
    assert (len(active.static_back) == 1) == exact, (flow, active.static_back)
    if exact:  # the kernel's own choice, computed from the 5-tuple: the packets take it
        assert list(active.lbs_back) == list(active.static_back)
    assert active.agrees_with_static


def test_users_traffic_without_probes(lab: Lab) -> None:
    """No --probe: nothing is sent by meridio-debug; the user's packets are followed."""
    spec = lab.spec
    src = spec.gateway.client_sources4[3]
    flow = f"udp {src}:41000 -> {spec.vip4}:4002"

    async def go() -> Any:
        task = asyncio.ensure_future(
            active_trace_async(
                lab.runtime, parse_flow(flow), lab.config, ActiveOptions(duration=1.0)
            )
        )
        await asyncio.sleep(0.6)  # captures run by now (warm agents)
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", spec.netns("gw"), "python3", "-c",
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            f"s.bind(('{src}', 41000)); s.settimeout(2); "
            f"s.sendto(b'hello', ('{spec.vip4}', 4002)); print(s.recv(100))",
        )  # fmt: skip
        await proc.wait()
        return await task

    run = lab.runtime.run(go())
    assert run.active is not None
    assert run.active.mode == "traffic" and run.active.first_broken is None
    assert run.active.packets["forward"] == 1 and run.active.packets["return"] == 1
    assert run.active.target == run.static.chosen.target


# --------------------------------------------------------------------------- breaks


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("breaker", BREAKS, ids=lambda b: b.__name__)
def test_active_names_the_same_broken_hop_as_static(lab: Lab, breaker: Any, family: int) -> None:
    flow = UDP_FLOWS[family]
    healthy = lab.trace(flow)
    assert healthy.first_broken is None
    with breaker(lab, healthy, family) as b:
        run = lab.active(flow, PROBE)
        static, active = run.static.first_broken, run.active
        assert active is not None
        if b.degraded:  # the flow still goes through the LB left: whole, degraded, exit 0
            assert static is None and run.static.verdict == "degraded"
            assert active.first_broken is None and active.lost_at is None
            assert active.packets["answered"] == PROBE.probes
            assert active.verdict == "degraded"
            assert (b.pod, b.direction, b.code) in {
                (h.pod, h.direction, h.code) for h in active.degraded
            }
            assert active.agrees_with_static
            return
        assert static is not None and (static.pod, static.direction) == (b.pod, b.direction)
        assert active.first_broken is not None, "active saw nothing"
        got = active.first_broken
        # where the packets died: the hop broken, at the candidate the kernel picked
        assert got.pod in b.pods and got.direction == b.direction, got
        assert got.code == b.code
        if b.any_of:
            assert active.lbs_back and set(active.lbs_back) <= set(b.any_of)
            assert got.pod in active.lbs_back
        assert active.agrees_with_static
        assert active.lost_at is not None  # packets did disappear, somewhere on the way
        # A detached bridge port: while the LB still has the target's MAC the proxy
        # floods the frames and they die there (packets); once its ARP/ND entry needs
        # an answer, they wait and die in the LB's neighbour queue, and the proxy's
        # broken state names the hop (state). Which one depends on the neighbour's age.
        if breaker.__name__ != "unenslave_target_port":
            assert active.evidence == "packets"


# --------------------------------------------------------------------------- without a gateway


def test_without_a_gateway_pod_the_entry_lb_sends_marked_probes(lab: Lab) -> None:
    """A cluster has no gateway pod: the LB sends the probes with the flow's mark."""
    runtime, config = lab_trace_source(
        lab.spec.prefix, [p.name for p in lab.runtime.pods() if p.role != "gateway"]
    )
    assert isinstance(runtime, LocalRuntime)
    flow = parse_flow(UDP_FLOWS[4])

    async def go() -> Any:
        return await active_trace_async(runtime, flow, config, PROBE)

    traffic(lab.spec, connections=8, family=4)  # LBs know the targets' MACs
    run = asyncio.run(go())
    active = run.active
    assert active is not None and active.first_broken is None, active
    assert active.sender.startswith("lb-fe-") and active.hops[0].role == "lb-fe"
    assert active.target == run.static.chosen.target  # type: ignore[union-attr]
    assert active.packets["answered"] == 3  # replies left the trench through an LB


# --------------------------------------------------------------------------- CLI and RPC


def test_cli_active_json_contract_and_usage(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["trace", "--lab", "--prefix", lab.spec.prefix, "--flow", FLOWS[6]]
    code = cli.main([*base, "--active", "--probe", "2", "-o", "json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"flow", "verdict", "paths", "first_broken", "degraded", "active"}
    assert doc["first_broken"] is None and doc["paths"][0]["chosen"] is True
    assert doc["verdict"] == "whole" and doc["degraded"] == []
    active = doc["active"]
    assert active["mode"] == "probe" and active["agrees_with_static"] is True
    assert active["target"] == doc["paths"][0]["target"]
    for hop in active["path"]:
        assert {"pod", "role", "direction", "in_iface", "out_iface", "latency_us", "ok"} <= set(hop)
    assert {c["pod"] for c in active["captures"]} == {p.name for p in lab.runtime.pods()}
    assert all(c["error"] is None for c in active["captures"])
    for bad in (
        [*base, "--probe"],  # --probe without --active
        [*base, "--active", "--flow", FLOWS[4]],  # two flows
        [*base, "--active", "--probe", "0"],
    ):
        assert cli.main(bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
    code = cli.main(
        [
            "trace",
            "--lab",
            "--prefix",
            lab.spec.prefix,
            "--active",
            "--probe",
            "--flow",
            "udp 1.2.3 -> x",
        ]
    )
    assert code == 2 and "expected" in capsys.readouterr().err
    code = cli.main(
        [
            "trace", "--lab", "--prefix", lab.spec.prefix, "--active", "--probe",
            "--flow", "udp 200.100.0.7:1 -> 20.0.0.9:4000",
        ]
    )  # fmt: skip
    assert code == 3 and "not a VIP of this trench" in capsys.readouterr().out


def test_cli_html_and_pcapng(lab: Lab, capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    out = tmp_path / "probe.pcapng"
    argv = ["trace", "--lab", "--prefix", lab.spec.prefix, "--flow", UDP_FLOWS[4], "--active"]
    assert cli.main([*argv, "--probe", "2", "-o", "html", "-w", str(out)]) == 0
    page = capsys.readouterr().out
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "path taken" in page
    data = out.read_bytes()
    assert data[:4] == b"\x0a\x0d\x0d\x0a" and b"lb-fe-" in data and b"target-" in data


def test_send_probes_rpc_bad_input(lab: Lab) -> None:
    async def ask() -> None:
        gw = next(p for p in lab.runtime.pods() if p.name == "gw")
        async with lab.runtime.open(gw) as client:
            stub = ppb_grpc.ProbeStub(client._channel)
            for request in (
                ppb.SendProbesRequest(proto="sctp", src="200.100.0.7", dst="20.0.0.1"),
                ppb.SendProbesRequest(
                    proto="tcp", src="200.100.0.7", dst="2000::1", sport=1, dport=2
                ),
                ppb.SendProbesRequest(proto="udp", src="200.100.0.7", dst="20.0.0.1"),
                ppb.SendProbesRequest(proto="icmp", src="200.100.0.7", dst="20.0.0.1", count=1000),
                ppb.SendProbesRequest(proto="icmp", src="200.100.0.7", dst="20.0.0.1", iif="nope0"),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.SendProbes(request)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "\n" not in (info.value.details() or "")
            # a flow the kernel cannot route is an answer, not a failed call
            reply = await client.send_probes(
                ppb.SendProbesRequest(proto="icmp", src="200.100.0.7", dst="1.2.3.4")
            )
            assert not reply.ok and reply.error and not reply.probes

    lab.runtime.run(ask())
