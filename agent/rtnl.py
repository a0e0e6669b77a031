"""rtnetlink for the agent, on pyroute2: its socket, message classes, constants and parser.

Requests are pyroute2 message classes (``rtmsg``, ``fibmsg``, ``ifinfmsg``,
``ifaddrmsg``, ``ndmsg``) encoded by pyroute2 and sent on pyroute2's
``IPRSocket``; answers are split and decoded by pyroute2's ``MarshalRtnl``, so
every attribute and kernel quirk pyroute2 knows is known here. Constants are
pyroute2's; what pyroute2 0.9 lacks (the RouteGet attributes RTA_IP_PROTO,
RTA_SPORT, RTA_DPORT; the RTM_F_* request flags; names iproute2 gives to a
few protocol numbers and route flags) is added in one place below, as an
``nla_map`` extension of pyroute2's own ``rtmsg`` where it is an attribute.

What this module adds on top, because an agent must never hang or die:

- Every wait is bounded: each ``recv`` has a timeout derived from one overall
  deadline, and the messages and bytes of a dump are capped.
- A dump answers in several datagrams, each one skb of at most
  ``max(recvmsg length, NLMSG_GOODSIZE)`` capped near 32 KiB
  (net/netlink/af_netlink.c ``netlink_dump``); we read with ``MSG_TRUNC`` into
  a 1 MiB buffer and fail loudly if a datagram was larger than the buffer.
- When the table changes during a dump the kernel sets ``NLM_F_DUMP_INTR``;
  we redo the dump a few times and keep the last answer.
- A dump that fails after it started ends with an ``NLMSG_DONE`` carrying the
  error (net/netlink/af_netlink.c ``netlink_dump_done``); pyroute2 decodes it
  only when extended-ack TLVs follow, the parser hook below always does.

The measured hot paths are the dumps: pyroute2's generic decode plus
``get_attr`` costs ~70 us a route (bench/snapshot_bench.py: ~150 ms for 2,000
routes against ~10-20 ms for all of ``ip -j``), and opening its socket ~0.1 ms.
So route, rule, address and neighbour messages of a dump go through a parser
hook of pyroute2's Marshal (``get_parser``): FastParser, built from the message
class's own ``fields`` and ``nla_map``, decodes the attributes whose pyroute2
type it knows (addresses, integers, strings, MACs, RTA_VIA, port/uid ranges,
the nexthop list) to the values pyroute2 gives, in the same shape (fields plus
``get_attr``); tests/unit/test_netlink_decode.py checks both decoders agree on
recorded kernel answers. Links (nested link info, stats), events and RouteGet
answers use pyroute2's classes. The dumps of one snapshot share one socket per
worker thread (thread_socket).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyroute2.iproute  # noqa: F401 - first: pyroute2's import order (agent/_lazy_pyroute2.py)
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nlmsg,
    nlmsg_base,
)
from pyroute2.netlink.exceptions import NetlinkError as Pyroute2NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWADDR,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    rt_proto,
    rt_scope,
    rt_type,
)
from pyroute2.netlink.rtnl.fibmsg import FR_ACT_NAMES, fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NAMES, ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_NAMES, ifinfmsg
from pyroute2.netlink.rtnl.iprsocket import IPRSocket
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.ndmsg import NTF_NAMES, NUD_NAMES, ndmsg
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_NAMES, nh, rtmsg

from meridio_debug.agent.errors import CollectorError

Message = Any  # a decoded pyroute2 message (nlmsg) or a FastMessage: fields by key, get_attr()

GET_NAMES = {
    RTM_GETLINK: "RTM_GETLINK (links)",
    RTM_GETADDR: "RTM_GETADDR (addresses)",
    RTM_GETROUTE: "RTM_GETROUTE (routes)",
    RTM_GETNEIGH: "RTM_GETNEIGH (neighbours/fdb)",
    RTM_GETRULE: "RTM_GETRULE (rules)",
}

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # a socket option, not netlink
RECV_BUFFER = 1 << 20
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_MESSAGES = 4_000_000  # a full IPv4+IPv6 internet table is ~1.2 M routes
DEFAULT_MAX_BYTES = 1 << 30
DUMP_INTR_RETRIES = 3


class RouteGetMessage(rtmsg):  # type: ignore[misc]
    """pyroute2's rtmsg plus the RouteGet attributes its 0.9 nla_map stops before.

    Numbers from include/uapi/linux/rtnetlink.h (enum rtattr_type_t); RTA_SPORT and
    RTA_DPORT are in network byte order.
    """

    # pyroute2 caches the compiled nla table on the class (nlmsg_base.compile_nla_table);
    # without these a subclass reads rtmsg's cached table once rtmsg has been used.
    _nlmsg_base__compiled_nla = False
    _nlmsg_base__t_nla_map = None
    _nlmsg_base__r_nla_map = None

    nla_map = (
        *((i, name, kind) for i, (name, kind) in enumerate(rtmsg.nla_map)),
        (24, "RTA_PAD", "hex"),
        (25, "RTA_UID", "uint32"),
        (26, "RTA_TTL_PROPAGATE", "uint8"),
        (27, "RTA_IP_PROTO", "uint8"),
        (28, "RTA_SPORT", "be16"),
        (29, "RTA_DPORT", "be16"),
        (30, "RTA_NH_ID", "uint32"),
    )


# RouteGet request flags (rtnetlink.h), absent from pyroute2 0.9.
RTM_F_LOOKUP_TABLE = 0x1000  # report the table that matched (IPv4 says 254 otherwise)
RTM_F_FIB_MATCH = 0x2000  # answer the matching FIB entry, not the resolved dst


class NetlinkError(CollectorError):
    """A netlink request failed; ``errno`` is set when the kernel said why."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


# --- names, as iproute2 6.1 prints them ----------------------------------------------------


def _bits(
    names: dict[str, int], prefix: str, order: Sequence[str] = ()
) -> tuple[tuple[int, str], ...]:
    """(mask, name) pairs of a pyroute2 name->value map, lower-cased without ``prefix``."""
    items = {name.removeprefix(prefix): value for name, value in names.items()}
    keys = list(order) or sorted(items, key=lambda k: items[k])
    return tuple((items[k], k) for k in keys)


# iproute2's print_link_flags order.
LINK_FLAGS = _bits(
    IFF_NAMES,
    "IFF_",
    ("LOOPBACK", "BROADCAST", "POINTOPOINT", "MULTICAST", "NOARP", "ALLMULTI", "PROMISC",
     "MASTER", "SLAVE", "DEBUG", "DYNAMIC", "AUTOMEDIA", "PORTSEL", "NOTRAILERS", "UP",
     "LOWER_UP", "DORMANT", "ECHO"),
)  # fmt: skip
IFF_UP = IFF_NAMES["IFF_UP"]
IFF_RUNNING = IFF_NAMES["IFF_RUNNING"]

# ip-address names (IFA_F_SECONDARY prints "temporary" for IPv6: same bit, see fill_address).
_IFA_NAME = {"HOMEADDRESS": "home", "MANAGETEMPADDR": "mngtmpaddr", "MCAUTOJOIN": "autojoin",
             "STABLE_PRIVACY": "stable-privacy"}  # fmt: skip
ADDR_FLAGS: tuple[tuple[int, str], ...] = tuple(
    (mask, _IFA_NAME.get(name, name.lower()))
    for mask, name in _bits(
        {k: v for k, v in IFA_F_NAMES.items() if k != "IFA_F_TEMPORARY"}, "IFA_F_"
    )
)
IFA_F_SECONDARY = IFA_F_NAMES["IFA_F_SECONDARY"]

NUD_STATES = tuple((m, n) for m, n in _bits(NUD_NAMES, "NUD_") if m)
NUD_PERMANENT = NUD_NAMES["NUD_PERMANENT"]
NUD_NOARP = NUD_NAMES["NUD_NOARP"]
NUD_STALE = NUD_NAMES["NUD_STALE"]
NUD_REACHABLE = NUD_NAMES["NUD_REACHABLE"]
NTF_USE = NTF_NAMES["NTF_USE"]
_NTF_NAME = {"EXT_LEARNED": "extern_learn", "OFFLOADED": "offload"}
NEIGH_FLAGS: tuple[tuple[int, str], ...] = tuple(
    (mask, _NTF_NAME.get(name, name.lower())) for mask, name in _bits(NTF_NAMES, "NTF_")
)
# NDA_FLAGS_EXT bits (neighbour.h NTF_EXT_*), absent from pyroute2 0.9.
NEIGH_EXT_FLAGS: tuple[tuple[int, str], ...] = ((0x1, "managed"), (0x2, "locked"))

# rtnh_flags from pyroute2, plus the RTNH_F_*/RTM_F_* bits it lacks, as `ip route` names them.
NEXTHOP_FLAGS: tuple[tuple[int, str], ...] = (
    *((m, n.lower()) for m, n in _bits(RTNH_F_NAMES, "RTNH_F_")),
    (0x20, "unresolved"),
    (0x40, "trap"),
)
ROUTE_FLAGS: tuple[tuple[int, str], ...] = (
    *NEXTHOP_FLAGS,
    (0x200, "cloned"),
    (0x4000, "rt_offload"),
    (0x8000, "rt_trap"),
    (0x20000000, "rt_offload_failed"),
)
RTM_F_NOTIFY = 0x100  # request-only: never printed
FIB_RULE_INVERT = 0x2  # fib_rules.h frh.flags ("not" in ip rule), absent from pyroute2 0.9

# iproute2's etc/iproute2/rt_protos names that pyroute2's rt_proto lacks.
ROUTE_PROTOCOLS: dict[int, str] = {
    **{k: v for k, v in rt_proto.items() if isinstance(k, int)},
    18: "keepalived", 42: "babel", 99: "openr", 186: "bgp", 187: "isis", 188: "ospf",
    189: "rip", 192: "eigrp",
}  # fmt: skip
ROUTE_TYPES: dict[int, str] = {k: v for k, v in rt_type.items() if isinstance(k, int)}
ROUTE_TYPES[0] = "none"  # ip prints RTN_UNSPEC as "none"
ROUTE_SCOPES: dict[int, str] = {k: v for k, v in rt_scope.items() if isinstance(k, int)}
ADDRESS_SCOPES: dict[int, str] = {**ROUTE_SCOPES, 0: "global"}
RULE_ACTIONS: dict[int, str] = {
    v: k.removeprefix("FR_ACT_").lower() for k, v in FR_ACT_NAMES.items()
}


def names_of(bits: int, table: Sequence[tuple[int, str]]) -> list[str]:
    """Names of the bits set in ``bits``; unknown bits as one hex string (like iproute2)."""
    out = [name for mask, name in table if bits & mask]
    known = 0
    for mask, _ in table:
        known |= mask
    if bits & ~known:
        out.append(hex(bits & ~known))
    return out


def nud_state_name(state: int) -> str:
    """NUD state as ``ip neigh`` prints it; 0 is NONE, several bits join with ','."""
    if state == 0:
        return "NONE"
    return ",".join(names_of(state, NUD_STATES))


def route_protocol_name(proto: int) -> str:
    return ROUTE_PROTOCOLS.get(proto) or str(proto)


def route_type_name(rtype: int) -> str:
    return ROUTE_TYPES.get(rtype) or str(rtype)


def route_scope_name(scope: int) -> str:
    return ROUTE_SCOPES.get(scope) or str(scope)


def address_scope_name(scope: int) -> str:
    return ADDRESS_SCOPES.get(scope) or str(scope)


def rule_action_name(action: int) -> str:
    return RULE_ACTIONS.get(action) or str(action)


def link_flag_names(flags: int) -> list[str]:
    """IFF_* flags like iproute2: NO-CARRIER when UP without RUNNING, RUNNING itself hidden."""
    out = ["NO-CARRIER"] if flags & IFF_UP and not flags & IFF_RUNNING else []
    return out + names_of(flags & ~IFF_RUNNING, LINK_FLAGS)


# IP protocol numbers as iproute2 names them (its names come from /etc/protocols,
# which an agent image may not have; these are the ones a rule plausibly names).
IP_PROTO_NAMES = {
    1: "icmp", 2: "igmp", 4: "ipencap", 6: "tcp", 17: "udp", 41: "ipv6", 47: "gre", 50: "esp",
    51: "ah", 58: "ipv6-icmp", 89: "ospf", 103: "pim", 112: "vrrp", 132: "sctp", 136: "udplite",
}  # fmt: skip


def ip_proto_name(number: int) -> str:
    """``ip rule``'s name for an IP protocol number (``ipproto-N`` when it has none)."""
    return IP_PROTO_NAMES.get(number, f"ipproto-{number}")


# --- the fast parser hook ------------------------------------------------------------------


class FastMessage(dict[str, Any]):
    """A message decoded by FastParser: the class's fields by key, attributes by ``get_attr``.

    The same reading interface as a pyroute2 nlmsg (``msg["family"]``,
    ``msg["header"]["type"]``, ``msg.get_attr("RTA_DST")``), a plain dict underneath.
    """

    __slots__ = ("get_attr", "nla")
    nla: dict[str, Any]
    get_attr: Callable[..., Any]


_INLINE_U32, _INLINE_IP = 1, 2
_NLMSGHDR = struct.Struct("=IHHII")
_NLA_HDR = struct.Struct("=HH").unpack_from
_NLA_TYPE = 0x3FFF  # NLA_F_NESTED | NLA_F_NET_BYTEORDER live in the top bits
_U32 = struct.Struct("=I").unpack_from
_U16 = struct.Struct("=H").unpack_from
_BE16 = struct.Struct("!H").unpack_from
_ntop = socket.inet_ntop

Decoder = Callable[[bytes, int, int, int], Any]


def _ip(d: bytes, s: int, e: int, af: int) -> str:
    """An address by its length, as pyroute2 decodes ``ipaddr`` (an fdb entry's dst is v4/v6)."""
    size = e - s
    if size == 4:
        return _ntop(socket.AF_INET, d[s:e])
    if size == 16:
        return _ntop(socket.AF_INET6, d[s:e])
    return d[s:e].hex(":")


def _via(d: bytes, s: int, e: int, af: int) -> dict[str, Any]:
    """RTA_VIA as pyroute2's rtvia decodes it: {'family', 'addr'}."""
    fam = _U16(d, s)[0]
    addr = d[s + 2 : e]
    if (fam == socket.AF_INET and len(addr) == 4) or (fam == socket.AF_INET6 and len(addr) == 16):
        return {"family": fam, "addr": _ntop(fam, addr)}
    return {"family": fam, "addr": addr.hex(":")}


def _range(fmt: str) -> Decoder:
    unpack = struct.Struct(fmt).unpack_from

    def decode(d: bytes, s: int, e: int, af: int) -> dict[str, int] | None:
        if e - s < struct.calcsize(fmt):
            return None
        start, end = unpack(d, s)
        return {"start": start, "end": end}

    return decode


class FastParser:
    """A parser hook for pyroute2's Marshal, built from a message class's own definitions.

    The header layout comes from the class's ``fields``, attribute numbers and
    names from its ``nla_map``; attributes of a pyroute2 type decoded here
    (``target``/``ipaddr``, ``uint32``, ``uint8``, ``be16``, ``asciiz``, ``rtvia``,
    port/uid ranges, the route nexthop list) give the value pyroute2 gives;
    the others are skipped (nothing reads them from a dump).
    """

    def __init__(self, msg_class: Any) -> None:
        fields = [(name, fmt) for name, fmt in msg_class.fields]
        self._fields = tuple(name for name, fmt in fields if not fmt.endswith("x"))  # pads
        self._struct = struct.Struct("=" + "".join(fmt for _, fmt in fields))
        self._start = 16 + self._struct.size
        table: dict[int, tuple[str, int, Decoder]] = {}
        for index, entry in enumerate(msg_class.nla_map):
            code, name, kind = entry if len(entry) == 3 else (index, *entry)
            decode = self._decoder(kind)
            if decode is not None:
                inline = {"uint32": _INLINE_U32, "target": _INLINE_IP, "ipaddr": _INLINE_IP}
                table[code] = (name, inline.get(kind, 0), decode)
        self._nla = table

    def _decoder(self, kind: str) -> Decoder | None:
        simple: dict[str, Decoder] = {
            "target": _ip,
            "ipaddr": _ip,
            "uint32": lambda d, s, e, af: _U32(d, s)[0],
            "uint8": lambda d, s, e, af: d[s],
            "uint16": lambda d, s, e, af: _U16(d, s)[0],
            "lladdr": lambda d, s, e, af: d[s:e].hex(":"),
            "be16": lambda d, s, e, af: _BE16(d, s)[0],
            "asciiz": lambda d, s, e, af: d[s:e].split(b"\0", 1)[0].decode("utf-8", "replace"),
            "rtvia": _via,
            "port_range": _range("=HH"),
            "uid_range": _range("=II"),
            "*get_nh": self._nexthops,
        }
        return simple.get(kind)

    def attrs(self, data: bytes, off: int, end: int, af: int) -> dict[str, Any]:
        nla: dict[str, Any] = {}
        table = self._nla
        while off + 4 <= end:
            alen, atype = _NLA_HDR(data, off)
            if alen < 4 or off + alen > end:
                break
            entry = table.get(atype & _NLA_TYPE)
            if entry is not None:
                name, inline, decode = entry
                # the two commonest kinds inline: a call per attribute is most of the cost
                if inline == _INLINE_U32:
                    nla[name] = _U32(data, off + 4)[0]
                elif inline == _INLINE_IP and alen == 8:
                    nla[name] = _ntop(socket.AF_INET, data[off + 4 : off + 8])
                elif inline == _INLINE_IP and alen == 20:
                    nla[name] = _ntop(socket.AF_INET6, data[off + 4 : off + 20])
                else:
                    nla[name] = decode(data, off + 4, off + alen, af)
            off += (alen + 3) & ~3
        return nla

    def _nexthops(self, data: bytes, start: int, end: int, af: int) -> list[FastMessage]:
        """RTA_MULTIPATH: packed struct rtnexthop + attributes, as pyroute2's ``nh`` gives them."""
        out: list[FastMessage] = []
        off = start
        while off + 8 <= end:
            rlen, flags, hops, oif = _NH(data, off)
            if rlen < 8 or off + rlen > end:
                break
            hop = FastMessage(flags=flags, hops=hops, oif=oif)
            hop.nla = self.attrs(data, off + 8, off + rlen, af)
            hop.get_attr = hop.nla.get
            out.append(hop)
            off += (rlen + 3) & ~3
        return out

    def __call__(self, data: bytes, offset: int, length: int) -> FastMessage:
        """One message at ``offset`` of ``data`` (the signature of Marshal's parsers)."""
        try:
            return self._parse(data, offset, length)
        except _DECODE_ERRORS as exc:
            return undecodable(data, offset, length, exc)

    def _parse(self, data: bytes, offset: int, length: int) -> FastMessage:
        mlen, mtype, mflags, mseq, mpid = _NLMSGHDR.unpack_from(data, offset)
        msg = FastMessage(
            zip(self._fields, self._struct.unpack_from(data, offset + 16), strict=False)
        )
        msg["header"] = {"length": mlen, "type": mtype, "flags": mflags,
                         "sequence_number": mseq, "pid": mpid, "error": None}  # fmt: skip
        msg.nla = self.attrs(data, offset + self._start, offset + length, msg["family"])
        msg.get_attr = msg.nla.get
        return msg


_DECODE_ERRORS = (struct.error, IndexError, ValueError, KeyError, TypeError)


def undecodable(data: bytes, offset: int, length: int, exc: Exception) -> FastMessage:
    """A message that cannot be decoded: its header says so, so one bad message ends no stream."""
    _len, key, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
    msg = FastMessage(header={
        "length": length, "type": key, "flags": flags, "sequence_number": seq, "error": None,
        "undecodable": f"undecodable rtnetlink message type {key}: {exc}",
    })  # fmt: skip
    msg.nla = {}
    msg.get_attr = msg.nla.get
    return msg


_NH = struct.Struct("=H" + "".join(fmt for _name, fmt in nh.fields)).unpack_from  # rtnh_len first
FAST_ROUTES = FastParser(rtmsg)
FAST_RULES = FastParser(fibmsg)
FAST_ADDRESSES = FastParser(ifaddrmsg)
FAST_NEIGHBOURS = FastParser(ndmsg)


_FAST = {
    RTM_NEWROUTE: FAST_ROUTES, RTM_DELROUTE: FAST_ROUTES,
    RTM_NEWRULE: FAST_RULES, RTM_DELRULE: FAST_RULES,
    RTM_NEWADDR: FAST_ADDRESSES, RTM_DELADDR: FAST_ADDRESSES,
    RTM_NEWNEIGH: FAST_NEIGHBOURS, RTM_DELNEIGH: FAST_NEIGHBOURS,
}  # fmt: skip


class RtnlMarshal(MarshalRtnl):  # type: ignore[misc]
    """pyroute2's rtnetlink Marshal with two parser hooks.

    ``fast``: route, rule, address and neighbour messages through FastParser
    (dumps; links keep pyroute2's class: nested link info); NLMSG_DONE is
    always decoded as an error message, so a dump that fails after it started
    reports its errno also without extended-ack TLVs.
    """

    def __init__(self, fast: bool = False) -> None:
        super().__init__()
        self.fast = fast

    def get_parser(self, key: int, flags: int, sequence_number: int) -> Any:
        if self.fast:
            fast = _FAST.get(key)
            if fast is not None:
                return fast  # guards itself
        if key == NLMSG_DONE and not flags & NLM_F_ACK_TLVS:
            parser = self._done
        else:
            parser = super().get_parser(key, flags, sequence_number)

        def guarded(data: bytes, offset: int, length: int) -> Message:
            try:
                return parser(data, offset, length)
            except _DECODE_ERRORS as exc:  # pyroute2 raises on a truncated message
                return undecodable(data, offset, length, exc)

        return guarded

    @staticmethod
    def _done(data: bytes, offset: int, length: int) -> nlmsg:
        msg = nlmsg(data, offset=offset)
        msg.decode()
        err = struct.unpack_from("=i", data, offset + 16)[0] if length >= 20 else 0
        msg["header"]["error"] = Pyroute2NetlinkError(-err) if err < 0 else None
        return msg


def kernel_error(msg: Message) -> tuple[int, str]:
    """(errno, extended-ack text) of an answer; (0, "") when it is not an error."""
    err = msg["header"].get("error")
    if err is None:
        return 0, ""
    code: int = getattr(err, "code", None) or getattr(err, "errno", None) or 0
    args: tuple[Any, ...] = tuple(getattr(err, "args", ()))
    text = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
    return code, "" if text == os.strerror(code) else text


def error_text(what: str, code: int, text: str) -> str:
    detail = f" ({text})" if text else ""
    return f"{what}: {os.strerror(code)}{detail}"


# --- the socket --------------------------------------------------------------------------


class RtnlSocket:
    """pyroute2's IPRSocket with bounded dumps and requests (and, with groups, notifications).

    Not thread-safe: use one per thread or per request (they are cheap: ~0.1 ms).
    """

    def __init__(
        self,
        groups: Iterable[int] = (),
        *,
        rcvbuf: int = 0,
        sock: socket.socket | None = None,
        fast: bool = False,
    ) -> None:
        """Open and subscribe to the RTNLGRP_* ``groups``; ``sock`` injects a ready socket (tests)."""
        self._ipr: IPRSocket | None = None
        if sock is None:
            self._ipr, sock = self._open(groups, rcvbuf)
        self.sock = sock
        self.marshal = RtnlMarshal(fast)
        self._seq = int(time.monotonic_ns() & 0x7FFFFFFF)
        # Anonymous memory: a page is touched only when a datagram reaches it. A
        # bytearray is zeroed at once: 256 page faults per socket, a sixth of a
        # one-shot agent's faults (perf -e minor-faults on the 1,000-target lab).
        self._buf = mmap.mmap(-1, RECV_BUFFER)
        self._view = memoryview(self._buf)

    @staticmethod
    def _open(groups: Iterable[int], rcvbuf: int) -> tuple[IPRSocket, socket.socket]:
        try:
            ipr = IPRSocket(groups=0, rcvbuf=rcvbuf or 1 << 20, ext_ack=True)
        except OSError as exc:
            raise NetlinkError(
                f"cannot open an rtnetlink socket: {exc.strerror}", exc.errno or 0
            ) from exc
        try:
            sock: socket.socket = ipr.socket
            if rcvbuf:  # SO_RCVBUFFORCE (asm-generic/socket.h) ignores rmem_max; needs NET_ADMIN
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            groups = list(groups)
            if groups:  # a socket that only asks is bound by the kernel on its first send
                ipr.bind(groups=0)
            for group in groups:
                ipr.asyncore.add_membership(group)
        except OSError as exc:
            ipr.close()
            raise NetlinkError(
                f"cannot set up the rtnetlink socket: {exc.strerror}", exc.errno or 0
            ) from exc
        return ipr, sock

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
        else:
            self.sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _recv(self, timeout: float | None) -> bytes:
        self.sock.settimeout(timeout)
        n = self.sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
        if n > len(self._buf):
            raise NetlinkError(
                f"netlink datagram of {n} bytes exceeds the buffer of {len(self._buf)}"
            )
        return bytes(self._view[:n])

    def _recv_by(self, deadline: float, what: str, received: int) -> bytes:
        """One datagram before ``deadline``, or a NetlinkError that says what did not come."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise NetlinkError(
                f"{what}: no end after {received} messages (timed out)", errno_mod.ETIMEDOUT
            )
        try:
            return self._recv(remaining)
        except TimeoutError as exc:
            raise NetlinkError(
                f"{what}: the kernel did not answer in time", errno_mod.ETIMEDOUT
            ) from exc
        except OSError as exc:
            raise NetlinkError(f"{what}: recv failed: {exc.strerror}", exc.errno or 0) from exc

    def recv_datagram(self, timeout: float | None) -> list[Message]:
        """Read one datagram (one skb), decoded; raises TimeoutError, OSError (ENOBUFS)."""
        return list(self.marshal.parse(self._recv(timeout)))

    def send(self, msg: nlmsg, msg_type: int, flags: int) -> int:
        """Encode ``msg`` (a pyroute2 message) as a request; returns its sequence number."""
        self._seq = (self._seq + 1) & 0x7FFFFFFF
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = flags
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        self.sock.sendall(msg.data)
        return self._seq

    def request(
        self, msg: nlmsg, msg_type: int, flags: int, *, timeout: float, what: str
    ) -> list[Message]:
        """Send one request, return the answers to it up to the ACK/error (errors raise)."""
        deadline = time.monotonic() + timeout
        seq = self.send(msg, msg_type, flags)
        out: list[Message] = []
        while True:
            answers = self.marshal.parse(self._recv_by(deadline, what, len(out)))
            for answer in answers:
                if answer["header"]["sequence_number"] != seq:
                    continue
                code, text = kernel_error(answer)
                if code:
                    raise NetlinkError(error_text(what, code, text), code)
                if answer["header"]["type"] in (NLMSG_ERROR, NLMSG_DONE):
                    return out
                out.append(answer)
                if not flags & (NLM_F_DUMP | NLM_F_ACK):  # one answer, no ACK after it
                    return out

    def dump(
        self,
        msg: nlmsg,
        msg_type: int,
        *,
        fast: bool | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> list[Message]:
        """Every message the kernel answers to a dump request (``msg``: a pyroute2 message).

        Redone up to DUMP_INTR_RETRIES times when the kernel flags the dump as
        interrupted (NLM_F_DUMP_INTR); bounded by ``timeout`` overall and by
        message and byte caps. ``fast``: through the FastParser hooks (RtnlMarshal).
        """
        if fast is not None:
            self.marshal.fast = fast
        deadline = time.monotonic() + timeout
        answers: list[Message] = []
        for _attempt in range(DUMP_INTR_RETRIES + 1):
            answers, interrupted = self._dump_once(msg, msg_type, deadline, max_messages, max_bytes)
            if not interrupted:
                break
        return answers

    def _dump_once(
        self, msg: nlmsg, msg_type: int, deadline: float, max_messages: int, max_bytes: int
    ) -> tuple[list[Message], bool]:
        what = f"netlink dump {GET_NAMES.get(msg_type, msg_type)}"
        try:
            seq = self.send(msg, msg_type, NLM_F_REQUEST | NLM_F_DUMP)
        except OSError as exc:
            raise NetlinkError(f"{what}: send failed: {exc.strerror}", exc.errno or 0) from exc
        out: list[Message] = []
        interrupted = False
        total = 0
        while True:
            data = self._recv_by(deadline, what, len(out))
            total += len(data)
            if total > max_bytes:
                raise NetlinkError(f"{what}: answer exceeds {max_bytes} bytes")
            for answer in self.marshal.parse(data):
                header = answer["header"]
                if header["sequence_number"] != seq:
                    continue  # a late answer to an earlier request
                if header["flags"] & NLM_F_DUMP_INTR:
                    interrupted = True
                code, text = kernel_error(answer)
                if code:
                    raise NetlinkError(error_text(what, code, text), code)
                if "undecodable" in header:
                    raise NetlinkError(f"{what}: {header['undecodable']}")
                mtype = header["type"]
                if mtype == NLMSG_DONE:
                    if len(out) > max_messages:
                        raise NetlinkError(f"{what}: more than {max_messages} messages")
                    return out, interrupted
                if mtype > NLMSG_DONE + 1:  # not NOOP/ERROR(ACK)/DONE/OVERRUN
                    out.append(answer)
            if len(out) > max_messages:
                raise NetlinkError(f"{what}: more than {max_messages} messages")


_local = threading.local()


def thread_socket() -> RtnlSocket:
    """This thread's reusable rtnetlink socket for dumps (opening one costs ~0.1 ms).

    The snapshot's six netlink sections run one after the other in a worker
    thread; sharing one socket saves an open per section. Answers to an earlier
    request that failed half-way are skipped by sequence number.
    """
    sock: RtnlSocket | None = getattr(_local, "sock", None)
    if sock is None:
        sock = _local.sock = RtnlSocket()
    return sock


def discard_thread_socket() -> None:
    """Close this thread's socket (after a failure), the next dump opens a new one."""
    sock: RtnlSocket | None = getattr(_local, "sock", None)
    _local.sock = None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def precompile(
    classes: Iterable[type] = (ifinfmsg, ifaddrmsg, rtmsg, RouteGetMessage, fibmsg, ndmsg),
) -> int:
    """Compile pyroute2's attribute tables of ``classes`` and every class nested in them.

    pyroute2 compiles a message class's ``nla_map`` the first time the class is
    instantiated, nested classes (IFLA_LINKINFO's per-kind data, RTA_MULTIPATH's
    nexthops...) included. A process that forks agents (agent/launcher.py) calls
    this once, so its children inherit compiled tables instead of each compiling
    them again: measured ~3 ms of CPU per one-shot snapshot otherwise (1,352
    ``compile_nla_table`` calls for 168 pods). Returns how many classes it touched.
    """
    seen: set[type] = set()
    stack = list(classes)
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        with contextlib.suppress(Exception):  # a class that needs arguments stays lazy
            cls()
        for name in dir(cls):
            value = getattr(cls, name, None)
            values = value.values() if isinstance(value, dict) else (value,)  # data_map
            stack.extend(v for v in values if isinstance(v, type) and issubclass(v, nlmsg_base))
    return len(seen)
