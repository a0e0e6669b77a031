"""The flow a trace follows, parsed from one line a person can type.

Why a strict little grammar instead of flags: the flow is the question, and
it should read like the packet (``tcp 200.100.0.7:40000 -> 20.0.0.1:4000``);
a typo must be refused with the expected form, never guessed at, because a
trace of the wrong flow answers the wrong question convincingly.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

Proto = Literal["tcp", "udp", "icmp"]

FLOW_FORMS: Final = (
    "'tcp 200.100.0.7:40000 -> 20.0.0.1:4000', 'udp [200:100::7]:40000 -> [2000::1]:4000' "
    "or 'icmp 200.100.0.7 -> 20.0.0.1'"
)

_ENDPOINT: Final = r"(\[[0-9A-Fa-f:.]+\]|[0-9.]+)(?::(\d+))?"
_FLOW: Final = re.compile(rf"^\s*(\w+)\s+{_ENDPOINT}\s*->\s*{_ENDPOINT}\s*$")
_BARE_V6: Final = re.compile(r"^\s*(icmp)\s+([0-9A-Fa-f:]+)\s*->\s*([0-9A-Fa-f:]+)\s*$")


class FlowError(ValueError):
    """The flow text is not a flow; the message shows the expected form."""


@dataclass(frozen=True, slots=True)
class Flow:
    """One direction of a conversation: client -> VIP (the forward direction)."""

    proto: Proto
    src: str
    dst: str
    sport: int = 0
    dport: int = 0

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.src).version

    @property
    def src_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.src)

    @property
    def dst_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.dst)

    @property
    def has_ports(self) -> bool:
        return self.proto in ("tcp", "udp")

    def __str__(self) -> str:
        def end(addr: str, port: int) -> str:
            host = f"[{addr}]" if ":" in addr and self.has_ports else addr
            return f"{host}:{port}" if self.has_ports else host

        return f"{self.proto} {end(self.src, self.sport)} -> {end(self.dst, self.dport)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "proto": self.proto,
            "family": self.family,
            "src": self.src,
            "sport": self.sport if self.has_ports else None,
            "dst": self.dst,
            "dport": self.dport if self.has_ports else None,
            "text": str(self),
        }


def _addr(text: str, what: str, line: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise FlowError(f"flow {line!r}: {what} {text!r} is not an IP address") from None


def parse_flow(text: str) -> Flow:
    """``Flow`` from ``PROTO SRC[:PORT] -> DST[:PORT]``; FlowError naming the expected form."""
    line = text.strip()
    bare = _BARE_V6.match(line)
    if bare:
        proto_text, src_text, sport_text, dst_text, dport_text = (
            bare.group(1),
            bare.group(2),
            None,
            bare.group(3),
            None,
        )
    else:
        match = _FLOW.match(line)
        if not match:
            raise FlowError(f"flow {text!r} is not a flow; expected {FLOW_FORMS}")
        proto_text, src_text, sport_text, dst_text, dport_text = match.groups()
    proto = proto_text.lower()
    if proto not in ("tcp", "udp", "icmp"):
        raise FlowError(f"flow {text!r}: protocol {proto_text!r}; expected tcp, udp or icmp")
    src = _addr(src_text, "source", text)
    dst = _addr(dst_text, "destination", text)
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise FlowError(f"flow {text!r}: source and destination are of different IP families")
    if proto == "icmp":
        if sport_text or dport_text:
            raise FlowError(f"flow {text!r}: icmp has no ports; expected {FLOW_FORMS}")
        return Flow("icmp", src, dst)
    if not sport_text or not dport_text:
        raise FlowError(f"flow {text!r}: {proto} needs both ports; expected {FLOW_FORMS}")
    sport, dport = int(sport_text), int(dport_text)
    for port in (sport, dport):
        if not 0 < port < 65536:
            raise FlowError(f"flow {text!r}: port {port} is not in 1-65535")
    return Flow("tcp" if proto == "tcp" else "udp", src, dst, sport, dport)
