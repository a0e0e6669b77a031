"""MDB1xx: the LB/FE pod -- gateways, VIP egress, and the mark -> rule -> table -> target chain.

Why these rules: nearly every Meridio data-plane incident (meridio-reference
§9) shows up in the LB first -- a BGP/BFD session down, an egress table
without its BIRD default, a mark whose rule or table went missing after NSM
link flapping (#575, #234), a next hop whose neighbour is FAILED or carries a
stale MAC (#170, #380). Each rule follows one relation of §7 invariant 7:
marks (nfqlb Active / nft mark map) == fwmark rules == non-empty tables, each
table's next hop on an UP conduit interface with a sane neighbour.

Nothing here keys on a priority or a table number: the VIP egress tables are
whatever the ``from VIP`` rules point at, target tables whatever the fwmark
rules point at.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping

from meridio_debug.controller.analysis._base import pod_check
from meridio_debug.controller.analysis._view import (
    PodView,
    TrenchView,
    ip,
    lb_marks,
    net,
    sysctl_name,
)
from meridio_debug.controller.analysis.findings import Check, Issue, Severity
from meridio_debug.controller.model import IpAddress, IpNetwork, Role, Route, Rule

_LB: tuple[Role, ...] = ("lb-fe",)


def _fam(family: int) -> str:
    return f"IPv{family}"


def _routes(routes: list[Route]) -> list[str]:
    return [str(r) for r in routes]


# --------------------------------------------------------------------------- gateways


@pod_check(
    "MDB101", Severity.ERROR, "gateway BGP protocol not up/Established", roles=_LB, needs=("bird",)
)
def check_bgp(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Every NBR-* gateway protocol must be up (BGP: Established), as the frontend requires.

    A bird the agent cannot see (ABSENT: not running, or in a PID namespace the
    agent does not share) is missing data, not a verdict; its effect shows in
    the routes anyway (MDB103: no default in the VIP egress table).
    """
    for proto in pod.snap.bird_protocols:
        kind = proto.proto.lower()
        if kind == "bgp":
            if proto.is_established:
                continue
        elif kind == "static" and proto.name.startswith("NBR-"):
            if proto.state == "up":
                continue
        else:
            continue
        yield Issue(
            summary=f"gateway protocol {proto.name} is {proto.state} {proto.info}".rstrip(),
            evidence={
                "protocol": proto.name,
                "proto": proto.proto,
                "state": proto.state,
                "info": proto.info,
                "bgp_state": proto.bgp_state,
                "neighbor": proto.neighbor_address,
                "neighbor_as": proto.neighbor_as,
                "local_as": proto.local_as,
                "last_error": proto.last_error,
            },
            hint="compare the Gateway CR (address, remote-asn, remote-port, local-asn) with the "
            "router's config; 'Active'/'Connection refused' means the peer does not answer on "
            "that address/port (birdc show protocols all 'NBR-*' in the frontend)",
        )


@pod_check("MDB102", Severity.ERROR, "gateway BFD session not Up", roles=_LB, needs=("bird",))
def check_bfd(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Every BFD session of the FE's bird must be Up; a BFD-enabled gateway needs a session."""
    sessions = {}
    for session in pod.snap.bfd_sessions:
        addr = ip(session.address)
        if addr is not None:
            sessions[addr] = session
        if session.is_up:
            continue
        yield Issue(
            summary=f"BFD session to {session.address} is {session.state}",
            evidence={
                "address": session.address,
                "interface": session.interface,
                "state": session.state,
                "protocol": session.protocol,
            },
            hint="BFD Down takes the gateway (and its routes) down: check the router's BFD "
            "config and timers against the Gateway CR's bfd{min-tx,min-rx,multiplier}",
        )
    for proto in pod.snap.bird_protocols:
        addr = ip(proto.neighbor_address) if proto.neighbor_address else None
        if not proto.bfd or addr is None or addr in sessions:
            continue
        yield Issue(
            summary=f"{proto.name} has BFD configured but no BFD session to {addr}",
            evidence={"protocol": proto.name, "neighbor": proto.neighbor_address, "sessions": []},
            hint="check the bird 'protocol bfd' (NBR-BFD) covers the external interface "
            "(birdc show bfd sessions in the frontend)",
        )


# --------------------------------------------------------------------------- VIP egress


@pod_check(
    "MDB103",
    Severity.ERROR,
    "VIP egress table without default route",
    roles=_LB,
    needs=("rules", "routes"),
)
def check_egress_default(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """The tables ``from VIP`` rules point at must hold a unicast default per VIP family."""
    if not pod.source_rules:
        return  # MDB104 says the rules are missing
    tables = sorted(pod.source_tables)
    families = set(trench.vip_families) | {r.family for r in pod.source_rules}
    for family in sorted(families):
        if pod.egress_defaults(family):
            continue
        rules = [str(r) for r in pod.source_rules if r.family == family]
        routes = [str(r) for t in tables for r in pod.table_routes(t, family)]
        yield Issue(
            summary=f"no {_fam(family)} default route in VIP egress table(s) "
            f"{', '.join(map(str, tables))}: VIP-sourced replies are dropped",
            evidence={"family": family, "tables": tables, "rules": rules, "routes": routes},
            hint="the default is imported by BIRD from the gateway (kernel protocol into the "
            "egress table): check the BGP/static gateway of this family (MDB101/MDB102) and "
            "'birdc show route' in the frontend",
        )


@pod_check(
    "MDB104", Severity.ERROR, "VIP without its from-VIP egress rules", roles=_LB, needs=("rules",)
)
def check_vip_rules(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Each trench VIP needs ``from VIP lookup T`` for every egress table the LB uses."""
    for vip, rules, missing in pod.vip_rule_gaps(trench.vips):
        what = f"to table(s) {', '.join(map(str, missing))}" if rules else "at all"
        yield Issue(
            summary=f"VIP {vip} has no {_fam(vip.version)} 'from {vip}' rule {what}",
            evidence={
                "vip": str(vip),
                "family": vip.version,
                "rules": [str(r) for r in rules],
                "missing_tables": missing,
                "egress_tables": sorted(pod.source_tables),
            },
            hint="the frontend adds these rules per VIP (cmd/frontend service.go); check the "
            "frontend logs and that the Vip CR is listed in the Attractor",
        )


# --------------------------------------------------------------------------- interfaces


@pod_check(
    "MDB105",
    Severity.ERROR,
    "external interface missing, down or without address",
    roles=_LB,
    needs=("links", "addresses"),
)
def check_external(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """The FE's external interface must exist, be UP and carry an address per gateway family."""
    gateways = pod.bgp_gateways
    for gw in gateways:
        if not pod.ifaces_for(gw):
            yield Issue(
                summary=f"gateway {gw} is on no connected subnet: the external interface "
                "lacks an address in that subnet",
                evidence={"gateway": str(gw), "family": gw.version},
                hint="check the Attractor's interface ipv4-prefix/ipv6-prefix and the NAD / "
                "nsm-vlan NSE that addresses the external interface",
            )
    externals = trench.external_interfaces(pod)
    families: set[int] = {gw.version for gw in gateways} or set(trench.vip_families)
    for name in externals:
        link = pod.links.get(name)
        if link is None:
            yield Issue(
                summary=f"external interface {name} does not exist",
                evidence={"interface": name},
                hint="check the Attractor's interface (name, type nsm-vlan or "
                "network-attachment) and the NSE/NAD that creates it",
            )
            continue
        if not link.is_up:
            yield Issue(
                summary=f"external interface {name} is {link.state}",
                evidence={"interface": name, "state": link.state, "flags": list(link.flags)},
                hint="the VLAN/NAD interface towards the gateways is down: check the base "
                "interface and the nse-vlan / Multus attachment",
            )
        for family in sorted(families):
            if not pod.global_addrs(name, family):
                yield Issue(
                    summary=f"external interface {name} has no {_fam(family)} address",
                    evidence={
                        "interface": name,
                        "family": family,
                        "addresses": [str(a) for a in pod.addrs_by_if.get(name, ())],
                    },
                    hint="the address comes from the Attractor prefix (nsm-vlan) or whereabouts "
                    "(NAD); without it the gateways of this family are unreachable",
                )


@pod_check(
    "MDB106",
    Severity.ERROR,
    "conduit interface down or without address",
    roles=_LB,
    needs=("links", "addresses"),
)
def check_conduits(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Every LB<->proxy (conduit) interface must be UP with an address per trench family."""
    conduits = trench.lb_conduits(pod)
    families = set(trench.vip_families) or {
        a.family for name in conduits for a in pod.global_addrs(name)
    }
    for name in conduits:
        link = pod.links.get(name)
        if link is None:
            yield Issue(
                summary=f"conduit interface {name} is referenced by routes but does not exist",
                evidence={"interface": name},
                hint="the NSM connection to the proxy is gone; the LB re-verifies targets every "
                "10 s -- check the NSM forwarder and the proxy's NSC",
            )
            continue
        if not link.is_up:
            yield Issue(
                summary=f"conduit interface {name} is {link.state}",
                evidence={"interface": name, "state": link.state, "flags": list(link.flags)},
                hint="the LB sets its conduits DOWN when its frontend is not connected "
                "(no FRONTEND target in NSP): check MDB101 and the frontend; otherwise the "
                "NSM connection to the proxy",
            )
        for family in sorted(families):
            if not pod.global_addrs(name, family):
                yield Issue(
                    summary=f"conduit interface {name} has no {_fam(family)} address",
                    evidence={
                        "interface": name,
                        "family": family,
                        "addresses": [str(a) for a in pod.addrs_by_if.get(name, ())],
                    },
                    hint="conduit addresses come from Meridio IPAM via the proxy's NSM "
                    "connection; check the ipam and proxy pods",
                )


# --------------------------------------------------------------------------- mark chain


@pod_check(
    "MDB110",
    Severity.ERROR,
    "fwmark rule points to a table without default route",
    roles=_LB,
    needs=("rules", "routes"),
)
def check_fwmark_tables(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """``fwmark N lookup T``: T must have a default route of the rule's family."""
    for rule, route, _hop, _addr in pod.fwmark_hops:
        if route is not None:
            continue
        yield Issue(
            summary=f"'{rule}' points to table {rule.table}, which has no "
            f"{_fam(rule.family)} default route: marked packets leak to the main table",
            evidence={
                "rule": str(rule),
                "mark": rule.fwmark,
                "table": rule.table,
                "family": rule.family,
                "routes": _routes(pod.table_routes(rule.table)),
            },
            hint="the LB adds 'default via <target IP>' per target (pkg/kernel/fwmark.go) and "
            "drops it when the target IP is unreachable; check the conduit link to the "
            "target's proxy and the stateless-lb logs (#575)",
        )


@pod_check(
    "MDB111",
    Severity.ERROR,
    "target next hop not on an UP conduit subnet",
    roles=_LB,
    needs=("rules", "routes", "links", "addresses"),
)
def check_target_nexthops(pod: PodView, _trench: TrenchView) -> Iterator[Issue]:
    """Each target table's next hop must sit in a connected subnet of an UP interface."""
    seen: set[tuple[int, str]] = set()
    for rule, route, hop, addr in pod.fwmark_hops:
        if route is None or hop is None:
            continue
        key = (rule.table, hop.gateway)
        if key in seen:
            continue
        seen.add(key)
        if addr is None:
            yield Issue(
                summary=f"table {rule.table} routes '{route}' without a next-hop address",
                evidence={"rule": str(rule), "table": rule.table, "route": str(route)},
                hint="target tables must be 'default via <target IP>'; check the stateless-lb",
            )
            continue
        ifaces = pod.ifaces_for(addr)
        up = [i for i in ifaces if pod.link_up(i) and (not hop.dev or hop.dev == i)]
        if up and not {"dead", "linkdown"} & set(hop.flags):
            continue
        if hop.dev and ifaces and hop.dev not in ifaces:
            where = f"routed out of {hop.dev}, but {addr} is on {', '.join(ifaces)}'s subnet"
        else:
            where = "not in a connected subnet of an UP conduit interface"
        yield Issue(
            summary=f"next hop {addr} of table {rule.table} is {where}",
            evidence={
                "rule": str(rule),
                "table": rule.table,
                "route": str(route),
                "nexthop": str(addr),
                "interfaces": {
                    i: pod.links[i].state if i in pod.links else "missing"
                    for i in ifaces or ([hop.dev] if hop.dev else [])
                },
            },
            hint="the conduit towards the target's proxy is down or gone (see MDB106), or the "
            "target IP is from another node subnet (stale); check the proxy on that node",
        )


@pod_check(
    "MDB112",
    Severity.ERROR,
    "target next hop neighbour FAILED or wrong MAC",
    roles=_LB,
    needs=("rules", "routes", "neighbours"),
)
def check_target_neighbours(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """A target IP's neighbour must not be FAILED/INCOMPLETE and must carry the target's MAC."""
    owners = trench.target_ips
    seen: set[IpAddress] = set()
    for rule, route, hop, addr in pod.fwmark_hops:
        if route is None or hop is None or addr is None or addr in seen:
            continue
        seen.add(addr)
        neighbour = pod.neighbour(addr, hop.dev)
        if neighbour is None:
            continue  # not resolved yet: not a failure
        owner = owners.get(addr)
        evidence: dict[str, object] = {
            "rule": str(rule),
            "table": rule.table,
            "nexthop": str(addr),
            "neighbour": str(neighbour),
            "state": neighbour.state,
            "lladdr": neighbour.lladdr,
        }
        if neighbour.is_failed:
            yield Issue(
                summary=f"neighbour {addr} on {neighbour.ifname} is {neighbour.state}: the "
                "target is unreachable from this LB",
                evidence=evidence,
                hint="ping the target IP from this LB; check the proxy bridge (fdb, ports) on "
                "the target's node and the target's nsm interface (#170, #380)",
            )
        elif owner is not None and owner.mac and neighbour.lladdr and owner.mac != neighbour.lladdr:
            evidence.update(
                {"target": owner.pod, "target_interface": owner.ifname, "target_mac": owner.mac}
            )
            yield Issue(
                summary=f"neighbour {addr} has MAC {neighbour.lladdr} but {owner.pod}'s "
                f"{owner.ifname} has {owner.mac}: traffic goes to a stale MAC",
                evidence=evidence,
                hint="the target's interface was re-created (NSM reconnect) and this LB kept "
                "the old MAC; the LB flushes neighbours when it re-adds a target (PR #334/#549)",
                pods=(pod.name, owner.pod),
            )


def _rule_marks(pod: PodView) -> dict[int, dict[int, Rule]]:
    out: dict[int, dict[int, Rule]] = {4: {}, 6: {}}
    for rule in pod.fwmark_rules:
        out.setdefault(rule.family, {})[rule.fwmark] = rule
    return out


def _mark_source(pod: PodView) -> str:
    if pod.ok("nfqlb") and pod.snap.nfqlb_shms:
        return "nfqlb Active (" + ", ".join(s.name for s in pod.snap.nfqlb_shms) + ")"
    tables = sorted({m.table for m in pod.snap.nft.mark_maps})
    return "nft mark map (" + ", ".join(tables) + ")"


@pod_check(
    "MDB113",
    Severity.ERROR,
    "load-balancer marks and fwmark rules disagree",
    roles=_LB,
    needs=("rules",),
)
def check_marks_vs_rules(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Marks handed out (nfqlb Active / nft map) == marks with a fwmark rule, per family."""
    marks = lb_marks(pod)
    if marks is None:
        return  # marks unknown (nfqlb section missing): nothing to compare
    rules = _rule_marks(pod)
    source = _mark_source(pod)
    for family in (4, 6):
        if family not in trench.vip_families and not rules.get(family):
            continue
        have_rule = rules.get(family, {})
        handed = marks.get(family, set())
        for mark in sorted(handed - set(have_rule)):
            yield Issue(
                summary=f"mark {mark} ({mark:#x}) is handed out but has no {_fam(family)} "
                f"'fwmark {mark:#x} lookup' rule: its packets fall through to the main table",
                evidence={
                    "mark": mark,
                    "family": family,
                    "source": source,
                    "rules": [str(r) for r in have_rule.values()],
                },
                hint="the LB adds 'ip rule fwmark N lookup N' when it activates a target; check "
                "the stateless-lb logs and 'nfqlb show' (#575, #234)",
            )
        for mark in sorted(set(have_rule) - handed):
            yield Issue(
                summary=f"rule '{have_rule[mark]}' has no matching mark in the load balancer: "
                "its target gets no traffic",
                evidence={
                    "mark": mark,
                    "family": family,
                    "source": source,
                    "rule": str(have_rule[mark]),
                    "marks": sorted(handed),
                },
                hint="the target is configured in the kernel but not active in nfqlb "
                "(nfqlb show --shm=tshm-<stream>); check the target's NSP registration",
            )


@pod_check(
    "MDB114",
    Severity.ERROR,
    "LB VIP sets differ from the trench VIPs",
    roles=_LB,
    needs=("nftables",),
)
def check_vip_sets(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """The nft VIP sets must hold exactly the trench VIPs (config, or what the roles agree on)."""
    reference = trench.vips  # configured, or agreed on by at least two roles
    if not reference:
        return
    in_sets: dict[IpNetwork, str] = {}
    for vip_set in pod.snap.nft.vip_sets:
        for element in vip_set.elements:
            prefix = net(element)
            if prefix is not None:
                in_sets[prefix] = f"{vip_set.table}/{vip_set.name}"
    sets = [f"{s.table}/{s.name}" for s in pod.snap.nft.vip_sets]
    for vip in sorted(reference - set(in_sets), key=str):
        yield Issue(
            summary=f"VIP {vip} is missing from the load balancer's VIP sets: its traffic is "
            "not load-balanced here",
            evidence={"vip": str(vip), "sets": sets},
            hint="the stateless-lb fills ipv4-vips/ipv6-vips of table meridio-nfqlb from the "
            "Flows' VIPs; check the Flow/Vip CRs and the stateless-lb logs",
        )
    for vip in sorted(set(in_sets) - reference, key=str):
        yield Issue(
            summary=f"VIP {vip} is in {in_sets[vip]} but not a VIP of the trench",
            evidence={"vip": str(vip), "set": in_sets[vip]},
            hint="a stale VIP (removed Vip CR) or a VIP the targets and frontends do not know",
        )


@pod_check(
    "MDB115",
    Severity.WARNING,
    "defrag table missing or its prefix matches no conduit",
    roles=_LB,
    needs=("nftables", "links"),
)
def check_defrag(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """``meridio-defrag`` must exist and its ``iifname "<prefix>*"`` must match the conduits."""
    defrag = pod.snap.nft.defrag
    if defrag is None:
        yield Issue(
            summary="nft table meridio-defrag is missing: non-first fragments of ingress "
            "traffic are dropped by the load balancer",
            evidence={"tables": [t.name for t in pod.snap.nft.tables]},
            hint="the stateless-lb creates it at start (pkg/loadbalancer/stream/defrag.go); "
            "check its logs (PR #115)",
        )
        return
    conduits = trench.lb_conduits(pod, by_defrag=False)
    if not conduits:
        return
    prefixes = [p for p in defrag.iifname_prefixes if p]
    unmatched = [c for c in conduits if not any(c.startswith(p) for p in prefixes)]
    if not unmatched:
        return
    summary = (
        f"defrag iifname prefix {prefixes or '(none)'} matches no conduit interface"
        if len(unmatched) == len(conduits)
        else f"defrag iifname prefix {prefixes} misses conduit(s) {', '.join(unmatched)}"
    )
    yield Issue(
        summary=summary + ": targets' egress fragments get reassembled",
        evidence={
            "table": defrag.table,
            "prefixes": prefixes,
            "conduits": conduits,
            "unmatched": unmatched,
        },
        hint="the prefix is the first 10 characters of the LB's network service; a renamed "
        "NSM interface (NSM v1.13.0, #528) breaks it",
    )


_LB_SYSCTLS: Mapping[str, tuple[str, int]] = {
    # key: (value Meridio sets, family it matters for)
    "net.ipv4.conf.all.forwarding": ("1", 4),
    "net.ipv4.ip_forward": ("1", 4),
    "net.ipv6.conf.all.forwarding": ("1", 6),
    "net.ipv4.fib_multipath_hash_policy": ("1", 4),
    "net.ipv6.fib_multipath_hash_policy": ("1", 6),
    "net.ipv4.conf.all.rp_filter": ("0", 4),
    "net.ipv4.conf.default.rp_filter": ("0", 4),
    "net.ipv4.fwmark_reflect": ("1", 4),
    "net.ipv6.fwmark_reflect": ("1", 6),
}

_SYSCTL_WHY = {
    "forwarding": "the pod must forward between external and conduit interfaces",
    "ip_forward": "the pod must forward between external and conduit interfaces",
    "fib_multipath_hash_policy": "ECMP must hash on L4 (policy 1)",
    "rp_filter": "rp_filter drops VIP-sourced egress arriving on conduit links",
    "fwmark_reflect": "ICMP errors must keep the mark so snat-local can rewrite them (PMTUD)",
    "accept_dad": "DAD delays every new IPv6 address by 1-2 s",
}


def sysctl_issues(
    pod: PodView,
    trench: TrenchView,
    expected: Mapping[str, tuple[str, int]],
    interfaces: list[str],
    component: str,
) -> Iterator[Issue]:
    """Shared by MDB116 and MDB208: compare present sysctls with Meridio's values."""
    families = set(trench.vip_families) or {4, 6}
    checks = {k: v for k, v in expected.items() if v[1] in families}
    if 4 in families:
        for name in interfaces:
            for form in (name, sysctl_name(name)):
                key = f"net.ipv4.conf.{form}.rp_filter"
                if pod.sysctl(key) is not None:
                    checks[key] = ("0", 4)
                    break
    for key, (want, _family) in checks.items():
        value = pod.sysctl(key)
        if value is None or value == want:
            continue
        why = next((text for word, text in _SYSCTL_WHY.items() if word in key), "")
        yield Issue(
            summary=f"{key} = {value}, Meridio sets {want}",
            evidence={"sysctl": key, "value": value, "expected": want},
            hint=f"{why}; the {component} init container (sysctl-init) sets it -- check it ran "
            "and that nothing resets it".lstrip("; "),
        )


@pod_check(
    "MDB116", Severity.WARNING, "LB sysctl differs from Meridio's", roles=_LB, needs=("sysctls",)
)
def check_lb_sysctls(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """forwarding, rp_filter (all/default/conduits), multipath hash policy, fwmark_reflect."""
    conduits = trench.lb_conduits(pod) if pod.ok("links") else []
    yield from sysctl_issues(pod, trench, _LB_SYSCTLS, conduits, "LB/FE")


@pod_check(
    "MDB117",
    Severity.WARNING,
    "external MTU larger than a conduit MTU",
    roles=_LB,
    needs=("links",),
)
def check_mtu(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """Ingress larger than a conduit's MTU needs PMTUD (snat-local + fwmark_reflect) to work."""
    externals = [pod.links[n] for n in trench.external_interfaces(pod) if n in pod.links]
    for conduit_name in trench.lb_conduits(pod):
        conduit = pod.links.get(conduit_name)
        if conduit is None:
            continue
        for ext in externals:
            if ext.mtu > conduit.mtu:
                yield Issue(
                    summary=f"external {ext.name} MTU {ext.mtu} > conduit {conduit.name} MTU "
                    f"{conduit.mtu}: large packets depend on PMTU discovery",
                    evidence={
                        "external": ext.name,
                        "external_mtu": ext.mtu,
                        "conduit": conduit.name,
                        "conduit_mtu": conduit.mtu,
                    },
                    hint="set the Conduit MTU (operator CONDUIT_MTU) >= the external MTU, or make "
                    "sure fwmark_reflect=1 and the snat-local chain exist (#452)",
                )


@pod_check(
    "MDB118",
    Severity.ERROR,
    "target load-balanced in one family only",
    roles=_LB,
    needs=("rules", "routes"),
)
def check_family_symmetry(pod: PodView, trench: TrenchView) -> Iterator[Issue]:
    """In a dual-stack trench each mark needs a rule and a default route in both families."""
    families = set(trench.vip_families) or {r.family for r in pod.fwmark_rules}
    if not {4, 6} <= families:
        return
    working: dict[int, dict[int, list[str]]] = defaultdict(lambda: {4: [], 6: []})
    rules: dict[int, dict[int, str]] = defaultdict(dict)
    for rule, route, hop, _addr in pod.fwmark_hops:
        rules[rule.fwmark][rule.family] = str(rule)
        if route is not None and hop is not None:
            working[rule.fwmark][rule.family].append(hop.gateway)
    owners = trench.target_ips
    for mark in sorted(rules):
        by_family = working[mark]
        if bool(by_family[4]) == bool(by_family[6]):
            continue
        good = 4 if by_family[4] else 6
        bad = 10 - good
        target = next(
            (owners[a].pod for g in by_family[good] if (a := ip(g)) is not None and a in owners),
            "",
        )
        bad_table = next(
            (r.table for r in pod.fwmark_rules if r.fwmark == mark and r.family == bad), None
        )
        yield Issue(
            summary=f"mark {mark} ({mark:#x}) is load-balanced over {_fam(good)} but not "
            f"{_fam(bad)}" + (f" (target {target})" if target else ""),
            evidence={
                "mark": mark,
                "target": target,
                "rules": {str(f): r for f, r in sorted(rules[mark].items())},
                "nexthops": {str(f): by_family[f] for f in (4, 6)},
                "missing_family": bad,
                "missing_rule": bad_table is None,
                "table": bad_table,
                "routes": [] if bad_table is None else _routes(pod.table_routes(bad_table, bad)),
            },
            hint="the LB configures each target IP of both families; check that the target's "
            f"TAPA registered an {_fam(bad)} address in NSP and the stateless-lb logs",
            pods=(pod.name, target) if target else (),
        )


CHECKS: tuple[Check, ...] = (
    check_bgp,
    check_bfd,
    check_egress_default,
    check_vip_rules,
    check_external,
    check_conduits,
    check_fwmark_tables,
    check_target_nexthops,
    check_target_neighbours,
    check_marks_vs_rules,
    check_vip_sets,
    check_defrag,
    check_lb_sysctls,
    check_mtu,
    check_family_symmetry,
)
