"""MDB2xx: the proxy pod -- bridge, ports and the VIP egress ECMP towards the LBs.

Why: ingress through the proxy is pure L2 (bridge0 and its NSM ports), and
egress is one shared ``from VIP`` table whose multipath default must have one
next hop per live LB link (#517: a missing or dead next hop blackholes the
share of flows hashed to it). These rules use only the proxy's own state --
its ports, fdb and neighbours tell which LB sits behind which port; the
cross-pod comparison with the LBs' real addresses is MDB403.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from meridio_debug.controller.analysis._base import pod_check
from meridio_debug.controller.analysis._view import PodView, TrenchView, ip
from meridio_debug.controller.analysis.findings import Check, Issue, Severity
from meridio_debug.controller.analysis.lbfe import sysctl_issues
from meridio_debug.controller.model import IpAddress, Link, Role

_PROXY: tuple[Role, ...] = ("proxy",)


def _fam(family: int) -> str:
    return f"IPv{family}"


@pod_check(
    "MDB201",
    Severity.ERROR,
    "bridge missing, down or without node-subnet address",
    roles=_PROXY,
    needs=("links", "addresses"),
)
def check_bridge(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """bridge0 must exist, be UP and hold the node subnet's .1/::1 (the targets' gateway)."""
    bridge = pod.bridge
    hint = "the proxy creates bridge0 and takes its address from IPAM (child 'bridge'); check "
    hint += "the proxy logs and the ipam pod"
    if bridge is None:
        yield Issue(summary="no bridge (bridge0) in the proxy", evidence={"bridges": []}, hint=hint)
        return
    if not bridge.is_up:
        yield Issue(
            summary=f"{bridge.name} is {bridge.state}",
            evidence={"bridge": bridge.name, "state": bridge.state, "flags": list(bridge.flags)},
            hint=hint,
        )
    port_nets = {
        c.network for port in pod.proxy_nsm_ports for c in pod.connected if c.ifname == port.name
    }
    families = set(trench.vip_families) | {n.version for n in port_nets}
    for family in sorted(families):
        own = pod.global_addrs(bridge.name, family)
        nets = {n for n in port_nets if n.version == family}
        if not own:
            yield Issue(
                summary=f"{bridge.name} has no {_fam(family)} address: targets lose their "
                "default gateway",
                evidence={
                    "bridge": bridge.name,
                    "family": family,
                    "port_subnets": sorted(map(str, nets)),
                },
                hint=hint,
            )
        elif nets and not any(a.network in nets for a in own):
            yield Issue(
                summary=f"{bridge.name}'s {_fam(family)} address is outside the node subnet "
                f"{', '.join(sorted(map(str, nets)))}",
                evidence={
                    "bridge": bridge.name,
                    "addresses": [str(a) for a in own],
                    "port_subnets": sorted(map(str, nets)),
                },
                hint=hint,
            )


@pod_check(
    "MDB202",
    Severity.ERROR,
    "NSM interface not enslaved to the bridge, or down",
    roles=_PROXY,
    needs=("links",),
)
def check_ports(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Every conduit-* (to an LB) and proxy.* (to a target) interface is an UP bridge port."""
    bridge = pod.bridge
    if bridge is None:
        return  # MDB201
    for port in pod.proxy_nsm_ports:
        side = "target" if pod.is_target_port(port) else "LB"
        evidence = {
            "interface": port.name,
            "master": port.master,
            "bridge": bridge.name,
            "state": port.state,
            "side": side,
        }
        if port.master != bridge.name:
            yield Issue(
                summary=f"{port.name} (towards a{'n' if side == 'LB' else ''} {side}) is not "
                f"a port of {bridge.name}: L2 between LBs and targets is cut",
                evidence=evidence,
                hint="the proxy enslaves every NSM interface when the connection comes up; "
                "check the proxy logs for the connection of this interface",
            )
        elif not port.is_up:
            yield Issue(
                summary=f"bridge port {port.name} (towards a{'n' if side == 'LB' else ''} "
                f"{side}) is {port.state}",
                evidence=evidence,
                hint="the NSM connection behind this port is down; check the NSM forwarder on "
                "this node and the peer pod",
            )


@pod_check(
    "MDB203", Severity.ERROR, "VIP without its from-VIP rule", roles=_PROXY, needs=("rules",)
)
def check_proxy_vip_rules(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Each trench VIP needs ``from VIP lookup <egress table>`` in its family."""
    for vip, rules, missing in pod.vip_rule_gaps(trench.vips):
        what = f"to table(s) {', '.join(map(str, missing))}" if rules else "at all"
        yield Issue(
            summary=f"VIP {vip} has no {_fam(vip.version)} 'from {vip}' rule {what}: targets' "
            "replies from it are not sent to the LBs",
            evidence={
                "vip": str(vip),
                "family": vip.version,
                "rules": [str(r) for r in rules],
                "missing_tables": missing,
                "egress_tables": sorted(pod.source_tables),
            },
            hint="the proxy adds one rule per VIP (pkg/proxy/vip.go) and flushes them at start; "
            "check the proxy logs and its NSP connection (it watches the VIPs)",
        )


def _egress(
    pod: PodView, trench: TrenchView
) -> dict[int, list[tuple[str, IpAddress | None, tuple[str, ...]]]]:
    """family -> [(route text, next-hop address, hop flags)] of the egress tables' defaults."""
    families = set(trench.vip_families) | {r.family for r in pod.source_rules}
    out: dict[int, list[tuple[str, IpAddress | None, tuple[str, ...]]]] = {}
    for family in sorted(families):
        hops: list[tuple[str, IpAddress | None, tuple[str, ...]]] = []
        for route in pod.egress_defaults(family):
            for hop in route.paths():
                hops.append((str(route), ip(hop.gateway) if hop.gateway else None, hop.flags))
        out[family] = hops
    return out


def _lb_ports(pod: PodView) -> list[Link]:
    bridge = pod.bridge
    if bridge is None:
        return []
    return [
        p
        for p in pod.proxy_nsm_ports
        if not pod.is_target_port(p) and p.master == bridge.name and p.is_up
    ]


def _port_of_mac(pod: PodView) -> Mapping[str, str]:
    """Learned (not local) fdb MAC -> bridge port."""
    out: dict[str, str] = {}
    for entry in pod.snap.fdb:
        if "self" in entry.flags or entry.state == "permanent":
            continue
        out.setdefault(entry.mac, entry.ifname)
    return out


def _lb_ips_by_port(pod: PodView, family: int) -> dict[str, set[IpAddress]]:
    """LB-side port -> addresses of that family whose neighbour MAC the fdb puts behind it."""
    bridge = pod.bridge
    if bridge is None or not pod.ok("neighbours", "fdb"):
        return {}
    port_of = _port_of_mac(pod)
    lb_ports = {p.name for p in pod.proxy_nsm_ports if not pod.is_target_port(p)}
    out: dict[str, set[IpAddress]] = {}
    for (ifname, addr), neighbour in pod.neigh.items():
        if ifname != bridge.name or addr.version != family or not neighbour.lladdr:
            continue
        port = port_of.get(neighbour.lladdr)
        if port in lb_ports and not neighbour.is_failed:
            out.setdefault(port, set()).add(addr)
    return out


@pod_check(
    "MDB204",
    Severity.ERROR,
    "egress default lacks a nexthop for a live LB link",
    roles=_PROXY,
    needs=("rules", "routes", "links"),
)
def check_missing_nexthops(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """One next hop per UP LB-side bridge port, per family (a missing one: partial blackhole)."""
    if not pod.source_rules or pod.bridge is None:
        return
    ports = _lb_ports(pod)
    tables = sorted(pod.source_tables)
    for family, hops in _egress(pod, trench).items():
        gateways = {addr for _r, addr, _f in hops if addr is not None}
        named = False
        for port, addrs in sorted(_lb_ips_by_port(pod, family).items()):
            if port not in {p.name for p in ports} or addrs & gateways:
                continue
            named = True
            yield Issue(
                summary=f"no {_fam(family)} egress nexthop for the LB behind {port} "
                f"({', '.join(sorted(map(str, addrs)))})",
                evidence={
                    "family": family,
                    "tables": tables,
                    "port": port,
                    "lb_addresses": sorted(map(str, addrs)),
                    "routes": sorted({r for r, _a, _f in hops}),
                },
                hint="the proxy adds a nexthop per connected LB (pkg/proxy/proxy.go); check "
                "the proxy logs for that LB's connection (#517)",
            )
        if not named and len(gateways) < len(ports):
            yield Issue(
                summary=f"{_fam(family)} egress default has {len(gateways)} nexthop(s) for "
                f"{len(ports)} live LB link(s)",
                evidence={
                    "family": family,
                    "tables": tables,
                    "nexthops": sorted(map(str, gateways)),
                    "lb_ports": [p.name for p in ports],
                    "routes": sorted({r for r, _a, _f in hops}),
                },
                hint="the proxy adds a nexthop per connected LB (pkg/proxy/proxy.go); check "
                "the proxy logs for the missing LB connection (#517)",
            )


@pod_check(
    "MDB205",
    Severity.ERROR,
    "egress nexthop without a live LB, or FAILED",
    roles=_PROXY,
    needs=("rules", "routes"),
)
def check_dead_nexthops(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """A nexthop must lead to a live LB: on the bridge subnet, neighbour not FAILED, port UP."""
    if not pod.source_rules:
        return
    bridge = pod.bridge
    subnets = pod.bridge_subnets
    have_links = pod.ok("links")
    ports = {p.name: p for p in pod.proxy_nsm_ports} if have_links else {}
    port_of = _port_of_mac(pod) if pod.ok("fdb") else {}
    hint = (
        "the LB behind this nexthop is gone or unreachable; the proxy removes a nexthop "
        "when the LB connection closes -- check the proxy logs and the LB (#517, PR #518)"
    )
    for family, hops in _egress(pod, trench).items():
        named = False
        seen: set[IpAddress] = set()
        for route, addr, flags in hops:
            if addr is None or addr in seen:
                continue
            seen.add(addr)
            evidence: dict[str, object] = {"family": family, "nexthop": str(addr), "route": route}
            reason = ""
            neighbour = (
                pod.neighbour(addr, bridge.name if bridge else "") if pod.ok("neighbours") else None
            )
            if {"dead", "linkdown"} & set(flags):
                reason = f"is marked {', '.join(sorted(set(flags)))}"
            elif neighbour is not None and neighbour.is_failed:
                reason = f"has neighbour state {neighbour.state}"
                evidence["neighbour"] = str(neighbour)
            elif (fam_nets := [s for s in subnets if s.version == family]) and not any(
                addr in s for s in fam_nets
            ):
                reason = "is outside the bridge's node subnet"
                evidence["subnets"] = sorted(map(str, subnets))
            elif neighbour is not None and neighbour.lladdr in port_of and have_links:
                port = ports.get(port_of[neighbour.lladdr])
                if port is None or not port.is_up:
                    reason = f"sits behind port {port_of[neighbour.lladdr]}, which is not UP"
                    evidence["port"] = port_of[neighbour.lladdr]
            if reason:
                named = True
                yield Issue(
                    summary=f"{_fam(family)} egress nexthop {addr} {reason}",
                    evidence=evidence,
                    hint=hint,
                )
        if have_links and bridge is not None and not named and len(seen) > len(_lb_ports(pod)):
            yield Issue(
                summary=f"{_fam(family)} egress default has {len(seen)} nexthops but only "
                f"{len(_lb_ports(pod))} live LB link(s)",
                evidence={
                    "family": family,
                    "nexthops": sorted(map(str, seen)),
                    "lb_ports": [p.name for p in _lb_ports(pod)],
                },
                hint=hint,
            )


@pod_check(
    "MDB207",
    Severity.WARNING,
    "IPv6 address tentative or dadfailed",
    roles=("lb-fe", "proxy", "target"),
    needs=("addresses",),
)
def check_dad(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Global IPv6 addresses must be usable at once: Meridio adds them nodad / accept_dad=0."""
    for addr in pod.snap.addresses:
        if addr.family != 6:
            continue
        failed = "dadfailed" in addr.flags
        if not failed and not ("tentative" in addr.flags and addr.is_global):
            continue
        state = "dadfailed" if failed else "tentative"
        yield Issue(
            summary=f"{addr} is {state}"
            + (": a duplicate address exists on the link" if failed else ": not usable yet"),
            evidence={
                "address": f"{addr.address}/{addr.prefixlen}",
                "interface": addr.ifname,
                "flags": list(addr.flags),
            },
            hint="Meridio adds NSM addresses with nodad and the proxy sets accept_dad=0 (the "
            "kernel uses max(all, interface)); a dadfailed address means a duplicate IP",
        )


_PROXY_SYSCTLS: Mapping[str, tuple[str, int]] = {
    "net.ipv4.conf.all.forwarding": ("1", 4),
    "net.ipv4.ip_forward": ("1", 4),
    "net.ipv6.conf.all.forwarding": ("1", 6),
    "net.ipv4.fib_multipath_hash_policy": ("1", 4),
    "net.ipv6.fib_multipath_hash_policy": ("1", 6),
    "net.ipv4.conf.all.rp_filter": ("0", 4),
    "net.ipv4.conf.default.rp_filter": ("0", 4),
    "net.ipv6.conf.all.accept_dad": ("0", 6),
}


@pod_check(
    "MDB208",
    Severity.WARNING,
    "proxy sysctl differs from Meridio's",
    roles=_PROXY,
    needs=("sysctls",),
)
def check_proxy_sysctls(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """forwarding, rp_filter (all/default/bridge), accept_dad, multipath hash policy."""
    bridge = pod.bridge if pod.ok("links") else None
    yield from sysctl_issues(pod, trench, _PROXY_SYSCTLS, [bridge.name] if bridge else [], "proxy")


CHECKS: tuple[Check, ...] = (
    check_bridge,
    check_ports,
    check_proxy_vip_rules,
    check_missing_nexthops,
    check_dead_nexthops,
    check_dad,
    check_proxy_sysctls,
)
