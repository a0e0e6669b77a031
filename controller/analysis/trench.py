"""MDB4xx: relations that only show when pods are compared.

Why: each pod can look fine alone while the trench is broken -- an LB routing
a mark to an IP no target owns any more (stale target), two LBs with
different target sets (a target gets half its share), a proxy sending
egress to addresses that are not the LBs', a target that opened its stream
but no LB sends it anything, an MTU that shrinks along one path. Target IPs
map to target pods through the targets' NSM addresses; LB addresses to LB
pods through the LBs' conduit addresses (TrenchView).

These rules only judge what they can see: with a target pod unreachable, an
unknown next hop is not called stale.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from meridio_debug.controller.analysis._base import trench_check
from meridio_debug.controller.analysis._view import PodView, TrenchView, ip
from meridio_debug.controller.analysis.findings import Check, Issue, Severity
from meridio_debug.controller.model import IpAddress


def _routing_lbs(trench: TrenchView) -> list[PodView]:
    return [p for p in trench.role("lb-fe") if p.ok("rules", "routes")]


@trench_check(
    "MDB401", Severity.ERROR, "LB routes a mark to an IP no target owns", roles=("lb-fe",)
)
def check_stale_targets(trench: TrenchView) -> Iterator[Issue]:
    """Every fwmark table's next hop must be the NSM address of a target pod."""
    if not trench.all_targets_known:
        return
    owners = trench.target_ips
    for lb in _routing_lbs(trench):
        seen: set[IpAddress] = set()
        for rule, route, _hop, addr in lb.fwmark_hops:
            if route is None or addr is None or addr in owners or addr in seen:
                continue
            seen.add(addr)
            yield Issue(
                pod=lb.name,
                summary=f"'{rule}' routes to {addr}, which no target pod owns: a stale target "
                "blackholes its share of flows",
                evidence={
                    "rule": str(rule),
                    "table": rule.table,
                    "route": str(route),
                    "nexthop": str(addr),
                    "targets": len(trench.role("target")),
                },
                hint="the LB keeps a target until NSP expires it (30 s) and its re-verification "
                "(every 10 s) drops it; check NSP's target registry and the stateless-lb logs",
            )


@trench_check("MDB402", Severity.ERROR, "LBs disagree on the target set", roles=("lb-fe",))
def check_lb_target_sets(trench: TrenchView) -> Iterator[Issue]:
    """All LBs must route to the same target pods (any family)."""
    lbs = _routing_lbs(trench)
    if len(lbs) < 2:
        return
    owners = trench.target_ips
    sets = {lb.name: {owners[a].pod for a in lb.routed_target_ips if a in owners} for lb in lbs}
    everyone = set().union(*sets.values())
    for lb in lbs:
        for target in sorted(everyone - sets[lb.name]):
            others = sorted(name for name, s in sets.items() if target in s)
            yield Issue(
                pod=lb.name,
                summary=f"target {target} is load-balanced by {', '.join(others)} but not by "
                f"{lb.name}",
                evidence={
                    "target": target,
                    "with": others,
                    "without": lb.name,
                    "target_ips": sorted(str(a) for a, o in owners.items() if o.pod == target),
                },
                hint="this LB never configured the target or dropped it (its IP unreachable "
                "from here): ping the target IP from this LB, check the conduit to the "
                "target's proxy and the stateless-lb logs (#170, #380)",
                pods=(lb.name, target, *others),
            )


@trench_check(
    "MDB403", Severity.ERROR, "proxy egress nexthops differ from the LB addresses", roles=("proxy",)
)
def check_proxy_nexthops(trench: TrenchView) -> Iterator[Issue]:
    """A proxy's egress nexthops == the LB conduit addresses on its node subnet."""
    lb_results = trench.role_results("lb-fe")
    if not lb_results or any(
        r.snapshot is None or not r.snapshot.ok("links", "addresses") for r in lb_results
    ):
        return  # an LB we cannot see might own the address
    lb_addrs = trench.lb_conduit_addrs
    for proxy in trench.role("proxy"):
        if not proxy.ok("rules", "routes", "addresses") or not proxy.source_rules:
            continue
        subnets = proxy.bridge_subnets
        if not subnets:
            continue
        for family in sorted(trench.vip_families or {4, 6}):
            fam_nets = [s for s in subnets if s.version == family]
            if not fam_nets:
                continue
            expected = {
                a: owner
                for a, (owner, _n) in lb_addrs.items()
                if a.version == family and any(a in s for s in fam_nets)
            }
            actual: set[IpAddress] = set()
            routes: set[str] = set()
            for route in proxy.egress_defaults(family):
                routes.add(str(route))
                actual.update(a for h in route.paths() if (a := ip(h.gateway)) is not None)
            for addr in sorted(set(expected) - actual, key=str):
                owner = expected[addr]
                yield Issue(
                    pod=proxy.name,
                    summary=f"no egress nexthop for {owner.pod} ({addr} on {owner.ifname})",
                    evidence={
                        "family": family,
                        "missing": str(addr),
                        "lb": owner.pod,
                        "nexthops": sorted(map(str, actual)),
                        "routes": sorted(routes),
                    },
                    hint="the proxy adds a nexthop per LB connection; check its logs for the "
                    "connection to that LB (#517)",
                    pods=(proxy.name, owner.pod),
                )
            for addr in sorted(actual - set(expected), key=str):
                yield Issue(
                    pod=proxy.name,
                    summary=f"egress nexthop {addr} is not an address of any LB on "
                    f"{', '.join(map(str, fam_nets))}",
                    evidence={
                        "family": family,
                        "extra": str(addr),
                        "lb_addresses": sorted(map(str, expected)),
                        "routes": sorted(routes),
                    },
                    hint="a nexthop left behind by a closed LB connection blackholes its share "
                    "of egress flows (#517, PR #518)",
                )


@trench_check(
    "MDB404", Severity.ERROR, "target owns the VIPs but no LB sends it traffic", roles=("target",)
)
def check_unserved_targets(trench: TrenchView) -> Iterator[Issue]:
    """A target with the VIPs (stream open) must get marks from at least one LB."""
    lbs = _routing_lbs(trench)
    if not lbs:
        return
    sending = trench.lbs_sending_to()
    open_targets = trench.config.open_targets if trench.config is not None else None
    vips = trench.vips
    for target in trench.role("target"):
        if not target.ok("addresses"):
            continue
        if open_targets is not None and target.name not in open_targets:
            continue
        owned = {a.network for a in target.target_vip_addrs()} & vips
        if not owned or sending.get(target.name):
            continue
        own = sorted(str(a.interface.ip) for a in target.target_own_addrs(vips))
        yield Issue(
            pod=target.name,
            summary=f"{target.name} holds the VIPs but no LB marks and routes traffic to "
            f"{', '.join(own) or 'its addresses'}",
            evidence={
                "vips": sorted(map(str, owned)),
                "target_ips": own,
                "lbs": [lb.name for lb in lbs],
            },
            hint="the target is not (or no longer) registered in NSP or not activated in the "
            "LBs: check 'target-client watch' (stream OPEN?), NSP, and the LBs' "
            "nfqlb show / fwmark rules",
            pods=(target.name, *(lb.name for lb in lbs)),
        )


@trench_check(
    "MDB405",
    Severity.WARNING,
    "MTU differs along an LB->proxy->target path",
    roles=("lb-fe", "proxy", "target"),
)
def check_path_mtu(trench: TrenchView) -> Iterator[Issue]:
    """LB conduit, proxy bridge and ports, target NSM interface: one MTU per node subnet."""
    lb_addrs = trench.lb_conduit_addrs
    targets = trench.target_ips
    for proxy in trench.role("proxy"):
        bridge = proxy.bridge
        if bridge is None or not proxy.ok("links", "addresses"):
            continue
        subnets = proxy.bridge_subnets
        if not subnets:
            continue
        hops: dict[tuple[str, str], int] = {(proxy.name, bridge.name): bridge.mtu}
        for port in proxy.proxy_nsm_ports:
            hops[(proxy.name, port.name)] = port.mtu
        for addr, (owner, _net) in lb_addrs.items():
            if any(addr in s for s in subnets) and owner.mtu:
                hops[(owner.pod, owner.ifname)] = owner.mtu
        for addr, owner in targets.items():
            if any(addr in s for s in subnets) and owner.mtu:
                hops[(owner.pod, owner.ifname)] = owner.mtu
        counts = Counter(hops.values())
        if len(counts) < 2:
            continue
        usual = max(counts, key=lambda mtu: (counts[mtu], mtu))
        path = {f"{pod}/{ifname}": mtu for (pod, ifname), mtu in sorted(hops.items())}
        for (pod, ifname), mtu in sorted(hops.items()):
            if mtu == usual:
                continue
            yield Issue(
                pod=pod,
                summary=f"{ifname} MTU {mtu} differs from the {usual} used along the paths "
                f"through {proxy.name}",
                evidence={
                    "interface": ifname,
                    "mtu": mtu,
                    "expected": usual,
                    "subnets": sorted(map(str, subnets)),
                    "path": path,
                },
                hint="all NSM interfaces of a conduit get the Conduit MTU (NSM_MTU); a smaller "
                "hop drops or fragments large packets -- check the Conduit CR and NSM",
                pods=(pod, proxy.name) if pod != proxy.name else (pod,),
            )


CHECKS: tuple[Check, ...] = (
    check_stale_targets,
    check_lb_target_sets,
    check_proxy_nexthops,
    check_unserved_targets,
    check_path_mtu,
)
