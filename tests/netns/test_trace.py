"""Static trace on the real lab: it names the target that answers, and the hop that breaks.

One lab per module (pid-unique prefix, always removed). Agents are started
once and kept warm (each trace is then a Snapshot + RouteGet per pod). The
healthy trace must name the target ``lab traffic`` sees answering each flow;
each break test damages one hop with the ``ip``/``birdc`` commands an
operator (or a bug) would run, checks that the trace names exactly that hop
first (pod, direction, finding code), and restores it; an autouse fixture
then insists the path is whole again.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from trace_lab import BREAKS, FLOWS, Lab, drop_proxy_nexthop, running_lab

from meridio_debug.controller import cli
from meridio_debug.controller.lab import traffic
from meridio_debug.controller.wire.client import AgentClient
from meridio_debug.protos import probe_pb2 as ppb
from meridio_debug.protos import probe_pb2_grpc as ppb_grpc

pytestmark = [
    pytest.mark.netns,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]


@pytest.fixture(scope="module")
def lab(lab_prefix: Callable[[], str]) -> Iterator[Lab]:
    with running_lab(lab_prefix()) as the_lab:
        yield the_lab


@pytest.fixture(autouse=True)
def whole_afterwards(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test leaves the lab whole (a damaged lab would fail the next test's premise)."""
    yield
    if "lab" not in request.fixturenames:
        return
    the_lab: Lab = request.getfixturevalue("lab")
    for result in the_lab.traces(*FLOWS.values()):
        assert result.first_broken is None, f"left broken: {result.first_broken}"


# --------------------------------------------------------------------------- healthy


@pytest.mark.parametrize("family", [4, 6])
def test_healthy_trace_names_the_target_that_answers(lab: Lab, family: int) -> None:
    answered = traffic(lab.spec, connections=24, family=family)
    assert not answered.failures
    flows = []
    for r in answered.results:
        p = r.probe
        host = f"[{p.dst}]" if family == 6 else p.dst
        src = f"[{p.src}]" if family == 6 else p.src
        flows.append(f"{p.proto} {src}:{r.sport} -> {host}:{p.port}")
    traces = lab.traces(*flows)
    for r, t in zip(answered.results, traces, strict=True):
        assert t.first_broken is None, t.first_broken
        assert t.chosen is not None
        assert t.chosen.target == r.answer == r.expected, (t.flow, r)
        # both directions, every role on the way (candidate LBs back: one row each)
        roles = [k for k, _ in itertools.groupby((h.role, h.direction) for h in t.chosen.hops)]
        assert roles == [
            ("gateway", "forward"),
            ("lb-fe", "forward"),
            ("proxy", "forward"),
            ("target", "forward"),
            ("target", "return"),
            ("proxy", "return"),
            ("lb-fe", "return"),
            ("gateway", "return"),
        ]


def test_icmp_and_udp_flows(lab: Lab) -> None:
    result = lab.trace("udp [200:100::9]:5000 -> [2000::1]:4003")
    assert result.first_broken is None
    assert result.chosen is not None
    # nfqlb hashes ICMP with the echo identifier, which a flow does not give: every Active
    # target is a candidate path, none is chosen, and none is broken
    result = lab.trace("icmp 200.100.0.9 -> 20.0.0.1")
    assert result.first_broken is None
    assert result.chosen is None
    assert {p.target for p in result.paths} == {t.pod for t in lab.spec.targets}


def test_vip_the_trench_does_not_have(lab: Lab) -> None:
    result = lab.trace("tcp 200.100.0.7:40000 -> 20.0.0.9:4000")
    assert result.paths == ()
    assert result.first_broken is not None
    assert "not a VIP of this trench" in result.first_broken.reason


# --------------------------------------------------------------------------- breaks


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("breaker", BREAKS, ids=lambda b: b.__name__)
def test_break_is_named_first(lab: Lab, breaker: Any, family: int) -> None:
    healthy = lab.trace(FLOWS[family])
    assert healthy.first_broken is None
    with breaker(lab, healthy, family) as b:
        result = lab.trace(FLOWS[family])
        if b.degraded:  # the flow still gets through: whole for it, degraded for others
            assert result.first_broken is None, result.first_broken
            assert result.verdict == "degraded"
            assert (b.pod, b.direction, b.code) in {
                (h.pod, h.direction, h.code) for h in result.degraded
            }
            return
        first = result.first_broken
        assert first is not None, f"{breaker.__name__}: trace saw nothing"
        assert (first.pod, first.direction, first.code) == (b.pod, b.direction, b.code), first
        assert first.certain and result.verdict == "broken"
        assert result.chosen is not None
        broken = [h for h in result.chosen.hops if not h.ok]
        assert broken[0].pod == b.pod
        # every candidate way is broken where the breaker broke it
        assert {h.pod for h in broken if h.via} <= set(b.pods)


# --------------------------------------------------------------------------- CLI and RPC


def test_cli_json_contract_and_usage(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["trace", "--lab", "--prefix", lab.spec.prefix, "--flow", FLOWS[4], "-o", "json"]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"flow", "verdict", "paths", "first_broken", "degraded"}
    assert doc["first_broken"] is None and doc["verdict"] == "whole" and doc["degraded"] == []
    [path] = doc["paths"]
    assert set(path) == {"target", "chosen", "hops"} and path["chosen"] is True
    keys = {"pod", "role", "direction", "ok", "reason", "code", "degraded", "candidates", "via"}
    for hop in path["hops"]:
        assert set(hop) == keys
        assert hop["direction"] in ("forward", "return")
    # a TCP reply: the proxy's ECMP is a candidate set of LB pod names, one branch each
    [proxy] = [h for h in path["hops"] if h["role"] == "proxy" and h["direction"] == "return"]
    assert set(proxy["candidates"]) == {p.name for p in lab.runtime.pods() if p.role == "lb-fe"}
    vias = [h["via"] for h in path["hops"] if h["role"] == "lb-fe" and h["direction"] == "return"]
    assert sorted(vias) == sorted(proxy["candidates"])
    code = cli.main(["trace", "--lab", "--prefix", lab.spec.prefix, "--flow", "tcp 1.2.3.4 -> x"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected" in err


def test_cli_degraded_flow_exits_0(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    """A proxy ECMP missing an LB breaks other flows, not this one: exit 0, and it is said."""
    base = ["trace", "--lab", "--prefix", lab.spec.prefix, "--flow", FLOWS[4]]
    with drop_proxy_nexthop(lab, lab.trace(FLOWS[4]), 4) as b:
        code = cli.main([*base, "-o", "json"])
        doc = json.loads(capsys.readouterr().out)
        table_code = cli.main(base)
        table = capsys.readouterr().out
    assert code == 0 and table_code == 0
    assert doc["verdict"] == "degraded" and doc["first_broken"] is None
    assert [(d["pod"], d["code"]) for d in doc["degraded"]] == [(b.pod, "MDB204")]
    assert "DEGRADED for others" in table and f"{b.pod} (return) [MDB204]" in table


def test_route_get_rpc_bad_input(lab: Lab) -> None:
    async def ask() -> None:
        lb = next(p for p in lab.runtime.pods() if p.name == "lb-fe-a")
        async with lab.runtime.open(lb) as client:
            await use(client)

    async def use(client: AgentClient) -> None:
        [res] = await client.route_get([ppb.RouteQuery(id="x", dst="20.0.0.1", iif="nope0")])
        assert not res.ok and res.errno == 19 and "nope0" in res.error
        stub = ppb_grpc.ProbeStub(client._channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RouteGet(ppb.RouteGetRequest(queries=[ppb.RouteQuery(dst="not-an-ip")]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    lab.runtime.run(ask())
