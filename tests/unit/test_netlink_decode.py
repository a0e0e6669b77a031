"""Netlink decoding on recorded kernel bytes, the dump loop's limits, and the watcher, without root.

tests/unit/data/netlink/ holds real dumps and notifications recorded in a
namespace (record.py) together with what ``ip -j`` printed for the same
state; the bytes go through pyroute2's parser (and the dump's fast parser
hook, which must give what pyroute2 gives), and the collectors' conversions
must agree with iproute2.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pytest
from pyroute2.netlink import (
    NLM_F_ACK_TLVS,
    NLM_F_DUMP_INTR,
    NLM_F_MULTI,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
)
from pyroute2.netlink.rtnl import (
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
)
from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from meridio_debug.agent import rtnl
from meridio_debug.agent.collectors import describe_error
from meridio_debug.agent.collectors import netlink as nl
from meridio_debug.agent.collectors.sysctls import SysctlsCollector, sysctl_key
from meridio_debug.agent.watch import KINDS, NetlinkWatcher, event_from_message
from meridio_debug.protos import agent_pb2 as pb

DATA = Path(__file__).parent / "data" / "netlink"
DUMPS: dict[str, list[str]] = json.loads((DATA / "dumps.json").read_text())
IP: dict[str, Any] = json.loads((DATA / "ip.json").read_text())
EVENTS: dict[str, Any] = json.loads((DATA / "events.json").read_text())
TABLES = {"local": 255, "main": 254, "default": 253}


class RecordedNames(nl.IfNames):
    """Names from the recorded link dump; never asks this host's kernel."""

    def __missing__(self, index: int) -> str:
        return f"if{index}"


def names() -> RecordedNames:
    return RecordedNames({link["ifindex"]: link["ifname"] for link in IP["links"]})


def parse(data: bytes, fast: bool = False) -> list[Any]:
    """The messages of a datagram as pyroute2's Marshal decodes them (``fast``: the dump hooks)."""
    return [
        msg
        for msg in rtnl.RtnlMarshal(fast).parse(data)
        if msg["header"]["type"] not in (NLMSG_DONE, NLMSG_ERROR)
    ]


def messages(dump: str, fast: bool = False) -> list[Any]:
    return [msg for raw in DUMPS[dump] for msg in parse(bytes.fromhex(raw), fast)]


def decode(dump: str, fill: Any, cls: Any, fast: bool = False) -> list[Any]:
    out = []
    ifnames = names()
    for msg in messages(dump, fast):
        obj = cls()
        fill(obj, msg, ifnames)
        out.append(obj)
    return out


def prefix(addr: str, family: int) -> str:
    if addr == "default" or "/" in addr:
        return addr
    return f"{addr}/{32 if family == 4 else 128}"


# --- recorded dumps against iproute2 ------------------------------------------------------


def test_routes_decode_like_ip() -> None:
    def ours(r: pb.Route) -> tuple[Any, ...]:
        hops = sorted((h.gateway, h.dev, h.weight, tuple(h.flags)) for h in r.nexthops)
        return (r.family, r.table, r.type, r.dst, r.gateway, r.dev, r.protocol, r.scope,
                r.metric, r.prefsrc, tuple(sorted(r.flags)), tuple(hops), r.tos, r.src)  # fmt: skip

    def theirs(r: dict[str, Any], family: int) -> tuple[Any, ...]:
        def gw(d: dict[str, Any]) -> str:
            return str(d.get("gateway") or d.get("via", {}).get("host", ""))

        hops = sorted(
            (gw(h), h["dev"], h.get("weight", 1), tuple(h.get("flags", [])))
            for h in r.get("nexthops", [])
        )
        table = r.get("table", "main")
        scope = r.get("scope", "global")
        return (
            family, TABLES.get(table) or int(table), r.get("type", "unicast"),
            prefix(r["dst"], family), gw(r), r.get("dev", ""), r.get("protocol", "boot"),
            "universe" if scope == "global" else scope, r.get("metric", 0), r.get("prefsrc", ""),
            tuple(sorted(r.get("flags", []))), tuple(hops), int(r.get("tos", "0x0"), 16),
            prefix(r["from"], family) if "from" in r else "",
        )  # fmt: skip

    want = [theirs(r, 4) for r in IP["routes4"]] + [theirs(r, 6) for r in IP["routes6"]]
    for fast in (False, True):  # pyroute2's rtmsg, and the dump's parser hook
        got = decode("routes4", nl.fill_route, pb.Route, fast)
        got += decode("routes6", nl.fill_route, pb.Route, fast)
        assert sorted(map(ours, got), key=repr) == sorted(want, key=repr)


def test_routes_meridio_shapes() -> None:
    routes = decode("routes4", nl.fill_route, pb.Route) + decode("routes6", nl.fill_route, pb.Route)
    by = {(r.family, r.table, r.dst): r for r in routes}
    egress = by[(4, 4096, "default")]
    assert (egress.gateway, egress.protocol, egress.metric, list(egress.flags)) == (
        "169.254.100.150", "bird", 32, ["onlink"],
    )  # fmt: skip
    drop = by[(4, 4097, "default")]
    assert (drop.type, drop.metric) == ("blackhole", 4294967295)
    proxy = by[(6, 1, "default")]
    assert [(h.gateway, h.dev, h.weight) for h in proxy.nexthops] == [
        ("fd00:1::2", "br0", 2),
        ("fd00:1::4", "br0", 1),
    ]
    assert by[(4, 100, "10.12.0.0/16")].gateway == "fd00::5"  # RTA_VIA
    assert by[(6, 300, "fd0a::/64")].src == "fd00:9::/64"
    assert by[(6, 5001, "default")].pref == 1  # ICMPV6_ROUTER_PREF_HIGH


def test_rules_decode_like_ip() -> None:
    def ours(r: pb.Rule) -> tuple[Any, ...]:
        action = {"to_tbl": ("table", r.table), "goto": ("goto", r.goto)}.get(r.action, (r.action,))
        mark = (r.fwmark, r.fwmask) if r.has_fwmark else None
        return (r.family, r.priority, f"{r.src}/{r.src_len}" if r.src else "",
                f"{r.dst}/{r.dst_len}" if r.dst else "", r.invert, r.tos, mark, r.iif, r.oif,
                action, r.suppress_prefixlen, r.protocol)  # fmt: skip

    def theirs(r: dict[str, Any], family: int) -> tuple[Any, ...]:
        host = 32 if family == 4 else 128
        if "table" in r:
            action: tuple[Any, ...] = ("table", TABLES.get(r["table"]) or int(r["table"]))
        elif "goto" in r:
            action = ("goto", r["goto"])
        else:
            action = ("nop",) if "nop" in r else (r["action"],)
        mark = None
        if "fwmark" in r:
            mark = (int(r["fwmark"], 16), int(r.get("fwmask", "0xffffffff"), 16))
        return (
            family, r["priority"], "" if r["src"] == "all" else f"{r['src']}/{r.get('srclen', host)}",
            f"{r['dst']}/{r.get('dstlen', host)}" if "dst" in r else "", "not" in r,
            int(r.get("tos", "0x0"), 16), mark, r.get("iif", ""), r.get("oif", ""), action,
            r.get("suppress_prefixlen", -1), r.get("protocol", ""),
        )  # fmt: skip

    want = [theirs(r, 4) for r in IP["rules4"]] + [theirs(r, 6) for r in IP["rules6"]]
    for fast in (True, False):  # the dump's parser hook, and pyroute2's fibmsg
        got = decode("rules4", nl.fill_rule, pb.Rule, fast)
        got += decode("rules6", nl.fill_rule, pb.Rule, fast)
        assert sorted(map(ours, got), key=repr) == sorted(want, key=repr)
    fwmark = next(r for r in got if r.table == 5001 and r.family == 4)
    assert (fwmark.fwmark, fwmark.fwmask, fwmark.priority) == (5001, 0xFFFFFFFF, 99)


def test_addresses_decode_like_ip() -> None:
    flag_keys = {"secondary", "temporary", "nodad", "optimistic", "dadfailed", "deprecated",
                 "tentative", "mngtmpaddr", "noprefixroute", "autojoin", "stable-privacy"}  # fmt: skip

    def ours(a: pb.Address) -> tuple[Any, ...]:
        flags = set(a.flags) - {"permanent"} | (set() if "permanent" in a.flags else {"dynamic"})
        local, peer = (a.local, a.address) if a.local else (a.address, "")
        return (a.ifname, a.family, local, peer, a.prefixlen, a.scope, frozenset(flags),
                a.label if a.family == 4 else "", a.broadcast)  # fmt: skip

    want = set()
    for link in IP["addresses"]:
        for a in link["addr_info"]:
            family = 4 if a["family"] == "inet" else 6
            flags = frozenset(k for k in (*flag_keys, "dynamic") if a.get(k))
            want.add((link["ifname"], family, a["local"], a.get("address", ""), a["prefixlen"],
                      a["scope"], flags, a.get("label", "") if family == 4 else "",
                      a.get("broadcast", "")))  # fmt: skip
    got = decode("addresses", nl.fill_address, pb.Address)
    assert {ours(a) for a in got} == want
    by = {a.address: a for a in got}
    assert "noprefixroute" in by["10.5.5.5"].flags  # bit 9: only in IFA_FLAGS
    assert {"nodad", "deprecated", "permanent"} <= set(by["fd00::7"].flags)
    assert by["10.6.6.6"].label == "v0:lbl" and by["10.6.6.6"].broadcast == "10.6.6.255"


def test_links_decode_like_ip() -> None:
    got = decode("links", nl.fill_link, pb.Link)
    by = {link.name: link for link in got}
    for link in IP["links"]:
        ours = by[link["ifname"]]
        info = link.get("linkinfo", {})
        assert (ours.index, ours.kind, ours.slave_kind, ours.mtu, ours.state, ours.mac) == (
            link["ifindex"], info.get("info_kind", ""), info.get("info_slave_kind", ""),
            link["mtu"], link["operstate"], link["address"],
        ), link["ifname"]  # fmt: skip
        assert set(ours.flags) == set(link["flags"]) - {"M-DOWN"}, link["ifname"]
        assert ours.master == link.get("master", ""), link["ifname"]
        assert ours.alias == link.get("ifalias", "")
        if "link" in link:
            assert by[link["link"]].index == ours.link_index
    assert (by["v0"].link_netnsid, by["v0"].vlan_id, by["mv0"].link_index) == (-1, -1, 3)


def test_neighbours_decode_like_ip() -> None:
    shown = {"router", "proxy", "extern_learn", "offload", "managed"}
    got = decode("neighbours", nl.fill_neighbour, pb.Neighbour)
    ours = {(n.family, n.ifname, n.dst, n.lladdr, n.state, frozenset(set(n.flags) & shown))
            for n in got}  # fmt: skip
    want = {
        (family, n["dev"], n["dst"], n.get("lladdr", ""), ",".join(n.get("state", [])) or "NONE",
         frozenset(shown & set(n)))
        for family in (4, 6)
        for n in IP[f"neighbours{family}"]
    }  # fmt: skip
    assert ours == want
    states = {n.dst: n.state for n in got}
    assert (states["10.0.0.50"], states["10.0.0.53"], states["10.0.0.55"]) == (
        "PERMANENT", "NOARP", "FAILED",
    )  # fmt: skip


def test_fdb_decodes_like_bridge() -> None:
    got = decode("fdb", nl.fill_fdb, pb.FdbEntry)
    ours = {(f.mac, f.ifname, f.vlan, f.master, f.state, frozenset(f.flags), f.dst) for f in got}
    want = {
        (f["mac"], f["ifname"], f.get("vlan", -1), f.get("master", ""),
         f.get("state") or "reachable", frozenset(f["flags"]), f.get("dst", ""))
        for f in IP["fdb"]
    }  # fmt: skip
    assert ours == want
    assert any(f.dst == "10.0.0.77" and f.ifname == "vx0" for f in got)


def test_fast_parser_gives_what_pyroute2_gives() -> None:
    """The dump's parser hook yields, for every attribute it decodes, pyroute2's own value."""
    for dump in ("routes4", "routes6", "rules4", "rules6", "addresses", "neighbours", "fdb"):
        for generic, fast in zip(messages(dump), messages(dump, fast=True), strict=True):
            assert {k: generic[k] for k in fast if k != "header"} == {
                k: v for k, v in fast.items() if k != "header"
            }
            for name, value in fast.nla.items():
                if name == "RTA_MULTIPATH":
                    hops = generic.get_attr(name)
                    assert [
                        (h["flags"], h["hops"], h["oif"], [(a[0], a[1]) for a in h["attrs"]])
                        for h in hops
                    ] == [(h["flags"], h["hops"], h["oif"], list(h.nla.items())) for h in value]
                else:
                    assert generic.get_attr(name) == value, (dump, name)


def test_recorded_events_in_kernel_order() -> None:
    ifnames = names()
    summaries = []
    for raw in EVENTS["datagrams"]:
        for msg in parse(bytes.fromhex(raw)):
            ev = event_from_message(msg, ifnames, KINDS)
            assert ev is not None
            summaries.append(f"{ev.kind} {ev.action} {ev.summary}")
    assert summaries[:3] == [
        "route new 10.99.0.0/24 via 10.0.0.5 dev v0 table 777",
        "rule new 777: from all fwmark 0x309 lookup 777",
        "address new 3: v0    inet 10.98.0.1/24 scope global permanent",
    ]
    assert "neighbour new 10.0.0.97 dev v0 lladdr 02:00:00:00:00:97 PERMANENT" in summaries
    assert "neighbour del Deleted 10.0.0.97 dev v0 FAILED" in summaries
    assert summaries[-2:] == [
        "rule del Deleted 777: from all fwmark 0x309 lookup 777",
        "route del Deleted 10.99.0.0/24 via 10.0.0.5 dev v0 table 777",
    ]


def test_event_kinds_filter() -> None:
    route = messages("routes4")[0]
    assert event_from_message(route, names(), {"rule"}) is None
    route["header"]["type"] = 999
    assert event_from_message(route, names(), KINDS) is None
    fdb = messages("fdb")[0]
    assert fdb["header"]["type"] == RTM_NEWNEIGH
    assert event_from_message(fdb, names(), {"neighbour"}) is None
    ev = event_from_message(fdb, names(), {"fdb"})
    assert ev is not None and ev.kind == "fdb" and ev.neighbour.family == 0


# --- synthetic messages: what this kernel cannot produce ------------------------------------


def code(msg_class: Any, name: str) -> int:
    """The number pyroute2's ``nla_map`` gives attribute ``name``."""
    for index, entry in enumerate(msg_class.nla_map):
        number, nla_name = (entry[0], entry[1]) if len(entry) == 3 else (index, entry[0])
        if nla_name == name:
            return int(number)
    raise KeyError(name)


def attr(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def message(mtype: int, body: bytes, flags: int = NLM_F_MULTI, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), mtype, flags, seq, 0) + body


def test_table_above_255_comes_from_rta_table() -> None:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, 24, 0, 0, 252, 12, 0, 1, 0)
    body += attr(code(rtmsg, "RTA_TABLE"), struct.pack("=I", 5001))
    body += attr(code(rtmsg, "RTA_DST"), bytes([10, 1, 2, 0]))
    for fast in (False, True):
        route = pb.Route()
        nl.fill_route(route, parse(message(RTM_NEWROUTE, body), fast)[0], RecordedNames())
        assert (route.table, route.dst, route.protocol, route.type) == (
            5001,
            "10.1.2.0/24",
            "bird",
            "unicast",
        )


def test_vlan_id_and_fdb_vlan() -> None:
    vlan_id = 1  # IFLA_VLAN_ID (if_link.h)
    info = attr(code(ifinfmsg.ifinfo, "IFLA_INFO_KIND"), b"vlan\0") + attr(
        code(ifinfmsg.ifinfo, "IFLA_INFO_DATA") | 0x8000, attr(vlan_id, struct.pack("=H", 100))
    )
    body = struct.pack("=BxHiII", 0, 1, 9, 0x1043, 0)
    body += attr(code(ifinfmsg, "IFLA_IFNAME"), b"ext-vlan0\0")
    body += attr(code(ifinfmsg, "IFLA_LINKINFO") | 0x8000, info)
    body += attr(code(ifinfmsg, "IFLA_OPERSTATE"), b"\x06")
    link = pb.Link()
    ifnames = RecordedNames()
    nl.fill_link(link, parse(message(RTM_NEWLINK, body))[0], ifnames)
    assert (link.name, link.kind, link.vlan_id, link.state) == ("ext-vlan0", "vlan", 100, "UP")
    assert ifnames[9] == "ext-vlan0"
    fdb = struct.pack("=BxxxiHBB", socket.AF_BRIDGE, 9, rtnl.NUD_REACHABLE, 0x02, 0)
    fdb += attr(code(ndmsg, "NDA_LLADDR"), bytes.fromhex("020000000001"))
    fdb += attr(code(ndmsg, "NDA_VLAN"), b"\x0a\x00")
    entry = pb.FdbEntry()
    nl.fill_fdb(entry, parse(message(RTM_NEWNEIGH, fdb))[0], ifnames)
    assert (entry.mac, entry.ifname, entry.vlan, entry.state, list(entry.flags)) == (
        "02:00:00:00:00:01", "ext-vlan0", 10, "reachable", ["self"],
    )  # fmt: skip


def test_ipv6_temporary_and_unknown_flag_bits() -> None:
    body = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 2)
    body += attr(code(ifaddrmsg, "IFA_ADDRESS"), socket.inet_pton(socket.AF_INET6, "fd00::5"))
    body += attr(code(ifaddrmsg, "IFA_FLAGS"), struct.pack("=I", 0x01 | 0x40 | 0x8000))
    address = pb.Address()
    nl.fill_address(address, parse(message(20, body))[0], RecordedNames({2: "v1"}))
    assert list(address.flags) == ["temporary", "tentative", "0x8000"]


# --- pure helpers -------------------------------------------------------------------------


def test_fast_parser_stops_on_malformed_lengths() -> None:
    good = attr(code(rtmsg, "RTA_OIF"), struct.pack("=I", 7))
    header = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, 254, 3, 0, 1, 0)
    for tail in (struct.pack("=HH", 0, 2), struct.pack("=HH", 200, 2)):
        msg = parse(message(RTM_NEWROUTE, header + good + tail), fast=True)[0]
        assert msg.nla == {"RTA_OIF": 7}
    nested = attr(code(rtmsg, "RTA_OIF") | 0x8000, struct.pack("=I", 9))  # NLA_F_NESTED masked
    assert parse(message(RTM_NEWROUTE, header + nested), fast=True)[0].nla == {"RTA_OIF": 9}
    truncated = parse(message(RTM_NEWROUTE, b"\x02\x18"), fast=True)[0]  # a 2-byte struct rtmsg
    assert truncated["header"]["undecodable"].startswith("undecodable rtnetlink message type 24")


def test_route_get_attributes_encode_at_the_kernel_numbers() -> None:
    """RTA_IP_PROTO/SPORT/DPORT (27-29, ports big-endian) extend pyroute2's rtmsg."""
    assert messages("routes4")  # rtmsg used first: its compiled table must not leak into ours
    msg = rtnl.RouteGetMessage()
    msg["family"] = socket.AF_INET
    msg["attrs"] = [("RTA_IP_PROTO", 6), ("RTA_SPORT", 40000), ("RTA_DPORT", 4000)]
    msg.encode()
    data = msg.data[28:]
    assert (
        attr(27, b"\x06") + attr(28, struct.pack("!H", 40000)) + attr(29, struct.pack("!H", 4000))
        == data
    )
    assert rtnl.RouteGetMessage.nla_map[16][1] == "RTA_MARK"  # pyroute2's own entries kept


def test_names() -> None:
    assert rtnl.nud_state_name(0) == "NONE"
    assert rtnl.nud_state_name(0x02) == "REACHABLE"
    assert rtnl.nud_state_name(0x0C) == "STALE,DELAY"
    assert rtnl.link_flag_names(0x1 | 0x2 | 0x1000) == [
        "NO-CARRIER",
        "BROADCAST",
        "MULTICAST",
        "UP",
    ]
    assert rtnl.link_flag_names(0x1 | 0x40 | 0x10000) == ["UP", "LOWER_UP"]
    assert rtnl.route_protocol_name(12) == "bird"
    assert rtnl.route_protocol_name(17) == "17"
    assert rtnl.route_scope_name(0) == "universe"
    assert rtnl.address_scope_name(0) == "global"
    assert rtnl.rule_action_name(1) == "to_tbl"
    assert nl.fdb_state_name(rtnl.NUD_NOARP) == "static"
    assert rtnl.names_of(0x5, ((0x1, "a"),)) == ["a", "0x4"]


def test_sysctl_keys_and_reading(tmp_path: Path) -> None:
    assert (
        sysctl_key("ipv4/conf/proxy.cond-97e3/rp_filter")
        == "net.ipv4.conf.proxy/cond-97e3.rp_filter"
    )
    for path, value in {
        "ipv4/ip_local_port_range": "49152\t65535\n",
        "ipv4/conf/all/rp_filter": "0\n",
        "ipv4/conf/default/rp_filter": "1\n",
        "ipv4/conf/nsm.0/rp_filter": "2\n",
        "ipv4/fwmark_reflect": "1\n",
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(value)
    snap = pb.Snapshot()
    SysctlsCollector(str(tmp_path)).collect(snap)
    assert [(s.key, s.value) for s in snap.sysctls] == [
        ("net.ipv4.fwmark_reflect", "1"),
        ("net.ipv4.ip_local_port_range", "49152 65535"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "1"),
        ("net.ipv4.conf.nsm/0.rp_filter", "2"),
    ]


def test_sysctls_nothing_readable_is_an_error(tmp_path: Path) -> None:
    snap = pb.Snapshot()
    with pytest.raises(Exception, match="no network sysctl"):
        SysctlsCollector(str(tmp_path)).collect(snap)


# --- the dump loop against a fake kernel --------------------------------------------------


class FakeKernel:
    """A stand-in for an AF_NETLINK socket: answers each request with scripted datagrams.

    Each script entry is a list of datagrams (bytes whose nlmsg_seq is
    rewritten to the request's) or an exception to raise from recv.
    """

    def __init__(self, *answers: list[bytes] | BaseException) -> None:
        self.answers = deque(answers)
        self.pending: deque[bytes | BaseException] = deque()
        self.requests: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.requests.append(data)
        seq = struct.unpack_from("=I", data, 8)[0]
        answer = self.answers.popleft() if self.answers else []
        if isinstance(answer, BaseException):
            self.pending.append(answer)
            return
        for datagram in answer:
            self.pending.append(with_seq(datagram, seq))

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        if not self.pending:
            raise TimeoutError("timed out")
        item = self.pending.popleft()
        if isinstance(item, BaseException):
            raise item
        buf[: len(item)] = item[: len(buf)]
        return len(item)

    def close(self) -> None:
        pass


def with_seq(datagram: bytes, seq: int) -> bytes:
    out = bytearray(datagram)
    off = 0
    while off + 16 <= len(out):
        struct.pack_into("=I", out, off + 8, seq)
        off += (struct.unpack_from("=I", out, off)[0] + 3) & ~3
    return bytes(out)


def done(err: int = 0) -> bytes:
    return message(NLMSG_DONE, struct.pack("=i", err))


def recorded(dump: str) -> list[bytes]:
    return [bytes.fromhex(raw) for raw in DUMPS[dump]]


def sock_of(kernel: FakeKernel) -> rtnl.RtnlSocket:
    return rtnl.RtnlSocket(sock=kernel)  # type: ignore[arg-type]


def test_dump_reads_every_datagram_until_done() -> None:
    kernel = FakeKernel(recorded("routes4"))
    got = sock_of(kernel).dump(rtmsg(), RTM_GETROUTE)
    assert len(got) == len(messages("routes4")) > 10
    request = kernel.requests[0]
    assert struct.unpack_from("=HH", request, 4) == (RTM_GETROUTE, 0x301)


def test_dump_error_names_errno_and_kernel_text() -> None:
    # Without NETLINK_CAP_ACK the kernel echoes the whole request, then the TLVs.
    request_copy = message(RTM_GETRULE, b"\0" * 12, 0x301)
    err = struct.pack("=i", -errno.EPERM) + request_copy
    err += attr(1, b"not allowed here\0")  # NLMSGERR_ATTR_MSG
    kernel = FakeKernel([message(NLMSG_ERROR, err, NLM_F_ACK_TLVS)])
    with pytest.raises(rtnl.NetlinkError) as caught:
        sock_of(kernel).dump(fibmsg(), RTM_GETRULE)
    assert caught.value.errno == errno.EPERM
    assert "not allowed here" in str(caught.value)
    assert describe_error(caught.value).startswith("permission denied")


def test_dump_done_with_error() -> None:
    kernel = FakeKernel([done(-errno.EMSGSIZE)])
    with pytest.raises(rtnl.NetlinkError) as caught:
        sock_of(kernel).dump(ifinfmsg(), RTM_GETLINK)
    assert caught.value.errno == errno.EMSGSIZE


def test_dump_failure_in_done_carries_the_kernel_text() -> None:
    # Recorded: a strict-checking kernel refusing a route dump header (flags MULTI|ACK_TLVS).
    body = bytes.fromhex(
        "eaffffff32000100496e76616c69642076616c75657320696e2068656164657220666f7220"
        "4649422064756d702072657175657374000000"
    )
    kernel = FakeKernel([message(NLMSG_DONE, body, 0x202)])
    with pytest.raises(rtnl.NetlinkError) as caught:
        sock_of(kernel).dump(rtmsg(), RTM_GETROUTE)
    assert caught.value.errno == errno.EINVAL
    assert str(caught.value) == (
        "netlink dump RTM_GETROUTE (routes): Invalid argument "
        "(Invalid values in header for FIB dump request)"
    )


def rule_body() -> bytes:
    """The body (after nlmsghdr) of the first recorded IPv4 rule."""
    data = bytes.fromhex(DUMPS["rules4"][0])
    return data[16 : struct.unpack_from("=I", data)[0]]


def test_dump_interrupted_is_redone() -> None:
    body = rule_body()
    interrupted = message(RTM_NEWRULE, body, NLM_F_MULTI | NLM_F_DUMP_INTR) + done()
    clean = message(RTM_NEWRULE, body) + message(RTM_NEWRULE, body) + done()
    kernel = FakeKernel([interrupted], [clean])
    got = sock_of(kernel).dump(fibmsg(), RTM_GETRULE)
    assert len(kernel.requests) == 2 and len(got) == 2


def test_dump_skips_answers_to_other_requests() -> None:
    body = rule_body()
    kernel = FakeKernel([message(RTM_NEWRULE, body) + done()])
    stale = struct.pack("=IHHII", 16 + len(body), RTM_NEWRULE, 2, 12345, 0) + body
    kernel.pending.append(stale)
    sock = sock_of(kernel)
    sock._seq = 12345 - 2  # the stale message answers the request before this one
    assert len(sock.dump(fibmsg(), RTM_GETRULE)) == 1


def test_dump_never_hangs() -> None:
    silent = FakeKernel([])
    with pytest.raises(rtnl.NetlinkError, match="did not answer") as caught:
        sock_of(silent).dump(ifinfmsg(), RTM_GETLINK, timeout=0.2)
    assert caught.value.errno == errno.ETIMEDOUT

    class Chatty(FakeKernel):
        def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
            time.sleep(0.01)
            noop = message(NLMSG_NOOP, b"", 0)
            seq = struct.unpack_from("=I", self.requests[-1], 8)[0]
            item = with_seq(noop, seq)
            buf[: len(item)] = item
            return len(item)

    with pytest.raises(rtnl.NetlinkError, match="timed out"):
        sock_of(Chatty()).dump(ifinfmsg(), RTM_GETLINK, timeout=0.2)


def test_dump_refuses_truncated_datagrams_and_floods() -> None:
    class Huge(FakeKernel):
        def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
            return len(buf) + 1  # what MSG_TRUNC reports for a datagram larger than buf

    with pytest.raises(rtnl.NetlinkError, match="exceeds the buffer"):
        sock_of(Huge()).dump(ifinfmsg(), RTM_GETLINK)
    many = FakeKernel([message(RTM_NEWRULE, rule_body()) * 20 + done()])
    with pytest.raises(rtnl.NetlinkError, match="more than 10 messages"):
        sock_of(many).dump(fibmsg(), RTM_GETRULE, max_messages=10)


def test_collector_errors_become_sections() -> None:
    """A netlink failure is an ERROR section with the kernel's reason, not an exception."""
    from meridio_debug.agent.collectors import run_collectors

    class Failing(nl.RulesCollector):
        def collect(self, snap: pb.Snapshot) -> None:
            raise rtnl.NetlinkError("netlink dump (type 34): Operation not permitted", errno.EPERM)

    snap = pb.Snapshot()
    run_collectors([Failing()], snap)
    assert snap.sections[0].state == pb.SectionStatus.ERROR
    assert "permission denied" in snap.sections[0].message


# --- the watcher ------------------------------------------------------------------------------


class FakeMulticast:
    """A multicast socket stand-in: readable through a real socketpair, scripted recv results."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.script: deque[bytes | BaseException] = deque()

    def deliver(self, item: bytes | BaseException) -> None:
        self.script.append(item)
        self.theirs.send(b"!")

    def settimeout(self, timeout: float | None) -> None:
        pass

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return self.ours.fileno()

    def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
        self.ours.recv(1)  # raises BlockingIOError when nothing was delivered
        item = self.script.popleft()
        if isinstance(item, BaseException):
            raise item
        buf[: len(item)] = item
        return len(item)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def test_watcher_reports_overflow_and_goes_on() -> None:
    fake = FakeMulticast()
    datagrams = [bytes.fromhex(raw) for raw in EVENTS["datagrams"]]
    with NetlinkWatcher(KINDS, sock=rtnl.RtnlSocket(sock=fake)) as watcher:  # type: ignore[arg-type]
        fake.deliver(datagrams[0])
        fake.deliver(OSError(errno.ENOBUFS, "No buffer space available"))
        fake.deliver(datagrams[1])
        events = list(watcher.events(1.0))
        assert list(watcher.events(0.05)) == []
    assert [(e.seq, e.kind, e.overflow) for e in events] == [
        (1, "route", False),
        (2, "", True),
        (3, "rule", False),
    ]
    assert "ENOBUFS" in events[1].summary
    assert events[0].unix_ns > 0 and events[0].monotonic_ns > 0
    assert watcher.closed and list(watcher.events(0.05)) == []


def test_watcher_survives_an_undecodable_message() -> None:
    fake = FakeMulticast()
    with NetlinkWatcher(KINDS, sock=rtnl.RtnlSocket(sock=fake)) as watcher:  # type: ignore[arg-type]
        fake.deliver(message(RTM_NEWROUTE, b"\x02\x18", 0))  # a truncated struct rtmsg
        fake.deliver(bytes.fromhex(EVENTS["datagrams"][0]))
        events = list(watcher.events(1.0))
    assert events[0].kind == "route"
    assert events[0].summary.startswith("undecodable rtnetlink message type 24")
    # the device name is resolved on this host (the recording's ifindex), so not compared
    assert events[1].summary.startswith("10.99.0.0/24 via 10.0.0.5 dev ")


def test_watcher_close_unblocks_a_reader() -> None:
    watcher = NetlinkWatcher({"route"})  # real rtnetlink listener: no privilege needed
    result: list[list[pb.Event]] = []
    reader = threading.Thread(target=lambda: result.append(list(watcher.events(60.0))))
    reader.start()
    time.sleep(0.1)
    watcher.close()
    reader.join(timeout=5)
    assert not reader.is_alive(), "close() did not wake the reader"
    assert result == [[]]
    watcher.close()  # idempotent


def test_watcher_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown event kind"):
        NetlinkWatcher({"routes"})


def test_request_returns_the_answer_or_the_kernels_reason() -> None:
    """RouteGet's path: one request, one answer (or the errno and extended-ack text)."""
    data = bytes.fromhex(DUMPS["routes4"][0])
    route = data[: struct.unpack_from("=I", data)[0]]
    kernel = FakeKernel([route])
    answers = sock_of(kernel).request(
        rtnl.RouteGetMessage(), RTM_GETROUTE, 1, timeout=1.0, what="route get"
    )
    assert [a["header"]["type"] for a in answers] == [RTM_NEWROUTE]
    unreachable = struct.pack("=i", -errno.ENETUNREACH) + message(RTM_GETROUTE, b"\0" * 12, 1)
    kernel = FakeKernel([message(NLMSG_ERROR, unreachable + attr(1, b"no route\0"), 0x200)])
    with pytest.raises(
        rtnl.NetlinkError, match=r"^route get: Network is unreachable \(no route\)$"
    ):
        sock_of(kernel).request(rtmsg(), RTM_GETROUTE, 1, timeout=1.0, what="route get")
    with pytest.raises(rtnl.NetlinkError, match="did not answer"):
        sock_of(FakeKernel([])).request(rtmsg(), RTM_GETROUTE, 1, timeout=0.2, what="route get")
