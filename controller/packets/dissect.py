"""Packet dissection for the controller, by scapy: one decoder for ``capture --print`` and the trace.

Why scapy: it knows Ethernet, 802.1Q/802.1ad tags, ARP, IPv4, IPv6 and its
extension headers, TCP, UDP, ICMP and ICMPv6 with their corner cases, so
the controller has no hand-written packet parser; the two it had (the
``--print`` summaries and the active trace's decode) disagreed on IPv6
extension headers. This is the one controller module that imports scapy
(an import-linter contract), and only on the first frame it dissects:
importing scapy costs several hundred ms, which a controller that never
prints or correlates packets does not pay.

Why not for every captured packet: dissecting one frame with scapy takes
hundreds of microseconds, so the capture path stays the agent's TPACKET_V3
ring and the pcapng writer (bytes in, bytes out); only what a human reads
(``--print``) or the active trace correlates (its flow's packets) is
dissected here. Bad input never raises: a short or odd frame is a summary
that says so, or no Packet.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

from meridio_debug.controller.errors import MeridioDebugError

LINKTYPE_ETHERNET: Final = 1
LINKTYPE_RAW: Final = 101

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


@dataclass(frozen=True, slots=True)
class Packet:
    """The fields of one IP packet the trace's correlation needs (decoded from a captured frame)."""

    version: int
    src: str
    dst: str
    proto: int  # 6 tcp, 17 udp, 1 icmp, 58 icmpv6
    sport: int = 0
    dport: int = 0
    ip_id: int = 0
    tcp_seq: int = 0
    tcp_ack: int = 0
    tcp_flags: int = 0
    icmp_type: int = -1
    icmp_id: int = 0
    icmp_seq: int = 0
    payload: bytes = b""

    @property
    def l4_name(self) -> str:
        return {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}.get(self.proto, str(self.proto))

    def identity(self) -> tuple[object, ...]:
        """What no hop changes: the 5-tuple plus the IP id and the L4 marker."""
        if self.proto == 6:
            mark: tuple[object, ...] = (self.tcp_seq, self.tcp_ack, self.tcp_flags)
        elif self.proto in (1, 58):
            mark = (self.icmp_type, self.icmp_id, self.icmp_seq)
        else:
            mark = (self.payload,)
        return (self.src, self.dst, self.proto, self.sport, self.dport, self.ip_id, *mark)

    def describe(self) -> str:
        if self.proto == 6:
            flags = "".join(
                c
                for bit, c in ((2, "S"), (16, "."), (4, "R"), (1, "F"), (8, "P"))
                if self.tcp_flags & bit
            )
            extra = f" [{flags}] seq {self.tcp_seq}"
        elif self.proto in (1, 58):
            extra = f" type {self.icmp_type} id {self.icmp_id} seq {self.icmp_seq}"
        else:
            extra = f" len {len(self.payload)}"
        ports = (
            f":{self.sport} > {self.dst}:{self.dport}"
            if self.proto in (6, 17)
            else f" > {self.dst}"
        )
        ipid = f" id {self.ip_id}" if self.version == 4 else ""
        return f"{self.l4_name} {self.src}{ports}{extra}{ipid}"


@dataclass(frozen=True, slots=True)
class _Layers:
    """scapy's classes, loaded on first use."""

    ether: Any
    dot1q: Any
    dot1ad: Any
    arp: Any
    ip: Any
    ipv6: Any
    tcp: Any
    udp: Any
    icmp: Any
    raw: Any
    v6_ext: tuple[Any, ...]


class DissectionUnavailable(MeridioDebugError):
    """scapy is not installed where the controller runs."""


@cache
def _scapy() -> _Layers:
    try:
        import scapy  # noqa: F401
    except ImportError as exc:
        raise DissectionUnavailable(
            f"dissecting packets needs scapy ({exc}); install meridio-debug[controller]"
        ) from exc
    from scapy.config import conf
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import (
        IPv6,
        IPv6ExtHdrDestOpt,
        IPv6ExtHdrFragment,
        IPv6ExtHdrHopByHop,
        IPv6ExtHdrRouting,
    )
    from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
    from scapy.packet import Raw

    # Dissect no deeper than the transport header: application layers (DNS, ...) cost
    # time and tell the summary and the trace nothing.
    conf.layers.filter([Ether, Dot1Q, Dot1AD, ARP, IP, IPv6, IPv6ExtHdrHopByHop,
                        IPv6ExtHdrRouting, IPv6ExtHdrFragment, IPv6ExtHdrDestOpt, TCP, UDP,
                        ICMP, *_icmpv6_classes()])  # fmt: skip
    return _Layers(
        Ether, Dot1Q, Dot1AD, ARP, IP, IPv6, TCP, UDP, ICMP, Raw,
        (IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrFragment, IPv6ExtHdrDestOpt),
    )  # fmt: skip


def load_in_background() -> None:
    """Import scapy in a daemon thread now, so the first dissection does not wait for it.

    For callers that know they will dissect soon and have other waiting to do first (the
    active trace: its static trace and captures take longer than the import).
    """
    threading.Thread(target=_load_quietly, name="scapy-import", daemon=True).start()


def _load_quietly() -> None:
    with contextlib.suppress(DissectionUnavailable):  # said again on the first dissection
        _scapy()


def _icmpv6_classes() -> list[Any]:
    from scapy.layers import inet6
    from scapy.packet import Packet as ScapyPacket

    return [
        cls
        for cls in vars(inet6).values()
        if isinstance(cls, type)
        and issubclass(cls, ScapyPacket)
        and isinstance(cls.name, str)
        and cls.name.startswith("ICMPv6")
    ]


def _network(frame: bytes, linktype: int) -> tuple[list[str], Any]:
    """(802.1Q tags as text, the layer after the link header) of a frame; raises on a short one."""
    s = _scapy()
    if linktype == LINKTYPE_RAW:
        version = frame[0] >> 4 if frame else 0
        cls = s.ip if version == 4 else s.ipv6 if version == 6 else s.raw
        return [], cls(frame)
    if len(frame) < 14:
        raise _Truncated(f"truncated frame, length {len(frame)}")
    layer = s.ether(frame).payload
    vlans: list[str] = []
    while isinstance(layer, (s.dot1q, s.dot1ad)):
        vlans.append(f"vlan {layer.vlan}")
        layer = layer.payload
    return vlans, layer


class _Truncated(ValueError):
    pass


def _l3(layer: Any) -> tuple[int, str, str, int, Any] | None:
    """(version, src, dst, protocol, transport layer) of an IP layer; None if not IP.

    The transport layer is None for a non-first IPv4 fragment.
    """
    s = _scapy()
    if isinstance(layer, s.ip):
        l4 = None if layer.frag else layer.payload
        return 4, layer.src, layer.dst, layer.proto, l4
    if isinstance(layer, s.ipv6):
        proto, l4 = layer.nh, layer.payload
        while isinstance(l4, s.v6_ext):
            if isinstance(l4, s.v6_ext[2]) and l4.offset:  # a fragment header, not the first
                return 6, layer.src, layer.dst, l4.nh, None
            proto, l4 = l4.nh, l4.payload
        return 6, layer.src, layer.dst, proto, l4
    return None


def _payload(layer: Any) -> bytes:
    return bytes(layer.payload)[:64]


def decode(frame: bytes, linktype: int = LINKTYPE_ETHERNET) -> Packet | None:
    """The IP packet in ``frame`` (Ethernet with VLAN tags, or raw IP); None if it is none."""
    if linktype not in (LINKTYPE_ETHERNET, LINKTYPE_RAW):
        return None
    try:
        _vlans, layer = _network(frame, linktype)
    except (_Truncated, IndexError):
        return None
    l3 = _l3(layer)
    if l3 is None:
        return None
    version, src, dst, proto, l4 = l3
    s = _scapy()
    ip_id = layer.id if version == 4 else 0
    if isinstance(l4, s.tcp):
        return Packet(
            version, src, dst, 6, l4.sport, l4.dport, ip_id, l4.seq, l4.ack, int(l4.flags)
        )
    if isinstance(l4, s.udp):
        return Packet(version, src, dst, 17, l4.sport, l4.dport, ip_id, payload=_payload(l4))
    if proto in (1, 58) and l4 is not None and not isinstance(l4, s.raw) and hasattr(l4, "type"):
        icmp_id, icmp_seq = getattr(l4, "id", 0) or 0, getattr(l4, "seq", 0) or 0
        data = getattr(l4, "data", None)
        payload = bytes(data)[:64] if isinstance(data, bytes) else _payload(l4)
        return Packet(version, src, dst, proto, ip_id=ip_id, icmp_type=int(l4.type),
                      icmp_id=icmp_id, icmp_seq=icmp_seq, payload=payload)  # fmt: skip
    return Packet(version, src, dst, proto, ip_id=ip_id)


def _l4_summary(proto: int, src: str, dst: str, l4: Any, v6: bool) -> str:
    s = _scapy()
    if isinstance(l4, s.udp):
        length = l4.len - 8 if l4.len is not None else len(l4.payload)
        return f"{src}.{l4.sport} > {dst}.{l4.dport}: UDP, length {max(length, 0)}"
    if isinstance(l4, s.tcp):
        bits = int(l4.flags)
        flags = "".join(c for bit, c in _TCP_FLAGS if bits & bit) or "none"
        text = f"{src}.{l4.sport} > {dst}.{l4.dport}: Flags [{flags}], seq {l4.seq}"
        if bits & 0x10:
            text += f", ack {l4.ack}"
        return f"{text}, length {len(l4.payload)}"
    if proto in (6, 17):
        return f"{src} > {dst}: {'TCP' if proto == 6 else 'UDP'} (truncated)"
    if (proto == 1 and not v6) or (proto == 58 and v6):
        if isinstance(l4, s.raw):  # shorter than scapy's layer for its type: the type byte
            kind = bytes(l4.load)[0] if l4.load else None
        else:
            kind = getattr(l4, "type", None)
        names = _ICMP6 if v6 else _ICMP4
        label = "ICMP6" if v6 else "ICMP"
        return f"{src} > {dst}: {label} {names.get(kind, f'type {kind}') if kind is not None else '(truncated)'}"
    return f"{src} > {dst}: ip-proto-{proto}"


def summarize(frame: bytes, linktype: int = LINKTYPE_ETHERNET) -> str:
    """A tcpdump-like one-line description of ``frame``."""
    try:
        vlans, layer = _network(frame, linktype)
        text = _summary(layer)
    except _Truncated as exc:
        return str(exc)
    except (IndexError, ValueError, TypeError, AttributeError) as exc:
        return f"undecodable frame ({exc}), length {len(frame)}"
    return ", ".join([*vlans, text]) if vlans else text


def _summary(layer: Any) -> str:
    s = _scapy()
    if isinstance(layer, s.arp):
        if layer.op == 1:
            return f"ARP, Request who-has {layer.pdst} tell {layer.psrc}"
        if layer.op == 2:
            return f"ARP, Reply {layer.psrc} is-at {layer.hwsrc}"
        return f"ARP, op {layer.op}"
    l3 = _l3(layer)
    if l3 is None:
        underlayer = layer.underlayer
        ethertype = getattr(underlayer, "type", None)
        if ethertype == 0x0800:
            return "IP (truncated)"
        if ethertype == 0x86DD:
            return "IP6 (truncated)"
        if ethertype == 0x0806:
            return "ARP (truncated)"
        if ethertype is None:
            return "raw"
        return f"ethertype 0x{ethertype:04x}, length {len(bytes(layer))}"
    version, src, dst, proto, l4 = l3
    if l4 is None:
        offset = layer.frag * 8 if version == 4 else layer[s.v6_ext[2]].offset * 8
        return f"{'IP' if version == 4 else 'IP6'} {src} > {dst}: fragment offset {offset}, proto {proto}"
    return ("IP " if version == 4 else "IP6 ") + _l4_summary(proto, src, dst, l4, version == 6)
