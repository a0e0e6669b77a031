"""The trench as a graph for the HTML picture: gateway -> LB/FEs -> proxies -> targets.

Why derived from the snapshots and not from a configuration: the picture
must show the trench as it *is* (what the agents saw), including a link
that is missing. Like the analysis, it keys on relations, never on names:

- LB <-> proxy: an LB address whose subnet is a subnet of a proxy's bridge
  (Meridio's node subnet: conduit ``.2`` and bridge ``.1`` share the /24);
- proxy <-> target: a target's NSM address inside a proxy's bridge subnet;
- gateway <-> LB: one edge per LB/FE (the gateway pod itself is optional
  context; its addresses come from the FEs' BGP neighbours).

Colours come from findings: a pod is as bad as its worst finding; an edge is
as bad as the worst finding on either end whose summary/evidence names one
of the edge's tokens (interface names and addresses of its two ends), so
"neighbour 172.16.1.6 on conduit-a--232a is FAILED" reddens exactly the
lb-fe-a -> proxy-a -> target-a1 path. Pure: model and findings in, graph out.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meridio_debug.controller.analysis import Finding, Severity
from meridio_debug.controller.model import IpNetwork, PodResult, PodSnapshot, TrenchState

_TOKEN = re.compile(r"[0-9A-Za-z_.:-]+")
COLUMNS = ("gateway", "lb-fe", "proxy", "target")


@dataclass(frozen=True)
class Node:
    id: str
    role: str
    label: str
    detail: tuple[str, ...] = ()  # addresses, one short line each
    severity: Severity | None = None
    counts: tuple[int, int] = (0, 0)  # errors, warnings
    unreachable: bool = False
    synthetic: bool = False  # drawn for context (the gateway), not a snapshot


@dataclass(frozen=True)
class Edge:
    a: str
    b: str
    label: str = ""
    severity: Severity | None = None
    why: tuple[str, ...] = ()  # codes that coloured it
    tokens: frozenset[str] = field(default_factory=frozenset, compare=False)


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]

    def column(self, role: str) -> list[Node]:
        return [n for n in self.nodes if n.role == role]


def _tokens(text: str) -> set[str]:
    """Interface names, addresses and pod names in a text ("172.16.1.6/24" -> 172.16.1.6)."""
    return {t.strip(".:-") for t in _TOKEN.findall(text.replace("/", " ")) if t.strip(".:-")}


def _finding_tokens(f: Finding) -> set[str]:
    return _tokens(f.summary + " " + json.dumps(dict(f.evidence), default=str))


def _global_addrs(
    snap: PodSnapshot,
) -> list[tuple[str, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    out = []
    for a in snap.addresses:
        if not a.is_global or a.ifname == "lo":
            continue
        try:
            out.append((a.ifname, a.interface))
        except ValueError:
            continue
    return out


def _bridge_subnets(snap: PodSnapshot) -> list[IpNetwork]:
    bridges = {link.name for link in snap.links if link.kind == "bridge"}
    return [i.network for name, i in _global_addrs(snap) if name in bridges]


def _worst(findings: Iterable[Finding]) -> Severity | None:
    worst = max((f.severity for f in findings), default=None)
    return worst if worst is not None and worst >= Severity.WARNING else None


def _short(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str:
    return str(iface)


def build(state: TrenchState, findings: Sequence[Finding]) -> Topology:
    """The graph of ``state`` coloured by ``findings``."""
    by_pod: dict[str, list[Finding]] = {}
    for f in findings:
        by_pod.setdefault(f.pod, []).append(f)
    ftokens = {id(f): _finding_tokens(f) for f in findings}

    pods = [p for p in state.pods]
    role = {p.pod: p.effective_role for p in pods}
    snaps = {p.pod: p.snapshot for p in pods if p.snapshot is not None}
    nodes: list[Node] = []

    def node_for(p: PodResult, detail: Sequence[str]) -> Node:
        fs = by_pod.get(p.pod, [])
        errors = sum(1 for f in fs if f.severity == Severity.ERROR)
        warnings = sum(1 for f in fs if f.severity == Severity.WARNING)
        sev = Severity.ERROR if not p.reachable else _worst(fs)
        return Node(
            id=p.pod,
            role=role[p.pod],
            label=p.pod,
            detail=tuple(detail),
            severity=sev,
            counts=(errors, warnings),
            unreachable=not p.reachable,
        )

    # --- gateway: the pod when present, else drawn from the FEs' BGP neighbours
    gateways = [p for p in pods if role[p.pod] == "gateway"]
    lbs = [p for p in pods if role[p.pod] == "lb-fe"]
    proxies = [p for p in pods if role[p.pod] == "proxy"]
    targets = [p for p in pods if role[p.pod] == "target"]
    neighbours: list[str] = []
    for p in lbs:
        snap = snaps.get(p.pod)
        for proto in snap.bird_protocols if snap is not None else ():
            if proto.neighbor_address and proto.neighbor_address not in neighbours:
                neighbours.append(proto.neighbor_address)
    if gateways:
        gw_id = gateways[0].pod
        nodes.append(node_for(gateways[0], neighbours[:2]))
    else:
        gw_id = "gateway"
        nodes.append(
            Node(
                id=gw_id,
                role="gateway",
                label="gateway",
                detail=tuple(neighbours[:2]),
                synthetic=True,
            )
        )

    # --- pods, with the addresses that say where they sit
    subnets: dict[str, list[IpNetwork]] = {}
    for p in proxies:
        snap = snaps.get(p.pod)
        subnets[p.pod] = _bridge_subnets(snap) if snap is not None else []
    all_subnets = {n for nets in subnets.values() for n in nets}

    lb_ext: dict[str, list[str]] = {}
    lb_links: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (lb, proxy) -> [(ifname, ip)]
    for p in lbs:
        snap = snaps.get(p.pod)
        ext: list[str] = []
        for ifname, iface in _global_addrs(snap) if snap is not None else ():
            owner = next((px for px, nets in subnets.items() if iface.network in nets), None)
            if owner is not None:
                lb_links.setdefault((p.pod, owner), []).append((ifname, str(iface.ip)))
            elif iface.network.prefixlen < iface.max_prefixlen and iface.network not in all_subnets:
                ext.append(_short(iface))
        lb_ext[p.pod] = ext
        nodes.append(node_for(p, ext[:2]))
    for p in proxies:
        nodes.append(node_for(p, [str(n) for n in subnets[p.pod][:2]]))

    target_links: dict[
        tuple[str, str], list[tuple[str, str]]
    ] = {}  # (proxy, target) -> [(ifname, ip)]
    for p in targets:
        snap = snaps.get(p.pod)
        own: list[str] = []
        for ifname, iface in _global_addrs(snap) if snap is not None else ():
            if iface.network.prefixlen == iface.max_prefixlen:
                continue  # a VIP
            own.append(str(iface.ip))
            owner = next((px for px, nets in subnets.items() if iface.network in nets), None)
            if owner is not None:
                target_links.setdefault((owner, p.pod), []).append((ifname, str(iface.ip)))
        nodes.append(node_for(p, own[:2]))

    # --- edges and their tokens
    edges: list[Edge] = []

    def colour(
        a: str, b: str, tokens: set[str], codes: Iterable[str] = ()
    ) -> tuple[Severity | None, tuple[str, ...]]:
        hits: list[Finding] = []
        wanted = set(codes)
        for pod in (a, b):
            for f in by_pod.get(pod, []):
                if f.severity < Severity.WARNING:
                    continue
                if f.code in wanted or (tokens & ftokens[id(f)]):
                    hits.append(f)
        return _worst(hits), tuple(sorted({f.code for f in hits}))

    for p in lbs:
        tokens = set(lb_ext.get(p.pod, ())) | {e.split("/")[0] for e in lb_ext.get(p.pod, ())}
        sev, why = colour(gw_id, p.pod, tokens, ("MDB101", "MDB102", "MDB103", "MDB105"))
        edges.append(Edge(gw_id, p.pod, "", sev, why, frozenset(tokens)))

    target_ips: dict[str, set[str]] = {}  # proxy -> addresses and names of its targets
    for (px, t), ends in target_links.items():
        target_ips.setdefault(px, set()).update({t, *(ip for _i, ip in ends)})
    for (lb, px), ends in lb_links.items():
        tokens = {ifname for ifname, _ in ends} | {ip for _, ip in ends}
        sev, why = colour(lb, px, tokens)
        # an LB finding about a target behind this proxy also crosses this link
        behind = target_ips.get(px, set())
        extra = [
            f
            for f in by_pod.get(lb, [])
            if f.severity >= Severity.WARNING and behind & ftokens[id(f)]
        ]
        if extra:
            sev = max(filter(None, [sev, _worst(extra)]), default=None)
            why = tuple(sorted(set(why) | {f.code for f in extra}))
        label = ends[0][0]
        edges.append(Edge(lb, px, label, sev, why, frozenset(tokens)))
    for (px, t), ends in target_links.items():
        tokens = {t, *(ip for _, ip in ends)}
        snap = snaps.get(t)
        nsm = {ifname for ifname, _ in ends}
        port = _peer_port(snaps.get(px), snap, nsm)
        if port:
            tokens.add(port)
        sev, why = colour(px, t, tokens, ("MDB304", "MDB305"))
        lb_hits = [
            f
            for lb in lbs
            for f in by_pod.get(lb.pod, [])
            if f.severity >= Severity.WARNING and tokens & ftokens[id(f)]
        ]
        if lb_hits:
            sev = max(filter(None, [sev, _worst(lb_hits)]), default=None)
            why = tuple(sorted(set(why) | {f.code for f in lb_hits}))
        edges.append(Edge(px, t, port, sev, why, frozenset(tokens)))
    return Topology(tuple(nodes), tuple(edges))


def _peer_port(proxy: PodSnapshot | None, target: PodSnapshot | None, nsm: set[str]) -> str:
    """The proxy's end of the target's veth (each end's IFLA_LINK is the other's index)."""
    if proxy is None or target is None:
        return ""
    for t_link in target.links:
        if t_link.name not in nsm or not t_link.link_index:
            continue
        for p_link in proxy.links:
            if p_link.index == t_link.link_index and p_link.link_index == t_link.index:
                return p_link.name
    return ""
