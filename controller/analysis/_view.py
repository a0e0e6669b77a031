"""Indexes over snapshots, built once per analysis, so rules stay linear.

Why: rules key on relations (fwmark -> rule -> table -> next hop -> interface
subnet -> target pod). Done naively, every rule rescans every list of every
pod and a 100-target trench turns quadratic. Here each pod is indexed once
(links by name, addresses by interface, routes by table, neighbours by
(interface, address), connected subnets) and the trench once (target IPs ->
target pod, LB conduit addresses -> LB pod, trench VIPs). The views are
memoised per TrenchState object for the duration of one ``analyze`` call.

Everything here is derived from state; nothing keys on rule priorities or
table numbers. Role-specific notions (an LB's conduit interfaces, its
external interface, a proxy's bridge, a target's NSM interface) are defined
by relations first and by Meridio's naming only as a fallback.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Final

from meridio_debug.controller.model import (
    Address,
    IpAddress,
    IpNetwork,
    Link,
    Neighbour,
    Nexthop,
    PodResult,
    PodSnapshot,
    Role,
    Route,
    Rule,
    TrenchState,
)

# NSM names kernel interfaces "<first 10 chars of the service>-<4 chars of the id>".
NSM_NAME: Final = re.compile(r"^.{1,10}-[0-9A-Za-z]{4}$")
_LOOPBACKS: Final = frozenset({"lo"})


def ip(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def net(text: str) -> IpNetwork | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def family_of(value: IpAddress | IpNetwork) -> int:
    return value.version


def host_len(family: int) -> int:
    return 32 if family == 4 else 128


def sysctl_name(ifname: str) -> str:
    """sysctl's dotted form writes '.' in interface names as '/'."""
    return ifname.replace(".", "/")


@dataclass(frozen=True, slots=True)
class Connected:
    network: IpNetwork
    ifname: str
    address: Address


class PodView:
    """One reachable pod's snapshot with lookup tables; cheap properties are cached."""

    def __init__(self, result: PodResult, snapshot: PodSnapshot) -> None:
        self.result = result
        self.snap = snapshot
        self.name = result.pod
        self.role: Role = result.effective_role
        self.links: dict[str, Link] = {link.name: link for link in snapshot.links}
        self.addrs_by_if: dict[str, list[Address]] = defaultdict(list)
        self.connected: list[Connected] = []
        for addr in snapshot.addresses:
            self.addrs_by_if[addr.ifname].append(addr)
            if addr.is_global and addr.ifname not in _LOOPBACKS:
                network = net(f"{addr.address}/{addr.prefixlen}")
                if network is not None:
                    self.connected.append(Connected(network, addr.ifname, addr))
        self.routes_by_table: dict[int, list[Route]] = defaultdict(list)
        for route in snapshot.routes:
            self.routes_by_table[route.table].append(route)
        self.neigh: dict[tuple[str, IpAddress], Neighbour] = {}
        for n in snapshot.neighbours:
            addr_ = ip(n.dst)
            if addr_ is not None:
                self.neigh[(n.ifname, addr_)] = n
        self.fwmark_rules: list[Rule] = [r for r in snapshot.rules if r.is_fwmark_lookup]
        self.source_rules: list[Rule] = [r for r in snapshot.rules if r.is_source_lookup]

    # ------------------------------------------------------------------ generic lookups

    def ok(self, *sections: str) -> bool:
        return self.snap.ok(*sections)

    def link_up(self, name: str) -> bool:
        link = self.links.get(name)
        return link is not None and link.is_up

    def global_addrs(self, ifname: str, family: int | None = None) -> list[Address]:
        return [
            a
            for a in self.addrs_by_if.get(ifname, ())
            if a.is_global and (family is None or a.family == family)
        ]

    def ifaces_for(self, addr: IpAddress) -> list[str]:
        """Interfaces with a connected subnet that contains ``addr``."""
        return [c.ifname for c in self.connected if addr in c.network]

    def default_routes(self, table: int, family: int) -> list[Route]:
        """Unicast default routes of one family in one table (blackholes excluded)."""
        return [
            r
            for r in self.routes_by_table.get(table, ())
            if r.family == family and r.is_default and r.is_unicast
        ]

    def table_routes(self, table: int, family: int | None = None) -> list[Route]:
        return [
            r for r in self.routes_by_table.get(table, ()) if family is None or r.family == family
        ]

    def neighbour(self, addr: IpAddress, dev: str = "") -> Neighbour | None:
        """The neighbour entry for ``addr`` on ``dev`` (or on any interface whose subnet has it)."""
        if dev:
            return self.neigh.get((dev, addr))
        for ifname in self.ifaces_for(addr):
            found = self.neigh.get((ifname, addr))
            if found is not None:
                return found
        return None

    def sysctl(self, key: str) -> str | None:
        return self.snap.sysctls.get(key)

    # ------------------------------------------------------------------ source (VIP) rules

    @cached_property
    def source_rule_vips(self) -> dict[IpNetwork, list[Rule]]:
        """VIP prefix -> its ``from VIP lookup T`` rules (every family)."""
        out: dict[IpNetwork, list[Rule]] = defaultdict(list)
        for rule in self.source_rules:
            prefix = net(rule.src)
            if prefix is not None:
                out[prefix].append(rule)
        return out

    @cached_property
    def source_tables(self) -> set[int]:
        return {rule.table for rule in self.source_rules}

    def vip_rule_gaps(
        self, vips: Iterable[IpNetwork], *, shared_tables: bool = True
    ) -> Iterator[tuple[IpNetwork, list[Rule], list[int]]]:
        """(VIP, its rules, tables it lacks) for each VIP missing a ``from VIP`` rule.

        The expected tables are the ones *other* VIP rules in this pod point at
        (the LB's 4096+4097, the proxy's shared table 1): a relation, not numbers.
        A VIP with no rule at all lacks every table. Targets give each VIP its
        own table (``shared_tables=False``): there only a missing rule counts.
        """
        template = sorted(self.source_tables) if shared_tables else []
        for vip in sorted(vips, key=lambda v: (v.version, str(v))):
            rules = [r for r in self.source_rule_vips.get(vip, ()) if r.family == vip.version]
            have = {r.table for r in rules}
            missing = [t for t in template if t not in have]
            if not rules or missing:
                yield vip, rules, missing

    # ------------------------------------------------------------------ fwmark tables (LB)

    @cached_property
    def fwmark_hops(self) -> list[tuple[Rule, Route | None, Nexthop | None, IpAddress | None]]:
        """(rule, default route, next hop, next-hop address) for every fwmark rule.

        A rule whose table has no default route in its family yields one entry
        with route/hop None, so callers see it.
        """
        out: list[tuple[Rule, Route | None, Nexthop | None, IpAddress | None]] = []
        for rule in self.fwmark_rules:
            routes = self.default_routes(rule.table, rule.family)
            if not routes:
                out.append((rule, None, None, None))
                continue
            for route in routes:
                for hop in route.paths():
                    out.append((rule, route, hop, ip(hop.gateway) if hop.gateway else None))
        return out

    @cached_property
    def routed_target_ips(self) -> set[IpAddress]:
        """Addresses a fwmark rule's table routes to (rule + default route present)."""
        return {addr for _r, _route, _hop, addr in self.fwmark_hops if addr is not None}

    # ------------------------------------------------------------------ LB/FE notions

    @cached_property
    def bgp_gateways(self) -> list[IpAddress]:
        out: list[IpAddress] = []
        if self.ok("bird"):
            for proto in self.snap.bird_protocols:
                addr = ip(proto.neighbor_address) if proto.neighbor_address else None
                if addr is not None:
                    out.append(addr)
            for session in self.snap.bfd_sessions:
                addr = ip(session.address)
                if addr is not None and addr not in out:
                    out.append(addr)
        return out

    def egress_defaults(self, family: int) -> list[Route]:
        """Unicast defaults of ``family`` in the tables ``from VIP`` rules point at."""
        out: list[Route] = []
        for table in sorted(self.source_tables):
            out.extend(self.default_routes(table, family))
        return out

    def external_interfaces(self, configured: str = "") -> list[str]:
        """The FE's external interface(s): configured name, gateway subnet, or egress route dev."""
        names: dict[str, None] = {}
        if configured:
            names[configured] = None
        for gw in self.bgp_gateways:
            for ifname in self.ifaces_for(gw):
                names[ifname] = None
        if not names and self.ok("rules", "routes"):
            for family in (4, 6):
                for route in self.egress_defaults(family):
                    for hop in route.paths():
                        if hop.dev:
                            names[hop.dev] = None
        return list(names)

    def lb_conduits(self, external: Iterable[str], *, by_defrag: bool = True) -> list[str]:
        """The LB's conduit (LB<->proxy) interfaces.

        By relation: devices of fwmark-table routes and interfaces whose subnet
        holds a fwmark next hop; by Meridio convention: the defrag table's
        iifname prefix and NSM's "<10 chars>-<4 chars>" naming.
        """
        skip = set(external) | _LOOPBACKS | {"eth0"}
        names: dict[str, None] = {}
        for _rule, _route, hop, addr in self.fwmark_hops:
            if hop is not None and hop.dev:
                names[hop.dev] = None
            if addr is not None:
                for ifname in self.ifaces_for(addr):
                    names[ifname] = None
        defrag = self.snap.nft.defrag
        prefixes = defrag.iifname_prefixes if defrag is not None and by_defrag else ()
        for link in self.snap.links:
            if link.kind == "bridge" or link.master:
                continue
            if NSM_NAME.match(link.name) or any(p and link.name.startswith(p) for p in prefixes):
                names[link.name] = None
        return [name for name in names if name not in skip]

    # ------------------------------------------------------------------ proxy notions

    @cached_property
    def bridge(self) -> Link | None:
        """The proxy's bridge: the bridge most NSM interfaces are enslaved to, else bridge0."""
        bridges = [link for link in self.snap.links if link.kind == "bridge"]
        if not bridges:
            return self.links.get("bridge0")
        ports: dict[str, int] = defaultdict(int)
        for link in self.snap.links:
            if link.master:
                ports[link.master] += 1
        return max(bridges, key=lambda b: (ports.get(b.name, 0), b.name == "bridge0"))

    @cached_property
    def bridge_subnets(self) -> list[IpNetwork]:
        bridge = self.bridge
        if bridge is None:
            return []
        return [c.network for c in self.connected if c.ifname == bridge.name]

    @cached_property
    def proxy_nsm_ports(self) -> list[Link]:
        """Interfaces that should be ports of the bridge: enslaved ones, NSM-named ones,
        and any interface with an address in a bridge / port subnet."""
        bridge = self.bridge
        bridge_name = bridge.name if bridge is not None else "bridge0"
        subnets = set(self.bridge_subnets)
        for link in self.snap.links:
            if link.master == bridge_name:
                subnets.update(c.network for c in self.connected if c.ifname == link.name)
        out: list[Link] = []
        for link in self.snap.links:
            if link.name == bridge_name or link.name in _LOOPBACKS or link.kind == "bridge":
                continue
            in_subnet = any(c.ifname == link.name and c.network in subnets for c in self.connected)
            if (
                link.master
                or link.name.startswith("proxy.")
                or NSM_NAME.match(link.name)
                or in_subnet
            ):
                out.append(link)
        return out

    @staticmethod
    def is_target_port(link: Link) -> bool:
        """proxy <-> TAPA ports are named from "proxy.<conduit>..." (proxy.cond-97e3)."""
        return link.name.startswith("proxy.")

    # ------------------------------------------------------------------ target notions

    @cached_property
    def nsm_interfaces(self) -> list[str]:
        """The target's NSM interface(s): nsm-N/nsc by name, or the policy routes' device."""
        names: dict[str, None] = {}
        for link in self.snap.links:
            if link.name.startswith("nsm") or link.name == "nsc":
                names[link.name] = None
        for table in sorted(self.source_tables):
            for route in self.routes_by_table.get(table, ()):
                for hop in route.paths():
                    if hop.dev and hop.dev not in _LOOPBACKS:
                        names[hop.dev] = None
        return list(names)

    def target_vip_addrs(self) -> Iterator[Address]:
        """Host-length addresses on NSM interfaces (the VIPs the TAPA added)."""
        for ifname in self.nsm_interfaces:
            for addr in self.global_addrs(ifname):
                if addr.prefixlen == host_len(addr.family):
                    yield addr

    def target_own_addrs(self, vips: set[IpNetwork]) -> Iterator[Address]:
        """The NSM connection's own addresses (172.16.1.6/24), i.e. not VIPs."""
        for ifname in self.nsm_interfaces:
            for addr in self.global_addrs(ifname):
                if addr.prefixlen == host_len(addr.family):
                    continue
                if addr.network in vips:
                    continue
                yield addr


@dataclass(frozen=True, slots=True)
class Owner:
    pod: str
    ifname: str
    mac: str
    mtu: int
    up: bool


class TrenchView:
    """All reachable pods indexed, plus the cross-pod maps the MDB4xx rules need."""

    def __init__(self, state: TrenchState) -> None:
        self.state = state
        self.config = state.config
        self.pods: list[PodView] = [
            PodView(result, result.snapshot) for result in state.pods if result.snapshot is not None
        ]
        self.by_name: dict[str, PodView] = {p.name: p for p in self.pods}
        self.by_role: dict[str, list[PodView]] = defaultdict(list)
        for p in self.pods:
            self.by_role[p.role].append(p)

    def role(self, role: Role) -> list[PodView]:
        return self.by_role.get(role, [])

    def role_results(self, role: Role) -> list[PodResult]:
        return [r for r in self.state.pods if r.effective_role == role]

    # ------------------------------------------------------------------ VIPs

    @cached_property
    def vip_sightings(self) -> dict[IpNetwork, set[str]]:
        """Every VIP seen anywhere -> the pods that show it (nft sets, VIP rules, target VIPs)."""
        seen: dict[IpNetwork, set[str]] = defaultdict(set)
        for p in self.pods:
            for prefix in self.pod_vips(p):
                seen[prefix].add(p.name)
        return seen

    def pod_vips(self, p: PodView) -> set[IpNetwork]:
        out: set[IpNetwork] = set()
        if p.role in ("lb-fe", "proxy", "target") and p.ok("rules"):
            out.update(p.source_rule_vips)
        if p.role == "lb-fe" and p.ok("nftables"):
            for vip_set in p.snap.nft.vip_sets:
                for element in vip_set.elements:
                    prefix = net(element)
                    if prefix is not None:
                        out.add(prefix)
        if p.role == "target" and p.ok("addresses"):
            out.update(addr.network for addr in p.target_vip_addrs())
        return out

    @cached_property
    def vips(self) -> set[IpNetwork]:
        """The trench's VIPs: configured (the Vips, else TrenchConfig.vips), else the VIPs
        at least two roles agree on.

        Without configuration the pods themselves are the evidence: the LBs
        (VIP rules, nft VIP sets), the proxies (VIP rules) and the targets (VIP
        addresses). A VIP shown by only one role while others show VIPs is a
        stray (say, a stale nft set element) and is reported where it sits
        (MDB114) instead of as "missing" in every other pod. When only one
        role reported VIPs at all, its VIPs are taken as they are.
        """
        configured: tuple[str, ...] = ()
        if self.config is not None:
            meridio = self.config.meridio
            configured = tuple(v.address for v in meridio.vips) if meridio else self.config.vips
        if configured:
            out: set[IpNetwork] = set()
            for text in configured:
                prefix = net(text)
                if prefix is not None:
                    out.add(prefix)
            return out
        roles_of: dict[IpNetwork, set[Role]] = defaultdict(set)
        for prefix, pods in self.vip_sightings.items():
            for name in pods:
                roles_of[prefix].add(self.by_name[name].role)
        reporting = set().union(*roles_of.values()) if roles_of else set()
        need = 2 if len(reporting) >= 2 else 1
        return {prefix for prefix, roles in roles_of.items() if len(roles) >= need}

    def vips_of_family(self, family: int) -> list[IpNetwork]:
        return sorted((v for v in self.vips if v.version == family), key=str)

    @cached_property
    def vip_families(self) -> set[int]:
        return {v.version for v in self.vips}

    # ------------------------------------------------------------------ cross-pod owners

    @cached_property
    def target_ips(self) -> dict[IpAddress, Owner]:
        """Target NSM addresses (not VIPs) -> the target pod that owns them."""
        out: dict[IpAddress, Owner] = {}
        vips = self.vips
        for p in self.role("target"):
            if not p.ok("addresses"):
                continue
            for addr in p.target_own_addrs(vips):
                link = p.links.get(addr.ifname)
                out[addr.interface.ip] = Owner(
                    pod=p.name,
                    ifname=addr.ifname,
                    mac=link.mac if link else "",
                    mtu=link.mtu if link else 0,
                    up=link.is_up if link else False,
                )
        return out

    @cached_property
    def all_targets_known(self) -> bool:
        """Every target pod answered with its addresses: an unowned IP is then really stale."""
        results = self.role_results("target")
        return bool(results) and all(
            r.snapshot is not None and r.snapshot.ok("addresses", "links") for r in results
        )

    @cached_property
    def lb_conduit_addrs(self) -> dict[IpAddress, tuple[Owner, IpNetwork]]:
        """LB conduit addresses -> (LB pod and interface, subnet)."""
        out: dict[IpAddress, tuple[Owner, IpNetwork]] = {}
        for p in self.role("lb-fe"):
            if not p.ok("addresses", "links"):
                continue
            for ifname in self.lb_conduits(p):
                link = p.links.get(ifname)
                for addr in p.global_addrs(ifname):
                    out[addr.interface.ip] = (
                        Owner(
                            pod=p.name,
                            ifname=ifname,
                            mac=link.mac if link else "",
                            mtu=link.mtu if link else 0,
                            up=link.is_up if link else False,
                        ),
                        addr.network,
                    )
        return out

    def external_interfaces(self, p: PodView) -> list[str]:
        configured = self.config.external_interface if self.config is not None else ""
        return p.external_interfaces(configured)

    def lb_conduits(self, p: PodView, *, by_defrag: bool = True) -> list[str]:
        return p.lb_conduits(self.external_interfaces(p), by_defrag=by_defrag)

    @cached_property
    def bridge_ips(self) -> dict[IpAddress, Owner]:
        """Proxy bridge addresses -> proxy (the targets' default gateway)."""
        out: dict[IpAddress, Owner] = {}
        for p in self.role("proxy"):
            bridge = p.bridge
            if bridge is None or not p.ok("addresses", "links"):
                continue
            for addr in p.global_addrs(bridge.name):
                out[addr.interface.ip] = Owner(
                    pod=p.name, ifname=bridge.name, mac=bridge.mac, mtu=bridge.mtu, up=bridge.is_up
                )
        return out

    def lbs_sending_to(self) -> dict[str, set[str]]:
        """target pod -> LB pods that mark traffic for it and route the mark to its IP."""
        out: dict[str, set[str]] = defaultdict(set)
        owners = self.target_ips
        for lb in self.role("lb-fe"):
            if not lb.ok("rules", "routes"):
                continue
            marks = lb_marks(lb)
            for rule, _route, _hop, addr in lb.fwmark_hops:
                if addr is None or addr not in owners:
                    continue
                if marks is not None and rule.fwmark not in marks.get(rule.family, set()):
                    continue
                out[owners[addr].pod].add(lb.name)
        return out


def lb_marks(p: PodView) -> dict[int, set[int]] | None:
    """Marks the load balancer hands out, per family; None when unknown.

    Real nfqlb: the Active fwmarks of every shm (they serve both families).
    The lab: the nft ``meta mark set ... map`` values, per hashed family.
    """
    if p.ok("nfqlb") and p.snap.nfqlb_shms:
        marks = {m for shm in p.snap.nfqlb_shms for m in shm.active}
        return {4: set(marks), 6: set(marks)}
    if p.ok("nftables") and p.snap.nft.mark_maps:
        out: dict[int, set[int]] = {4: set(), 6: set()}
        for mark_map in p.snap.nft.mark_maps:
            families = (mark_map.family,) if mark_map.family in (4, 6) else (4, 6)
            for family in families:
                out[family].update(mark_map.marks)
        return out
    return None


_CACHE: list[tuple[TrenchState, TrenchView]] = []
_CACHE_SIZE: Final = 4


def release(state: TrenchState) -> None:
    """Drop the memoised view of ``state`` (analyze calls it when done)."""
    _CACHE[:] = [(s, v) for s, v in _CACHE if s is not state]


def trench_view(state: TrenchState) -> TrenchView:
    """The (memoised) view of ``state``: identity-keyed, so hashing big states is avoided."""
    for cached_state, view in _CACHE:
        if cached_state is state:
            return view
    view = TrenchView(state)
    _CACHE.append((state, view))
    if len(_CACHE) > _CACHE_SIZE:
        del _CACHE[0]
    return view
