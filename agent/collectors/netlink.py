"""Netlink collectors: links, addresses, rules, routes, neighbours and bridge fdb.

This is the agent's one conversion boundary for rtnetlink: each ``fill_*``
function turns one kernel message body into one proto message, and both the
snapshot collectors below and the event watcher (agent/watch.py) use them, so
an object looks the same in a snapshot and in an event.

What the conversions take care of, because the kernel's message is not what a
reader expects:

- The 8-bit ``rtm_table`` / ``frh.table`` header fields hold only tables
  0..255; a table id above 255 is sent as ``RT_TABLE_COMPAT`` (252) in the
  header and the real id in the 32-bit ``RTA_TABLE`` / ``FRA_TABLE``
  attribute (net/ipv4/fib_semantics.c ``fib_dump_info``), so the attribute
  wins. Meridio's tables 4096/4097 and 5000+ are all above 255.
- Address flags above bit 7 (``IFA_F_NOPREFIXROUTE``, ``IFA_F_MANAGETEMPADDR``,
  ...) exist only in the 32-bit ``IFA_FLAGS`` attribute; ``ifa_flags`` in the
  header is truncated to 8 bits.
- A multipath nexthop carries ``rtnh_hops`` = weight - 1 ("rtnh_hops: Nexthop
  priority", include/uapi/linux/rtnetlink.h); ``ip`` prints hops + 1 as
  ``weight``, and so do we.
- A v4 route can have an IPv6 gateway (``RTA_VIA`` with its own family).
- ``FRA_SUPPRESS_PREFIXLEN`` is a signed 32-bit value (-1: unset) that pyroute2
  decodes unsigned.
- Without IPv6 in the kernel an ``AF_INET6`` dump falls back to the
  ``PF_UNSPEC`` handler and answers with every family
  (net/core/rtnetlink.c ``rtnetlink_rcv_msg``), so dumps keep only the family
  they asked for.

The messages are pyroute2's (agent/rtnl.py): decoded by its message classes
(routes of a dump by a parser hook of its Marshal that yields the same shape).
Names follow iproute2 (see agent/rtnl.py) so a fidelity test can compare with
``ip -j`` / ``bridge -j`` as sets.
"""

from __future__ import annotations

import socket
from typing import Any

from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETLINK, RTM_GETNEIGH, RTM_GETROUTE, RTM_GETRULE
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from meridio_debug.agent import rtnl
from meridio_debug.agent.rtnl import (
    DEFAULT_TIMEOUT,
    Message,
    NetlinkError,
    RtnlSocket,
)
from meridio_debug.protos import agent_pb2 as pb

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
AF_BRIDGE = socket.AF_BRIDGE
AF_UNSPEC = socket.AF_UNSPEC


class IfNames(dict[int, str]):
    """ifindex -> name, filled from link messages, else asked from the kernel (SIOCGIFNAME).

    A name the kernel no longer knows (the link is gone) prints as ``if<N>``
    like ``ip`` does, and is not cached, so a later link message can fill it.
    """

    def __missing__(self, index: int) -> str:
        try:
            name = socket.if_indextoname(index)
        except OSError:
            return f"if{index}"
        self[index] = name
        return name


def _family(af: int) -> int:
    """Proto family: 4 or 6 (0 for anything else)."""
    return 4 if af == AF_INET else 6 if af == AF_INET6 else 0


def _via(value: dict[str, Any] | None) -> str:
    """RTA_VIA as pyroute2 decodes it ({'family', 'addr'})."""
    return str(value.get("addr", "")) if value else ""


# Per-value name tables for the 8-bit header fields (list lookup beats dict.get in the hot path).
_RT_PROTO: tuple[str, ...] = tuple(rtnl.route_protocol_name(i) for i in range(256))
_RT_TYPE: tuple[str, ...] = tuple(rtnl.route_type_name(i) for i in range(256))
_RT_SCOPE: tuple[str, ...] = tuple(rtnl.route_scope_name(i) for i in range(256))
_RT_FLAGS: dict[int, list[str]] = {}


def _route_flags(flags: int) -> list[str]:
    names = _RT_FLAGS.get(flags)
    if names is None:
        names = rtnl.names_of(flags & ~rtnl.RTM_F_NOTIFY, rtnl.ROUTE_FLAGS)
        if len(_RT_FLAGS) < 256:
            _RT_FLAGS[flags] = names
    return names


def _fill_nexthops(out: pb.Route, hops: list[Any], names: IfNames) -> None:
    """RTA_MULTIPATH as pyroute2 decodes it: ``nh`` messages (flags, hops, oif, attributes)."""
    for hop in hops:
        nh = out.nexthops.add()
        gw = hop.get_attr("RTA_GATEWAY") or _via(hop.get_attr("RTA_VIA"))
        if gw:
            nh.gateway = gw
        ifindex = hop["oif"]
        if ifindex:
            nh.index = ifindex
            nh.dev = names[ifindex]
        nh.weight = hop["hops"] + 1
        if hop["flags"]:
            nh.flags.extend(rtnl.names_of(hop["flags"], rtnl.NEXTHOP_FLAGS))


def fill_route(out: pb.Route, msg: Message, names: IfNames) -> None:
    """One RTM_NEWROUTE/RTM_DELROUTE (pyroute2 rtmsg, or the dump hook's FastMessage) into ``out``."""
    get = msg.get_attr
    af = msg["family"]
    out.family = 4 if af == AF_INET else 6 if af == AF_INET6 else 0
    out.table = get("RTA_TABLE") or msg["table"]
    dst = get("RTA_DST")
    dlen = msg["dst_len"]
    out.dst = f"{dst}/{dlen}" if dst and dlen else "default"
    gw = get("RTA_GATEWAY") or _via(get("RTA_VIA"))
    if gw:
        out.gateway = gw
    oif = get("RTA_OIF")
    if oif:
        out.oif = oif
        out.dev = names[oif]
    out.type = _RT_TYPE[msg["type"]]
    out.protocol = _RT_PROTO[msg["proto"]]
    prio = get("RTA_PRIORITY")
    if prio:
        out.metric = prio
    prefsrc = get("RTA_PREFSRC")
    if prefsrc:
        out.prefsrc = prefsrc
    out.scope = _RT_SCOPE[msg["scope"]]
    multipath = get("RTA_MULTIPATH")
    if multipath:
        _fill_nexthops(out, multipath, names)
    flags = msg["flags"]
    if flags:
        route_flags = _route_flags(flags)
        if route_flags:
            out.flags.extend(route_flags)
    if msg["tos"]:
        out.tos = msg["tos"]
    src = get("RTA_SRC")
    if src and msg["src_len"]:
        out.src = f"{src}/{msg['src_len']}"
    iif = get("RTA_IIF")
    if iif:
        out.iif = names[iif]
    pref = get("RTA_PREF")
    if pref is not None:
        out.pref = pref


def fill_rule(out: pb.Rule, msg: Message, names: IfNames) -> None:
    """One RTM_NEWRULE/RTM_DELRULE (pyroute2 fibmsg) into ``out``."""
    del names  # rules name their interfaces themselves (FRA_IIFNAME/FRA_OIFNAME)
    get = msg.get_attr
    out.family = _family(msg["family"])
    value = get("FRA_PRIORITY")
    if value:
        out.priority = value
    value = get("FRA_SRC")
    if value and msg["src_len"]:
        out.src = value
        out.src_len = msg["src_len"]
    value = get("FRA_DST")
    if value and msg["dst_len"]:
        out.dst = value
        out.dst_len = msg["dst_len"]
    value = get("FRA_FWMARK")
    if value is not None:
        out.has_fwmark = True
        out.fwmark = value
        mask = get("FRA_FWMASK")
        out.fwmask = mask if mask is not None else 0xFFFFFFFF
    value = get("FRA_IIFNAME")
    if value:
        out.iif = value
    value = get("FRA_OIFNAME")
    if value:
        out.oif = value
    out.table = get("FRA_TABLE") or msg["table"]
    out.action = rtnl.rule_action_name(msg["action"])
    out.invert = bool(msg["flags"] & rtnl.FIB_RULE_INVERT)
    value = get("FRA_GOTO")
    if value:
        out.goto = value
    value = get("FRA_SUPPRESS_PREFIXLEN")
    if value is None:
        out.suppress_prefixlen = -1
    else:
        out.suppress_prefixlen = value - (1 << 32) if value >= 1 << 31 else value
    out.tos = msg["tos"]
    value = get("FRA_PROTOCOL")
    if value is not None:
        out.protocol = rtnl.route_protocol_name(value)
    value = get("FRA_IP_PROTO")
    if value:
        out.ipproto = rtnl.ip_proto_name(value)
    value = get("FRA_SPORT_RANGE")
    if value:
        out.sport_start, out.sport_end = value["start"], value["end"]
    value = get("FRA_DPORT_RANGE")
    if value:
        out.dport_start, out.dport_end = value["start"], value["end"]
    value = get("FRA_UID_RANGE")
    if value:
        out.has_uid_range = True
        out.uid_start, out.uid_end = value["start"], value["end"]


def fill_address(out: pb.Address, msg: Message, names: IfNames) -> None:
    """One RTM_NEWADDR/RTM_DELADDR (pyroute2 ifaddrmsg) into ``out``."""
    get = msg.get_attr
    af = msg["family"]
    index = msg["index"]
    out.family = _family(af)
    out.index = index
    out.ifname = names[index]
    address = get("IFA_ADDRESS")
    local = get("IFA_LOCAL")
    if address is None:
        address = local
    if address:
        out.address = address
    if local and local != address:
        out.local = local
    out.prefixlen = msg["prefixlen"]
    out.scope = rtnl.address_scope_name(msg["scope"])
    flags = get("IFA_FLAGS") or msg["flags"]
    if flags:
        flag_names = rtnl.names_of(flags, rtnl.ADDR_FLAGS)
        if af == AF_INET6 and flags & rtnl.IFA_F_SECONDARY:
            flag_names[flag_names.index("secondary")] = "temporary"
        out.flags.extend(flag_names)
    value = get("IFA_LABEL")
    if value:
        out.label = value
    value = get("IFA_BROADCAST")
    if value:
        out.broadcast = value


def fill_link(out: pb.Link, msg: Message, names: IfNames) -> None:
    """One RTM_NEWLINK/RTM_DELLINK (pyroute2 ifinfmsg) into ``out``; learns the name."""
    get = msg.get_attr
    index = msg["index"]
    out.index = index
    value = get("IFLA_IFNAME")
    if value:
        out.name = value
        names[index] = value
    out.vlan_id = -1
    info = get("IFLA_LINKINFO")
    if info:
        kind = info.get_attr("IFLA_INFO_KIND")
        if kind:
            out.kind = kind
        slave_kind = info.get_attr("IFLA_INFO_SLAVE_KIND")
        if slave_kind:
            out.slave_kind = slave_kind
        data = info.get_attr("IFLA_INFO_DATA")
        if data and out.kind == "vlan" and hasattr(data, "get_attr"):
            vlan = data.get_attr("IFLA_VLAN_ID")
            if vlan is not None:
                out.vlan_id = vlan
    out.state = get("IFLA_OPERSTATE") or "UNKNOWN"
    out.flags.extend(rtnl.link_flag_names(msg["flags"]))
    value = get("IFLA_MTU")
    if value:
        out.mtu = value
    value = get("IFLA_ADDRESS")
    if value:
        out.mac = value
    value = get("IFLA_MASTER")
    if value:
        out.master_index = value
        out.master = names[value]
    stats = get("IFLA_STATS64")
    if stats:
        s = out.stats
        for key in ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors",
                    "tx_errors", "rx_dropped", "tx_dropped"):  # fmt: skip
            setattr(s, key, stats[key])
    value = get("IFLA_LINK")
    if value:
        out.link_index = value
    value = get("IFLA_LINK_NETNSID")
    out.link_netnsid = value if value is not None else -1
    value = get("IFLA_IFALIAS")
    if value:
        out.alias = value


def _neigh_flags(msg: Message) -> list[str]:
    flags = msg["flags"]
    out = rtnl.names_of(flags, rtnl.NEIGH_FLAGS) if flags else []
    ext = msg.get_attr("NDA_FLAGS_EXT")
    if ext:
        out += rtnl.names_of(ext, rtnl.NEIGH_EXT_FLAGS)
    return out


def fill_neighbour(out: pb.Neighbour, msg: Message, names: IfNames) -> None:
    """One RTM_NEWNEIGH/RTM_DELNEIGH (pyroute2 ndmsg) of an IP neighbour into ``out``."""
    ifindex = msg["ifindex"]
    out.family = _family(msg["family"])
    out.index = ifindex
    out.ifname = names[ifindex]
    value = msg.get_attr("NDA_DST")
    if value:
        out.dst = value
    value = msg.get_attr("NDA_LLADDR")
    if value:
        out.lladdr = value
    out.state = rtnl.nud_state_name(msg["state"])
    flag_names = _neigh_flags(msg)
    if flag_names:
        out.flags.extend(flag_names)


def fdb_state_name(state: int) -> str:
    """FDB entry state like bridge(8): permanent, static, stale, else reachable (dynamic)."""
    if state & rtnl.NUD_PERMANENT:
        return "permanent"
    if state & rtnl.NUD_NOARP:
        return "static"
    if state & rtnl.NUD_STALE:
        return "stale"
    if state & rtnl.NUD_REACHABLE or state == 0:
        return "reachable"
    return rtnl.nud_state_name(state).lower()


def fill_fdb(out: pb.FdbEntry, msg: Message, names: IfNames) -> None:
    """One AF_BRIDGE RTM_NEWNEIGH/RTM_DELNEIGH (a forwarding database entry) into ``out``."""
    get = msg.get_attr
    ifindex = msg["ifindex"]
    value = get("NDA_LLADDR")
    if value:
        out.mac = value
    out.index = ifindex
    out.ifname = names[ifindex]
    value = get("NDA_MASTER")
    if value:
        out.master = names[value]
    value = get("NDA_VLAN")
    out.vlan = value if value is not None else -1
    out.state = fdb_state_name(msg["state"])
    flag_names = _neigh_flags(msg)
    if flag_names:
        out.flags.extend(flag_names)
    value = get("NDA_DST")
    if value:
        out.dst = value


# --- collectors ---------------------------------------------------------------------------


class _NetlinkCollector:
    """Shared plumbing: bounded dumps on the thread's rtnetlink socket, through the fast hooks.

    Links keep pyroute2's own class (nested link info, stats); the other sections go
    through rtnl.FastParser, checked equal to pyroute2's decode in the unit tests.
    """

    name = ""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout

    def available(self) -> tuple[bool, str]:
        try:
            RtnlSocket().close()
        except NetlinkError as exc:
            return False, str(exc)
        return True, "rtnetlink (pyroute2)"

    def _dump(self, msg_type: int, request: Any, family: int, fast: bool = True) -> list[Message]:
        """Dump answers, keeping only ``family`` (AF_UNSPEC: all) -- see the module docstring.

        On this thread's reused socket; ``fast``: through the parser hooks (rtnl.FastParser).
        """
        request["family"] = family
        try:
            answers = rtnl.thread_socket().dump(request, msg_type, fast=fast, timeout=self.timeout)
        except NetlinkError:
            rtnl.discard_thread_socket()
            raise
        if family == AF_UNSPEC:
            return answers
        return [msg for msg in answers if msg["family"] == family]


class LinksCollector(_NetlinkCollector):
    """Section ``links``: every interface (RTM_GETLINK dump)."""

    name = "links"

    def collect(self, snap: pb.Snapshot) -> None:
        names = IfNames()
        links = self._dump(RTM_GETLINK, ifinfmsg(), AF_UNSPEC, fast=False)
        # Learn every name first: a bridge port can come before its master.
        for msg in links:
            name = msg.get_attr("IFLA_IFNAME")
            if name:
                names[msg["index"]] = name
        add = snap.links.add
        for msg in links:
            fill_link(add(), msg, names)


class AddressesCollector(_NetlinkCollector):
    """Section ``addresses``: IPv4 and IPv6 addresses (one AF_UNSPEC RTM_GETADDR dump)."""

    name = "addresses"

    def collect(self, snap: pb.Snapshot) -> None:
        names = IfNames()
        answers = self._dump(RTM_GETADDR, ifaddrmsg(), AF_UNSPEC)
        add = snap.addresses.add
        for msg in answers:
            if msg["family"] in (AF_INET, AF_INET6):
                fill_address(add(), msg, names)


class RulesCollector(_NetlinkCollector):
    """Section ``rules``: every IPv4 and IPv6 policy-routing rule."""

    name = "rules"

    def collect(self, snap: pb.Snapshot) -> None:
        names = IfNames()
        add = snap.rules.add
        for family in (AF_INET, AF_INET6):
            for msg in self._dump(RTM_GETRULE, fibmsg(), family):
                fill_rule(add(), msg, names)


class RoutesCollector(_NetlinkCollector):
    """Section ``routes``: IPv4 and IPv6 routes of all tables (rtm_table 0 = RT_TABLE_UNSPEC).

    The hot path of a snapshot (thousands of routes on a large LB).
    """

    name = "routes"

    def collect(self, snap: pb.Snapshot) -> None:
        names = IfNames()
        add = snap.routes.add
        for family in (AF_INET, AF_INET6):
            for msg in self._dump(RTM_GETROUTE, rtmsg(), family):
                fill_route(add(), msg, names)


class NeighboursCollector(_NetlinkCollector):
    """Section ``neighbours``: ARP and NDP entries (one AF_UNSPEC RTM_GETNEIGH dump)."""

    name = "neighbours"

    def collect(self, snap: pb.Snapshot) -> None:
        names = IfNames()
        answers = self._dump(RTM_GETNEIGH, ndmsg(), AF_UNSPEC)
        add = snap.neighbours.add
        for msg in answers:
            if msg["family"] in (AF_INET, AF_INET6):
                fill_neighbour(add(), msg, names)


class FdbCollector(_NetlinkCollector):
    """Section ``fdb``: the bridge forwarding database (AF_BRIDGE RTM_GETNEIGH, as ``bridge fdb``).

    Like ``bridge fdb show`` this includes each device's own unicast and
    multicast address entries (flag ``self``), not only learned bridge entries.
    """

    name = "fdb"

    def collect(self, snap: pb.Snapshot) -> None:
        names = IfNames()
        answers = self._dump(RTM_GETNEIGH, ndmsg(), AF_BRIDGE)
        add = snap.fdb.add
        for msg in answers:
            fill_fdb(add(), msg, names)


def netlink_collectors(timeout: float = DEFAULT_TIMEOUT) -> list[_NetlinkCollector]:
    """One of each netlink collector, in snapshot order."""
    return [
        LinksCollector(timeout),
        AddressesCollector(timeout),
        RulesCollector(timeout),
        RoutesCollector(timeout),
        NeighboursCollector(timeout),
        FdbCollector(timeout),
    ]
