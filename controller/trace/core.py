"""Static trace: where a flow goes through the trench and back, and where it is lost.

Why it is built this way: the path of a Meridio flow is a chain of relations
across pods -- gateway ECMP -> LB mark (nfqlb / nft hash) -> fwmark rule ->
table -> next hop on a conduit -> proxy bridge port -> target's NSM interface
with the VIP -> the target's ``from VIP`` policy route -> the proxy's ECMP
towards an LB -> the LB's VIP egress table -> gateway. Every routing decision
on that chain is asked of the pod's own kernel (``RouteGet``: ``ip route get``
with the flow's source, destination, input interface, mark, protocol and
ports), because the kernel is the authority on policy routing; the snapshots
say what the kernel cannot (which target owns a next hop, bridge ports,
neighbour MACs, the mark a flow gets) and explain a refusal (a missing rule
vs. an empty table) with the analysis' finding codes.

Two pure steps, so the I/O layer (controller/services/trace.py) stays thin::

    queries = plan(state, flow)            # pod -> RouteQuery...
    answers = <ask each pod's agent>       # pod -> {query id: RouteAnswer}
    result = trace(state, flow, answers)   # TraceResult: paths, first broken hop

Nothing here keys on rule priorities or table numbers: the mark comes from
the LB's own map, the table from the rule that carries that mark, the proxy
and target from the subnet that holds the next hop.

What is certain and what is a candidate set: a kernel answer is the packets'
choice only where the forwarding kernel hashes what the query carries
(multipath.py has the rule, from net/ipv4/route.c and net/ipv6/route.c).
Where it is not -- the proxy's reply ECMP for IPv6 and TCP, a gateway
forwarding a client's IPv6 packets -- the hop carries ``candidates`` and the
path continues through each of them (hops with ``via``). State that breaks
other flows but not this one (an LB missing from a proxy's ECMP) is
*degraded*, never this flow's first broken hop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from meridio_debug.controller.analysis._view import (
    PodView,
    TrenchView,
    ip,
    lb_marks,
    net,
    trench_view,
)
from meridio_debug.controller.model import (
    IpAddress,
    IpNetwork,
    Link,
    NfqlbFlow,
    NfqlbShm,
    NftMarkMap,
    Rule,
    TrenchState,
)
from meridio_debug.controller.trace import nfqlb_hash
from meridio_debug.controller.trace.flow import Flow
from meridio_debug.controller.trace.hashing import computable, mark_for
from meridio_debug.controller.trace.multipath import EcmpRule, forwarded, originated, policy_of
from meridio_debug.controller.trace.types import (
    Answers,
    Broken,
    Direction,
    Hop,
    RouteAnswer,
    RouteQuery,
    TracePath,
    TraceResult,
)

# Query ids (per pod): stable strings so answers and plans meet.
Q_GW = "fwd:gw"
Q_LOCAL = "fwd:vip-local"
Q_TARGET_RET = "ret:target"
Q_PROXY_RET = "ret:proxy"


def q_mark(mark: int) -> str:
    return f"fwd:mark:{mark}"


def q_lb_ret(ifname: str) -> str:
    return f"ret:lb:{ifname}"


def q_gw_ret(ifname: str) -> str:
    return f"ret:gw:{ifname}"


# --------------------------------------------------------------------------- marks


@dataclass(frozen=True, slots=True)
class MarkChoice:
    """The marks one LB can give the flow: exact (one, computed) or every candidate."""

    marks: tuple[int, ...]
    exact: bool
    how: str  # for the reason text: "jhash of 200.100.0.7 seed 0x... -> index 0"
    problem: str = ""  # when the LB cannot mark the flow at all
    code: str | None = None


def _in_set(state: PodView, mark_map: NftMarkMap, dst: IpAddress) -> bool | None:
    """Is ``dst`` in the VIP set the mark rule matches? None when the set is unknown."""
    if not mark_map.vip_set:
        return None
    for vip_set in state.snap.nft.vip_sets:
        if vip_set.table == mark_map.table and vip_set.name == mark_map.vip_set:
            for element in vip_set.elements:
                if "-" in element:
                    low, _, high = element.partition("-")
                    lo, hi = ip(low), ip(high)
                    if (
                        lo is not None
                        and hi is not None
                        and lo.version == dst.version
                        and int(lo) <= int(dst) <= int(hi)
                    ):
                        return True
                    continue
                prefix = net(element)
                if prefix is not None and prefix.version == dst.version and dst in prefix:
                    return True
            return False
    return None


def _port_in(ranges: Sequence[str], port: int) -> bool:
    if not ranges:
        return True
    for text in ranges:
        low, _, high = text.partition("-")
        try:
            lo = int(low)
            hi = int(high) if high else lo
        except ValueError:
            if text.strip().lower() == "any":
                return True
            continue
        if lo <= port <= hi:
            return True
    return False


def _addr_in(prefixes: Sequence[str], addr: IpAddress) -> bool:
    if not prefixes:
        return True
    for text in prefixes:
        prefix = net(text)
        if prefix is None:
            continue
        if isinstance(prefix, ipaddress.IPv6Network) and addr.version == 4:
            mapped = ipaddress.IPv6Address(f"::ffff:{addr}")  # nfqlb prints v4 as ::ffff:a.b.c.d
            if mapped in prefix:
                return True
        elif prefix.version == addr.version and addr in prefix:
            return True
    return False


def _nfqlb_flow_matches(f: NfqlbFlow, flow: Flow) -> bool:
    if flow.proto == "icmp":
        return True  # --promiscuous_ping: echo to a VIP is load-balanced
    protos = [p.lower() for p in f.protocols]
    if protos and flow.proto not in protos:
        return False
    if not _addr_in(f.dests, flow.dst_ip) or not _addr_in(f.srcs, flow.src_ip):
        return False
    return _port_in(f.dports, flow.dport) and _port_in(f.sports, flow.sport)


def _nfqlb_exact(
    matching: Sequence[NfqlbFlow], shms: Mapping[str, NfqlbShm], flow: Flow
) -> MarkChoice | None:
    """nfqlb's own choice (nfqlb_hash) when it is computable, else None (candidates then).

    nfqlb takes the matching flow of highest priority (a tie is nfqlb's qsort order: not
    computable), hashes the 5-tuple and looks the slot up in that flow's shm.
    """
    top = max(f.priority for f in matching)
    winners = [f for f in matching if f.priority == top]
    if len(winners) != 1 or winners[0].user_ref not in shms:
        return None
    winner = winners[0]
    predicted = nfqlb_hash.predict_mark(
        shms[winner.user_ref], flow.src, flow.dst, flow.proto, sport=flow.sport, dport=flow.dport
    )
    if not predicted.exact:
        return None
    how = f"nfqlb flow {winner.name}: {predicted.how}"
    if predicted.mark is None:
        return MarkChoice((), True, how, problem=how)
    return MarkChoice((predicted.mark,), True, how)


def mark_choice(lb: PodView, flow: Flow) -> MarkChoice:
    """Which mark(s) ``lb`` gives ``flow``: from nfqlb (all Active) or the nft mark map."""
    dst = flow.dst_ip
    snap = lb.snap
    if lb.ok("nfqlb") and snap.nfqlb_shms:
        shms = {s.name: s for s in snap.nfqlb_shms}
        if snap.nfqlb_flows:
            matching = [f for f in snap.nfqlb_flows if _nfqlb_flow_matches(f, flow)]
            if not matching:
                return MarkChoice(
                    (),
                    False,
                    "",
                    problem=f"no nfqlb flow matches {flow.proto}/{flow.dport or '-'} to {dst}: "
                    "nfqlb drops it",
                )
            exact = _nfqlb_exact(matching, shms, flow)
            if exact is not None:
                return exact
            refs = {f.user_ref for f in matching}
            chosen = [shms[r] for r in refs if r in shms] or list(snap.nfqlb_shms)
            marks = sorted({m for shm in chosen for m in shm.active})
            names = ", ".join(sorted(f.name for f in matching))
            how = f"nfqlb flow {names}: any Active target (Maglev state is not in a snapshot)"
        else:
            marks = sorted({m for s in snap.nfqlb_shms for m in s.active})
            how = "nfqlb: any Active target (Maglev state is not in a snapshot)"
        if not marks:
            return MarkChoice(
                (), False, how, problem="nfqlb has no Active target: it drops the flow"
            )
        return MarkChoice(tuple(marks), len(marks) == 1, how)
    if lb.ok("nftables") and snap.nft.mark_maps:
        maps = [
            m
            for m in snap.nft.mark_maps
            if m.family in (flow.family, 0) and _in_set(lb, m, dst) is not False
        ]
        if not maps:
            return MarkChoice(
                (),
                False,
                "",
                problem=f"{dst} is in none of this LB's VIP sets: it is not load-balanced here",
                code="MDB114",
            )
        mark_map = maps[0]
        if computable(mark_map):
            index, mark = mark_for(mark_map, flow.src)
            if mark is None:
                return MarkChoice(
                    (),
                    True,
                    "",
                    problem=f"the nft map has no mark for hash {index} of {flow.src}",
                )
            if index is None:
                how = f"nft sets the constant mark {mark}"
            else:
                how = (
                    f"nft {mark_map.hash} of {flow.src} seed {mark_map.seed:#x} "
                    f"mod {mark_map.modulus} = {index}"
                )
            return MarkChoice((mark,), True, how)
        marks = sorted(set(mark_map.marks))
        why = "random seed" if mark_map.seed is None else f"{mark_map.hash or 'hash'}"
        return MarkChoice(tuple(marks), False, f"nft map ({why}: not computable), any mark")
    known = lb_marks(lb)
    if known:
        marks = sorted(known.get(flow.family, set()))
        return MarkChoice(tuple(marks), False, "any mark with a fwmark rule")
    fw = sorted({r.fwmark for r in lb.fwmark_rules if r.family == flow.family})
    return MarkChoice(tuple(fw), False, "no load-balancer state: any fwmark rule")


def fwmark_rule(lb: PodView, family: int, mark: int) -> Rule | None:
    rules = sorted((r for r in lb.fwmark_rules if r.family == family), key=lambda r: r.priority)
    for rule in rules:
        mask = rule.fwmask or 0xFFFFFFFF
        if mark & mask == rule.fwmark & mask:
            return rule
    return None


def _mark_target_ip(lb: PodView, family: int, mark: int) -> IpAddress | None:
    rule = fwmark_rule(lb, family, mark)
    if rule is None:
        return None
    for route in lb.default_routes(rule.table, family):
        for hop in route.paths():
            addr = ip(hop.gateway) if hop.gateway else None
            if addr is not None:
                return addr
    return None


def mark_target(trench: TrenchView, lbs: Sequence[PodView], family: int, mark: int) -> str:
    """The target pod a mark leads to: via the LBs' tables (any LB that still has it)."""
    for lb in lbs:
        addr = _mark_target_ip(lb, family, mark)
        if addr is not None:
            owner = trench.target_ips.get(addr)
            return owner.pod if owner is not None else f"{addr} (no target owns it)"
    return f"mark {mark}"


# --------------------------------------------------------------------------- topology helpers


def _external_iface(trench: TrenchView, lb: PodView) -> str:
    names = trench.external_interfaces(lb)
    return names[0] if names else ""


def _lb_owner_of_ext(trench: TrenchView, addr: IpAddress) -> PodView | None:
    for lb in trench.role("lb-fe"):
        for ifname in trench.external_interfaces(lb):
            for a in lb.global_addrs(ifname):
                if a.interface.ip == addr:
                    return lb
    return None


def _gateway_ifaces(trench: TrenchView, gw: PodView) -> list[str]:
    """Gateway interfaces on the segment of the LBs' external addresses."""
    names: dict[str, None] = {}
    for lb in trench.role("lb-fe"):
        for ifname in trench.external_interfaces(lb):
            for a in lb.global_addrs(ifname):
                for name in gw.ifaces_for(a.interface.ip):
                    names[name] = None
    return list(names)


def _target_nsm(target: PodView, addr: IpAddress | None = None) -> str:
    """The target's NSM interface (the one holding ``addr`` when given)."""
    if addr is not None:
        for name in target.nsm_interfaces:
            if any(a.interface.ip == addr for a in target.global_addrs(name)):
                return name
    return target.nsm_interfaces[0] if target.nsm_interfaces else ""


def _target_own_ip(trench: TrenchView, target: PodView, family: int) -> IpAddress | None:
    for addr, owner in trench.target_ips.items():
        if owner.pod == target.name and addr.version == family:
            return addr
    return None


def _proxy_for(trench: TrenchView, addr: IpAddress) -> PodView | None:
    for proxy in trench.role("proxy"):
        if any(addr in subnet for subnet in proxy.bridge_subnets):
            return proxy
    return None


def _peer_port(proxy: PodView, link: Link | None) -> Link | None:
    """The proxy interface that is the veth peer of ``link`` (ifindex both ways)."""
    if link is None or not link.link_index:
        return None
    for candidate in proxy.snap.links:
        if candidate.index == link.link_index and candidate.link_index == link.index:
            return candidate
    return None


def _fdb_port(proxy: PodView, mac: str) -> str:
    mac = mac.lower()
    bridge = proxy.bridge
    for entry in proxy.snap.fdb:
        if entry.mac == mac and entry.ifname != (bridge.name if bridge else ""):
            return entry.ifname
    return ""


def _source_rule_tables(p: PodView, vip: IpAddress) -> list[int]:
    return [
        r.table
        for r in sorted(p.source_rules, key=lambda r: r.priority)
        if r.family == vip.version and (prefix := net(r.src)) is not None and vip in prefix
    ]


def _vip_net(trench: TrenchView, dst: IpAddress) -> IpNetwork | None:
    for vip in trench.vips:
        if vip.version == dst.version and dst in vip:
            return vip
    return None


# --------------------------------------------------------------------------- plan


def _base(flow: Flow, qid: str, *, reverse: bool = False, **kw: object) -> RouteQuery:
    if reverse:
        src, dst, sport, dport = flow.dst, flow.src, flow.dport, flow.sport
    else:
        src, dst, sport, dport = flow.src, flow.dst, flow.sport, flow.dport
    return RouteQuery(
        id=qid,
        dst=dst,
        src=src,
        ipproto=flow.proto,
        sport=sport,
        dport=dport,
        iif=str(kw.get("iif", "")),
        mark=int(str(kw.get("mark", 0))),
    )


def plan(state: TrenchState, flow: Flow) -> dict[str, tuple[RouteQuery, ...]]:
    """The FIB lookups to ask each pod for ``flow`` (both directions, every candidate)."""
    trench = trench_view(state)
    out: dict[str, list[RouteQuery]] = {}
    for gw in trench.role("gateway"):
        qs = [_base(flow, Q_GW)]
        qs += [
            _base(flow, q_gw_ret(ifname), reverse=True, iif=ifname)
            for ifname in _gateway_ifaces(trench, gw)
        ]
        out[gw.name] = qs
    lbs = trench.role("lb-fe")
    for lb in lbs:
        qs = []
        ext = _external_iface(trench, lb)
        if ext:
            choice = mark_choice(lb, flow)
            qs += [_base(flow, q_mark(m), iif=ext, mark=m) for m in choice.marks]
        qs += [
            _base(flow, q_lb_ret(ifname), reverse=True, iif=ifname)
            for ifname in trench.lb_conduits(lb)
            if ifname in lb.links
        ]
        out[lb.name] = qs
    for proxy in trench.role("proxy"):
        bridge = proxy.bridge
        if bridge is not None:
            out[proxy.name] = [_base(flow, Q_PROXY_RET, reverse=True, iif=bridge.name)]
    for target in trench.role("target"):
        qs = [_base(flow, Q_TARGET_RET, reverse=True)]
        nsm = _target_nsm(target, _target_own_ip(trench, target, flow.family))
        if nsm:
            qs.append(_base(flow, Q_LOCAL, iif=nsm))
        out[target.name] = qs
    return {pod: tuple(qs) for pod, qs in out.items()}


# --------------------------------------------------------------------------- trace


class _Ctx:
    """What every hop check needs: the flow, the indexed trench and the kernel's answers."""

    def __init__(self, state: TrenchState, flow: Flow, answers: Answers) -> None:
        self.state = state
        self.flow = flow
        self.trench = trench_view(state)
        self.answers = answers
        self.vip = flow.dst_ip
        self.client = flow.src_ip

    def answer(self, pod: str, qid: str) -> RouteAnswer | None:
        return self.answers.get(pod, {}).get(qid)

    def unasked(self, pod: PodView | str, role: str, direction: Direction, what: str) -> Hop:
        name = pod if isinstance(pod, str) else pod.name
        result = self.state.pod(name)
        if result is not None and result.snapshot is None:
            return Hop(name, role, direction, False, f"pod unreachable: {result.error}", "MDB002")
        return Hop(
            name,
            role,
            direction,
            False,
            f"no kernel answer for {what} (the agent could not be asked)",
            None,
        )


def _client_is_local(gw: PodView, client: IpAddress) -> bool:
    return any(a.interface.ip == client for addrs in gw.addrs_by_if.values() for a in addrs)


def _ecmp_rule(ctx: _Ctx, pod: PodView, *, reply: bool) -> EcmpRule:
    """Can the kernel's answer at ``pod`` be trusted as the packets' ECMP choice?"""
    if not reply and _client_is_local(pod, ctx.client):
        return originated()
    family = "ipv4" if ctx.flow.family == 4 else "ipv6"
    value = pod.sysctl(f"net.{family}.fib_multipath_hash_policy") if pod.ok("sysctls") else None
    return forwarded(ctx.flow, policy_of(value), reply=reply)


def _owners(trench: TrenchView, ans: RouteAnswer) -> list[PodView]:
    """The LBs whose external addresses are the answer's ECMP next hops."""
    out: dict[str, PodView] = {}
    for hop in ans.nexthops:
        addr = ip(hop.gateway) if hop.gateway else None
        owner = _lb_owner_of_ext(trench, addr) if addr is not None else None
        if owner is not None:
            out[owner.name] = owner
    return [out[name] for name in sorted(out)]


def _gateway_forward(ctx: _Ctx, gw: PodView) -> tuple[Hop, list[PodView] | None]:
    ans = ctx.answer(gw.name, Q_GW)
    if ans is None:
        return ctx.unasked(gw, "gateway", "forward", "the route to the VIP"), None
    if not ans.ok or ans.type not in ("unicast", ""):
        return (
            Hop(
                gw.name,
                "gateway",
                "forward",
                False,
                f"no route to VIP {ctx.vip} from {ctx.client} ({ans.describe()}): the VIP is "
                "not advertised (check BGP: MDB101/MDB102)",
                None,
                "no route",
            ),
            None,
        )
    addr = ip(ans.gateway) if ans.gateway else None
    lb = _lb_owner_of_ext(ctx.trench, addr) if addr is not None else None
    ecmp = f" (ECMP over {len(ans.nexthops)})" if len(ans.nexthops) > 1 else ""
    rule = _ecmp_rule(ctx, gw, reply=False)
    owners = _owners(ctx.trench, ans)
    if len(owners) > 1 and not rule.exact:
        names = [o.name for o in owners]
        return (
            Hop(
                gw.name,
                "gateway",
                "forward",
                True,
                f"VIP {ctx.vip}: ECMP over {', '.join(names)}; one of them: {rule.why} "
                f"({ans.describe()})",
                None,
                f"one of {', '.join(names)}",
                candidates=tuple(names),
            ),
            owners,
        )
    if lb is None:
        return (
            Hop(
                gw.name,
                "gateway",
                "forward",
                False,
                f"VIP {ctx.vip} is routed via {ans.gateway or 'a direct route'} dev {ans.dev}, "
                "which is no LB's external address",
                None,
                "not via an LB",
            ),
            None,
        )
    return (
        Hop(
            gw.name,
            "gateway",
            "forward",
            True,
            f"VIP {ctx.vip} via {ans.gateway} ({lb.name}) dev {ans.dev}{ecmp}, {ans.describe()}",
            None,
            f"via {lb.name}",
        ),
        [lb],
    )


def _lb_forward(ctx: _Ctx, lb: PodView, target: str, choice: MarkChoice) -> Hop:
    flow, trench = ctx.flow, ctx.trench
    if choice.problem:
        return Hop(lb.name, "lb-fe", "forward", False, choice.problem, choice.code, "no mark")
    lbs = trench.role("lb-fe")
    marks = [m for m in choice.marks if mark_target(trench, [lb, *lbs], flow.family, m) == target]
    if not marks:
        return Hop(
            lb.name,
            "lb-fe",
            "forward",
            False,
            f"no mark of this LB leads to {target} ({choice.how}; marks "
            f"{', '.join(map(str, choice.marks)) or 'none'})",
            "MDB402",
            "no mark",
        )
    mark = marks[0]
    ext = _external_iface(trench, lb)
    ans = ctx.answer(lb.name, q_mark(mark))
    rule = fwmark_rule(lb, flow.family, mark)
    label = f"mark {mark}"
    if ans is None:
        if not ext:
            return Hop(
                lb.name,
                "lb-fe",
                "forward",
                False,
                "external interface unknown: cannot ask the kernel",
                "MDB105",
                label,
            )
        return ctx.unasked(lb, "lb-fe", "forward", f"mark {mark}")
    prefix = f"mark {mark} ({choice.how})"
    if rule is None:
        return Hop(
            lb.name,
            "lb-fe",
            "forward",
            False,
            f"{prefix}: no fwmark rule for mark {mark} (IPv{flow.family}); "
            f"the packet falls through: {ans.describe()}",
            "MDB113",
            label,
        )
    if not ans.ok or ans.table != rule.table:
        return Hop(
            lb.name,
            "lb-fe",
            "forward",
            False,
            f"{prefix}: rule '{rule}' points to table {rule.table}, which has no default route; "
            f"{ans.describe()}",
            "MDB110",
            f"{label}: table {rule.table} empty",
        )
    label = f"mark {mark} → table {ans.table}"
    addr = ip(ans.gateway) if ans.gateway else None
    owner = trench.target_ips.get(addr) if addr is not None else None
    head = f"{prefix} → rule '{rule}' → {ans.describe()}"
    if addr is None or owner is None:
        return Hop(
            lb.name,
            "lb-fe",
            "forward",
            False,
            f"{head}: the next hop {ans.gateway or '(none)'} belongs to no target pod (stale)",
            "MDB401" if trench.all_targets_known else None,
            label,
        )
    conduits = trench.lb_conduits(lb)
    link = lb.links.get(ans.dev)
    if ans.dev not in conduits or link is None or not link.is_up:
        return Hop(
            lb.name,
            "lb-fe",
            "forward",
            False,
            f"{head}: egress {ans.dev} is not an UP conduit interface",
            "MDB111",
            label,
        )
    if not any(addr in c.network for c in lb.connected if c.ifname == ans.dev):
        return Hop(
            lb.name,
            "lb-fe",
            "forward",
            False,
            f"{head}: {addr} is not in a connected subnet of {ans.dev}",
            "MDB111",
            label,
        )
    if lb.ok("neighbours"):
        neighbour = lb.neighbour(addr, ans.dev)
        if neighbour is not None and neighbour.is_failed:
            return Hop(
                lb.name,
                "lb-fe",
                "forward",
                False,
                f"{head}: neighbour {neighbour}",
                "MDB112",
                label,
            )
        if (
            neighbour is not None
            and neighbour.lladdr
            and owner.mac
            and neighbour.lladdr != owner.mac
            and "STALE" not in neighbour.state
        ):
            return Hop(
                lb.name,
                "lb-fe",
                "forward",
                False,
                f"{head}: neighbour {addr} has MAC {neighbour.lladdr}, but {owner.pod}'s "
                f"{owner.ifname} has {owner.mac}",
                "MDB112",
                label,
            )
    return Hop(lb.name, "lb-fe", "forward", True, f"{head} ({owner.pod})", None, label)


def _proxy_forward(
    ctx: _Ctx, target: PodView | None, target_addr: IpAddress | None, lbs: Sequence[PodView]
) -> Hop | None:
    trench = ctx.trench
    if target is None or target_addr is None:
        return None
    proxy = _proxy_for(trench, target_addr)
    if proxy is None:
        return Hop(
            "?",
            "proxy",
            "forward",
            False,
            f"no proxy's bridge subnet holds {target.name}'s address {target_addr}",
            "MDB201",
            "no proxy",
        )
    bridge = proxy.bridge
    if bridge is None or not bridge.is_up:
        state = "missing" if bridge is None else bridge.state
        return Hop(proxy.name, "proxy", "forward", False, f"bridge {state}", "MDB201", "bridge")
    nsm_name = _target_nsm(target, target_addr)
    nsm = target.links.get(nsm_name)
    port_name = _fdb_port(proxy, nsm.mac) if nsm is not None and nsm.mac else ""
    how = "fdb"
    port = proxy.links.get(port_name) if port_name else None
    if port is None:
        port = _peer_port(proxy, nsm)
        how = "veth peer"
    if port is None:
        return Hop(
            proxy.name,
            "proxy",
            "forward",
            False,
            f"no port of {bridge.name} leads to {target.name} ({nsm_name} "
            f"{nsm.mac if nsm else '?'}): neither the fdb nor a veth peer names one",
            "MDB202",
            "no port",
        )
    if port.master != bridge.name or not port.is_up:
        what = (
            f"is not enslaved to {bridge.name}"
            if port.master != bridge.name
            else f"is {port.state}"
        )
        return Hop(
            proxy.name,
            "proxy",
            "forward",
            False,
            f"port {port.name} towards {target.name} {what}: the bridge cannot reach the target",
            "MDB202",
            "port detached",
        )
    # The LB-side port the frame arrives on (fdb of the LB's conduit MAC, or veth peer).
    ingress = ""
    for lb in lbs:
        for ifname in trench.lb_conduits(lb):
            link = lb.links.get(ifname)
            if link is None or not any(
                target_addr in c.network for c in lb.connected if c.ifname == ifname
            ):
                continue
            in_name = _fdb_port(proxy, link.mac) if link.mac else ""
            in_port = proxy.links.get(in_name) if in_name else _peer_port(proxy, link)
            if in_port is not None:
                if in_port.master != bridge.name or not in_port.is_up:
                    return Hop(
                        proxy.name,
                        "proxy",
                        "forward",
                        False,
                        f"port {in_port.name} from {lb.name} is "
                        f"{'not enslaved to ' + bridge.name if in_port.master != bridge.name else in_port.state}",
                        "MDB202",
                        "LB port detached",
                    )
                ingress = f"{in_port.name} (from {lb.name}) → "
    return Hop(
        proxy.name,
        "proxy",
        "forward",
        True,
        f"{bridge.name}: {ingress}{port.name} ({how}) → {target.name} {nsm_name}",
        None,
        f"{bridge.name} → {port.name}",
    )


def _target_forward(ctx: _Ctx, target: PodView) -> Hop:
    ans = ctx.answer(target.name, Q_LOCAL)
    nsm = _target_nsm(target, _target_own_ip(ctx.trench, target, ctx.flow.family))
    link = target.links.get(nsm)
    if link is None or not link.is_up:
        state = "missing" if link is None else link.state
        return Hop(
            target.name,
            "target",
            "forward",
            False,
            f"NSM interface {nsm or 'nsm-*'} is {state}",
            "MDB305",
            "nsm down",
        )
    if ans is None:
        return ctx.unasked(target, "target", "forward", "the VIP")
    if ans.ok and ans.type == "local":
        return Hop(
            target.name,
            "target",
            "forward",
            True,
            f"VIP {ctx.vip} is local (arrives on {nsm}, {ans.describe()})",
            None,
            "VIP local",
        )
    has_vip = any(
        a.interface.ip == ctx.vip
        for name in target.nsm_interfaces
        for a in target.global_addrs(name)
    )
    return Hop(
        target.name,
        "target",
        "forward",
        False,
        f"VIP {ctx.vip} is not local here ({ans.describe()})"
        + ("" if has_vip else f": it is missing on {nsm}"),
        None if has_vip else "MDB301",
        "VIP missing",
    )


def _target_return(ctx: _Ctx, target: PodView) -> tuple[Hop, IpAddress | None]:
    ans = ctx.answer(target.name, Q_TARGET_RET)
    if ans is None:
        return ctx.unasked(target, "target", "return", "the return route"), None
    vip = ctx.vip
    tables = _source_rule_tables(target, vip)
    has_vip = any(
        a.interface.ip == vip for name in target.nsm_interfaces for a in target.global_addrs(name)
    )
    if not ans.ok:
        if not has_vip:
            code, why = "MDB301", f"VIP {vip} is not an address here"
        elif not tables:
            code, why = "MDB302", f"no 'from {vip}' policy rule"
        else:
            code, why = "MDB303", f"table {tables[0]} of 'from {vip}' has no default route"
        return Hop(
            target.name,
            "target",
            "return",
            False,
            f"reply from {vip}: {why} ({ans.describe()})",
            code,
            "no return route",
        ), None
    gw = ip(ans.gateway) if ans.gateway else None
    proxy_owner = ctx.trench.bridge_ips.get(gw) if gw is not None else None
    if not tables or ans.table not in tables:
        return Hop(
            target.name,
            "target",
            "return",
            False,
            f"reply from {vip} is not policy-routed (no 'from {vip}' rule): {ans.describe()}",
            "MDB302",
            "no VIP rule",
        ), None
    if proxy_owner is None or ans.dev not in target.nsm_interfaces:
        return Hop(
            target.name,
            "target",
            "return",
            False,
            f"reply from {vip}: {ans.describe()}, not via a proxy bridge on the NSM interface",
            "MDB303",
            "wrong gateway",
        ), None
    return Hop(
        target.name,
        "target",
        "return",
        True,
        f"reply from {vip} → {ans.describe()} ({proxy_owner.pod} {proxy_owner.ifname})",
        None,
        f"table {ans.table} → {proxy_owner.pod}",
    ), gw


def _proxy_return(ctx: _Ctx, proxy: PodView) -> tuple[Hop, list[IpAddress]]:
    """The proxy's reply ECMP: the LB (or, hash unknown, the candidate LBs) the reply takes."""
    ans = ctx.answer(proxy.name, Q_PROXY_RET)
    if ans is None:
        return ctx.unasked(proxy, "proxy", "return", "the return route"), []
    vip, trench = ctx.vip, ctx.trench
    tables = _source_rule_tables(proxy, vip)
    if not ans.ok or ans.table not in tables:
        if not tables:
            code, why = "MDB203", f"no 'from {vip}' rule"
        else:
            code, why = "MDB204", f"table {tables[0]} has no default route towards the LBs"
        return Hop(
            proxy.name,
            "proxy",
            "return",
            False,
            f"reply from {vip}: {why} ({ans.describe()})",
            code,
            "no egress",
        ), []
    hops = [ip(h.gateway) for h in ans.nexthops if h.gateway] or [ip(ans.gateway)]
    have = {h for h in hops if h is not None}
    bridge_nets = [s for s in proxy.bridge_subnets if s.version == vip.version]
    live = {
        addr: owner
        for addr, (owner, subnet) in trench.lb_conduit_addrs.items()
        if addr.version == vip.version and owner.up and any(subnet == s for s in bridge_nets)
    }
    ecmp = ", ".join(f"{h} ({live[h].pod})" if h in live else str(h) for h in sorted(have, key=str))
    missing = sorted((a for a in live if a not in have), key=str)
    degraded = ""
    if missing:
        names = ", ".join(f"{a} ({live[a].pod})" for a in missing)
        degraded = (
            f"; egress ECMP lacks a nexthop for live LB link(s) {names}: those LBs get no "
            "return traffic (other flows' replies may be lost)"
        )
    rule = _ecmp_rule(ctx, proxy, reply=True)
    if len(have) > 1 and not rule.exact:
        # The kernel's answer is one boot's (or one socket's) pick: every nexthop is a candidate.
        cands = sorted(have, key=str)
        owners = []
        for addr in cands:
            found = trench.lb_conduit_addrs.get(addr)
            owners.append(found[0].pod if found is not None else str(addr))
        names = ", ".join(owners)
        return Hop(
            proxy.name,
            "proxy",
            "return",
            True,
            f"reply from {vip} → table {ans.table}, ECMP [{ecmp}]: one of {names}: {rule.why}"
            + degraded,
            "MDB204" if degraded else None,
            f"one of {names}",
            degraded=bool(degraded),
            candidates=tuple(owners),
        ), cands
    chosen = ip(ans.gateway) if ans.gateway else None
    found = trench.lb_conduit_addrs.get(chosen) if chosen is not None else None
    chosen_owner = found[0] if found is not None else None
    if chosen_owner is None:
        return Hop(
            proxy.name,
            "proxy",
            "return",
            False,
            f"reply from {vip} hashes to {ans.gateway}, which is no live LB conduit address "
            f"(ECMP [{ecmp}])",
            "MDB205",
            "dead nexthop",
        ), []
    bad = _failed_neighbour(proxy, chosen, ans.dev)
    if bad:
        return Hop(
            proxy.name,
            "proxy",
            "return",
            False,
            f"reply from {vip} hashes to {chosen} ({chosen_owner.pod}), neighbour {bad}",
            "MDB205",
            "nexthop FAILED",
        ), []
    how = "this flow hashes to" if len(have) > 1 else "the only nexthop is"
    return Hop(
        proxy.name,
        "proxy",
        "return",
        True,
        f"reply from {vip} → table {ans.table}, ECMP [{ecmp}] → {how} "
        f"{ans.gateway} ({chosen_owner.pod}) dev {ans.dev}" + degraded,
        "MDB204" if degraded else None,
        f"ECMP → {chosen_owner.pod}",
        degraded=bool(degraded),
    ), [chosen] if chosen is not None else []


def _failed_neighbour(proxy: PodView, addr: IpAddress | None, dev: str = "") -> str:
    if addr is None or not proxy.ok("neighbours"):
        return ""
    neighbour = proxy.neighbour(addr, dev)
    return str(neighbour) if neighbour is not None and neighbour.is_failed else ""


def _candidate_nexthop(ctx: _Ctx, proxy: PodView, addr: IpAddress) -> Hop | None:
    """Why a candidate nexthop of the proxy's ECMP cannot carry the reply (None: it can)."""
    found = ctx.trench.lb_conduit_addrs.get(addr)
    if found is None or not found[0].up:
        return Hop(
            proxy.name,
            "proxy",
            "return",
            False,
            f"if the reply hashes to {addr}: no live LB conduit has that address",
            "MDB205",
            "dead nexthop",
            via=found[0].pod if found is not None else str(addr),
        )
    bad = _failed_neighbour(proxy, addr)
    if bad:
        return Hop(
            proxy.name,
            "proxy",
            "return",
            False,
            f"if the reply hashes to {addr} ({found[0].pod}): neighbour {bad}",
            "MDB205",
            "nexthop FAILED",
            via=found[0].pod,
        )
    return None


def _lb_return(ctx: _Ctx, lb: PodView, via: IpAddress) -> Hop:
    trench, vip = ctx.trench, ctx.vip
    conduit = trench.lb_conduit_addrs[via][0].ifname
    ans = ctx.answer(lb.name, q_lb_ret(conduit))
    if ans is None:
        return ctx.unasked(lb, "lb-fe", "return", f"the VIP egress from {conduit}")
    tables = _source_rule_tables(lb, vip)
    external = trench.external_interfaces(lb)
    if not tables:
        return Hop(
            lb.name,
            "lb-fe",
            "return",
            False,
            f"reply from {vip} arriving on {conduit}: no 'from {vip}' egress rule "
            f"({ans.describe()})",
            "MDB104",
            "no VIP rule",
        )
    if not ans.ok or ans.type not in ("unicast", "") or ans.table not in tables:
        return Hop(
            lb.name,
            "lb-fe",
            "return",
            False,
            f"reply from {vip} arriving on {conduit}: VIP egress table {tables[0]} has no "
            f"default route{_fallthrough(lb, tables, vip.version)} ({ans.describe()})",
            "MDB103",
            f"table {tables[0]} empty",
        )
    if external and ans.dev not in external:
        return Hop(
            lb.name,
            "lb-fe",
            "return",
            False,
            f"reply from {vip} leaves via {ans.dev}, not the external interface "
            f"{', '.join(external)} ({ans.describe()})",
            "MDB103",
            "wrong egress",
        )
    return Hop(
        lb.name,
        "lb-fe",
        "return",
        True,
        f"reply from {vip} arriving on {conduit} → {ans.describe()}",
        None,
        f"table {ans.table} → {ans.dev}",
    )


def _fallthrough(p: PodView, tables: Sequence[int], family: int) -> str:
    """Where a lookup that misses the first table ends (Meridio: 4097's blackhole)."""
    for table in tables[1:]:
        for route in p.table_routes(table, family):
            if route.is_default:
                kind = route.type if not route.is_unicast else "default route"
                return f"; it falls through to the {kind} of table {table}"
    return ""


def _gateway_return(ctx: _Ctx, gw: PodView, lbs: Sequence[PodView]) -> Hop:
    trench = ctx.trench
    answers = [
        (ifname, ctx.answer(gw.name, q_gw_ret(ifname))) for ifname in _gateway_ifaces(trench, gw)
    ]
    got = [(i, a) for i, a in answers if a is not None]
    if not got:
        return ctx.unasked(gw, "gateway", "return", "the client route")
    ifname, ans = got[0]
    assert ans is not None
    if ans.ok and ans.type == "local":
        return Hop(
            gw.name,
            "gateway",
            "return",
            True,
            f"reply from {' or '.join(lb.name for lb in lbs)} arrives on {ifname}: "
            f"{ctx.client} is local (client)",
            None,
            "client",
        )
    return Hop(
        gw.name,
        "gateway",
        "return",
        ans.ok,
        f"reply arrives on {ifname} and is forwarded: {ans.describe()}",
        None,
        "forwarded",
    )


def _order_lbs(lbs: Iterable[PodView]) -> list[PodView]:
    return sorted(lbs, key=lambda p: p.name)


def trace(state: TrenchState, flow: Flow, answers: Answers) -> TraceResult:
    """The flow's path to every candidate target and back, from snapshots and kernel answers."""
    ctx = _Ctx(state, flow, answers)
    trench = ctx.trench
    notes: list[str] = []
    lbs = _order_lbs(trench.role("lb-fe"))
    gateways = trench.role("gateway")
    if _vip_net(trench, ctx.vip) is None:
        vips = ", ".join(sorted(map(str, trench.vips))) or "none found"
        pod = gateways[0].name if gateways else (lbs[0].name if lbs else "")
        reason = f"{ctx.vip} is not a VIP of this trench (VIPs: {vips})"
        return TraceResult(flow, (), Broken(pod, "forward", reason, None))

    # Forward entry: the gateway's ECMP choice, else every LB may receive the flow.
    gw_hop: Hop | None = None
    entry: list[PodView] = lbs
    gw = gateways[0] if gateways else None
    if gw is not None:
        gw_hop, chosen_lbs = _gateway_forward(ctx, gw)
        if chosen_lbs:
            entry = chosen_lbs
    else:
        notes.append("no gateway pod: every LB is a possible entry")
    entry_branches = gw_hop is not None and len(gw_hop.candidates) > 1

    choices = {lb.name: mark_choice(lb, flow) for lb in lbs}
    exact = all(choices[lb.name].exact for lb in entry) and bool(entry)
    candidates: dict[str, None] = {}
    for lb in entry:
        for mark in choices[lb.name].marks:
            candidates[mark_target(trench, [lb, *lbs], flow.family, mark)] = None
    chosen_target = ""
    if exact and entry and choices[entry[0].name].marks and len(candidates) == 1:
        chosen_target = mark_target(
            trench, [entry[0], *lbs], flow.family, choices[entry[0].name].marks[0]
        )
        notes.append(f"{entry[0].name}: {choices[entry[0].name].how}")
    elif entry:
        notes.append("the mark is not computable: every candidate target is shown")

    paths: list[TracePath] = []
    for target_name in candidates or {"": None}:
        hops: list[Hop] = []
        if gw_hop is not None:
            hops.append(gw_hop)
        for lb in entry:
            hop = _lb_forward(ctx, lb, target_name, choices[lb.name])
            hops.append(replace(hop, via=lb.name) if entry_branches else hop)
        target = trench.by_name.get(target_name)
        if target is not None and target.role == "target":
            hops.extend(_from_target(ctx, target, entry, gw))
        elif target_name:
            hops.append(
                Hop(
                    target_name,
                    "target",
                    "forward",
                    False,
                    f"the mark leads to {target_name}, which is no target pod of this trench",
                    "MDB401",
                    "unknown target",
                )
            )
        paths.append(
            TracePath(
                target=target_name or "?",
                chosen=bool(chosen_target) and target_name == chosen_target,
                hops=tuple(hops),
            )
        )
    paths.sort(key=lambda p: (not p.chosen, p.target))
    chosen_path = next((p for p in paths if p.chosen), None)
    first: Hop | None = None
    certain = True
    for path in [chosen_path] if chosen_path is not None else paths:
        first = path.first_broken
        if first is None and path.maybe_broken is not None:
            first, certain = path.maybe_broken, False
        if first is not None:
            break
    broken = None
    if first is not None:
        reason = first.reason
        if not certain:
            reason = f"if the kernel picks {first.via}: {reason}"
        broken = Broken(first.pod, first.direction, reason, first.code, certain)
    degraded: dict[tuple[str, str, str | None], Hop] = {}
    for path in [chosen_path] if chosen_path is not None else paths:
        for hop in path.degraded:
            degraded.setdefault((hop.pod, hop.direction, hop.code), hop)
    return TraceResult(flow, tuple(paths), broken, tuple(notes), tuple(degraded.values()))


def _from_target(
    ctx: _Ctx, target: PodView, entry: Sequence[PodView], gw: PodView | None
) -> list[Hop]:
    """Proxy forward, target both ways, proxy return and on: one branch per candidate LB."""
    trench, flow = ctx.trench, ctx.flow
    hops: list[Hop] = []
    target_addr = _target_own_ip(trench, target, flow.family)
    proxy_hop = _proxy_forward(ctx, target, target_addr, entry)
    if proxy_hop is not None:
        hops.append(proxy_hop)
    hops.append(_target_forward(ctx, target))
    ret_hop, bridge_ip = _target_return(ctx, target)
    hops.append(ret_hop)
    proxy = trench.bridge_ips.get(bridge_ip) if bridge_ip is not None else None
    proxy_view = trench.by_name.get(proxy.pod) if proxy is not None else None
    if proxy_view is None:
        return hops
    phop, lb_ips = _proxy_return(ctx, proxy_view)
    hops.append(phop)
    branching = len(phop.candidates) > 1
    back: list[PodView] = []
    for lb_ip in lb_ips:
        owner = trench.lb_conduit_addrs.get(lb_ip)
        ret_lb = trench.by_name.get(owner[0].pod) if owner is not None else None
        if branching:
            bad = _candidate_nexthop(ctx, proxy_view, lb_ip)
            if bad is not None:
                hops.append(bad)
                continue
        if ret_lb is None:
            continue
        hop = _lb_return(ctx, ret_lb, lb_ip)
        hops.append(replace(hop, via=ret_lb.name) if branching else hop)
        back.append(ret_lb)
    if back and gw is not None:
        hops.append(_gateway_return(ctx, gw, back))
    return hops


def answers_for(
    results: Mapping[str, Iterable[tuple[str, RouteAnswer]]],
) -> Answers:
    """Answers from (pod -> (query id, answer)...) pairs."""
    return {pod: dict(pairs) for pod, pairs in results.items()}
