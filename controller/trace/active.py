"""Active trace: follow the flow's real packets through every pod, hop by hop.

Why: the static trace says where a flow *should* go from each kernel's FIB
answers; it cannot see what the packets do (a drop nobody's rule explains,
a flood on a bridge, an ECMP choice made from a socket's random hash). The
active trace captures in every pod at once while probes (or the user's
traffic) flow, then follows each packet from pod to pod. This module is the
pure part -- frames and probe markers in, the path actually taken and the
first hop where packets disappear out -- so it is unit-tested on recorded
packets; controller/services/active_trace.py does the I/O (captures, SendProbes).

How a packet is recognised at every hop: by its identity, the 5-tuple plus
what no hop changes -- the IPv4 id, the TCP sequence number, the ICMP echo
id+seq, the UDP payload (IPv6 has no IP id). Probes carry known markers
(agent/probe.py), so a reply is tied to its probe (TCP ack = seq + 1, ICMP
id+seq); the user's traffic is followed packet by packet the same way.

How a pod is judged from what its capture saw (``sll_pkttype``):
- a pod *holds* a packet when it received it for itself (HOST, broadcast,
  multicast) or sent it out (OUTGOING: forwarded, bridged or originated);
- a pod that only saw it OTHERHOST and never sent it on was merely flooded
  (a bridge sent it to every port); it is not on the path;
- packets *disappear* at the last pod that held them, unless that pod is
  where they were going (the target forward, the client side back).

Packets cannot tell whether a target that got a request and sent nothing
back dropped the request (VIP not local: forward) or could not route the
reply (no ``from VIP`` rule: return). There the kernel's state, as the static
trace read it on the hops the packets took, names the hop -- and the result
says which evidence named it (``packets`` or ``state``).

Packets are the truth for *their* flow (issue 10): when every probe was
answered the flow is whole, and broken state on a hop they passed (a proxy
ECMP without one LB's nexthop) is reported as *degraded* -- it breaks other
flows -- never as this flow's first broken hop. ``agrees_with_static`` also
compares the way back: the LBs the replies took must be the one static
computed or among its candidates (a reply ECMP hashed with a seed).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from statistics import median
from typing import Any, Final, Literal, cast

from meridio_debug.controller.analysis._view import trench_view
from meridio_debug.controller.model import TrenchState
from meridio_debug.controller.packets.dissect import Packet
from meridio_debug.controller.trace.core import fwmark_rule, mark_choice
from meridio_debug.controller.trace.flow import Flow
from meridio_debug.controller.trace.types import Broken, Direction, Hop, TraceResult

PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST, PACKET_OUTGOING = range(5)

# Path order of hops, to find the *first* one where packets disappear.
_ORDER: Final = {
    ("gateway", "forward"): 0,
    ("lb-fe", "forward"): 1,
    ("proxy", "forward"): 2,
    ("target", "forward"): 3,
    ("target", "return"): 4,
    ("proxy", "return"): 5,
    ("lb-fe", "return"): 6,
    ("gateway", "return"): 7,
}

Evidence = Literal["packets", "state"]


# --------------------------------------------------------------------------- frames


def capture_filter(flow: Flow) -> str:
    """A BPF (pcap-filter) expression for the flow, both directions."""
    c, v = flow.src, flow.dst
    if flow.proto == "icmp":
        kind = "icmp6" if flow.family == 6 else "icmp"
        return f"{kind} and host {c} and host {v}"
    p, s, d = flow.proto, flow.sport, flow.dport
    return (
        f"{p} and ((src host {c} and dst host {v} and src port {s} and dst port {d}) or "
        f"(src host {v} and dst host {c} and src port {d} and dst port {s}))"
    )


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Sighting:
    """One packet seen in one pod, on one interface, at one time."""

    pod: str
    iface: str
    ts_ns: int
    pkttype: int  # sll_pkttype: 0 host, 1 broadcast, 2 multicast, 3 otherhost, 4 outgoing
    packet: Packet

    @property
    def outbound(self) -> bool:
        return self.pkttype == PACKET_OUTGOING

    @property
    def held(self) -> bool:
        """Received for this pod or sent by it (not just flooded past it)."""
        return self.pkttype != PACKET_OTHERHOST


@dataclass(frozen=True, slots=True)
class ProbeMark:
    """One probe as the sender reported it (protos/probe.proto ProbeSent)."""

    index: int
    sent_ns: int
    ip_id: int = 0
    tcp_seq: int = 0
    icmp_id: int = 0
    icmp_seq: int = 0
    marker: bytes = b""
    ok: bool = True


@dataclass(frozen=True, slots=True)
class ProbeRun:
    """Who sent the probes, how, and what the agent said."""

    pod: str
    role: str
    proto: str
    probes: tuple[ProbeMark, ...]
    how: str = ""  # "from gw's kernel route: ext-br via 169.254.100.2" ...
    error: str = ""  # the sender could not send (no route, no neighbour)


@dataclass(frozen=True, slots=True)
class ProbeOrder:
    """Where and how to send probes: the pod, and the route lookup that places them."""

    pod: str
    role: str
    iif: str = ""
    mark: int = 0
    src: str = ""
    dst: str = ""
    why: str = ""


def probe_orders(state: TrenchState, flow: Flow) -> list[ProbeOrder]:
    """Who should send the probes for ``flow``.

    The gateway when it is one of the pods (the lab): the probes leave it as a
    client's packets would. Otherwise (a cluster, no gateway pod) the entry LB
    sends them *marked*, as if it had received and load-balanced them: a route
    lookup with the external interface as iif and the flow's mark -- one order
    per candidate mark when the mark is not computable (nfqlb: Maglev state is
    not in a snapshot).
    """
    trench = trench_view(state)
    gateways = [p for p in trench.role("gateway") if p.ok("links")]
    if gateways:
        return [ProbeOrder(gateways[0].name, "gateway", why="the gateway, as a client")]
    out: list[ProbeOrder] = []
    for lb in sorted(trench.role("lb-fe"), key=lambda p: p.name):
        ext = trench.external_interfaces(lb)
        if not ext or not lb.ok("links"):
            continue
        choice = mark_choice(lb, flow)
        for mark in choice.marks:
            if fwmark_rule(lb, flow.family, mark) is None:
                continue
            out.append(
                ProbeOrder(
                    lb.name,
                    "lb-fe",
                    iif=ext[0],
                    mark=mark,
                    why=f"{lb.name}, marked {mark} as if received on {ext[0]} ({choice.how})",
                )
            )
        if out:
            break
    return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class PodPass:
    """One pod on a packet's way: where it came in and went out, and when."""

    pod: str
    role: str
    direction: Direction
    in_iface: str
    out_iface: str
    t_in_ns: int
    t_out_ns: int
    held: bool
    sent_on: bool

    @property
    def dwell_ns(self) -> int:
        return max(self.t_out_ns - self.t_in_ns, 0) if self.sent_on else 0


@dataclass(frozen=True, slots=True)
class Trail:
    """Every sighting of one packet, in time order, grouped into pods."""

    direction: Direction
    packet: Packet
    sightings: tuple[Sighting, ...]
    passes: tuple[PodPass, ...]
    flooded: tuple[str, ...]  # pods that only saw it flooded past them
    probe: int = -1  # index of the probe it is (forward) or answers (return); -1: user traffic

    @property
    def end(self) -> PodPass | None:
        return self.passes[-1] if self.passes else None


@dataclass(frozen=True, slots=True)
class ActiveHop:
    """One hop of the path actually taken, with what the packets and the state said."""

    pod: str
    role: str
    direction: Direction
    in_iface: str
    out_iface: str
    t_in_us: float  # since the first sighting of the packet (the representative probe)
    t_out_us: float
    latency_us: float  # from the previous pod's last sighting to this pod's first
    dwell_us: float  # inside this pod (first in to last out)
    seen: int  # packets of the run that passed here
    lost: int  # packets that disappeared here
    ok: bool
    reason: str
    code: str | None = None
    evidence: Evidence | None = None
    degraded: bool = False  # packets passed; the kernel state here breaks other flows (code)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "role": self.role,
            "direction": self.direction,
            "in_iface": self.in_iface,
            "out_iface": self.out_iface,
            "t_in_us": round(self.t_in_us, 1),
            "t_out_us": round(self.t_out_us, 1),
            "latency_us": round(self.latency_us, 1),
            "dwell_us": round(self.dwell_us, 1),
            "seen": self.seen,
            "lost": self.lost,
            "ok": self.ok,
            "reason": self.reason,
            "code": self.code,
            "evidence": self.evidence,
            "degraded": self.degraded,
        }


@dataclass(frozen=True, slots=True)
class ActiveResult:
    """What the packets did: the path taken, per-hop latency, where they disappeared."""

    flow: Flow
    mode: Literal["probe", "traffic"]
    hops: tuple[ActiveHop, ...]
    sightings: tuple[Sighting, ...]  # of the representative packet round trip
    target: str  # the target that got the packets ("" none)
    first_broken: Broken | None
    evidence: Evidence | None
    lost_at: Broken | None  # where packets disappeared (None: every one arrived)
    packets: Mapping[str, int]  # forward, return, delivered, answered, sent
    rtt_us: float | None
    agrees_with_static: bool
    static_first_broken: Broken | None
    static_target: str
    sender: str = ""
    notes: tuple[str, ...] = field(default=())
    static_back: tuple[str, ...] = ()  # the LB(s) static said the replies take (candidates)
    lbs_back: tuple[str, ...] = ()  # the LB(s) the replies took

    @property
    def ok(self) -> bool:
        return self.first_broken is None

    @property
    def degraded(self) -> tuple[ActiveHop, ...]:
        return tuple(h for h in self.hops if h.degraded)

    @property
    def verdict(self) -> str:
        if self.first_broken is not None:
            return "broken"
        return "degraded" if self.degraded else "whole"

    def to_dict(self) -> dict[str, Any]:
        t0 = self.sightings[0].ts_ns if self.sightings else 0
        return {
            "mode": self.mode,
            "sender": self.sender or None,
            "target": self.target or None,
            "path": [h.to_dict() for h in self.hops],
            "sightings": [
                {
                    "pod": s.pod,
                    "iface": s.iface,
                    "dir": "out" if s.outbound else "in",
                    "flooded": s.pkttype == PACKET_OTHERHOST,
                    "t_us": round((s.ts_ns - t0) / 1000.0, 1),
                    "ts_ns": s.ts_ns,
                    "packet": s.packet.describe(),
                }
                for s in self.sightings
            ],
            "rtt_us": None if self.rtt_us is None else round(self.rtt_us, 1),
            "packets": dict(self.packets),
            "lost_at": self.lost_at.to_dict() if self.lost_at else None,
            "first_broken": self.first_broken.to_dict() if self.first_broken else None,
            "evidence": self.evidence,
            "verdict": self.verdict,
            "degraded": [
                {"pod": h.pod, "direction": h.direction, "reason": h.reason, "code": h.code}
                for h in self.degraded
            ],
            "agrees_with_static": self.agrees_with_static,
            "static_return_lbs": list(self.static_back),
            "return_lbs": list(self.lbs_back),
            "static_target": self.static_target or None,
            "static_first_broken": (
                self.static_first_broken.to_dict() if self.static_first_broken else None
            ),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------- correlation


def _direction(flow: Flow, p: Packet) -> Direction | None:
    """forward (client -> VIP), return (VIP -> client), or None: not this flow."""
    want = {"tcp": (6,), "udp": (17,), "icmp": (1, 58)}[flow.proto]
    if p.proto not in want:
        return None
    if p.src == flow.src and p.dst == flow.dst:
        if flow.has_ports and (p.sport, p.dport) != (flow.sport, flow.dport):
            return None
        if flow.proto == "icmp" and p.icmp_type not in (8, 128):
            return None
        return "forward"
    if p.src == flow.dst and p.dst == flow.src:
        if flow.has_ports and (p.sport, p.dport) != (flow.dport, flow.sport):
            return None
        if flow.proto == "icmp" and p.icmp_type not in (0, 129):
            return None
        return "return"
    return None


def _probe_of(p: Packet, direction: Direction, probes: Sequence[ProbeMark]) -> int:
    """The index of the probe ``p`` is (forward) or answers (return); -1 when none."""
    for probe in probes:
        if direction == "forward":
            if p.version == 4 and p.ip_id != probe.ip_id:
                continue
            if p.proto == 6 and p.tcp_seq == probe.tcp_seq and p.tcp_flags & 0x02:
                return probe.index
            if p.proto in (1, 58) and (p.icmp_id, p.icmp_seq) == (probe.icmp_id, probe.icmp_seq):
                return probe.index
            if p.proto == 17 and probe.marker and p.payload.startswith(probe.marker):
                return probe.index
        else:
            if p.proto == 6 and p.tcp_ack == (probe.tcp_seq + 1) & 0xFFFFFFFF:
                return probe.index
            if p.proto in (1, 58) and (p.icmp_id, p.icmp_seq) == (probe.icmp_id, probe.icmp_seq):
                return probe.index
    return -1


def _udp_reply_of(ts_ns: int, probes: Sequence[ProbeMark], taken: set[int]) -> int:
    """A UDP reply carries no marker of ours: it answers the earliest probe sent before it
    that no earlier reply answered (replies come back in order; with 10 ms between probes a
    reply may arrive after the next probe left), else the last one sent before it."""
    before = sorted((p for p in probes if p.ok and p.sent_ns <= ts_ns), key=lambda p: p.sent_ns)
    if not before:
        return -1
    free = next((p for p in before if p.index not in taken), before[-1])
    taken.add(free.index)
    return free.index


def _passes(
    direction: Direction, sightings: Sequence[Sighting], roles: Mapping[str, str]
) -> tuple[tuple[PodPass, ...], tuple[str, ...]]:
    """Group one packet's sightings by pod in time order; split off pods it was flooded to."""
    order: list[str] = []
    by_pod: dict[str, list[Sighting]] = defaultdict(list)
    for s in sightings:
        if s.pod not in by_pod:
            order.append(s.pod)
        by_pod[s.pod].append(s)
    passes: list[PodPass] = []
    flooded: list[str] = []
    for pod in order:
        seen = by_pod[pod]
        outs = [s for s in seen if s.outbound]
        ins = [s for s in seen if not s.outbound]
        held_in = [s for s in ins if s.held]
        if not outs and not held_in:
            flooded.append(pod)
            continue
        first_in = (held_in or ins or outs)[0]
        passes.append(
            PodPass(
                pod=pod,
                role=roles.get(pod, "unknown"),
                direction=direction,
                in_iface=first_in.iface if ins else "",
                out_iface=outs[-1].iface if outs else "",
                t_in_ns=seen[0].ts_ns,
                t_out_ns=outs[-1].ts_ns if outs else seen[-1].ts_ns,
                held=bool(held_in) or bool(outs),
                sent_on=bool(outs),
            )
        )
    return tuple(passes), tuple(flooded)


def trails(
    flow: Flow,
    sightings: Iterable[Sighting],
    roles: Mapping[str, str],
    probes: Sequence[ProbeMark] | None = None,
) -> list[Trail]:
    """Every packet of the flow, followed across pods (probes only, when ``probes`` is given).

    Packets with the same identity (an IPv6 UDP reply has no IP id and the same
    payload every time) are told apart in time: a sighting at a point (pod,
    interface, direction) the current instance has already passed starts the next one.
    """
    instances: dict[tuple[object, ...], list[list[Sighting]]] = defaultdict(list)
    for s in sorted(sightings, key=lambda s: s.ts_ns):
        direction = _direction(flow, s.packet)
        if direction is None:
            continue
        key = (direction, *s.packet.identity())
        runs = instances[key]
        point = (s.pod, s.iface, s.pkttype)
        if not runs or any((x.pod, x.iface, x.pkttype) == point for x in runs[-1]):
            runs.append([])
        runs[-1].append(s)
    out: list[Trail] = []
    taken: set[int] = set()
    ordered = sorted(
        ((cast(Direction, key[0]), seen) for key, runs in instances.items() for seen in runs),
        key=lambda item: item[1][0].ts_ns,
    )
    for direction, seen in ordered:
        index = -1
        if probes is not None:
            index = _probe_of(seen[0].packet, direction, probes)
            if index < 0 and direction == "return" and seen[0].packet.proto == 17:
                index = _udp_reply_of(seen[0].ts_ns, probes, taken)
            if index < 0:
                continue  # not a probe nor a reply to one (e.g. the client's RST)
        passes, flooded = _passes(direction, seen, roles)
        out.append(Trail(direction, seen[0].packet, tuple(seen), passes, flooded, index))
    out.sort(key=lambda t: t.sightings[0].ts_ns)
    return out


def answered(
    flow: Flow,
    sightings: Iterable[Sighting],
    roles: Mapping[str, str],
    probes: Sequence[ProbeMark],
) -> set[int]:
    """Indexes of the probes whose reply has made it back out of the trench (or to the client)."""
    return {
        t.probe
        for t in trails(flow, sightings, roles, probes)
        if t.direction == "return" and t.probe >= 0 and _return_delivered(t)
    }


def _forward_delivered(trail: Trail) -> bool:
    end = trail.end
    return end is not None and end.role == "target" and end.held and not end.sent_on


def _return_delivered(trail: Trail) -> bool:
    end = trail.end
    if end is None:
        return False
    if end.role == "gateway":
        return not end.sent_on or end.in_iface != ""
    # no gateway captured (a cluster): delivered once an LB sent it out of the trench
    return end.role == "lb-fe" and end.sent_on


def _static_path_hops(static: TraceResult, target: str) -> list[Hop]:
    path = next((p for p in static.paths if p.target == target), None) or static.chosen
    return list(path.hops) if path is not None else []


@dataclass
class _Tally:
    seen: int = 0
    lost: int = 0
    latency: list[int] = field(default_factory=list)
    dwell: list[int] = field(default_factory=list)
    in_iface: str = ""
    out_iface: str = ""
    lost_how: str = ""


def correlate(
    flow: Flow,
    sightings: Iterable[Sighting],
    roles: Mapping[str, str],
    static: TraceResult,
    probe_run: ProbeRun | None = None,
) -> ActiveResult:
    """Follow every packet of the flow; the path taken, per-hop latency, the first loss."""
    probes = probe_run.probes if probe_run is not None else None
    sightings = list(sightings)
    all_trails = trails(flow, sightings, roles, probes)
    fwd = [t for t in all_trails if t.direction == "forward"]
    ret = [t for t in all_trails if t.direction == "return"]
    notes: list[str] = []
    mode: Literal["probe", "traffic"] = "probe" if probe_run is not None else "traffic"
    static_target = static.chosen.target if static.chosen is not None else ""

    # Where did forward packets end, where did replies end?
    delivered = [t for t in fwd if _forward_delivered(t)]
    targets = sorted({t.end.pod for t in delivered if t.end is not None})
    target = targets[0] if len(targets) == 1 else ""
    if len(targets) > 1:
        notes.append(f"forward packets reached several targets: {', '.join(targets)}")
        target = max(targets, key=lambda n: sum(1 for t in delivered if t.end and t.end.pod == n))
    if not target and ret:
        first_pass = ret[0].passes[0] if ret[0].passes else None
        if first_pass is not None and first_pass.role == "target":
            target = first_pass.pod
    answered_probes = {t.probe for t in ret if t.probe >= 0 and _return_delivered(t)}
    replied_probes = {t.probe for t in ret if t.probe >= 0}
    collided = _collided(flow, sightings, roles, delivered, replied_probes)

    forward_end = {t.probe: t.end for t in delivered if t.probe >= 0}
    tallies: dict[tuple[str, Direction], _Tally] = defaultdict(_Tally)
    for t in all_trails:
        prev_out: int | None = None
        if t.direction == "return" and t.probe in forward_end:
            end = forward_end[t.probe]
            prev_out = end.t_in_ns if end is not None else None
        for i, p in enumerate(t.passes):
            tally = tallies[(p.pod, p.direction)]
            tally.seen += 1
            if prev_out is not None:
                tally.latency.append(max(p.t_in_ns - prev_out, 0))
            tally.dwell.append(p.dwell_ns)
            prev_out = p.t_out_ns
            tally.in_iface = tally.in_iface or p.in_iface
            tally.out_iface = tally.out_iface or p.out_iface
            if i == len(t.passes) - 1:
                arrived = (
                    _forward_delivered(t) if t.direction == "forward" else _return_delivered(t)
                )
                if not arrived:
                    tally.lost += 1
                    if p.sent_on:
                        tally.lost_how = (
                            f"sent out on {p.out_iface}, and no pod of the trench took it next"
                            + (f" (flooded to {', '.join(t.flooded)})" if t.flooded else "")
                        )
                    else:
                        tally.lost_how = f"came in on {p.in_iface or '?'} and never left"

    static_hops = _static_path_hops(static, target or static_target)
    state_of = {(h.pod, h.direction): h for h in static_hops}
    # Every packet got through (probes: each one answered; traffic: each delivered both
    # ways): the flow is whole, whatever the kernel state on its hops says about others.
    if probes is not None:
        sent_ok = [p for p in probes if p.ok]
        all_through = bool(answered_probes) and len(answered_probes) >= len(sent_ok) - len(collided)
    else:
        all_through = (
            bool(fwd)
            and len(delivered) == len(fwd)
            and bool(ret)
            and all(_return_delivered(t) for t in ret)
        )

    # A target that got a request and sent no reply: the loss is in that target;
    # packets cannot say which way, the target's kernel state does.
    silent_target, silent_lost = "", 0
    if collided:
        notes.append(
            f"probe(s) {', '.join(str(i + 1) for i in sorted(collided))} reached the target while "
            "the handshake of an earlier probe of the same 5-tuple was still open (the "
            "client's RST had not arrived): the target cannot answer such a SYN; not counted"
        )
    if probes is not None:
        silent = [
            t
            for t in delivered
            if t.probe >= 0 and t.probe not in replied_probes and t.probe not in collided
        ]
        if silent and silent[0].end is not None:
            silent_target, silent_lost = silent[0].end.pod, len(silent)
    elif delivered and not ret and target:
        silent_target, silent_lost = target, len(delivered)
    silent_direction: Direction = "return"
    fwd_state = state_of.get((silent_target, "forward"))
    if fwd_state is not None and not fwd_state.ok:
        silent_direction = "forward"
    if silent_target:
        tally = tallies[(silent_target, silent_direction)]
        tally.lost += silent_lost
        tally.lost_how = (
            "the request arrived and no reply left"
            if silent_direction == "return"
            else "the request arrived and was not taken (no reply)"
        )

    # The hops taken: the pods the packets passed, in path order.
    observed: list[tuple[str, str, Direction]] = []
    for t in all_trails:
        for p in t.passes:
            if (p.pod, p.role, p.direction) not in observed:
                observed.append((p.pod, p.role, p.direction))
    if silent_target and (silent_target, "target", silent_direction) not in observed:
        observed.append((silent_target, "target", silent_direction))
    observed.sort(key=lambda k: (_ORDER.get((k[1], k[2]), 9), k[0]))

    rep = _representative(fwd, ret)
    t0 = rep[0].ts_ns if rep else 0
    rep_times: dict[tuple[str, Direction], tuple[float, float]] = {}
    for part in ("forward", "return"):
        mine = [s for s in rep if _direction(flow, s.packet) == part]
        for p in _passes(part, mine, roles)[0]:
            rep_times[(p.pod, part)] = ((p.t_in_ns - t0) / 1000.0, (p.t_out_ns - t0) / 1000.0)

    hops: list[ActiveHop] = []
    lost_at: Broken | None = None
    for pod, role, direction in observed:
        tally = tallies.get((pod, direction), _Tally())
        state = state_of.get((pod, direction))
        ok, reason, code = True, "", None
        evidence: Evidence | None = None
        state_bad = state is not None and not state.ok
        degraded = False
        if not tally.lost and state is not None and (state.degraded or (state_bad and all_through)):
            degraded, code = True, state.code
            reason = f"packets passed; the kernel state here breaks other flows: {state.reason}"
        elif tally.lost:
            ok, evidence = False, "packets"
            total = max(tally.seen, tally.lost)
            why = f" -- kernel: {state.reason}" if state is not None and state_bad else ""
            reason = f"{tally.lost} of {total} packets disappeared here: {tally.lost_how}{why}"
            code = state.code if state is not None and state_bad else None
            if lost_at is None:
                lost_at = Broken(pod, direction, reason, code)
        elif state is not None and state_bad:
            ok, evidence = False, "state"
            reason = f"packets passed, but the kernel state here is broken: {state.reason}"
            code = state.code
        else:
            reason = state.reason if state is not None else "packets passed"
        t_in, t_out = rep_times.get((pod, direction), (0.0, 0.0))
        hops.append(
            ActiveHop(
                pod=pod,
                role=role,
                direction=direction,
                in_iface=tally.in_iface,
                out_iface=tally.out_iface,
                t_in_us=t_in,
                t_out_us=t_out,
                latency_us=median(tally.latency) / 1000.0 if tally.latency else 0.0,
                dwell_us=median(tally.dwell) / 1000.0 if tally.dwell else 0.0,
                seen=tally.seen,
                lost=tally.lost,
                ok=ok,
                reason=reason,
                code=code,
                evidence=evidence,
                degraded=degraded,
            )
        )
    first = next((h for h in hops if not h.ok), None)
    if first is not None and first.evidence == "packets":
        blamed = _blame_next(first, state_of, static_hops, observed)
        if blamed is not None:
            index = hops.index(first)
            hops.insert(index + 1, blamed)
            first = blamed

    sent = len([p for p in probes if p.ok]) if probes is not None else 0
    if probe_run is not None and probe_run.error:
        reason = f"{probe_run.pod} could not send the probes: {probe_run.error}"
        broken = Broken(probe_run.pod, "forward", reason, None)
        first_broken: Broken | None = broken
        lost_at = broken
        verdict_by: Evidence | None = "packets"
    elif first is not None:
        first_broken = Broken(first.pod, first.direction, first.reason, first.code)
        verdict_by = first.evidence
    elif not fwd:
        first_broken, verdict_by = None, None
        if probe_run is not None:
            reason = f"no probe was seen, not even in {probe_run.pod} that sent them"
            first_broken = Broken(probe_run.pod, "forward", reason, None)
            lost_at, verdict_by = first_broken, "packets"
        else:
            notes.append("no packet of the flow was seen: was there traffic during the capture?")
    else:
        first_broken, verdict_by = None, None
    rtt = None
    if rep and any(_direction(flow, s.packet) == "return" for s in rep):
        rtt = (rep[-1].ts_ns - rep[0].ts_ns) / 1000.0
    static_broken = static.first_broken
    lbs_back = sorted({p.pod for t in ret for p in t.passes if p.role == "lb-fe"})
    static_back = _static_back(static_hops)
    same_verdict = _same_verdict(first_broken, static_hops)
    same_back = not lbs_back or not static_back or set(lbs_back) <= set(static_back)
    agrees = (
        bool(all_trails)
        and same_verdict
        and same_back
        and (not target or not static_target or target == static_target)
    )
    if target and static_target and target != static_target:
        notes.append(f"the packets went to {target}; the static trace expected {static_target}")
    if len(lbs_back) > 1:
        notes.append(
            f"replies left through several LBs ({', '.join(lbs_back)}): the proxy's ECMP "
            "choice is per packet hash (a TCP socket's random txhash is kept across veth)"
        )
    if lbs_back and static_back:
        if not same_back:
            notes.append(
                f"replies left through {', '.join(lbs_back)}; the static trace said "
                f"{' or '.join(static_back)}"
            )
        elif len(static_back) > 1:
            notes.append(
                f"replies left through {', '.join(lbs_back)}, one of the static trace's "
                f"candidates {', '.join(static_back)} (the kernel's hash is not computable)"
            )
    if lbs_back and static_back and not same_back:
        hops = [
            replace(h, reason=f"{h.reason}; the packets went to {', '.join(lbs_back)}")
            if h.ok and h.role == "proxy" and h.direction == "return"
            else h
            for h in hops
        ]
    counts = {
        "forward": len(fwd),
        "return": len(ret),
        "delivered": len(delivered),
        "answered": len(answered_probes) if probes is not None else len(ret),
        "sent": sent,
        "collided": len(collided),
    }
    return ActiveResult(
        flow=flow,
        mode=mode,
        hops=tuple(hops),
        sightings=tuple(rep),
        target=target,
        first_broken=first_broken,
        evidence=verdict_by,
        lost_at=lost_at,
        packets=counts,
        rtt_us=rtt,
        agrees_with_static=agrees,
        static_first_broken=static_broken,
        static_target=static_target,
        sender=probe_run.pod if probe_run is not None else "",
        notes=tuple(notes),
        static_back=tuple(static_back),
        lbs_back=tuple(lbs_back),
    )


def _collided(
    flow: Flow,
    sightings: Sequence[Sighting],
    roles: Mapping[str, str],
    delivered: Sequence[Trail],
    replied: set[int],
) -> set[int]:
    """TCP probes that met an earlier probe's handshake still open in the target.

    Every probe SYN has the flow's 5-tuple; the first one's SYN-ACK is reset by
    the client's kernel (no socket). A next SYN that reaches the target before
    that RST meets the open request socket, and the kernel answers it with at
    most a rate-limited ACK for the *earlier* SYN (``tcp_check_req``) -- silence
    that is no loss. Seen from the captures: no RST of the flow reached the
    target between the earlier replied probe's arrival and this one's.
    """
    if flow.proto != "tcp":
        return set()
    resets = sorted(
        s.ts_ns
        for s in sightings
        if roles.get(s.pod) == "target"
        and not s.outbound
        and s.held
        and s.packet.proto == 6
        and s.packet.tcp_flags & 0x04
        and _direction(flow, s.packet) == "forward"
    )
    arrivals = {t.probe: t.end.t_in_ns for t in delivered if t.probe >= 0 and t.end is not None}
    out: set[int] = set()
    for k, t_k in arrivals.items():
        if k in replied:
            continue
        earlier = [t_j for j, t_j in arrivals.items() if t_j < t_k and j in replied]
        if earlier and not any(max(earlier) < r < t_k for r in resets):
            out.add(k)
    return out


def _static_back(static_hops: Sequence[Hop]) -> list[str]:
    """The LBs the static trace says the replies may leave through (one when exact)."""
    proxy = next((h for h in static_hops if h.role == "proxy" and h.direction == "return"), None)
    if proxy is not None and proxy.candidates:
        return list(proxy.candidates)
    return [h.pod for h in static_hops if h.role == "lb-fe" and h.direction == "return"][:1]


def _ways(static_hops: Sequence[Hop]) -> list[list[Hop]]:
    """Each way the flow may take through the static path: common hops + one candidate's."""
    branches = sorted({h.via for h in static_hops if h.via})
    if not branches:
        return [list(static_hops)]
    return [[h for h in static_hops if not h.via or h.via == b] for b in branches]


def _same_verdict(active_broken: Broken | None, static_hops: Sequence[Hop]) -> bool:
    """Do packets and state agree: whole on a way static found whole, or broken where one stops?

    The static trace may list several ways (a reply ECMP it cannot predict); the
    packets took one. They agree when that is one of static's ways: broken at a
    hop where one of its ways first breaks, or whole when one of its ways is whole.
    """
    firsts = [next((h for h in way if not h.ok), None) for way in _ways(static_hops)]
    if active_broken is None:
        return any(f is None for f in firsts) or not static_hops
    return any(
        f is not None and (f.pod, f.direction) == (active_broken.pod, active_broken.direction)
        for f in firsts
    )


def _blame_next(
    stopped: ActiveHop,
    state_of: Mapping[tuple[str, Direction], Hop],
    static_hops: Sequence[Hop],
    observed: Sequence[tuple[str, str, Direction]],
) -> ActiveHop | None:
    """The next hop, when packets stopped in a pod whose own state is fine and the next is not.

    A pod hands a packet to the next one at L2: when the next hop cannot answer
    ARP/ND (its port left the bridge, its address is gone) the packet waits in
    *this* pod's neighbour queue and is dropped there. The loss is seen here,
    the fault is there -- so the next hop, unreached by any packet and broken in
    the kernel state, is named.
    """
    here = state_of.get((stopped.pod, stopped.direction))
    if here is None or not here.ok:
        return None
    keys = [(h.pod, h.direction) for h in static_hops]
    try:
        at = keys.index((stopped.pod, stopped.direction))
    except ValueError:
        return None
    if at + 1 >= len(static_hops):
        return None
    nxt = static_hops[at + 1]
    if nxt.via or nxt.ok or any((pod, d) == (nxt.pod, nxt.direction) for pod, _r, d in observed):
        return None
    return ActiveHop(
        pod=nxt.pod,
        role=nxt.role,
        direction=nxt.direction,
        in_iface="",
        out_iface="",
        t_in_us=0.0,
        t_out_us=0.0,
        latency_us=0.0,
        dwell_us=0.0,
        seen=0,
        lost=0,
        ok=False,
        reason=f"no packet got here (they stopped in {stopped.pod}: {stopped.reason}); "
        f"the kernel state here is broken: {nxt.reason}",
        code=nxt.code,
        evidence="state",
    )


def _representative(fwd: Sequence[Trail], ret: Sequence[Trail]) -> list[Sighting]:
    """The sightings of one round trip: the first forward packet and its reply (if any)."""
    if not fwd:
        return list(ret[0].sightings) if ret else []
    chosen = next((t for t in fwd if _forward_delivered(t)), fwd[0])
    out = list(chosen.sightings)
    reply = next(
        (
            t
            for t in ret
            if (chosen.probe >= 0 and t.probe == chosen.probe)
            or (chosen.probe < 0 and t.sightings[0].ts_ns >= chosen.sightings[0].ts_ns)
        ),
        None,
    )
    if reply is not None:
        out.extend(reply.sightings)
    return sorted(out, key=lambda s: s.ts_ns)
