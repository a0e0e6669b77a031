"""The trace core on model data: the healthy lab fixture, a tiny FIB standing in for kernels.

Why a stand-in FIB: the core's job is to ask the right questions and to read
the answers with the snapshots; the netns tier checks it against real
kernels. Here ``fib()`` answers each planned query from the fixture's own
rules and routes (priority order, fwmark/iif/source match, longest prefix,
first next hop of a multipath route), so every break can be made in the
model and the core must name it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from lab_fixture import build_lab, change, drop, snap, with_pod

from meridio_debug.controller.lab import build_spec, predict_target
from meridio_debug.controller.model import PodSnapshot, TrenchState
from meridio_debug.controller.trace import (
    RouteAnswer,
    RouteQuery,
    TraceResult,
    parse_flow,
    plan,
    trace,
)


def fib(s: PodSnapshot, q: RouteQuery) -> RouteAnswer:
    dst = ipaddress.ip_address(q.dst)
    src = ipaddress.ip_address(q.src) if q.src else None
    for rule in sorted((r for r in s.rules if r.family == dst.version), key=lambda r: r.priority):
        if rule.src and (src is None or src not in ipaddress.ip_network(rule.src)):
            continue
        if rule.has_fwmark and q.mark & (rule.fwmask or 0xFFFFFFFF) != rule.fwmark:
            continue
        if rule.iif and rule.iif != q.iif:
            continue
        if rule.action != "lookup":
            continue
        best = None
        for route in s.routes:
            if route.table != rule.table or route.family != dst.version:
                continue
            prefix = ipaddress.ip_network("0.0.0.0/0" if dst.version == 4 else "::/0")
            if route.dst != "default":
                prefix = ipaddress.ip_network(route.dst)
            if dst in prefix and (best is None or prefix.prefixlen > best[0].prefixlen):
                best = (prefix, route)
        if best is None:
            continue
        route = best[1]
        if route.type == "blackhole":
            return RouteAnswer(ok=False, errno=22, error="Invalid argument")
        if route.type not in ("unicast", "local", ""):
            continue
        hop = route.paths()[0] if route.paths() else None
        return RouteAnswer(
            ok=True,
            table=rule.table,
            type=route.type or "unicast",
            gateway=hop.gateway if hop else "",
            dev=(hop.dev if hop else "") or ("lo" if route.type == "local" else ""),
            route_dst=route.dst,
            nexthops=route.nexthops,
        )
    return RouteAnswer(ok=False, errno=101, error="Network is unreachable")


def run(state: TrenchState, text: str) -> TraceResult:
    flow = parse_flow(text)
    answers = {
        pod: {q.id: fib(snap(state, pod), q) for q in queries}
        for pod, queries in plan(state, flow).items()
    }
    return trace(state, flow, answers)


FLOW4 = "tcp 200.100.0.7:40000 -> 20.0.0.1:4000"
FLOW6 = "tcp [200:100::7]:40000 -> [2000::1]:4000"


@pytest.fixture(scope="module")
def healthy() -> TrenchState:
    return build_lab(with_config=True)


@pytest.mark.parametrize("flow", [FLOW4, FLOW6, "icmp 200.100.0.9 -> 20.0.0.1"])
def test_healthy_path_is_whole_and_names_the_hashed_target(healthy: TrenchState, flow: str) -> None:
    result = run(healthy, flow)
    assert result.first_broken is None, result.first_broken
    assert result.chosen is not None
    spec = build_spec("mdl-", marking="nft-jhash")
    assert result.chosen.target == predict_target(spec, parse_flow(flow).src)
    assert len(result.paths) == 1  # the mark's hash is computable: one candidate target
    back = [h for h in result.chosen.hops if h.direction == "return"]
    [proxy] = [h for h in back if h.role == "proxy"]
    lbs = [h.pod for h in back if h.role == "lb-fe"]
    if flow.startswith("icmp"):  # IPv4 ICMP: the proxy's L4 hash is the 5-tuple's, exact
        assert proxy.candidates == () and len(lbs) == 1 and "hashes to" in proxy.reason
    else:  # TCP (socket hash), IPv6 (flow label / per-boot seed): every nexthop, one branch each
        assert proxy.candidates == ("lb-fe-a", "lb-fe-b") and lbs == ["lb-fe-a", "lb-fe-b"]
        assert [h.via for h in back if h.role == "lb-fe"] == lbs
        assert "one of lb-fe-a, lb-fe-b" in proxy.reason and "hashes to" not in proxy.reason
    assert [h.role for h in back][-1] == "gateway"
    assert result.verdict == "whole" and result.to_dict()["verdict"] == "whole"


def test_every_client_source_matches_the_lab_prediction(healthy: TrenchState) -> None:
    spec = build_spec("mdl-", marking="nft-jhash")
    for src in spec.gateway.client_sources4[:16]:
        result = run(healthy, f"udp {src}:1234 -> 20.0.0.1:4001")
        assert result.chosen is not None and result.chosen.target == predict_target(spec, src)


def test_unknown_vip_is_reported(healthy: TrenchState) -> None:
    result = run(healthy, "tcp 200.100.0.7:1 -> 20.0.0.9:4000")
    assert result.paths == ()
    assert result.first_broken is not None and "not a VIP" in result.first_broken.reason


def test_random_seed_makes_every_mark_a_candidate(healthy: TrenchState) -> None:
    def no_seed(s: PodSnapshot) -> PodSnapshot:
        maps = tuple(replace(m, seed=None) for m in s.nft.mark_maps)
        return replace(s, nft=replace(s.nft, mark_maps=maps))

    state = with_pod(with_pod(healthy, "lb-fe-a", no_seed), "lb-fe-b", no_seed)
    result = run(state, FLOW4)
    assert len(result.paths) == 4
    assert not any(p.chosen for p in result.paths)
    assert result.first_broken is None


def _chosen(healthy: TrenchState, flow: str) -> tuple[str, str, str]:
    """(entry LB, target, return proxy) of the healthy path."""
    result = run(healthy, flow)
    assert result.chosen is not None
    hops = result.chosen.hops
    lb = next(h.pod for h in hops if h.role == "lb-fe")
    proxy = next(h.pod for h in hops if h.role == "proxy" and h.direction == "return")
    return lb, result.chosen.target, proxy


@pytest.mark.parametrize("family", [4, 6])
def test_breaks_are_named(healthy: TrenchState, family: int) -> None:
    flow = FLOW4 if family == 4 else FLOW6
    lb, target, _proxy = _chosen(healthy, flow)
    mark = build_spec("mdl-", marking="nft-jhash").target(target).fwmark
    vip = "20.0.0.1" if family == 4 else "2000::1"
    cases = [
        (
            lb,
            lambda s: replace(
                s, routes=drop(s.routes, lambda r: r.table == mark and r.family == family)
            ),
            (lb, "forward", "MDB110"),
        ),
        (
            lb,
            lambda s: replace(s, rules=drop(s.rules, lambda r: r.has_fwmark and r.fwmark == mark)),
            (lb, "forward", "MDB113"),
        ),
        (
            target,
            lambda s: replace(
                s,
                addresses=drop(s.addresses, lambda a: a.address == vip),
                routes=drop(s.routes, lambda r: r.type == "local" and r.dst.startswith(vip + "/")),
            ),
            (target, "forward", "MDB301"),
        ),
        (
            target,
            lambda s: replace(
                s, rules=drop(s.rules, lambda r: r.src.startswith(vip) and r.family == family)
            ),
            (target, "return", "MDB302"),
        ),
    ]
    for pod, mutate, expected in cases:
        result = run(with_pod(healthy, pod, mutate), flow)
        first = result.first_broken
        assert first is not None, expected
        assert (first.pod, first.direction, first.code) == expected, first


def test_unenslaved_target_port(healthy: TrenchState) -> None:
    _lb, target, _proxy = _chosen(healthy, FLOW4)
    spec = build_spec("mdl-", marking="nft-jhash")
    t = spec.target(target)
    proxy = next(n.proxy for n in spec.nodes if n.letter == t.node)

    def detach(s: PodSnapshot) -> PodSnapshot:
        links = change(s.links, lambda link: link.name == t.proxy_ifname, master="")
        fdb = drop(s.fdb, lambda e: e.ifname == t.proxy_ifname)
        return replace(s, links=links, fdb=fdb)

    result = run(with_pod(healthy, proxy, detach), FLOW4)
    assert result.first_broken is not None
    assert (result.first_broken.pod, result.first_broken.code) == (proxy, "MDB202")


def test_unreachable_pod_is_mdb002(healthy: TrenchState) -> None:
    _lb, target, _proxy = _chosen(healthy, FLOW4)
    pods = tuple(
        replace(p, snapshot=None, error="agent did not start") if p.pod == target else p
        for p in healthy.pods
    )
    state = replace(healthy, pods=pods)
    flow = parse_flow(FLOW4)
    answers = {
        pod: {q.id: fib(snap(state, pod), q) for q in queries}
        for pod, queries in plan(state, flow).items()
    }
    result = trace(state, flow, answers)
    assert result.first_broken is not None


def _drop_nexthop(family: int, keep: int = 1):  # type: ignore[no-untyped-def]
    """A proxy whose reply ECMP keeps only its first ``keep`` nexthop(s)."""

    def mutate(s: PodSnapshot) -> PodSnapshot:
        return replace(
            s,
            routes=change(
                s.routes,
                lambda r: r.table == 1 and r.family == family,
                nexthops=tuple(
                    h
                    for r in s.routes
                    if r.table == 1 and r.family == family
                    for h in r.nexthops[:keep]
                ),
            ),
        )

    return mutate


@pytest.mark.parametrize("flow", [FLOW4, FLOW6, "udp 200.100.0.7:40000 -> 20.0.0.1:4001"])
def test_a_missing_proxy_nexthop_degrades_the_flow_it_does_not_break(
    healthy: TrenchState, flow: str
) -> None:
    _lb, _target, proxy = _chosen(healthy, flow)
    family = parse_flow(flow).family
    result = run(with_pod(healthy, proxy, _drop_nexthop(family)), flow)
    assert result.first_broken is None and result.ok  # the reply goes via the LB left
    assert result.verdict == "degraded"
    [hop] = result.degraded
    assert (hop.pod, hop.direction, hop.code) == (proxy, "return", "MDB204")
    doc = result.to_dict()
    assert doc["first_broken"] is None and doc["degraded"][0]["code"] == "MDB204"
    assert result.chosen is not None
    [phop] = [h for h in result.chosen.hops if h.role == "proxy" and h.direction == "return"]
    assert phop.ok and phop.degraded and phop.candidates == ()  # one nexthop: no choice


def _empty_egress(family: int):  # type: ignore[no-untyped-def]
    table = build_spec("mdl-").vip_table

    def mutate(s: PodSnapshot) -> PodSnapshot:
        return replace(s, routes=drop(s.routes, lambda r: r.table == table and r.family == family))

    return mutate


@pytest.mark.parametrize("flow", [FLOW4, FLOW6])
def test_a_broken_candidate_makes_the_verdict_uncertain_all_broken_make_it_broken(
    healthy: TrenchState, flow: str
) -> None:
    family = parse_flow(flow).family
    one = run(with_pod(healthy, "lb-fe-b", _empty_egress(family)), flow)
    assert one.first_broken is not None and not one.first_broken.certain
    assert (one.first_broken.pod, one.first_broken.direction) == ("lb-fe-b", "return")
    assert one.first_broken.code == "MDB103" and one.verdict == "uncertain"
    assert one.first_broken.reason.startswith("if the kernel picks lb-fe-b:")
    from meridio_debug.controller.report.trace import render_html, render_table

    assert "verdict  MAY BREAK (uncertain) at lb-fe-b (return) [MDB103]" in render_table(one)
    assert 'class="verdict degraded">MAY BREAK' in render_html(one)
    state = with_pod(healthy, "lb-fe-b", _empty_egress(family))
    both = run(with_pod(state, "lb-fe-a", _empty_egress(family)), flow)
    assert both.first_broken is not None and both.first_broken.certain
    assert (both.first_broken.pod, both.first_broken.code) == ("lb-fe-a", "MDB103")
    assert both.verdict == "broken" and both.to_dict()["first_broken"]["certain"] is True


def test_ipv4_udp_reply_is_exact_and_follows_the_kernels_answer(healthy: TrenchState) -> None:
    """IPv4 UDP with policy 1: the proxy hashes the 5-tuple like RouteGet does -- one LB."""
    result = run(healthy, "udp 200.100.0.7:40000 -> 20.0.0.1:4001")
    assert result.chosen is not None
    back = [h for h in result.chosen.hops if h.direction == "return"]
    [proxy] = [h for h in back if h.role == "proxy"]
    assert proxy.candidates == () and [h.role for h in back].count("lb-fe") == 1
    # a broken LB that the reply does not take stays off this flow's verdict
    other = "lb-fe-b" if next(h.pod for h in back if h.role == "lb-fe") == "lb-fe-a" else "lb-fe-a"
    assert run(with_pod(healthy, other, _empty_egress(4)), str(result.flow)).first_broken is None


def test_candidates_are_pod_names_in_json(healthy: TrenchState) -> None:
    doc = run(healthy, FLOW6).to_dict()
    [path] = doc["paths"]
    [proxy] = [h for h in path["hops"] if h["role"] == "proxy" and h["direction"] == "return"]
    assert proxy["candidates"] == ["lb-fe-a", "lb-fe-b"]
    assert all(isinstance(c, str) for c in proxy["candidates"])
    assert [h["via"] for h in path["hops"] if h["role"] == "lb-fe" and h["direction"] == "return"] \
        == ["lb-fe-a", "lb-fe-b"]  # fmt: skip


@pytest.mark.parametrize(
    ("flow", "policy", "exact"),
    [
        ("udp 1.1.1.1:1 -> 2.2.2.2:2", 1, True),
        ("icmp 1.1.1.1 -> 2.2.2.2", 1, True),
        ("udp 1.1.1.1:1 -> 2.2.2.2:2", None, True),
        ("tcp 1.1.1.1:1 -> 2.2.2.2:2", 1, False),
        ("tcp 1.1.1.1:1 -> 2.2.2.2:2", 0, True),
        ("tcp 1.1.1.1:1 -> 2.2.2.2:2", None, False),
        ("udp 1.1.1.1:1 -> 2.2.2.2:2", 2, False),
        ("udp [1::1]:1 -> [2::2]:2", 0, False),
        ("udp [1::1]:1 -> [2::2]:2", 1, False),
        ("icmp 1::1 -> 2::2", 1, False),
        ("tcp [1::1]:1 -> [2::2]:2", 0, False),
    ],
)
def test_the_multipath_rule(flow: str, policy: int | None, exact: bool) -> None:
    from meridio_debug.controller.trace.multipath import forwarded

    rule = forwarded(parse_flow(flow), policy, reply=True)
    assert rule.exact == exact
    assert bool(rule.why) != exact


def test_table_and_html_say_candidates_and_degraded(healthy: TrenchState) -> None:
    from meridio_debug.controller.report.trace import render_html, render_table

    result = run(healthy, "udp [200:100::7]:40000 -> [2000::1]:4001")
    text = "one of lb-fe-a, lb-fe-b: the kernel hashes this reply with a per-boot seed"
    assert text in render_table(result) and text in render_html(result)
    assert "[if via lb-fe-b]" in render_table(result)
    _lb, _target, proxy = _chosen(healthy, FLOW4)
    degraded = run(with_pod(healthy, proxy, _drop_nexthop(4)), FLOW4)
    table = render_table(degraded)
    assert "verdict  whole for this flow, DEGRADED for others at" in table
    assert f"{proxy} (return) [MDB204]" in table and "BROKEN" not in table
    assert 'class="verdict degraded"' in render_html(degraded)


@pytest.mark.parametrize(
    ("flow", "policy", "exact"),
    [
        (FLOW6, "0", False),
        (FLOW6, "1", False),
        (FLOW4, "1", False),
        (FLOW4, "0", True),
        ("icmp 200.100.0.7 -> 20.0.0.1", "1", False),
        ("icmp 200.100.0.7 -> 20.0.0.1", "0", True),
    ],
)
def test_a_gateway_forwarding_a_clients_packets(
    healthy: TrenchState, flow: str, policy: str, exact: bool
) -> None:
    """The client is not on the gateway: its ECMP hashes the client's packet (IPv6 flow
    label; with policy 1 a NIC's hash) -- candidates, one forward branch per entry LB. The
    gateway's own packets (the lab's clients) are hashed as route get hashes them: exact."""
    client = parse_flow(flow).src
    family = parse_flow(flow).family

    def away(s: PodSnapshot) -> PodSnapshot:
        sysctls = {**s.sysctls, f"net.ipv{family}.fib_multipath_hash_policy": policy}
        return replace(
            s, addresses=drop(s.addresses, lambda a: a.address == client), sysctls=sysctls
        )

    local = run(healthy, flow)
    assert local.chosen is not None and not local.chosen.hops[0].candidates
    result = run(with_pod(healthy, "gw", away), flow)
    assert result.chosen is not None
    gw = result.chosen.hops[0]
    forward_lbs = [h for h in result.chosen.hops if h.role == "lb-fe" and h.direction == "forward"]
    if exact:  # IPv4 with L3 hashing: the addresses only, like route get
        assert not gw.candidates and len(forward_lbs) == 1
    else:
        assert gw.candidates == ("lb-fe-a", "lb-fe-b")
        assert [h.via for h in forward_lbs] == ["lb-fe-a", "lb-fe-b"]
        assert result.first_broken is None and result.verdict == "whole"
