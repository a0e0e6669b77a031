"""One-line packet summaries for ``capture --print``, in pure Python.

Why not scapy: the controller must never import it (import-linter contract,
design.md), and dissecting every layer of every packet is what makes scapy's
sniffer 100x slower than the ring. This decodes only what a line shows:
Ethernet (with 802.1Q tags), ARP, IPv4, IPv6 (skipping common extension
headers), TCP, UDP, ICMP and ICMPv6, tcpdump style. Anything else is named by
its EtherType or protocol number. It never raises on a short or odd frame.
"""

from __future__ import annotations

import ipaddress
import struct

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101

_TCP_FLAGS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."), (0x20, "U"))
_ICMP4 = {0: "echo reply", 3: "unreachable", 8: "echo request", 11: "time exceeded"}
_ICMP6 = {
    1: "unreachable",
    3: "time exceeded",
    128: "echo request",
    129: "echo reply",
    133: "router solicitation",
    134: "router advertisement",
    135: "neighbor solicitation",
    136: "neighbor advertisement",
}
_V6_EXT = {0, 43, 44, 60}  # hop-by-hop, routing, fragment, destination options


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def _l4(proto: int, src: str, dst: str, data: bytes, v6: bool) -> str:
    if proto in (6, 17) and len(data) >= 4:
        sport, dport = struct.unpack_from("!HH", data)
        if proto == 17:
            length = struct.unpack_from("!H", data, 4)[0] - 8 if len(data) >= 6 else len(data) - 8
            return f"{src}.{sport} > {dst}.{dport}: UDP, length {max(length, 0)}"
        if len(data) < 14:
            return f"{src}.{sport} > {dst}.{dport}: TCP (truncated)"
        seq, ack = struct.unpack_from("!II", data, 4)
        off, flag_bits = data[12] >> 4, data[13]
        flags = "".join(c for bit, c in _TCP_FLAGS if flag_bits & bit) or "none"
        payload = max(len(data) - off * 4, 0)
        text = f"{src}.{sport} > {dst}.{dport}: Flags [{flags}], seq {seq}"
        if flag_bits & 0x10:
            text += f", ack {ack}"
        return f"{text}, length {payload}"
    if (proto == 1 and not v6) or (proto == 58 and v6):
        kind = data[0] if data else -1
        names = _ICMP6 if v6 else _ICMP4
        label = "ICMP6" if v6 else "ICMP"
        return f"{src} > {dst}: {label} {names.get(kind, f'type {kind}')}"
    return f"{src} > {dst}: ip-proto-{proto}"


def _ipv4(data: bytes) -> str:
    if len(data) < 20:
        return "IP (truncated)"
    ihl = (data[0] & 0x0F) * 4
    proto = data[9]
    src, dst = ipaddress.IPv4Address(data[12:16]), ipaddress.IPv4Address(data[16:20])
    frag = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
    if frag:
        return f"IP {src} > {dst}: fragment offset {frag * 8}, proto {proto}"
    return "IP " + _l4(proto, str(src), str(dst), data[ihl:], v6=False)


def _ipv6(data: bytes) -> str:
    if len(data) < 40:
        return "IP6 (truncated)"
    nxt = data[6]
    src, dst = ipaddress.IPv6Address(data[8:24]), ipaddress.IPv6Address(data[24:40])
    pos = 40
    while nxt in _V6_EXT and len(data) >= pos + 8:
        length = 8 if nxt == 44 else (data[pos + 1] + 1) * 8
        nxt = data[pos]
        pos += length
    return "IP6 " + _l4(nxt, str(src), str(dst), data[pos:], v6=True)


def _arp(data: bytes) -> str:
    if len(data) < 28:
        return "ARP (truncated)"
    op = struct.unpack_from("!H", data, 6)[0]
    sha, spa, tpa = data[8:14], data[14:18], data[24:28]
    s, t = ipaddress.IPv4Address(spa), ipaddress.IPv4Address(tpa)
    if op == 1:
        return f"ARP, Request who-has {t} tell {s}"
    if op == 2:
        return f"ARP, Reply {s} is-at {_mac(sha)}"
    return f"ARP, op {op}"


def _by_ethertype(ethertype: int, data: bytes) -> str:
    if ethertype == 0x0800:
        return _ipv4(data)
    if ethertype == 0x86DD:
        return _ipv6(data)
    if ethertype == 0x0806:
        return _arp(data)
    return f"ethertype 0x{ethertype:04x}, length {len(data)}"


def summarize(frame: bytes, linktype: int = LINKTYPE_ETHERNET) -> str:
    """A tcpdump-like one-line description of ``frame``."""
    try:
        if linktype == LINKTYPE_RAW:
            version = frame[0] >> 4 if frame else 0
            return _ipv4(frame) if version == 4 else _ipv6(frame) if version == 6 else "raw"
        if len(frame) < 14:
            return f"truncated frame, length {len(frame)}"
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        pos = 14
        vlans = []
        while ethertype in (0x8100, 0x88A8) and len(frame) >= pos + 4:
            tci, ethertype = struct.unpack_from("!HH", frame, pos)
            vlans.append(f"vlan {tci & 0x0FFF}")
            pos += 4
        text = _by_ethertype(ethertype, frame[pos:])
        return ", ".join([*vlans, text]) if vlans else text
    except (IndexError, struct.error, ValueError) as exc:
        return f"undecodable frame ({exc}), length {len(frame)}"
