"""Automatic analysis against the lab: healthy is silent, each break shows its code.

The healthy state is the default lab (lab_fixture.build_lab, pinned to
shared/lab.md). Every mutation breaks one thing the way the catalog and the
Meridio failure history describe it, and the test asserts the exact set of
(code, pod) at warning/error level. Where one break legitimately implies a
second code, the expected set has both and a comment says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from lab_fixture import build_lab, change, drop, snap, with_pod

from meridio_debug.controller.analysis import (
    CHECKS,
    INTERNAL_ERROR_CODE,
    AnalysisResult,
    Severity,
    analyze,
)
from meridio_debug.controller.model import (
    Address,
    Link,
    NfqlbShm,
    NftMarkMap,
    NftVipSet,
    PodSnapshot,
    Route,
    Rule,
    SectionStatus,
    TrenchState,
)

HEALTHY = build_lab()
HEALTHY_WITH_CONFIG = build_lab(with_config=True)

# findings-catalog.md: every code and its severity (the contract).
CATALOG = {
    "MDB001": Severity.WARNING,
    "MDB002": Severity.ERROR,
    "MDB003": Severity.INFO,
    "MDB101": Severity.ERROR,
    "MDB102": Severity.ERROR,
    "MDB103": Severity.ERROR,
    "MDB104": Severity.ERROR,
    "MDB105": Severity.ERROR,
    "MDB106": Severity.ERROR,
    "MDB110": Severity.ERROR,
    "MDB111": Severity.ERROR,
    "MDB112": Severity.ERROR,
    "MDB113": Severity.ERROR,
    "MDB114": Severity.ERROR,
    "MDB115": Severity.WARNING,
    "MDB116": Severity.WARNING,
    "MDB117": Severity.WARNING,
    "MDB118": Severity.ERROR,
    "MDB119": Severity.ERROR,
    "MDB120": Severity.ERROR,
    "MDB121": Severity.ERROR,
    "MDB201": Severity.ERROR,
    "MDB202": Severity.ERROR,
    "MDB203": Severity.ERROR,
    "MDB204": Severity.ERROR,
    "MDB205": Severity.ERROR,
    "MDB207": Severity.WARNING,
    "MDB208": Severity.WARNING,
    "MDB301": Severity.ERROR,
    "MDB302": Severity.ERROR,
    "MDB303": Severity.ERROR,
    "MDB304": Severity.ERROR,
    "MDB305": Severity.ERROR,
    "MDB401": Severity.ERROR,
    "MDB402": Severity.ERROR,
    "MDB403": Severity.ERROR,
    "MDB404": Severity.ERROR,
    "MDB405": Severity.WARNING,
    # pods and containers (test_health.py)
    "MDB501": Severity.ERROR,
    "MDB502": Severity.ERROR,
    "MDB503": Severity.WARNING,
    "MDB511": Severity.ERROR,
    "MDB521": Severity.WARNING,
    "MDB522": Severity.ERROR,
    "MDB531": Severity.ERROR,
    "MDB532": Severity.ERROR,
    "MDB541": Severity.ERROR,
    "MDB542": Severity.WARNING,
    # over time (test_flaps.py)
    "MDB701": Severity.WARNING,
    "MDB702": Severity.ERROR,
    "MDB703": Severity.ERROR,
    "MDB704": Severity.WARNING,
    "MDB705": Severity.WARNING,
    # configuration vs data plane (test_config_checks.py)
    "MDB601": Severity.ERROR,
    "MDB602": Severity.ERROR,
    "MDB603": Severity.WARNING,
    "MDB611": Severity.ERROR,
    "MDB621": Severity.ERROR,
    "MDB622": Severity.WARNING,
    "MDB631": Severity.WARNING,
    "MDB632": Severity.WARNING,
    "MDB633": Severity.WARNING,
}

Mutation = Callable[[TrenchState], TrenchState]


def problems(result: AnalysisResult) -> set[tuple[str, str]]:
    return {(f.code, f.pod) for f in result.at_least(Severity.WARNING)}


# --------------------------------------------------------------------------- helpers
# They find things by relation (the address on an interface, the table a rule
# points at), like the rules do, so no test hard-codes a hashed interface name.

VIP4, VIP6 = "20.0.0.1/32", "2000::1/128"


def ifname_with(s: PodSnapshot, address: str) -> str:
    return next(a.ifname for a in s.addresses if a.address == address)


def table_of_mark(s: PodSnapshot, mark: int, family: int) -> int:
    return next(
        r.table for r in s.rules if r.has_fwmark and r.fwmark == mark and r.family == family
    )


def vip_tables(s: PodSnapshot, family: int) -> set[int]:
    return {r.table for r in s.rules if r.src and r.family == family}


def on(pod: str, fn: Callable[[PodSnapshot], PodSnapshot]) -> Mutation:
    return lambda state: with_pod(state, pod, fn)


def edit(**fields: Callable[[PodSnapshot], object]) -> Callable[[PodSnapshot], PodSnapshot]:
    """Replace snapshot fields with functions of the snapshot."""
    return lambda s: dataclasses.replace(s, **{k: f(s) for k, f in fields.items()})


def chain(*mutations: Mutation) -> Mutation:
    def run(state: TrenchState) -> TrenchState:
        for mutation in mutations:
            state = mutation(state)
        return state

    return run


def drop_routes(pred: Callable[[PodSnapshot, Route], bool]) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(routes=lambda s: drop(s.routes, lambda r: pred(s, r)))


def drop_rules(pred: Callable[[PodSnapshot, Rule], bool]) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(rules=lambda s: drop(s.rules, lambda r: pred(s, r)))


def set_link(
    pred: Callable[[PodSnapshot, Link], bool], **fields: object
) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(links=lambda s: change(s.links, lambda lk: pred(s, lk), **fields))


def set_neighbour(dst: str, **fields: object) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(neighbours=lambda s: change(s.neighbours, lambda n: n.dst == dst, **fields))


def drop_addresses(pred: Callable[[Address], bool]) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(addresses=lambda s: drop(s.addresses, pred))


def set_sysctl(key: str, value: str) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(sysctls=lambda s: {**s.sysctls, key: value})


def map_marks(fn: Callable[[NftMarkMap], tuple[int, ...]]) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(
        nft=lambda s: dataclasses.replace(
            s.nft, mark_maps=tuple(dataclasses.replace(m, marks=fn(m)) for m in s.nft.mark_maps)
        )
    )


def section(name: str, state: str, message: str) -> Callable[[PodSnapshot], PodSnapshot]:
    """Mark a section failed/absent; the data it would have held is gone too."""
    emptied = {
        "rules": {"rules": ()},
        "routes": {"routes": ()},
        "addresses": {"addresses": ()},
        "links": {"links": ()},
        "neighbours": {"neighbours": ()},
        "bird": {"bird_protocols": (), "bfd_sessions": ()},
        "sysctls": {"sysctls": {}},
    }.get(name, {})

    def run(s: PodSnapshot) -> PodSnapshot:
        sections = tuple(
            SectionStatus(name, state, message) if st.name == name else st for st in s.sections
        )
        return dataclasses.replace(s, sections=sections, **emptied)

    return run


def lb_conduit(node_ip4: str) -> Callable[[PodSnapshot, Link], bool]:
    return lambda s, lk: lk.name == ifname_with(s, node_ip4)


def forget_target(mark: int) -> Callable[[PodSnapshot], PodSnapshot]:
    """An LB that never configured the target behind ``mark`` (rule, table, map entry)."""

    def run(s: PodSnapshot) -> PodSnapshot:
        tables = {r.table for r in s.rules if r.has_fwmark and r.fwmark == mark}
        gateways = {r.gateway for r in s.routes if r.table in tables}
        s = dataclasses.replace(
            s,
            rules=drop(s.rules, lambda r: r.has_fwmark and r.fwmark == mark),
            routes=drop(s.routes, lambda r: r.table in tables),
            neighbours=drop(s.neighbours, lambda n: n.dst in gateways),
        )
        return map_marks(lambda m: tuple(x for x in m.marks if x != mark))(s)

    return run


def add_stale_target(mark: int, v4: str, v6: str) -> Callable[[PodSnapshot], PodSnapshot]:
    def run(s: PodSnapshot) -> PodSnapshot:
        dev = ifname_with(s, "172.16.1.2")
        rules = tuple(
            Rule(family=f, priority=90, table=mark, fwmark=mark, fwmask=0xFFFFFFFF, has_fwmark=True)
            for f in (4, 6)
        )
        routes = (
            Route(family=4, table=mark, dst="default", gateway=v4, dev=dev),
            Route(family=6, table=mark, dst="default", gateway=v6, dev=dev, metric=1024),
        )
        s = dataclasses.replace(s, rules=s.rules + rules, routes=s.routes + routes)
        return map_marks(lambda m: (*m.marks, mark))(s)

    return run


def bird_protocol(name: str, **fields: object) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(
        bird_protocols=lambda s: change(s.bird_protocols, lambda p: p.name == name, **fields)
    )


def bfd_session(address: str, **fields: object) -> Callable[[PodSnapshot], PodSnapshot]:
    return edit(
        bfd_sessions=lambda s: change(s.bfd_sessions, lambda b: b.address == address, **fields)
    )


def proxy_nexthops(
    family: int, fn: Callable[[tuple[str, ...]], tuple[str, ...]]
) -> Callable[[PodSnapshot], PodSnapshot]:
    def run(s: PodSnapshot) -> PodSnapshot:
        tables = vip_tables(s, family)
        routes = []
        for r in s.routes:
            if r.table in tables and r.family == family and r.is_default:
                hops = fn(tuple(h.gateway for h in r.nexthops))
                template = r.nexthops[0]
                nexthops = tuple(dataclasses.replace(template, gateway=g) for g in hops)
                routes.append(dataclasses.replace(r, nexthops=nexthops))
            else:
                routes.append(r)
        return dataclasses.replace(s, routes=tuple(routes))

    return run


def unreachable(pod: str, error: str) -> Mutation:
    def run(state: TrenchState) -> TrenchState:
        pods = tuple(
            dataclasses.replace(r, snapshot=None, error=error) if r.pod == pod else r
            for r in state.pods
        )
        return dataclasses.replace(state, pods=pods)

    return run


T1_MARK = 5001  # target-a1 (lab.md: identifier 1, fwmark = table = 5001)
T4_MARK = 5004  # target-b2

# --------------------------------------------------------------------------- the mutations

CASES: list[tuple[str, Mutation, set[tuple[str, str]]]] = [
    # ---- access
    (
        "MDB001 rules unreadable: no false findings from the missing rules",
        on("lb-fe-a", section("rules", "ERROR", "permission denied: EPERM")),
        {("MDB001", "lb-fe-a")},
    ),
    (
        "MDB001 addresses unreadable in a target",
        on("target-a1", section("addresses", "ERROR", "NetlinkError: EACCES")),
        {("MDB001", "target-a1")},
    ),
    (
        "MDB001 links unreadable in a proxy",
        on("proxy-a", section("links", "ERROR", "permission denied")),
        {("MDB001", "proxy-a")},
    ),
    (
        "MDB001 neighbours and sysctls unreadable in an LB",
        chain(
            on("lb-fe-a", section("neighbours", "ERROR", "EPERM")),
            on("lb-fe-a", section("sysctls", "ERROR", "no network sysctl readable")),
        ),
        {("MDB001", "lb-fe-a")},
    ),
    (
        "MDB002 target unreachable",
        unreachable("target-b2", "ephemeral container: forbidden by PodSecurity"),
        {("MDB002", "target-b2")},
    ),
    (
        "MDB002 LB unreachable",
        unreachable("lb-fe-b", "port-forward timed out"),
        {("MDB002", "lb-fe-b")},
    ),
    # ---- LB/FE
    (
        "MDB101 BGP v4 Active",
        on(
            "lb-fe-a",
            bird_protocol(
                "NBR-gateway-v4-a",
                state="start",
                info="Active",
                bgp_state="Active",
                last_error="Socket: Connection refused",
            ),
        ),
        {("MDB101", "lb-fe-a")},
    ),
    (
        "MDB101 BGP v6 down",
        on("lb-fe-b", bird_protocol("NBR-gateway-v6-a", state="down", info="", bgp_state="Idle")),
        {("MDB101", "lb-fe-b")},
    ),
    (
        "MDB102 BFD v4 Down",
        on("lb-fe-a", bfd_session("169.254.100.150", state="Down")),
        {("MDB102", "lb-fe-a")},
    ),
    (
        "MDB102 BFD v6 missing for a BFD gateway",
        on(
            "lb-fe-b", edit(bfd_sessions=lambda s: drop(s.bfd_sessions, lambda b: ":" in b.address))
        ),
        {("MDB102", "lb-fe-b")},
    ),
    (
        "MDB103 no v4 default in the VIP egress table",
        on(
            "lb-fe-a",
            drop_routes(
                lambda s, r: r.family == 4 and r.table in vip_tables(s, 4) and r.type == "unicast"
            ),
        ),
        {("MDB103", "lb-fe-a")},
    ),
    (
        "MDB103 no v6 default in the VIP egress table (only the blackhole left)",
        on("lb-fe-b", drop_routes(lambda s, r: r.family == 6 and r.protocol == "bird")),
        {("MDB103", "lb-fe-b")},
    ),
    (
        "MDB104 v4 VIP lacks its drop-table rule",
        on(
            "lb-fe-a",
            drop_rules(lambda s, r: r.family == 4 and r.src == VIP4 and r.priority == 101),
        ),
        {("MDB104", "lb-fe-a")},
    ),
    (
        "MDB104 v6 VIP has no rule at all",
        on("lb-fe-a", drop_rules(lambda s, r: r.src == VIP6)),
        {("MDB104", "lb-fe-a")},
    ),
    (
        "MDB105 external interface down",
        on(
            "lb-fe-a",
            set_link(
                lambda s, lk: lk.name == "ext-vlan0", state="DOWN", flags=("BROADCAST", "MULTICAST")
            ),
        ),
        {("MDB105", "lb-fe-a")},
    ),
    (
        "MDB105 external interface lost its v6 address",
        on(
            "lb-fe-b",
            drop_addresses(
                lambda a: a.ifname == "ext-vlan0" and a.family == 6 and a.scope == "global"
            ),
        ),
        {("MDB105", "lb-fe-b")},
    ),
    # The conduit towards node a is down, so target-a1/a2's next hops are on a
    # down interface as well (MDB111): the cause and its effect on the tables.
    (
        "MDB106 conduit interface down",
        on(
            "lb-fe-a",
            set_link(lb_conduit("172.16.1.2"), state="DOWN", flags=("BROADCAST", "MULTICAST")),
        ),
        {("MDB106", "lb-fe-a"), ("MDB111", "lb-fe-a")},
    ),
    # Without its v6 address the conduit's v6 next hops leave the connected
    # subnets (MDB111) and proxy-a's egress nexthop fd00:0:0:1::2 is no longer
    # an LB address (MDB403).
    (
        "MDB106 conduit interface without v6 address",
        on("lb-fe-a", drop_addresses(lambda a: a.address == "fd00:0:0:1::2")),
        {("MDB106", "lb-fe-a"), ("MDB111", "lb-fe-a"), ("MDB403", "proxy-a")},
    ),
    # Deleting the v4 route empties the table for IPv4 (MDB110) and leaves
    # target-a1 load-balanced over IPv6 only (MDB118).
    (
        "MDB110 v4 route of a fwmark table deleted",
        on(
            "lb-fe-a",
            drop_routes(lambda s, r: r.family == 4 and r.table == table_of_mark(s, T1_MARK, 4)),
        ),
        {("MDB110", "lb-fe-a"), ("MDB118", "lb-fe-a")},
    ),
    # Both families gone from lb-fe-a's table: target-a1 is now reached
    # through lb-fe-b only, which is MDB402's signal.
    (
        "MDB110 fwmark table emptied in both families",
        on("lb-fe-a", drop_routes(lambda s, r: r.table == table_of_mark(s, T1_MARK, 4))),
        {("MDB110", "lb-fe-a"), ("MDB402", "lb-fe-a")},
    ),
    (
        "MDB111 target next hop routed out of the wrong conduit",
        on(
            "lb-fe-b",
            edit(
                routes=lambda s: change(
                    s.routes,
                    lambda r: r.family == 4 and r.table == table_of_mark(s, T1_MARK, 4),
                    dev=ifname_with(s, "172.16.2.4"),
                )
            ),
        ),
        {("MDB111", "lb-fe-b")},
    ),
    (
        "MDB111 v6 next hop flagged linkdown",
        on(
            "lb-fe-a",
            edit(
                routes=lambda s: change(
                    s.routes,
                    lambda r: r.family == 6 and r.table == table_of_mark(s, T4_MARK, 6),
                    flags=("linkdown",),
                )
            ),
        ),
        {("MDB111", "lb-fe-a")},
    ),
    (
        "MDB112 target neighbour FAILED (v4)",
        on("lb-fe-a", set_neighbour("172.16.1.6", state="FAILED", lladdr="")),
        {("MDB112", "lb-fe-a")},
    ),
    (
        "MDB112 target neighbour INCOMPLETE (v6)",
        on("lb-fe-b", set_neighbour("fd00:0:0:2::8", state="INCOMPLETE", lladdr="")),
        {("MDB112", "lb-fe-b")},
    ),
    (
        "MDB112 stale MAC for a target",
        on("lb-fe-a", set_neighbour("172.16.2.6", state="STALE", lladdr="02:de:ad:be:ef:01")),
        {("MDB112", "lb-fe-a")},
    ),
    # A missing v6 rule: the v6 mark has no rule (MDB113) and target-a1 is
    # load-balanced over IPv4 only (MDB118).
    (
        "MDB113 missing v6 fwmark rule for a target",
        on(
            "lb-fe-a",
            drop_rules(lambda s, r: r.family == 6 and r.has_fwmark and r.fwmark == T1_MARK),
        ),
        {("MDB113", "lb-fe-a"), ("MDB118", "lb-fe-a")},
    ),
    (
        "MDB113 rule without mark (target not active in the load balancer)",
        on("lb-fe-b", map_marks(lambda m: tuple(x for x in m.marks if x != T4_MARK))),
        {("MDB113", "lb-fe-b")},
    ),
    (
        "MDB114 VIP missing from the LB's v6 VIP set",
        on(
            "lb-fe-a",
            edit(
                nft=lambda s: dataclasses.replace(
                    s.nft,
                    vip_sets=tuple(
                        dataclasses.replace(v, elements=()) if v.family == 6 else v
                        for v in s.nft.vip_sets
                    ),
                )
            ),
        ),
        {("MDB114", "lb-fe-a")},
    ),
    (
        "MDB114 stray VIP in the LB's v4 VIP set",
        on(
            "lb-fe-b",
            edit(
                nft=lambda s: dataclasses.replace(
                    s.nft,
                    vip_sets=(
                        *s.nft.vip_sets,
                        NftVipSet("meridio-nfqlb", "ipv4-vips", 4, ("20.0.0.9/32",)),
                    ),
                )
            ),
        ),
        {("MDB114", "lb-fe-b")},
    ),
    (
        "MDB115 defrag table missing",
        on("lb-fe-a", edit(nft=lambda s: dataclasses.replace(s.nft, defrag=None))),
        {("MDB115", "lb-fe-a")},
    ),
    (
        "MDB115 defrag prefix from renamed NSM interfaces",
        on(
            "lb-fe-a",
            edit(
                nft=lambda s: dataclasses.replace(
                    s.nft, defrag=dataclasses.replace(s.nft.defrag, iifname_prefixes=("nsm",))
                )
            ),
        ),
        {("MDB115", "lb-fe-a")},
    ),
    (
        "MDB116 rp_filter=1",
        on("lb-fe-a", set_sysctl("net.ipv4.conf.all.rp_filter", "1")),
        {("MDB116", "lb-fe-a")},
    ),
    (
        "MDB116 v6 fwmark_reflect off",
        on("lb-fe-b", set_sysctl("net.ipv6.fwmark_reflect", "0")),
        {("MDB116", "lb-fe-b")},
    ),
    (
        "MDB116 rp_filter=2 on a conduit",
        on(
            "lb-fe-a",
            lambda s: set_sysctl(f"net.ipv4.conf.{ifname_with(s, '172.16.2.2')}.rp_filter", "2")(s),
        ),
        {("MDB116", "lb-fe-a")},
    ),
    (
        "MDB117 external MTU above the conduits'",
        on("lb-fe-a", set_link(lambda s, lk: lk.name == "ext-vlan0", mtu=9000)),
        {("MDB117", "lb-fe-a")},
    ),
    (
        "MDB118 target load-balanced over IPv4 only",
        on(
            "lb-fe-a",
            lambda s: dataclasses.replace(
                s,
                rules=drop(
                    s.rules, lambda r: r.family == 6 and r.has_fwmark and r.fwmark == T1_MARK
                ),
                routes=drop(
                    s.routes, lambda r: r.family == 6 and r.table == table_of_mark(s, T1_MARK, 6)
                ),
                nft=dataclasses.replace(
                    s.nft,
                    mark_maps=tuple(
                        dataclasses.replace(m, marks=tuple(x for x in m.marks if x != T1_MARK))
                        if m.family == 6
                        else m
                        for m in s.nft.mark_maps
                    ),
                ),
            ),
        ),
        {("MDB118", "lb-fe-a")},
    ),
    # ---- proxy
    (
        "MDB201 bridge0 down",
        on(
            "proxy-a",
            set_link(
                lambda s, lk: lk.name == "bridge0", state="DOWN", flags=("BROADCAST", "MULTICAST")
            ),
        ),
        {("MDB201", "proxy-a")},
    ),
    # The targets' v6 gateway is gone with it; their routes still name it, and
    # with no bridge address on that subnet MDB303 has nothing to compare to,
    # so only the cause is reported.
    (
        "MDB201 bridge0 without its v6 node-subnet address",
        on("proxy-a", drop_addresses(lambda a: a.address == "fd00:0:0:1::1")),
        {("MDB201", "proxy-a")},
    ),
    (
        "MDB202 target port not enslaved",
        on(
            "proxy-a",
            set_link(
                lambda s, lk: (
                    lk.name.startswith("proxy.") and lk.name == ifname_with(s, "172.16.1.7")
                ),
                master="",
                slave_kind="",
            ),
        ),
        {("MDB202", "proxy-a")},
    ),
    (
        "MDB202 target port down",
        on(
            "proxy-b",
            set_link(
                lambda s, lk: lk.name == ifname_with(s, "172.16.2.9"),
                state="LOWERLAYERDOWN",
                flags=("BROADCAST", "MULTICAST", "UP"),
            ),
        ),
        {("MDB202", "proxy-b")},
    ),
    # An LB-side port down: the nexthop behind it has no live link (MDB205).
    (
        "MDB202 LB-side port down",
        on(
            "proxy-a",
            set_link(
                lambda s, lk: lk.name == ifname_with(s, "172.16.1.5"),
                state="DOWN",
                flags=("BROADCAST", "MULTICAST"),
            ),
        ),
        {("MDB202", "proxy-a"), ("MDB205", "proxy-a")},
    ),
    (
        "MDB203 proxy lacks the v6 VIP rule",
        on("proxy-a", drop_rules(lambda s, r: r.src == VIP6)),
        {("MDB203", "proxy-a")},
    ),
    (
        "MDB203 proxy lacks the v4 VIP rule",
        on("proxy-b", drop_rules(lambda s, r: r.src == VIP4)),
        {("MDB203", "proxy-b")},
    ),
    # The proxy sees it locally (LB behind a port, no nexthop: MDB204) and the
    # cross-pod comparison names the missing LB address (MDB403).
    (
        "MDB204 v4 egress nexthop to lb-fe-b dropped",
        on("proxy-a", proxy_nexthops(4, lambda hops: tuple(h for h in hops if h != "172.16.1.4"))),
        {("MDB204", "proxy-a"), ("MDB403", "proxy-a")},
    ),
    (
        "MDB204 v6 egress nexthop dropped (LBs not snapshotted: local view only)",
        chain(
            on("proxy-b", proxy_nexthops(6, lambda hops: hops[:1])),
            unreachable("lb-fe-a", "timeout"),
            unreachable("lb-fe-b", "timeout"),
        ),
        {("MDB204", "proxy-b"), ("MDB002", "lb-fe-a"), ("MDB002", "lb-fe-b")},
    ),
    (
        "MDB205 nexthop neighbour FAILED (v4)",
        on("proxy-a", set_neighbour("172.16.1.4", state="FAILED", lladdr="")),
        {("MDB205", "proxy-a")},
    ),
    (
        "MDB205 nexthop neighbour FAILED (v6)",
        on("proxy-b", set_neighbour("fd00:0:0:2::2", state="FAILED", lladdr="")),
        {("MDB205", "proxy-b")},
    ),
    # A nexthop outside the node subnet is no LB of this node either (MDB403),
    # and lb-fe-b behind its port has no nexthop left (MDB204).
    (
        "MDB205 nexthop outside the bridge subnet",
        on("proxy-a", proxy_nexthops(4, lambda hops: (hops[0], "172.16.9.4"))),
        {("MDB205", "proxy-a"), ("MDB204", "proxy-a"), ("MDB403", "proxy-a")},
    ),
    (
        "MDB207 tentative global v6 address",
        on(
            "proxy-a",
            edit(
                addresses=lambda s: change(
                    s.addresses,
                    lambda a: a.address == "fd00:0:0:1::1",
                    flags=("tentative", "permanent"),
                )
            ),
        ),
        {("MDB207", "proxy-a")},
    ),
    (
        "MDB207 dadfailed on a target",
        on(
            "target-b1",
            edit(
                addresses=lambda s: change(
                    s.addresses,
                    lambda a: a.address == "fd00:0:0:2::6",
                    flags=("dadfailed", "permanent"),
                )
            ),
        ),
        {("MDB207", "target-b1")},
    ),
    (
        "MDB208 proxy accept_dad=1",
        on("proxy-a", set_sysctl("net.ipv6.conf.all.accept_dad", "1")),
        {("MDB208", "proxy-a")},
    ),
    (
        "MDB208 proxy rp_filter on bridge0",
        on("proxy-b", set_sysctl("net.ipv4.conf.bridge0.rp_filter", "1")),
        {("MDB208", "proxy-b")},
    ),
    (
        "MDB208 proxy v6 multipath hash L3",
        on("proxy-b", set_sysctl("net.ipv6.fib_multipath_hash_policy", "0")),
        {("MDB208", "proxy-b")},
    ),
    # ---- target
    (
        "MDB301 v4 VIP removed from nsm-0",
        on("target-a1", drop_addresses(lambda a: a.address == "20.0.0.1")),
        {("MDB301", "target-a1")},
    ),
    (
        "MDB301 v6 VIP removed from nsm-0",
        on("target-b2", drop_addresses(lambda a: a.address == "2000::1")),
        {("MDB301", "target-b2")},
    ),
    (
        "MDB302 v6 VIP rule missing",
        on("target-a2", drop_rules(lambda s, r: r.src == VIP6)),
        {("MDB302", "target-a2")},
    ),
    (
        "MDB302 v4 VIP rule missing",
        on("target-b1", drop_rules(lambda s, r: r.src == VIP4)),
        {("MDB302", "target-b1")},
    ),
    (
        "MDB303 policy route without via (#376)",
        on(
            "target-a1",
            edit(
                routes=lambda s: change(
                    s.routes,
                    lambda r: r.family == 4 and r.table in vip_tables(s, 4) and r.is_default,
                    gateway="",
                    flags=(),
                )
            ),
        ),
        {("MDB303", "target-a1")},
    ),
    (
        "MDB303 v6 policy table empty",
        on("target-b2", drop_routes(lambda s, r: r.family == 6 and r.table in vip_tables(s, 6))),
        {("MDB303", "target-b2")},
    ),
    (
        "MDB303 policy route via another node's bridge address",
        on(
            "target-a2",
            edit(
                routes=lambda s: change(
                    s.routes,
                    lambda r: r.family == 4 and r.table in vip_tables(s, 4) and r.is_default,
                    gateway="172.16.1.3",
                )
            ),
        ),
        {("MDB303", "target-a2")},
    ),
    (
        "MDB304 bridge gateway neighbour FAILED",
        on("target-a1", set_neighbour("172.16.1.1", state="FAILED", lladdr="")),
        {("MDB304", "target-a1")},
    ),
    (
        "MDB304 bridge gateway with a stale MAC (v6)",
        on("target-b1", set_neighbour("fd00:0:0:2::1", state="STALE", lladdr="02:00:00:00:0b:01")),
        {("MDB304", "target-b1")},
    ),
    (
        "MDB305 nsm-0 down",
        on(
            "target-a2",
            set_link(
                lambda s, lk: lk.name == "nsm-0", state="DOWN", flags=("BROADCAST", "MULTICAST")
            ),
        ),
        {("MDB305", "target-a2")},
    ),
    # ---- across pods
    (
        "MDB401 LB routes an extra mark to IPs no target owns",
        on("lb-fe-a", add_stale_target(5009, "172.16.1.66", "fd00:0:0:1::66")),
        {("MDB401", "lb-fe-a")},
    ),
    # Only the v4 route is stale: lb-fe-a still reaches target-a1 over IPv6, so
    # the LBs still agree on the target set (no MDB402).
    (
        "MDB401 stale target IP in place of a live one",
        on(
            "lb-fe-a",
            edit(
                routes=lambda s: change(
                    s.routes,
                    lambda r: r.family == 4 and r.table == table_of_mark(s, T1_MARK, 4),
                    gateway="172.16.1.66",
                )
            ),
        ),
        {("MDB401", "lb-fe-a")},
    ),
    (
        "MDB402 one LB never configured a target",
        on("lb-fe-b", forget_target(T4_MARK)),
        {("MDB402", "lb-fe-b")},
    ),
    # proxy-a has not resolved its LBs yet (no neighbours, no learned fdb), so
    # only the cross-pod comparison can tell the nexthop is wrong.
    (
        "MDB403 proxy nexthop is not an LB address",
        chain(
            on("proxy-a", proxy_nexthops(4, lambda hops: (hops[0], "172.16.1.99"))),
            on("proxy-a", edit(neighbours=lambda s: ())),
        ),
        {("MDB403", "proxy-a")},
    ),
    (
        "MDB404 no LB sends to a target that holds the VIPs",
        chain(on("lb-fe-a", forget_target(T1_MARK)), on("lb-fe-b", forget_target(T1_MARK))),
        {("MDB404", "target-a1")},
    ),
    (
        "MDB405 target MTU below the path's",
        on("target-a1", set_link(lambda s, lk: lk.name == "nsm-0", mtu=1400)),
        {("MDB405", "target-a1")},
    ),
    # A smaller conduit in the LB is also smaller than the external MTU (MDB117).
    (
        "MDB405 LB conduit MTU below the path's",
        on("lb-fe-b", set_link(lb_conduit("172.16.2.4"), mtu=1400)),
        {("MDB405", "lb-fe-b"), ("MDB117", "lb-fe-b")},
    ),
]


def test_healthy_lab_has_no_warning_or_error() -> None:
    result = analyze(HEALTHY)
    assert problems(result) == set(), [f.summary for f in result.at_least(Severity.WARNING)]
    assert {f.code for f in result.findings} == {"MDB003"}
    # nfqlb is absent in the lab's LB/FEs (it marks with nftables); bird and nfqlb are
    # not expected outside the LB/FE pod, so their absence there is no finding at all.
    assert {(f.code, f.pod, f.evidence["section"]) for f in result.findings} == {
        ("MDB003", "lb-fe-a", "nfqlb"),
        ("MDB003", "lb-fe-b", "nfqlb"),
    }


def test_healthy_lab_with_configured_vips_is_silent_too() -> None:
    assert problems(analyze(HEALTHY_WITH_CONFIG)) == set()


@pytest.mark.parametrize(("lbs", "proxies", "targets"), [(1, 1, 1), (3, 3, 3), (2, 4, 5)])
def test_scaled_lab_is_healthy(lbs: int, proxies: int, targets: int) -> None:
    assert problems(analyze(build_lab(lbs, proxies, targets))) == set()


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [pytest.param(m, e, id=name) for name, m, e in CASES],
)
def test_mutation_reports_exactly(mutation: Mutation, expected: set[tuple[str, str]]) -> None:
    for state in (HEALTHY, HEALTHY_WITH_CONFIG):
        result = analyze(mutation(state))
        assert problems(result) == expected, [
            (f.code, f.pod, f.summary) for f in result.at_least(Severity.WARNING)
        ]


def test_every_catalog_code_is_registered_with_its_severity() -> None:
    assert {c.code: c.severity for c in CHECKS} == CATALOG
    assert len({c.code for c in CHECKS}) == len(CHECKS)


def test_every_warning_and_error_code_has_a_mutation() -> None:
    from test_config_checks import CONFIG_CASES
    from test_flaps import COVERED as FLAPS
    from test_health import COVERED
    from test_nfqlb_checks import NFQLB_CASES

    covered = {code for _name, _m, expected in CASES for code, _pod in expected}
    covered |= {code for _name, _m, expected in CONFIG_CASES for code, _pod in expected}
    covered |= COVERED | FLAPS
    covered |= {code for _name, _m, expected in NFQLB_CASES for code, _pod in expected}
    assert {c for c, s in CATALOG.items() if s >= Severity.WARNING} <= covered


def test_findings_carry_evidence_hint_and_role() -> None:
    state = on(
        "lb-fe-a",
        drop_routes(lambda s, r: r.family == 4 and r.table == table_of_mark(s, T1_MARK, 4)),
    )(HEALTHY)
    mdb110 = next(f for f in analyze(state).findings if f.code == "MDB110")
    assert mdb110.role == "lb-fe"
    assert mdb110.severity is Severity.ERROR
    assert mdb110.evidence["rule"] == "99: from all fwmark 0x1389 lookup 5001"
    assert mdb110.evidence["table"] == 5001
    assert mdb110.evidence["routes"] == [
        "default via fd00:0:0:1::6 dev "
        f"{ifname_with(snap(state, 'lb-fe-a'), '172.16.1.2')} "
        "proto boot metric 1024 table 5001"
    ]
    assert "stateless-lb" in mdb110.hint
    assert mdb110.to_dict()["severity"] == "error"


def test_multi_pod_findings_name_every_pod() -> None:
    state = on("lb-fe-b", forget_target(T4_MARK))(HEALTHY)
    mdb402 = next(f for f in analyze(state).findings if f.code == "MDB402")
    assert mdb402.pod == "lb-fe-b"
    assert set(mdb402.pods) == {"lb-fe-b", "target-b2", "lb-fe-a"}


def test_relations_not_numbers_renumbered_tables_stay_healthy() -> None:
    """Other Meridio versions use other priorities, offsets and table numbers."""

    def renumber(s: PodSnapshot) -> PodSnapshot:
        def table(t: int) -> int:
            return t + 100 if t not in (253, 254, 255) else t

        marks = {r.fwmark for r in s.rules if r.has_fwmark}
        return dataclasses.replace(
            s,
            rules=tuple(
                dataclasses.replace(
                    r,
                    table=table(r.table),
                    fwmark=r.fwmark + 100 if r.has_fwmark else 0,
                    priority=r.priority + 7 if r.priority else 0,
                )
                for r in s.rules
            ),
            routes=tuple(dataclasses.replace(r, table=table(r.table)) for r in s.routes),
            nft=dataclasses.replace(
                s.nft,
                mark_maps=tuple(
                    dataclasses.replace(
                        m, marks=tuple(x + 100 if x in marks else x for x in m.marks)
                    )
                    for m in s.nft.mark_maps
                ),
            ),
        )

    state = HEALTHY
    for result in HEALTHY.pods:
        if result.role != "gateway":
            state = with_pod(state, result.pod, renumber)
    assert problems(analyze(state)) == set()


def test_real_nfqlb_marks_replace_the_nft_map() -> None:
    def nfqlb(s: PodSnapshot) -> PodSnapshot:
        marks = tuple(sorted({r.fwmark for r in s.rules if r.has_fwmark}))
        return dataclasses.replace(
            s,
            sections=tuple(
                SectionStatus(st.name, "OK") if st.name == "nfqlb" else st for st in s.sections
            ),
            nft=dataclasses.replace(s.nft, mark_maps=()),
            nfqlb_shms=(NfqlbShm(name="tshm-stream-a", m=9973, n=100, active=marks),),
        )

    state = with_pod(with_pod(HEALTHY, "lb-fe-a", nfqlb), "lb-fe-b", nfqlb)
    assert problems(analyze(state)) == set()
    broken = with_pod(
        state,
        "lb-fe-a",
        lambda s: dataclasses.replace(
            s,
            nfqlb_shms=(
                dataclasses.replace(s.nfqlb_shms[0], active=(5001, 5002, 5003, 5004, 5044)),
            ),
        ),
    )
    result = analyze(broken)
    assert problems(result) == {("MDB113", "lb-fe-a")}
    assert {f.evidence["mark"] for f in result.findings if f.code == "MDB113"} == {5044}


def _single_stack(family: int) -> Callable[[PodSnapshot], PodSnapshot]:
    other = 10 - family

    def run(s: PodSnapshot) -> PodSnapshot:
        return dataclasses.replace(
            s,
            addresses=drop(s.addresses, lambda a: a.family == other and a.scope != "host"),
            rules=drop(s.rules, lambda r: r.family == other and r.priority not in (0, 32766)),
            routes=drop(s.routes, lambda r: r.family == other and r.table not in (254, 255)),
            neighbours=drop(s.neighbours, lambda n: n.family == other),
            bird_protocols=drop(
                s.bird_protocols, lambda p: p.channel == f"ipv{other}" and p.proto == "BGP"
            ),
            bfd_sessions=drop(s.bfd_sessions, lambda b: (":" in b.address) == (other == 6)),
            nft=dataclasses.replace(
                s.nft,
                vip_sets=drop(s.nft.vip_sets, lambda v: v.family == other),
                mark_maps=drop(s.nft.mark_maps, lambda m: m.family == other),
            ),
            sysctls={k: v for k, v in s.sysctls.items() if f"ipv{other}" not in k},
        )

    return run


@pytest.mark.parametrize("family", [4, 6])
def test_single_stack_trench_is_healthy(family: int) -> None:
    state = HEALTHY
    for result in HEALTHY.pods:
        state = with_pod(state, result.pod, _single_stack(family))
    result = analyze(state)
    assert problems(result) == set(), [f.summary for f in result.at_least(Severity.WARNING)]
    # and breaking it still shows
    broken = with_pod(state, "target-a1", drop_rules(lambda s, r: bool(r.src)))
    assert problems(analyze(broken)) == {("MDB302", "target-a1")}


def test_unknown_roles_are_inferred_from_state() -> None:
    pods = tuple(dataclasses.replace(r, role="unknown") for r in HEALTHY.pods)
    roles = {r.pod: r.effective_role for r in pods}
    assert roles == {r.pod: r.role for r in HEALTHY.pods}
    assert problems(analyze(TrenchState(pods=pods))) == set()


def test_suppress_by_code_and_pod_glob() -> None:
    state = chain(
        on("lb-fe-a", set_sysctl("net.ipv4.conf.all.rp_filter", "1")),
        on("lb-fe-b", set_sysctl("net.ipv4.conf.all.rp_filter", "1")),
    )(HEALTHY)
    result = analyze(state, suppress=["MDB003", "MDB116=lb-fe-a"])
    assert {(f.code, f.pod) for f in result.findings} == {("MDB116", "lb-fe-b")}
    assert {f.code for f in result.suppressed} == {"MDB003", "MDB116"}
    assert analyze(state, suppress=["MDB1*"]).at_least(Severity.WARNING) == ()


def test_findings_sorted_by_pod_then_code_and_runs_listed() -> None:
    state = chain(
        on("target-a1", drop_addresses(lambda a: a.address == "20.0.0.1")),
        on("lb-fe-a", set_sysctl("net.ipv4.conf.all.rp_filter", "1")),
        on("lb-fe-a", bird_protocol("NBR-gateway-v4-a", state="start", info="Active")),
    )(HEALTHY)
    result = analyze(state)
    keys = [(f.pod, f.code) for f in result.findings]
    assert keys == sorted(keys)
    runs = {(r.code, r.pod) for r in result.runs}
    assert ("MDB101", "lb-fe-a") in runs and ("MDB101", "target-a1") not in runs
    assert ("MDB404", "target-a1") in runs and ("MDB001", "gw") in runs
    assert result.summary() == {
        "error": 2,
        "warning": 1,
        "info": 2,
    }  # nfqlb absent on the two LB/FEs
    assert result.worst() is Severity.ERROR


def test_skipped_checks_say_why() -> None:
    state = on("lb-fe-a", section("rules", "ERROR", "permission denied: EPERM"))(HEALTHY)
    skipped = {r.code: r.skipped for r in analyze(state).runs if r.pod == "lb-fe-a" and r.skipped}
    assert skipped["MDB110"] == "section rules ERROR: permission denied: EPERM"
    assert "MDB101" not in skipped


def test_bird_invisible_to_the_agent_is_missing_data_not_an_error() -> None:
    state = on("lb-fe-a", section("bird", "ABSENT", "no bird process"))(HEALTHY)
    result = analyze(state)
    assert problems(result) == set()
    info = [f for f in result.findings if f.pod == "lb-fe-a" and f.evidence["section"] == "bird"]
    assert info and "PID namespace" in info[0].hint
    skipped = {r.code for r in result.runs if r.pod == "lb-fe-a" and r.skipped}
    assert {"MDB101", "MDB102"} <= skipped


def test_unreachable_pod_gets_only_mdb002_runs() -> None:
    result = analyze(unreachable("target-b2", "timeout")(HEALTHY))
    assert {r.code for r in result.runs if r.pod == "target-b2"} == {"MDB002"}


def test_a_crashing_check_becomes_a_finding_not_an_exception() -> None:
    def boom(state: TrenchState) -> list[object]:
        raise RuntimeError("unexpected data")

    bad = dataclasses.replace(CHECKS[0], code="MDB999", run=boom)
    result = analyze(HEALTHY, checks=(bad, *CHECKS))
    codes = [f.code for f in result.findings]
    assert INTERNAL_ERROR_CODE in codes and "MDB003" in codes


def test_state_without_targets_or_lbs_does_not_crash() -> None:
    only_lbs = TrenchState(pods=tuple(r for r in HEALTHY.pods if r.role == "lb-fe"))
    assert problems(analyze(only_lbs)) == set()
    only_target = TrenchState(pods=tuple(r for r in HEALTHY.pods if r.pod == "target-a1"))
    assert problems(analyze(only_target)) == set()
    assert analyze(TrenchState(pods=())).findings == ()


def test_checks_are_callable_alone() -> None:
    state = on("proxy-a", drop_rules(lambda s, r: r.src == VIP6))(HEALTHY)
    mdb203 = next(c for c in CHECKS if c.code == "MDB203")
    findings = mdb203(state)
    assert [(f.code, f.pod, f.role) for f in findings] == [("MDB203", "proxy-a", "proxy")]
