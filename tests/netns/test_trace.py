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

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest

from meridio_debug.controller import cli
from meridio_debug.controller.client import AgentClient
from meridio_debug.controller.lab import build_spec, down, traffic, up
from meridio_debug.controller.lab.spec import LabSpec
from meridio_debug.controller.lab.state import bird_paths, state_dir
from meridio_debug.controller.runtime import PodRef
from meridio_debug.controller.runtime.local import LocalRuntime
from meridio_debug.controller.trace import TraceResult, parse_flow
from meridio_debug.controller.trace_session import lab_trace_source, trace_async
from meridio_debug.protos import probe_pb2 as ppb
from meridio_debug.protos import probe_pb2_grpc as ppb_grpc

pytestmark = [
    pytest.mark.netns,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]


class WarmRuntime:
    """The lab's runtime with each pod's agent started once, on a private loop."""

    def __init__(self, inner: LocalRuntime) -> None:
        self.inner = inner
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.stack = contextlib.AsyncExitStack()
        self.clients: dict[str, AgentClient] = {}

    def pods(self) -> list[PodRef]:
        return self.inner.pods()

    @contextlib.asynccontextmanager
    async def open(self, pod: PodRef) -> AsyncIterator[AgentClient]:
        client = self.clients.get(pod.name)
        if client is None:
            client = await self.stack.enter_async_context(self.inner.open(pod))
            self.clients[pod.name] = client
        yield client

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.stack.aclose(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Lab:
    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        runtime, self.config = lab_trace_source(spec.prefix)
        assert isinstance(runtime, LocalRuntime)
        self.runtime = WarmRuntime(runtime)

    def traces(self, *flows: str) -> list[TraceResult]:
        parsed = [parse_flow(f) for f in flows]
        result = self.runtime.run(trace_async(self.runtime, parsed, self.config))
        assert not result.errors
        return list(result.results)

    def trace(self, flow: str) -> TraceResult:
        return self.traces(flow)[0]

    def ip(self, pod: str, *args: str) -> str:
        return run(["ip", "-n", self.spec.netns(pod), *args])

    def birdc(self, pod: str, *args: str) -> str:
        ctl = bird_paths(state_dir(self.spec.prefix), pod)["ctl"]
        return run(["birdc", "-s", str(ctl), *args])


@pytest.fixture(scope="module")
def lab(lab_prefix: Callable[[], str]) -> Iterator[Lab]:
    spec = build_spec(lab_prefix())
    try:
        up(spec)
        the_lab = Lab(spec)
        try:
            yield the_lab
        finally:
            the_lab.runtime.close()
    finally:
        down(spec.prefix)


FLOWS = {
    4: "tcp 200.100.0.7:40000 -> 20.0.0.1:4000",
    6: "tcp [200:100::7]:40000 -> [2000::1]:4000",
}


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
    assert answered.healthy
    flows = []
    for r in answered.results:
        p = r.probe
        host = f"[{p.dst}]" if family == 6 else p.dst
        src = f"[{p.src}]" if family == 6 else p.src
        flows.append(f"{p.proto} {src}:40000 -> {host}:{p.port}")
    traces = lab.traces(*flows)
    for r, t in zip(answered.results, traces, strict=True):
        assert t.first_broken is None, t.first_broken
        assert t.chosen is not None
        assert t.chosen.target == r.answer == r.expected, (t.flow, r)
        # both directions, every role on the way
        roles = [(h.role, h.direction) for h in t.chosen.hops]
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
    for flow in ("icmp 200.100.0.9 -> 20.0.0.1", "udp [200:100::9]:5000 -> [2000::1]:4003"):
        result = lab.trace(flow)
        assert result.first_broken is None
        assert result.chosen is not None


def test_vip_the_trench_does_not_have(lab: Lab) -> None:
    result = lab.trace("tcp 200.100.0.7:40000 -> 20.0.0.9:4000")
    assert result.paths == ()
    assert result.first_broken is not None
    assert "not a VIP of this trench" in result.first_broken.reason


# --------------------------------------------------------------------------- breaks


def _hop(result: TraceResult, role: str, direction: str) -> str:
    assert result.chosen is not None
    return next(h.pod for h in result.chosen.hops if h.role == role and h.direction == direction)


def _fam(family: int) -> list[str]:
    return ["-6"] if family == 6 else []


def _vip(lab: Lab, family: int) -> str:
    return lab.spec.vip4 if family == 4 else lab.spec.vip6


@contextlib.contextmanager
def break_lb_fwmark_route(
    lab: Lab, healthy: TraceResult, family: int
) -> Iterator[tuple[str, str, str]]:
    lb = _hop(healthy, "lb-fe", "forward")
    assert healthy.chosen is not None
    table = str(lab.spec.target(healthy.chosen.target).table)
    saved = json.loads(lab.ip(lb, *_fam(family), "-j", "route", "show", "table", table))[0]
    lab.ip(lb, *_fam(family), "route", "del", "default", "table", table)
    try:
        yield lb, "forward", "MDB110"
    finally:
        lab.ip(
            lb,
            *_fam(family),
            "route",
            "add",
            "default",
            "via",
            saved["gateway"],
            "dev",
            saved["dev"],
            "table",
            table,
        )


@contextlib.contextmanager
def unenslave_target_port(
    lab: Lab, healthy: TraceResult, family: int
) -> Iterator[tuple[str, str, str]]:
    proxy = _hop(healthy, "proxy", "forward")
    assert healthy.chosen is not None
    port = lab.spec.target(healthy.chosen.target).proxy_ifname
    lab.ip(proxy, "link", "set", port, "nomaster")
    try:
        yield proxy, "forward", "MDB202"
    finally:
        lab.ip(proxy, "link", "set", port, "master", "bridge0")


@contextlib.contextmanager
def remove_target_vip(
    lab: Lab, healthy: TraceResult, family: int
) -> Iterator[tuple[str, str, str]]:
    assert healthy.chosen is not None
    target = healthy.chosen.target
    plen = "32" if family == 4 else "128"
    vip = f"{_vip(lab, family)}/{plen}"
    lab.ip(target, "addr", "del", vip, "dev", "nsm-0")
    try:
        yield target, "forward", "MDB301"
    finally:
        lab.ip(target, "addr", "add", vip, "dev", "nsm-0", *(["nodad"] if family == 6 else []))


@contextlib.contextmanager
def delete_target_return_rule(
    lab: Lab, healthy: TraceResult, family: int
) -> Iterator[tuple[str, str, str]]:
    assert healthy.chosen is not None
    target = healthy.chosen.target
    table = str(lab.spec.target_table4 if family == 4 else lab.spec.target_table6)
    vip = _vip(lab, family)
    lab.ip(target, *_fam(family), "rule", "del", "from", vip, "lookup", table)
    try:
        yield target, "return", "MDB302"
    finally:
        lab.ip(target, *_fam(family), "rule", "add", "from", vip, "lookup", table)


@contextlib.contextmanager
def drop_proxy_nexthop(
    lab: Lab, healthy: TraceResult, family: int
) -> Iterator[tuple[str, str, str]]:
    proxy = _hop(healthy, "proxy", "return")
    table = str(lab.spec.proxy_table)
    saved = json.loads(lab.ip(proxy, *_fam(family), "-j", "route", "show", "table", table))[0]
    hops = saved["nexthops"]
    assert len(hops) == 2
    lab.ip(
        proxy,
        *_fam(family),
        "route",
        "replace",
        "default",
        "table",
        table,
        "nexthop",
        "via",
        hops[0]["gateway"],
        "dev",
        hops[0]["dev"],
    )
    try:
        yield proxy, "return", "MDB204"
    finally:
        argv = [*_fam(family), "route", "replace", "default", "table", table]
        for hop in hops:
            argv += ["nexthop", "via", hop["gateway"], "dev", hop["dev"]]
        lab.ip(proxy, *argv)


@contextlib.contextmanager
def empty_lb_egress_table(
    lab: Lab, healthy: TraceResult, family: int
) -> Iterator[tuple[str, str, str]]:
    lb = _hop(healthy, "lb-fe", "return")
    # bird owns table 4096 and re-adds a deleted route at once: disable its kernel
    # protocol of that family instead (it withdraws what it exported).
    kernel = "kernel1" if family == 4 else "kernel2"
    lab.birdc(lb, "disable", kernel)
    deadline = time.monotonic() + 5
    while lab.ip(lb, *_fam(family), "route", "show", "table", str(lab.spec.vip_table)).strip():
        assert time.monotonic() < deadline, "bird did not withdraw table 4096"
        time.sleep(0.05)
    try:
        yield lb, "return", "MDB103"
    finally:
        lab.birdc(lb, "enable", kernel)
        deadline = time.monotonic() + 10
        while not lab.ip(
            lb, *_fam(family), "route", "show", "table", str(lab.spec.vip_table)
        ).strip():
            assert time.monotonic() < deadline, "bird did not restore table 4096"
            time.sleep(0.05)


BREAKS = [
    break_lb_fwmark_route,
    unenslave_target_port,
    remove_target_vip,
    delete_target_return_rule,
    drop_proxy_nexthop,
    empty_lb_egress_table,
]


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("breaker", BREAKS, ids=lambda b: b.__name__)
def test_break_is_named_first(lab: Lab, breaker: Any, family: int) -> None:
    healthy = lab.trace(FLOWS[family])
    assert healthy.first_broken is None
    with breaker(lab, healthy, family) as (pod, direction, code):
        result = lab.trace(FLOWS[family])
        first = result.first_broken
        assert first is not None, f"{breaker.__name__}: trace saw nothing"
        assert (first.pod, first.direction, first.code) == (pod, direction, code), first
        assert result.chosen is not None
        broken = [h for h in result.chosen.hops if not h.ok]
        assert broken[0].pod == pod


# --------------------------------------------------------------------------- CLI and RPC


def test_cli_json_contract_and_usage(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["trace", "--lab", "--prefix", lab.spec.prefix, "--flow", FLOWS[4], "-o", "json"]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"flow", "paths", "first_broken"}
    assert doc["first_broken"] is None
    [path] = doc["paths"]
    assert set(path) == {"target", "chosen", "hops"} and path["chosen"] is True
    for hop in path["hops"]:
        assert set(hop) == {"pod", "role", "direction", "ok", "reason", "code"}
        assert hop["direction"] in ("forward", "return")
    code = cli.main(["trace", "--lab", "--prefix", lab.spec.prefix, "--flow", "tcp 1.2.3.4 -> x"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected" in err


def test_route_get_rpc_bad_input(lab: Lab) -> None:
    async def ask() -> None:
        client = lab.runtime.clients.get("lb-fe-a")
        if client is None:
            await lab.runtime.stack.enter_async_context(
                lab.runtime.open(next(p for p in lab.runtime.pods() if p.name == "lb-fe-a"))
            )
            client = lab.runtime.clients["lb-fe-a"]
        [res] = await client.route_get([ppb.RouteQuery(id="x", dst="20.0.0.1", iif="nope0")])
        assert not res.ok and res.errno == 19 and "nope0" in res.error
        stub = ppb_grpc.ProbeStub(client._channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RouteGet(ppb.RouteGetRequest(queries=[ppb.RouteQuery(dst="not-an-ip")]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    lab.runtime.run(ask())
