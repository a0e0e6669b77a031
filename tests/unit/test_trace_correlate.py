"""The active trace's correlation on recorded-style packets: built by the agent's own crafter.

Why built, not captured: each case needs a precise story (a packet that stops
in one pod, a frame flooded past a pod, a target that answers nothing) and the
same story must hold for IPv4 and IPv6. The frames are what the agent's
SendProbes puts on the wire (agent/probe.py build_packet), wrapped in
Ethernet, so decoding and marker matching are exercised end to end; the
netns tier checks the whole thing on the real lab.
"""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from meridio_debug.agent.probe import build_packet, marks_for
from meridio_debug.controller.packets.dissect import decode
from meridio_debug.controller.trace import parse_flow
from meridio_debug.controller.trace.active import (
    PACKET_HOST,
    PACKET_OTHERHOST,
    PACKET_OUTGOING,
    Packet,
    ProbeMark,
    ProbeRun,
    Sighting,
    answered,
    capture_filter,
    correlate,
)
from meridio_debug.controller.trace.types import Broken, Hop, TracePath, TraceResult

FLOWS = {
    4: parse_flow("tcp 200.100.0.7:40000 -> 20.0.0.1:4000"),
    6: parse_flow("tcp [200:100::7]:40000 -> [2000::1]:4000"),
}
ROLES = {
    "gw": "gateway",
    "lb-fe-a": "lb-fe",
    "proxy-a": "proxy",
    "target-a1": "target",
    "target-a2": "target",
}
NONCE = 0x12345678


def inet_checksum(data: bytes) -> int:
    """RFC 1071 one's complement sum: 0 over a header whose checksum is right."""
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(packet: bytes, vlan: int = 0) -> bytes:
    ethertype = 0x0800 if packet[0] >> 4 == 4 else 0x86DD
    head = b"\x02" * 6 + b"\x04" * 6
    if vlan:
        head += struct.pack("!HH", 0x8100, vlan)
    return head + struct.pack("!H", ethertype) + packet


def probe_frame(family: int, index: int) -> bytes:
    flow = FLOWS[family]
    marks = marks_for("tcp", family, NONCE, index)
    return ether(
        build_packet(
            "tcp", src=flow.src, dst=flow.dst, sport=flow.sport, dport=flow.dport, marks=marks
        )
    )


def reply_frame(family: int, index: int, ip_id: int = 777) -> bytes:
    """A SYN-ACK for probe ``index`` (what the target's kernel sends)."""
    flow = FLOWS[family]
    seq = marks_for("tcp", family, NONCE, index).tcp_seq
    pkt = bytearray(
        build_packet(
            "tcp",
            src=flow.dst,
            dst=flow.src,
            sport=flow.dport,
            dport=flow.sport,
            marks=marks_for("tcp", family, 0x0BAD0000, index),
        )
    )
    off = 20 if family == 4 else 40
    if family == 4:
        struct.pack_into("!H", pkt, 4, ip_id)
    struct.pack_into("!I", pkt, off + 8, (seq + 1) & 0xFFFFFFFF)  # ack
    pkt[off + 13] = 0x12  # SYN+ACK
    return ether(bytes(pkt))


def probe_run(family: int, n: int = 2) -> ProbeRun:
    marks = []
    for i in range(n):
        m = marks_for("tcp", family, NONCE, i)
        marks.append(ProbeMark(i, sent_ns=i * 1_000_000, ip_id=m.ip_id, tcp_seq=m.tcp_seq))
    return ProbeRun("gw", "gateway", "tcp", tuple(marks))


FORWARD = [
    ("gw", "ext-br", PACKET_OUTGOING),
    ("gw", "ext-lb-fe-a", PACKET_OUTGOING),
    ("lb-fe-a", "ext-vlan0", PACKET_HOST),
    ("lb-fe-a", "conduit-a--1111", PACKET_OUTGOING),
    ("proxy-a", "conduit-a--2222", PACKET_OTHERHOST),
    ("proxy-a", "proxy.cond-3333", PACKET_OUTGOING),
    ("target-a1", "nsm-0", PACKET_HOST),
]
RETURN = [
    ("target-a1", "nsm-0", PACKET_OUTGOING),
    ("proxy-a", "proxy.cond-3333", PACKET_OTHERHOST),
    ("proxy-a", "bridge0", PACKET_HOST),
    ("proxy-a", "bridge0", PACKET_OUTGOING),
    ("proxy-a", "conduit-a--2222", PACKET_OUTGOING),
    ("lb-fe-a", "conduit-a--1111", PACKET_HOST),
    ("lb-fe-a", "ext-vlan0", PACKET_OUTGOING),
    ("gw", "ext-lb-fe-a", PACKET_OTHERHOST),
    ("gw", "ext-br", PACKET_HOST),
]


def sightings(
    family: int,
    *,
    forward: list[tuple[str, str, int]] = FORWARD,
    back: list[tuple[str, str, int]] | None = RETURN,
    probes: int = 2,
) -> list[Sighting]:
    out = []
    for i in range(probes):
        t = 1_000_000 * i + 10_000
        fwd = decode(probe_frame(family, i))
        assert fwd is not None
        for step, (pod, iface, kind) in enumerate(forward):
            out.append(Sighting(pod, iface, t + step * 1000, kind, fwd))
        if back is not None:
            ret = decode(reply_frame(family, i))
            assert ret is not None
            t2 = t + 100_000
            for step, (pod, iface, kind) in enumerate(back):
                out.append(Sighting(pod, iface, t2 + step * 1000, kind, ret))
    return out


def static(family: int, broken: tuple[str, str, str] | None = None) -> TraceResult:
    """The static trace's chosen path to target-a1; ``broken`` = (pod, direction, code)."""
    order = [
        ("gw", "gateway", "forward"),
        ("lb-fe-a", "lb-fe", "forward"),
        ("proxy-a", "proxy", "forward"),
        ("target-a1", "target", "forward"),
        ("target-a1", "target", "return"),
        ("proxy-a", "proxy", "return"),
        ("lb-fe-a", "lb-fe", "return"),
        ("gw", "gateway", "return"),
    ]
    hops = []
    first = None
    for pod, role, direction in order:
        bad = broken is not None and (pod, direction) == broken[:2]
        code = broken[2] if bad and broken else None
        hop = Hop(pod, role, direction, not bad, "state says broken" if bad else "fine", code)  # type: ignore[arg-type]
        hops.append(hop)
        if bad and first is None:
            first = Broken(pod, direction, hop.reason, code)  # type: ignore[arg-type]
    path = TracePath("target-a1", True, tuple(hops))
    return TraceResult(FLOWS[family], (path,), first)


# --------------------------------------------------------------------------- frames


@pytest.mark.parametrize("family", [4, 6])
def test_crafted_probe_decodes_with_its_markers_and_valid_checksums(family: int) -> None:
    flow = FLOWS[family]
    marks = marks_for("tcp", family, NONCE, 3)
    raw = build_packet(
        "tcp", src=flow.src, dst=flow.dst, sport=flow.sport, dport=flow.dport, marks=marks
    )
    p = decode(ether(raw, vlan=100))
    assert p is not None
    assert (p.src, p.dst, p.sport, p.dport, p.tcp_seq) == (
        flow.src,
        flow.dst,
        40000,
        4000,
        marks.tcp_seq,
    )
    assert p.tcp_flags & 0x02 and p.ip_id == (marks.ip_id if family == 4 else 0)
    if family == 4:
        assert inet_checksum(raw[:20]) == 0  # header checksum verifies
    # every probe of a run is distinct, runs with other nonces too
    keys = {marks_for("tcp", family, n, i).tcp_seq for n in (1, 2) for i in range(50)}
    assert len(keys) == 100


@pytest.mark.parametrize("proto", ["udp", "icmp"])
@pytest.mark.parametrize("family", [4, 6])
def test_udp_and_icmp_probes_carry_a_marker(proto: str, family: int) -> None:
    src, dst = ("200.100.0.7", "20.0.0.1") if family == 4 else ("200:100::7", "2000::1")
    marks = marks_for(proto, family, NONCE, 1)
    p = decode(ether(build_packet(proto, src=src, dst=dst, sport=5, dport=6, marks=marks)))
    assert p is not None
    assert p.payload.startswith(marks.payload) and b"meridio-debug probe" in p.payload
    if proto == "icmp":
        assert (p.icmp_type, p.icmp_id, p.icmp_seq) == (
            8 if family == 4 else 128,
            NONCE & 0xFFFF,
            2,
        )


def test_capture_filter_both_directions() -> None:
    assert capture_filter(FLOWS[4]) == (
        "tcp and ((src host 200.100.0.7 and dst host 20.0.0.1 and src port 40000 and dst port "
        "4000) or (src host 20.0.0.1 and dst host 200.100.0.7 and src port 4000 and dst port "
        "40000))"
    )
    assert capture_filter(parse_flow("icmp 200:100::7 -> 2000::1")) == (
        "icmp6 and host 200:100::7 and host 2000::1"
    )


def test_decode_ignores_what_is_not_ip() -> None:
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + b"\0" * 28
    assert decode(arp) is None
    assert decode(b"\x01\x02") is None


# --------------------------------------------------------------------------- correlation


@pytest.mark.parametrize("family", [4, 6])
def test_healthy_round_trip(family: int) -> None:
    result = correlate(FLOWS[family], sightings(family), ROLES, static(family), probe_run(family))
    assert result.first_broken is None and result.lost_at is None
    assert result.target == "target-a1" and result.agrees_with_static
    assert [(h.pod, h.direction) for h in result.hops] == [
        ("gw", "forward"),
        ("lb-fe-a", "forward"),
        ("proxy-a", "forward"),
        ("target-a1", "forward"),
        ("target-a1", "return"),
        ("proxy-a", "return"),
        ("lb-fe-a", "return"),
        ("gw", "return"),
    ]
    lb = result.hops[1]
    assert (lb.in_iface, lb.out_iface, lb.seen, lb.lost) == (
        "ext-vlan0",
        "conduit-a--1111",
        2,
        0,
    )
    assert lb.latency_us == pytest.approx(1.0)  # 1 µs after the gateway sent it on
    assert result.packets["answered"] == 2
    assert result.rtt_us == pytest.approx(108.0)
    doc = result.to_dict()
    assert doc["sightings"][0]["dir"] == "out" and doc["path"][0]["pod"] == "gw"
    assert answered(FLOWS[family], sightings(family), ROLES, probe_run(family).probes) == {0, 1}


@pytest.mark.parametrize("family", [4, 6])
def test_packets_stop_in_the_lb(family: int) -> None:
    s = sightings(family, forward=FORWARD[:3], back=None)
    result = correlate(
        FLOWS[family], s, ROLES, static(family, ("lb-fe-a", "forward", "MDB110")), probe_run(family)
    )
    assert result.lost_at is not None and result.first_broken is not None
    assert (result.first_broken.pod, result.first_broken.direction) == ("lb-fe-a", "forward")
    assert result.first_broken.code == "MDB110" and result.evidence == "packets"
    assert "came in on ext-vlan0 and never left" in result.first_broken.reason
    assert result.agrees_with_static


@pytest.mark.parametrize("family", [4, 6])
def test_flooded_past_a_pod_is_not_on_the_path(family: int) -> None:
    # the proxy port to target-a1 left the bridge: the frame is flooded to target-a2, which drops it
    fwd = [*FORWARD[:5], ("proxy-a", "proxy.cond-4444", PACKET_OUTGOING)]
    fwd.append(("target-a2", "nsm-0", PACKET_OTHERHOST))
    result = correlate(
        FLOWS[family],
        sightings(family, forward=fwd, back=None),
        ROLES,
        static(family, ("proxy-a", "forward", "MDB202")),
        probe_run(family),
    )
    assert result.first_broken is not None
    assert (result.first_broken.pod, result.first_broken.direction) == ("proxy-a", "forward")
    assert "flooded to target-a2" in result.first_broken.reason
    assert "target-a2" not in [h.pod for h in result.hops]


@pytest.mark.parametrize(
    ("broken", "direction"),
    [
        (("target-a1", "forward", "MDB301"), "forward"),
        (("target-a1", "return", "MDB302"), "return"),
    ],
)
def test_a_silent_target_is_named_by_its_kernel_state(
    broken: tuple[str, str, str], direction: str
) -> None:
    result = correlate(
        FLOWS[4],
        sightings(4, back=None),
        ROLES,
        static(4, broken),
        probe_run(4),
    )
    assert result.first_broken is not None
    assert (result.first_broken.pod, result.first_broken.direction) == ("target-a1", direction)
    assert result.first_broken.code == broken[2]
    assert result.evidence == "packets" and result.agrees_with_static


def test_a_broken_state_on_a_hop_the_packets_passed_is_degraded_when_all_got_through() -> None:
    """Every probe answered: the flow is whole; the state breaks other flows (issue 10)."""
    result = correlate(
        FLOWS[6], sightings(6), ROLES, static(6, ("proxy-a", "return", "MDB204")), probe_run(6)
    )
    assert result.lost_at is None and result.packets["answered"] == 2
    assert result.first_broken is None and result.verdict == "degraded"
    [hop] = result.degraded
    assert (hop.pod, hop.direction, hop.code, hop.ok) == ("proxy-a", "return", "MDB204", True)
    assert result.to_dict()["degraded"][0]["code"] == "MDB204"
    assert not result.agrees_with_static  # static called the flow broken; it was not


def test_a_degraded_static_hop_agrees_with_whole_packets() -> None:
    st = static(6)
    path = st.paths[0]
    hops = tuple(
        replace(h, degraded=True, code="MDB204", reason="lacks lb-fe-b")
        if (h.pod, h.direction) == ("proxy-a", "return")
        else h
        for h in path.hops
    )
    st = replace(st, paths=(replace(path, hops=hops),), degraded=(hops[5],))
    assert st.verdict == "degraded" and st.ok
    result = correlate(FLOWS[6], sightings(6), ROLES, st, probe_run(6))
    assert result.first_broken is None and result.verdict == "degraded"
    assert result.agrees_with_static


def test_a_state_break_with_lost_packets_stays_broken() -> None:
    result = correlate(
        FLOWS[4],
        sightings(4, back=RETURN[:6]),
        ROLES,
        static(4, ("proxy-a", "return", "MDB205")),
        probe_run(4),
    )
    assert result.first_broken is not None and result.verdict == "broken"


def test_reply_lost_in_the_lb_on_the_way_back() -> None:
    result = correlate(
        FLOWS[4],
        sightings(4, back=RETURN[:6]),
        ROLES,
        static(4, ("lb-fe-a", "return", "MDB103")),
        probe_run(4),
    )
    assert result.first_broken is not None
    assert (result.first_broken.pod, result.first_broken.direction) == ("lb-fe-a", "return")
    assert result.packets["answered"] == 0


def test_user_traffic_and_the_clients_rst_are_followed_without_probes() -> None:
    s = sightings(4, probes=1)
    result = correlate(FLOWS[4], s, ROLES, static(4))
    assert result.mode == "traffic" and result.first_broken is None
    assert result.packets["forward"] == 1 and result.packets["return"] == 1
    nothing = correlate(FLOWS[4], [], ROLES, static(4))
    assert nothing.first_broken is None and nothing.notes


def test_identical_ipv6_udp_replies_are_told_apart_in_time() -> None:
    flow = parse_flow("udp [200:100::7]:40000 -> [2000::1]:4001")
    marks = [marks_for("udp", 6, NONCE, i) for i in range(3)]
    run = ProbeRun(
        "gw",
        "gateway",
        "udp",
        tuple(ProbeMark(i, sent_ns=i * 1_000_000, marker=m.payload) for i, m in enumerate(marks)),
    )
    reply = decode(
        ether(
            build_packet(
                "udp",
                src=flow.dst,
                dst=flow.src,
                sport=4001,
                dport=40000,
                marks=marks_for("tcp", 6, 0, 0),  # empty payload, no marker: all alike
            )
        )
    )
    assert reply is not None
    s: list[Sighting] = []
    for i, m in enumerate(marks):
        fwd = decode(
            ether(build_packet("udp", src=flow.src, dst=flow.dst, sport=40000, dport=4001, marks=m))
        )
        assert fwd is not None
        t = i * 1_000_000 + 1000
        s += [Sighting(p, n, t + k, kind, fwd) for k, (p, n, kind) in enumerate(FORWARD)]
        s += [Sighting(p, n, t + 500 + k, kind, reply) for k, (p, n, kind) in enumerate(RETURN)]
    assert answered(flow, s, ROLES, run.probes) == {0, 1, 2}
    # replies slower than the probe interval: each still answers its own probe (in order)
    late: list[Sighting] = []
    for i, m in enumerate(marks):
        fwd = decode(
            ether(build_packet("udp", src=flow.src, dst=flow.dst, sport=40000, dport=4001, marks=m))
        )
        assert fwd is not None
        t = i * 1_000_000 + 1000
        late += [Sighting(p, n, t + k, kind, fwd) for k, (p, n, kind) in enumerate(FORWARD)]
        t_back = t + 1_500_000  # after the next probe left
        late += [Sighting(p, n, t_back + k, kind, reply) for k, (p, n, kind) in enumerate(RETURN)]
    assert answered(flow, late, ROLES, run.probes) == {0, 1, 2}


def test_replies_through_another_lb_than_the_hash_predicted_are_said() -> None:
    """TCP replies keep their socket's hash: the row and a note say where they really went."""
    back = [
        (pod.replace("lb-fe-a", "lb-fe-b"), iface.replace("ext-lb-fe-a", "ext-lb-fe-b"), kind)
        for pod, iface, kind in RETURN
    ]
    roles = {**ROLES, "lb-fe-b": "lb-fe"}
    result = correlate(FLOWS[4], sightings(4, back=back), roles, static(4), probe_run(4))
    assert result.first_broken is None
    assert any(
        "replies left through lb-fe-b; the static trace said lb-fe-a" in n for n in result.notes
    )
    (proxy_back,) = [h for h in result.hops if (h.pod, h.direction) == ("proxy-a", "return")]
    assert proxy_back.reason.endswith("the packets went to lb-fe-b")
    # the return path is compared too: an exact claim the packets contradict disagrees
    assert not result.agrees_with_static
    assert result.to_dict()["return_lbs"] == ["lb-fe-b"]


def _with_candidates(st: TraceResult, broken_lb: str = "") -> TraceResult:
    """The static path with the proxy's reply ECMP as candidates lb-fe-a, lb-fe-b (branches)."""
    path = st.paths[0]
    out: list[Hop] = []
    for h in path.hops:
        if (h.role, h.direction) == ("proxy", "return"):
            out.append(replace(h, candidates=("lb-fe-a", "lb-fe-b")))
        elif (h.role, h.direction) == ("lb-fe", "return"):
            for lb in ("lb-fe-a", "lb-fe-b"):
                bad = lb == broken_lb
                out.append(replace(h, pod=lb, via=lb, ok=not bad, code="MDB103" if bad else None))
        else:
            out.append(h)
    return replace(st, paths=(replace(path, hops=tuple(out)),))


def test_replies_through_one_of_static_candidates_agree() -> None:
    back = [
        (pod.replace("lb-fe-a", "lb-fe-b"), iface.replace("ext-lb-fe-a", "ext-lb-fe-b"), kind)
        for pod, iface, kind in RETURN
    ]
    roles = {**ROLES, "lb-fe-b": "lb-fe"}
    st = _with_candidates(static(6))
    result = correlate(FLOWS[6], sightings(6, back=back), roles, st, probe_run(6))
    assert result.first_broken is None and result.agrees_with_static
    assert result.static_back == ("lb-fe-a", "lb-fe-b") and result.lbs_back == ("lb-fe-b",)
    assert any("one of the static trace's candidates" in n for n in result.notes)
    # static: broken if the kernel picks lb-fe-a (uncertain); the packets took lb-fe-b: agree
    uncertain = _with_candidates(static(6), broken_lb="lb-fe-a")
    assert uncertain.paths[0].first_broken is None
    assert uncertain.paths[0].maybe_broken is not None
    result = correlate(FLOWS[6], sightings(6, back=back), roles, uncertain, probe_run(6))
    assert result.first_broken is None and result.agrees_with_static


def test_a_tcp_probe_that_meets_an_open_handshake_is_not_a_loss() -> None:
    """Probe 2's SYN reached the target before the client's RST of probe 1's SYN-ACK: the
    target's silence is TCP (an open request socket), not a loss; with the RST in between
    the silence is a loss again."""
    flow = FLOWS[4]
    only_first_reply = [
        s for s in sightings(4) if _direction_of(s) == "forward" or s.ts_ns < 1_000_000
    ]
    result = correlate(flow, only_first_reply, ROLES, static(4), probe_run(4))
    assert result.first_broken is None and result.packets["collided"] == 1
    assert result.packets["answered"] == 1
    assert any("handshake of an earlier probe" in n for n in result.notes)
    rst = Packet(4, flow.src, flow.dst, 6, flow.sport, flow.dport, tcp_flags=0x04)
    reset = Sighting("target-a1", "nsm-0", 500_000, PACKET_HOST, rst)
    result = correlate(flow, [*only_first_reply, reset], ROLES, static(4), probe_run(4))
    assert result.packets["collided"] == 0
    assert result.first_broken is not None
    assert (result.first_broken.pod, result.first_broken.direction) == ("target-a1", "return")


def _direction_of(s: Sighting) -> str:
    return "forward" if s.packet.src == FLOWS[4].src else "return"
