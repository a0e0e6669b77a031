"""Raw rtnetlink for the agent: dump requests, multicast subscriptions, attribute parsing.

Why our own netlink code instead of pyroute2 on this path: measured with
bench/snapshot_bench.py (2,000 routes in 200 tables), pyroute2 0.9's generic
message classes need ~110 ms to decode the routes (``get_routes``, both
families), while ``ip -j -batch`` prints routes, rules, addresses, links and
neighbours in ~8 ms and this module's route section takes ~10 ms; and
``import pyroute2`` alone costs ~140 ms of agent start-up. A snapshot must stay within 2x of
iproute2, so the dumps use a plain ``AF_NETLINK`` socket and decode only the
attributes we report, with precompiled ``struct`` formats (see
collectors/netlink.py for the conversions). pyroute2 stays the oracle for our
constants in the unit tests and does namespace handling in tests/bench.

Kernel behaviours this module works around (quotes from the kernel sources):

- A dump answers in several datagrams, each one skb of at most
  ``max(recvmsg length, NLMSG_GOODSIZE)`` capped near 32 KiB
  (net/netlink/af_netlink.c ``netlink_dump``); we read with ``MSG_TRUNC`` into
  a 1 MiB buffer and fail loudly if a datagram was ever larger than the buffer
  instead of decoding a silently truncated one.
- When the table changes during a dump the kernel sets ``NLM_F_DUMP_INTR``
  ("Dump was interrupted and may be inconsistent", include/uapi/linux/netlink.h);
  we redo the dump a few times and keep the last answer.
- ``NLA_F_NESTED``/``NLA_F_NET_BYTEORDER`` live in the top bits of ``nla_type``
  and must be masked off before comparing types.
- Every wait is bounded: each ``recv`` has a socket timeout derived from one
  overall deadline, and the number of messages and bytes per dump is capped,
  so a collector can never hang the agent.

Numbers below are the stable UAPI values from include/uapi/linux/rtnetlink.h,
if_link.h, if_addr.h, neighbour.h and fib_rules.h; names follow iproute2 6.1
(lib/rt_names.c, /etc/iproute2/rt_protos) so our output compares 1:1 with ``ip``.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import socket
import struct
import time
from collections.abc import Iterable, Sequence

from meridio_debug.agent.errors import CollectorError

# --- netlink core (include/uapi/linux/netlink.h) -------------------------------------------

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_EXT_ACK = 11
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; Python's socket module lacks it

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE = 0x100  # on new-object requests (same bit as NLM_F_CAPPED on errors)
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLM_F_CAPPED = 0x100  # on NLMSG_ERROR: the request payload is not echoed
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR: extended ack attributes follow

NLA_TYPE_MASK = 0x3FFF  # ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER)
NLMSGERR_ATTR_MSG = 1

AF_UNSPEC = 0
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
AF_BRIDGE = 7

# --- rtnetlink message types --------------------------------------------------------------

RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

GET_NAMES = {
    RTM_GETLINK: "RTM_GETLINK (links)",
    RTM_GETADDR: "RTM_GETADDR (addresses)",
    RTM_GETROUTE: "RTM_GETROUTE (routes)",
    RTM_GETNEIGH: "RTM_GETNEIGH (neighbours/fdb)",
    RTM_GETRULE: "RTM_GETRULE (rules)",
}

# multicast groups (enum rtnetlink_groups)
RTNLGRP_LINK = 1
RTNLGRP_NEIGH = 3
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_IFADDR = 9
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_IPV6_RULE = 19

# --- links (if_link.h) ------------------------------------------------------------------

IFLA_ADDRESS = 1
IFLA_BROADCAST = 2
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_STATS64 = 23
IFLA_LINK_NETNSID = 37
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_VLAN_ID = 1

OPERSTATES: tuple[str, ...] = (
    "UNKNOWN",
    "NOTPRESENT",
    "DOWN",
    "LOWERLAYERDOWN",
    "TESTING",
    "DORMANT",
    "UP",
)

# net/if.h IFF_*, in the order iproute2's print_link_flags prints them.
IFF_UP = 0x1
IFF_RUNNING = 0x40
LINK_FLAGS: tuple[tuple[int, str], ...] = (
    (0x8, "LOOPBACK"),
    (0x2, "BROADCAST"),
    (0x10, "POINTOPOINT"),
    (0x1000, "MULTICAST"),
    (0x80, "NOARP"),
    (0x200, "ALLMULTI"),
    (0x100, "PROMISC"),
    (0x400, "MASTER"),
    (0x800, "SLAVE"),
    (0x4, "DEBUG"),
    (0x8000, "DYNAMIC"),
    (0x4000, "AUTOMEDIA"),
    (0x2000, "PORTSEL"),
    (0x20, "NOTRAILERS"),
    (0x1, "UP"),
    (0x10000, "LOWER_UP"),
    (0x20000, "DORMANT"),
    (0x40000, "ECHO"),
)

# --- addresses (if_addr.h) ----------------------------------------------------------------

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
IFA_BROADCAST = 4
IFA_FLAGS = 8

IFA_F_SECONDARY = 0x01
ADDR_FLAGS: tuple[tuple[int, str], ...] = (
    (0x01, "secondary"),  # "temporary" for IPv6 (same bit)
    (0x02, "nodad"),
    (0x04, "optimistic"),
    (0x08, "dadfailed"),
    (0x10, "home"),
    (0x20, "deprecated"),
    (0x40, "tentative"),
    (0x80, "permanent"),
    (0x100, "mngtmpaddr"),
    (0x200, "noprefixroute"),
    (0x400, "autojoin"),
    (0x800, "stable-privacy"),
)

# --- routes (rtnetlink.h) ---------------------------------------------------------------

RTA_DST = 1
RTA_SRC = 2
RTA_IIF = 3
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_VIA = 18
RTA_PREF = 20
RTA_NH_ID = 30

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255

RTN_UNICAST = 1
ROUTE_TYPES: dict[int, str] = {
    0: "none",
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
    11: "xresolve",
}

# iproute2 6.1 etc/iproute2/rt_protos (what `ip` prints); anything else prints as a number.
ROUTE_PROTOCOLS: dict[int, str] = {
    0: "unspec",
    1: "redirect",
    2: "kernel",
    3: "boot",
    4: "static",
    8: "gated",
    9: "ra",
    10: "mrt",
    11: "zebra",
    12: "bird",
    13: "dnrouted",
    14: "xorp",
    15: "ntk",
    16: "dhcp",
    18: "keepalived",
    42: "babel",
    99: "openr",
    186: "bgp",
    187: "isis",
    188: "ospf",
    189: "rip",
    192: "eigrp",
}

ROUTE_SCOPES: dict[int, str] = {
    0: "universe",
    200: "site",
    253: "link",
    254: "host",
    255: "nowhere",
}
ADDRESS_SCOPES: dict[int, str] = {**ROUTE_SCOPES, 0: "global"}

# rtnh_flags / rtm_flags bits (RTNH_F_*, RTM_F_*)
ROUTE_FLAGS: tuple[tuple[int, str], ...] = (
    (0x1, "dead"),
    (0x2, "pervasive"),
    (0x4, "onlink"),
    (0x8, "offload"),
    (0x10, "linkdown"),
    (0x20, "unresolved"),
    (0x40, "trap"),
    (0x200, "cloned"),
    (0x4000, "rt_offload"),
    (0x8000, "rt_trap"),
    (0x20000000, "rt_offload_failed"),
)
NEXTHOP_FLAGS: tuple[tuple[int, str], ...] = ROUTE_FLAGS[:7]

# --- rules (fib_rules.h) -----------------------------------------------------------------

FRA_DST = 1
FRA_SRC = 2
FRA_IIFNAME = 3
FRA_GOTO = 4
FRA_PRIORITY = 6
FRA_FWMARK = 10
FRA_SUPPRESS_PREFIXLEN = 14
FRA_TABLE = 15
FRA_FWMASK = 16
FRA_OIFNAME = 17
FRA_UID_RANGE = 20
FRA_PROTOCOL = 21
FRA_IP_PROTO = 22
FRA_SPORT_RANGE = 23
FRA_DPORT_RANGE = 24

FIB_RULE_INVERT = 0x2
RULE_ACTIONS: dict[int, str] = {
    0: "unspec",
    1: "to_tbl",
    2: "goto",
    3: "nop",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
}

# --- neighbours (neighbour.h) -------------------------------------------------------------

NDA_DST = 1
NDA_LLADDR = 2
NDA_VLAN = 5
NDA_MASTER = 9
NDA_FLAGS_EXT = 15

NUD_STATES: tuple[tuple[int, str], ...] = (
    (0x01, "INCOMPLETE"),
    (0x02, "REACHABLE"),
    (0x04, "STALE"),
    (0x08, "DELAY"),
    (0x10, "PROBE"),
    (0x20, "FAILED"),
    (0x40, "NOARP"),
    (0x80, "PERMANENT"),
)
NUD_PERMANENT = 0x80
NUD_NOARP = 0x40
NUD_STALE = 0x04
NUD_REACHABLE = 0x02

NEIGH_FLAGS: tuple[tuple[int, str], ...] = (
    (0x01, "use"),
    (0x02, "self"),
    (0x04, "master"),
    (0x08, "proxy"),
    (0x10, "extern_learn"),
    (0x20, "offload"),
    (0x40, "sticky"),
    (0x80, "router"),
)
NEIGH_EXT_FLAGS: tuple[tuple[int, str], ...] = ((0x1, "managed"), (0x2, "locked"))

# --- struct layouts ----------------------------------------------------------------------

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
RTMSG = struct.Struct("=BBBBBBBBI")  # family dst_len src_len tos table protocol scope type flags
FIBRULEHDR = RTMSG  # family dst_len src_len tos table res1 res2 action flags: same layout
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
U8 = struct.Struct("=B")
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")
STATS64_8 = struct.Struct("=8Q")  # first 8 counters of rtnl_link_stats64

RECV_BUFFER = 1 << 20
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_MESSAGES = 4_000_000  # a full IPv4+IPv6 internet table is ~1.2 M routes
DEFAULT_MAX_BYTES = 1 << 30
DUMP_INTR_RETRIES = 3


class NetlinkError(CollectorError):
    """A netlink request failed; ``errno`` is set when the kernel said why."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


# --- pure helpers ------------------------------------------------------------------------


def align4(n: int) -> int:
    """Netlink aligns messages and attributes to 4 bytes (NLMSG_ALIGN / NLA_ALIGN)."""
    return (n + 3) & ~3


def parse_attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """Attributes between ``off`` and ``end`` as {type: payload}; the last of a repeated type wins.

    Stops at a malformed length instead of looping: ``nla_len`` < 4 or past the end.
    """
    attrs: dict[int, bytes] = {}
    unpack = NLATTR.unpack_from
    while off + 4 <= end:
        alen, atype = unpack(data, off)
        if alen < 4 or off + alen > end:
            break
        attrs[atype & NLA_TYPE_MASK] = data[off + 4 : off + alen]
        off += (alen + 3) & ~3
    return attrs


def cstr(value: bytes) -> str:
    """A NUL-terminated netlink string attribute as text."""
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


def u32(value: bytes) -> int:
    return int(U32.unpack_from(value)[0])


def mac(value: bytes) -> str:
    """Link-layer address as ``ip`` prints it (aa:bb:...)."""
    return value.hex(":")


def ip(family: int, value: bytes) -> str:
    """An address of ``family`` (AF_INET/AF_INET6) in its canonical text form."""
    return socket.inet_ntop(family, value)


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


def build_request(msg_type: int, flags: int, seq: int, header: bytes, attrs: bytes = b"") -> bytes:
    """One netlink request: nlmsghdr + family header + attributes."""
    return NLMSGHDR.pack(16 + len(header) + len(attrs), msg_type, flags, seq, 0) + header + attrs


def pack_attr(atype: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    raw = NLATTR.pack(4 + len(payload), atype) + payload
    return raw + b"\0" * (align4(len(raw)) - len(raw))


def split_messages(
    data: bytes | bytearray | memoryview, n: int
) -> list[tuple[int, int, int, bytes]]:
    """Split one datagram into (type, flags, seq, body); raises on a malformed length."""
    out: list[tuple[int, int, int, bytes]] = []
    off = 0
    unpack = NLMSGHDR.unpack_from
    while off + 16 <= n:
        mlen, mtype, mflags, mseq, _pid = unpack(data, off)
        if mlen < 16 or off + mlen > n:
            raise NetlinkError(f"malformed netlink message: length {mlen} at offset {off} of {n}")
        out.append((mtype, mflags, mseq, bytes(data[off + 16 : off + mlen])))
        off += (mlen + 3) & ~3
    return out


def error_of(body: bytes, flags: int = 0) -> tuple[int, str]:
    """(errno, extended-ack text) of an NLMSG_ERROR body; errno 0 is an ACK.

    struct nlmsgerr is the error and the request's nlmsghdr, followed by the
    request's payload unless NLM_F_CAPPED, then TLVs if NLM_F_ACK_TLVS
    (include/uapi/linux/netlink.h, NETLINK_EXT_ACK).
    """
    (err,) = I32.unpack_from(body)
    text = ""
    if flags & NLM_F_ACK_TLVS and len(body) >= 20:
        (orig_len,) = U32.unpack_from(body, 4)
        tlv_off = 4 + 16 if flags & NLM_F_CAPPED else 4 + align4(orig_len)
        msg = parse_attrs(body, tlv_off, len(body)).get(NLMSGERR_ATTR_MSG)
        if msg:
            text = cstr(msg)
    return -err, text


def done_error(body: bytes, flags: int = 0) -> tuple[int, str]:
    """(errno, extended-ack text) of an NLMSG_DONE body: a dump that failed after it started.

    Unlike NLMSG_ERROR, DONE carries the int error and then the TLVs directly
    (net/netlink/af_netlink.c ``netlink_dump_done``).
    """
    if len(body) < 4:
        return 0, ""
    (err,) = I32.unpack_from(body)
    text = ""
    if err < 0 and flags & NLM_F_ACK_TLVS:
        msg = parse_attrs(body, 4, len(body)).get(NLMSGERR_ATTR_MSG)
        if msg:
            text = cstr(msg)
    return -err, text


# --- the socket --------------------------------------------------------------------------


class RtnlSocket:
    """An rtnetlink socket for dumps (and, with groups, for notifications).

    Not thread-safe: use one per thread or per request (they are cheap: ~10 us).
    """

    def __init__(
        self, groups: Iterable[int] = (), *, rcvbuf: int = 0, sock: socket.socket | None = None
    ) -> None:
        """Open, bind and subscribe to ``groups``; ``sock`` injects a ready socket (tests)."""
        if sock is None:
            sock = self._open(groups, rcvbuf)
        self.sock = sock
        self._seq = int(time.monotonic_ns() & 0x7FFFFFFF)
        self._buf = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buf)

    @staticmethod
    def _open(groups: Iterable[int], rcvbuf: int) -> socket.socket:
        try:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
            )
        except OSError as exc:
            raise NetlinkError(
                f"cannot open an rtnetlink socket: {exc.strerror}", exc.errno or 0
            ) from exc
        try:
            sock.bind((0, 0))
            with contextlib.suppress(OSError):  # kernels before 4.12: errors come without text
                sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            if rcvbuf:
                try:  # SO_RCVBUFFORCE ignores rmem_max but needs CAP_NET_ADMIN
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            for group in groups:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
        except OSError as exc:
            sock.close()
            raise NetlinkError(
                f"cannot set up the rtnetlink socket: {exc.strerror}", exc.errno or 0
            ) from exc
        return sock

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_datagram(self, timeout: float | None) -> list[tuple[int, int, int, bytes]]:
        """Read one datagram (one skb) and split it; raises TimeoutError, OSError (ENOBUFS)."""
        self.sock.settimeout(timeout)
        n = self.sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
        if n > len(self._buf):
            raise NetlinkError(
                f"netlink datagram of {n} bytes exceeds the {len(self._buf)}-byte buffer"
            )
        return split_messages(self._view, n)

    def dump(
        self,
        msg_type: int,
        header: bytes,
        attrs: bytes = b"",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> list[bytes]:
        """Bodies of every message the kernel answers to a dump request.

        Redone up to DUMP_INTR_RETRIES times when the kernel flags the dump as
        interrupted (NLM_F_DUMP_INTR); bounded by ``timeout`` overall and by
        message and byte caps.
        """
        deadline = time.monotonic() + timeout
        bodies: list[bytes] = []
        for _attempt in range(DUMP_INTR_RETRIES + 1):
            bodies, interrupted = self._dump_once(
                msg_type, header + attrs, deadline, max_messages=max_messages, max_bytes=max_bytes
            )
            if not interrupted:
                break
        return bodies

    def _dump_once(
        self, msg_type: int, payload: bytes, deadline: float, *, max_messages: int, max_bytes: int
    ) -> tuple[list[bytes], bool]:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        what = f"netlink dump {GET_NAMES.get(msg_type, msg_type)}"
        try:
            self.sock.sendall(build_request(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, payload))
        except OSError as exc:
            raise NetlinkError(f"{what}: send failed: {exc.strerror}", exc.errno or 0) from exc
        bodies: list[bytes] = []
        interrupted = False
        total = 0
        append = bodies.append
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NetlinkError(
                    f"{what}: no end after {len(bodies)} messages (timed out)",
                    errno_mod.ETIMEDOUT,
                )
            try:
                self.sock.settimeout(remaining)
                n = self.sock.recv_into(self._buf, 0, socket.MSG_TRUNC)
            except TimeoutError as exc:
                raise NetlinkError(
                    f"{what}: the kernel did not answer in time", errno_mod.ETIMEDOUT
                ) from exc
            except OSError as exc:
                raise NetlinkError(f"{what}: recv failed: {exc.strerror}", exc.errno or 0) from exc
            if n > len(self._buf):
                raise NetlinkError(f"{what}: datagram of {n} bytes exceeds the buffer")
            total += n
            if total > max_bytes:
                raise NetlinkError(f"{what}: answer exceeds {max_bytes} bytes")
            # Hot loop: inline split_messages and skip the per-message tuple.
            data = bytes(self._view[:n])
            off = 0
            unpack = NLMSGHDR.unpack_from
            while off + 16 <= n:
                mlen, mtype, mflags, mseq, _pid = unpack(data, off)
                if mlen < 16 or off + mlen > n:
                    raise NetlinkError(f"{what}: malformed message length {mlen}")
                if mseq != seq:
                    off += (mlen + 3) & ~3
                    continue  # a late answer to an earlier request
                if mflags & NLM_F_DUMP_INTR:
                    interrupted = True
                if mtype == NLMSG_DONE:
                    if len(bodies) > max_messages:
                        raise NetlinkError(f"{what}: more than {max_messages} messages")
                    err, text = done_error(data[off + 16 : off + mlen], mflags)
                    if err > 0:
                        detail = f" ({text})" if text else ""
                        raise NetlinkError(f"{what}: {os.strerror(err)}{detail}", err)
                    return bodies, interrupted
                if mtype == NLMSG_ERROR:
                    err, text = error_of(data[off + 16 : off + mlen], mflags)
                    detail = f" ({text})" if text else ""
                    raise NetlinkError(f"{what}: {os.strerror(err)}{detail}", err)
                if mtype not in (NLMSG_NOOP, NLMSG_OVERRUN):
                    append(data[off + 16 : off + mlen])
                off += (mlen + 3) & ~3
            if len(bodies) > max_messages:
                raise NetlinkError(f"{what}: more than {max_messages} messages")


# IP protocol numbers as iproute2 names them (its names come from /etc/protocols,
# which an agent image may not have; these are the ones a rule plausibly names).
IP_PROTO_NAMES = {
    1: "icmp",
    2: "igmp",
    4: "ipencap",
    6: "tcp",
    17: "udp",
    41: "ipv6",
    47: "gre",
    50: "esp",
    51: "ah",
    58: "ipv6-icmp",
    89: "ospf",
    103: "pim",
    112: "vrrp",
    132: "sctp",
    136: "udplite",
}


def ip_proto_name(number: int) -> str:
    """``ip rule``'s name for an IP protocol number (``ipproto-N`` when it has none)."""
    return IP_PROTO_NAMES.get(number, f"ipproto-{number}")
