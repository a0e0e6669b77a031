"""The probes SendProbes puts on the wire, crafted by scapy (agent/probe.py build_packet).

Why byte for byte: the active trace recognises a probe in every pod by its
markers (IPv4 id, TCP sequence number, ICMP id/seq, the UDP/ICMP payload
text), and a kernel drops a packet whose lengths or checksums are wrong. The
expected bytes were produced by the struct-based builder the agent used before
scapy and checked on the lab (tests/netns/test_trace_active.py), so the two
crafters put the same packets on the wire.
"""

from __future__ import annotations

import pytest

from meridio_debug.agent.probe import build_packet, marks_for

EXPECTED = {
    ("tcp", "10.0.0.1", "20.0.0.1"): "4500002c1237400040060a940a000001140000019c410fa01237abcd000000006002faf0154e0000020405b4",
    ("udp", "10.0.0.1", "20.0.0.1"): "4500003a1237400040110a7b0a000001140000019c410fa00026c6086d65726964696f2d64656275672070726f62652031323334616263642033",
    ("icmp", "10.0.0.1", "20.0.0.1"): "4500003a1237400040010a8b0a000001140000010800dc77abcd00046d65726964696f2d64656275672070726f62652031323334616263642033",
    ("tcp", "fd00::1", "2000::1"): "6000000000180640fd000000000000000000000000000001200000000000000000000000000000019c410fa01237abcd000000006002faf0164d0000020405b4",
    ("udp", "fd00::1", "2000::1"): "6000000000261140fd000000000000000000000000000001200000000000000000000000000000019c410fa00026c7076d65726964696f2d64656275672070726f62652031323334616263642033",
    ("icmp", "fd00::1", "2000::1"): "6000000000263a40fd0000000000000000000000000000012000000000000000000000000000000180004714abcd00046d65726964696f2d64656275672070726f62652031323334616263642033",
}  # fmt: skip


@pytest.mark.parametrize(("proto", "src", "dst"), list(EXPECTED))
def test_probe_bytes(proto: str, src: str, dst: str) -> None:
    marks = marks_for(proto, 6 if ":" in src else 4, 0x1234ABCD, 3)
    raw = build_packet(proto, src=src, dst=dst, sport=40001, dport=4000, marks=marks)
    assert raw.hex() == EXPECTED[(proto, src, dst)]
