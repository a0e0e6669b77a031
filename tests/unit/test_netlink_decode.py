"""Netlink decoding on recorded kernel bytes, the dump loop's limits, and the watcher, without root.

tests/unit/data/netlink/ holds real dumps and notifications recorded in a
namespace (record.py) together with what ``ip -j`` printed for the same
state; the collectors' conversions must agree with iproute2 on those bytes.
Our constants are checked against pyroute2's, our independent oracle.
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


def bodies(dump: str) -> list[bytes]:
    out = []
    for raw in DUMPS[dump]:
        data = bytes.fromhex(raw)
        for mtype, _flags, _seq, body in rtnl.split_messages(data, len(data)):
            if mtype not in (rtnl.NLMSG_DONE, rtnl.NLMSG_ERROR):
                out.append(body)
    return out


def decode(dump: str, fill: Any, cls: Any) -> list[Any]:
    out = []
    ifnames = names()
    for body in bodies(dump):
        msg = cls()
        fill(msg, body, ifnames)
        out.append(msg)
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

    got = decode("routes4", nl.fill_route, pb.Route) + decode("routes6", nl.fill_route, pb.Route)
    want = [theirs(r, 4) for r in IP["routes4"]] + [theirs(r, 6) for r in IP["routes6"]]
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

    got = decode("rules4", nl.fill_rule, pb.Rule) + decode("rules6", nl.fill_rule, pb.Rule)
    want = [theirs(r, 4) for r in IP["rules4"]] + [theirs(r, 6) for r in IP["rules6"]]
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


def test_recorded_events_in_kernel_order() -> None:
    ifnames = names()
    summaries = []
    for raw in EVENTS["datagrams"]:
        data = bytes.fromhex(raw)
        for mtype, _flags, _seq, body in rtnl.split_messages(data, len(data)):
            ev = event_from_message(mtype, body, ifnames, KINDS)
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
    body = bodies("routes4")[0]
    assert event_from_message(rtnl.RTM_NEWROUTE, body, names(), {"rule"}) is None
    assert event_from_message(999, body, names(), KINDS) is None
    fdb_body = bodies("fdb")[0]
    assert event_from_message(rtnl.RTM_NEWNEIGH, fdb_body, names(), {"neighbour"}) is None
    ev = event_from_message(rtnl.RTM_NEWNEIGH, fdb_body, names(), {"fdb"})
    assert ev is not None and ev.kind == "fdb" and ev.neighbour.family == 0


# --- synthetic messages: what this kernel cannot produce ------------------------------------


def attr(atype: int, payload: bytes) -> bytes:
    return rtnl.pack_attr(atype, payload)


def test_table_above_255_comes_from_rta_table() -> None:
    body = rtnl.RTMSG.pack(socket.AF_INET, 24, 0, 0, 252, 12, 0, 1, 0)
    body += attr(rtnl.RTA_TABLE, struct.pack("=I", 5001)) + attr(rtnl.RTA_DST, bytes([10, 1, 2, 0]))
    route = pb.Route()
    nl.fill_route(route, body, RecordedNames())
    assert (route.table, route.dst, route.protocol, route.type) == (
        5001,
        "10.1.2.0/24",
        "bird",
        "unicast",
    )


def test_vlan_id_and_fdb_vlan() -> None:
    info = attr(rtnl.IFLA_INFO_KIND, b"vlan\0") + attr(
        rtnl.IFLA_INFO_DATA | 0x8000, attr(rtnl.IFLA_VLAN_ID, struct.pack("=H", 100))
    )
    body = rtnl.IFINFOMSG.pack(0, 1, 9, 0x1043, 0) + attr(rtnl.IFLA_IFNAME, b"ext-vlan0\0")
    body += attr(rtnl.IFLA_LINKINFO | 0x8000, info) + attr(rtnl.IFLA_OPERSTATE, b"\x06")
    link = pb.Link()
    ifnames = RecordedNames()
    nl.fill_link(link, body, ifnames)
    assert (link.name, link.kind, link.vlan_id, link.state) == ("ext-vlan0", "vlan", 100, "UP")
    assert ifnames[9] == "ext-vlan0"
    fdb = rtnl.NDMSG.pack(socket.AF_BRIDGE, 9, rtnl.NUD_REACHABLE, 0x02, 0)
    fdb += attr(rtnl.NDA_LLADDR, bytes.fromhex("020000000001")) + attr(rtnl.NDA_VLAN, b"\x0a\x00")
    entry = pb.FdbEntry()
    nl.fill_fdb(entry, fdb, ifnames)
    assert (entry.mac, entry.ifname, entry.vlan, entry.state, list(entry.flags)) == (
        "02:00:00:00:00:01", "ext-vlan0", 10, "reachable", ["self"],
    )  # fmt: skip


def test_ipv6_temporary_and_unknown_flag_bits() -> None:
    body = rtnl.IFADDRMSG.pack(socket.AF_INET6, 64, 0, 0, 2)
    body += attr(rtnl.IFA_ADDRESS, socket.inet_pton(socket.AF_INET6, "fd00::5"))
    body += attr(rtnl.IFA_FLAGS, struct.pack("=I", 0x01 | 0x40 | 0x8000))
    address = pb.Address()
    nl.fill_address(address, body, RecordedNames({2: "v1"}))
    assert list(address.flags) == ["temporary", "tentative", "0x8000"]


# --- pure helpers -------------------------------------------------------------------------


def test_parse_attrs_stops_on_malformed_lengths() -> None:
    good = attr(1, b"abcd")
    assert rtnl.parse_attrs(good + struct.pack("=HH", 0, 2), 0, len(good) + 4) == {1: b"abcd"}
    assert rtnl.parse_attrs(good + struct.pack("=HH", 200, 2), 0, len(good) + 4) == {1: b"abcd"}
    assert rtnl.parse_attrs(attr(0x8000 | 7, b"x"), 0, 8) == {7: b"x"}  # NLA_F_NESTED masked


def test_split_messages_rejects_bad_lengths() -> None:
    msg = rtnl.build_request(rtnl.RTM_NEWROUTE, 0, 1, b"x" * 12)
    assert [m[0] for m in rtnl.split_messages(msg + msg, 2 * len(msg))] == [24, 24]
    with pytest.raises(rtnl.NetlinkError, match="malformed"):
        rtnl.split_messages(msg[:20], 20)
    with pytest.raises(rtnl.NetlinkError, match="malformed"):
        rtnl.split_messages(struct.pack("=IHHII", 4, 24, 0, 1, 0), 16)


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


# --- constants against pyroute2 ------------------------------------------------------------


def test_constants_agree_with_pyroute2() -> None:
    pyroute2 = pytest.importorskip("pyroute2.netlink.rtnl")
    from pyroute2.netlink.rtnl import fibmsg, ifaddrmsg, ifinfmsg, ndmsg, rtmsg

    for name in ("LINK", "NEIGH", "IPV4_IFADDR", "IPV4_ROUTE", "IPV4_RULE", "IPV6_IFADDR",
                 "IPV6_ROUTE", "IPV6_RULE"):  # fmt: skip
        assert getattr(rtnl, f"RTNLGRP_{name}") == getattr(pyroute2, f"RTNLGRP_{name}")
    for value in range(1, 12):
        assert rtnl.ROUTE_TYPES[value] == pyroute2.rt_type[value]
    assert {k: v for k, v in rtnl.ROUTE_SCOPES.items()} == {
        k: v for k, v in pyroute2.rt_scope.items() if isinstance(k, int)
    }
    for value, name in pyroute2.rt_proto.items():
        if isinstance(value, int):
            assert rtnl.ROUTE_PROTOCOLS[value] == name
    assert [name for name, *_ in rtmsg.rtmsg.nla_map].index("RTA_TABLE") == rtnl.RTA_TABLE
    for name in (
        "DST",
        "SRC",
        "IIF",
        "OIF",
        "GATEWAY",
        "PRIORITY",
        "PREFSRC",
        "MULTIPATH",
        "VIA",
        "PREF",
    ):
        assert [n for n, *_ in rtmsg.rtmsg.nla_map].index(f"RTA_{name}") == getattr(
            rtnl, f"RTA_{name}"
        )
    fra = {n: i for i, n, *_ in fibmsg.fibmsg.nla_map}
    for name in ("DST", "SRC", "IIFNAME", "GOTO", "PRIORITY", "FWMARK", "SUPPRESS_PREFIXLEN",
                 "TABLE", "FWMASK", "OIFNAME", "PROTOCOL"):  # fmt: skip
        assert fra[f"FRA_{name}"] == getattr(rtnl, f"FRA_{name}")
    for name, value in fibmsg.FR_ACT_NAMES.items():
        assert rtnl.RULE_ACTIONS[value] == name.removeprefix("FR_ACT_").lower()
    ifa = [n for n, *_ in ifaddrmsg.ifaddrmsg.nla_map]
    for name in ("ADDRESS", "LOCAL", "LABEL", "BROADCAST", "FLAGS"):
        assert ifa.index(f"IFA_{name}") == getattr(rtnl, f"IFA_{name}")
    addr_flags = dict((n, m) for m, n in rtnl.ADDR_FLAGS)
    assert addr_flags["nodad"] == ifaddrmsg.IFA_F_NODAD
    assert addr_flags["tentative"] == ifaddrmsg.IFA_F_TENTATIVE
    assert addr_flags["noprefixroute"] == ifaddrmsg.IFA_F_NOPREFIXROUTE
    assert addr_flags["dadfailed"] == ifaddrmsg.IFA_F_DADFAILED
    nda = [n for n, *_ in ndmsg.ndmsg.nla_map]
    for name in ("DST", "LLADDR", "VLAN", "MASTER", "FLAGS_EXT"):
        assert nda.index(f"NDA_{name}") == getattr(rtnl, f"NDA_{name}")
    for mask, name in rtnl.NUD_STATES:
        assert getattr(ndmsg, f"NUD_{name}") == mask
    assert dict((n, m) for m, n in rtnl.NEIGH_FLAGS)["extern_learn"] == ndmsg.NTF_EXT_LEARNED
    ifla = [n for n, *_ in ifinfmsg.ifinfmsg.nla_map]
    for name in ("ADDRESS", "IFNAME", "MTU", "LINK", "MASTER", "OPERSTATE", "LINKINFO",
                 "IFALIAS", "STATS64", "LINK_NETNSID"):  # fmt: skip
        assert ifla.index(f"IFLA_{name}") == getattr(rtnl, f"IFLA_{name}")
    for mask, name in rtnl.LINK_FLAGS:
        assert getattr(ifinfmsg, f"IFF_{name}") == mask


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


def message(mtype: int, body: bytes, flags: int = rtnl.NLM_F_MULTI) -> bytes:
    return rtnl.build_request(mtype, flags, 0, body)


def done(err: int = 0) -> bytes:
    return message(rtnl.NLMSG_DONE, struct.pack("=i", err))


def recorded(dump: str) -> list[bytes]:
    return [bytes.fromhex(raw) for raw in DUMPS[dump]]


def sock_of(kernel: FakeKernel) -> rtnl.RtnlSocket:
    return rtnl.RtnlSocket(sock=kernel)  # type: ignore[arg-type]


def test_dump_reads_every_datagram_until_done() -> None:
    kernel = FakeKernel(recorded("routes4"))
    got = sock_of(kernel).dump(rtnl.RTM_GETROUTE, rtnl.RTMSG.pack(2, 0, 0, 0, 0, 0, 0, 0, 0))
    assert len(got) == len(bodies("routes4")) > 10
    request = kernel.requests[0]
    assert struct.unpack_from("=HH", request, 4) == (rtnl.RTM_GETROUTE, 0x301)


def test_dump_error_names_errno_and_kernel_text() -> None:
    request_copy = rtnl.build_request(rtnl.RTM_GETRULE, 0x301, 0, b"\0" * 12)
    err = struct.pack("=i", -errno.EPERM) + request_copy[:16]
    err += rtnl.pack_attr(rtnl.NLMSGERR_ATTR_MSG, b"not allowed here\0")
    kernel = FakeKernel([message(rtnl.NLMSG_ERROR, err, rtnl.NLM_F_CAPPED | rtnl.NLM_F_ACK_TLVS)])
    with pytest.raises(rtnl.NetlinkError) as caught:
        sock_of(kernel).dump(rtnl.RTM_GETRULE, b"\0" * 12)
    assert caught.value.errno == errno.EPERM
    assert "not allowed here" in str(caught.value)
    assert describe_error(caught.value).startswith("permission denied")


def test_dump_done_with_error() -> None:
    kernel = FakeKernel([done(-errno.EMSGSIZE)])
    with pytest.raises(rtnl.NetlinkError) as caught:
        sock_of(kernel).dump(rtnl.RTM_GETLINK, b"\0" * 16)
    assert caught.value.errno == errno.EMSGSIZE


def test_dump_failure_in_done_carries_the_kernel_text() -> None:
    # Recorded: a strict-checking kernel refusing a route dump header (flags MULTI|ACK_TLVS).
    body = bytes.fromhex(
        "eaffffff32000100496e76616c69642076616c75657320696e2068656164657220666f7220"
        "4649422064756d702072657175657374000000"
    )
    kernel = FakeKernel([message(rtnl.NLMSG_DONE, body, 0x202)])
    with pytest.raises(rtnl.NetlinkError) as caught:
        sock_of(kernel).dump(rtnl.RTM_GETROUTE, b"\0" * 12)
    assert caught.value.errno == errno.EINVAL
    assert str(caught.value) == (
        "netlink dump RTM_GETROUTE (routes): Invalid argument "
        "(Invalid values in header for FIB dump request)"
    )


def test_dump_interrupted_is_redone() -> None:
    body = bodies("rules4")[0]
    interrupted = message(rtnl.RTM_NEWRULE, body, rtnl.NLM_F_MULTI | rtnl.NLM_F_DUMP_INTR) + done()
    clean = message(rtnl.RTM_NEWRULE, body) + message(rtnl.RTM_NEWRULE, body) + done()
    kernel = FakeKernel([interrupted], [clean])
    got = sock_of(kernel).dump(rtnl.RTM_GETRULE, b"\0" * 12)
    assert len(kernel.requests) == 2 and len(got) == 2


def test_dump_skips_answers_to_other_requests() -> None:
    body = bodies("rules4")[0]
    kernel = FakeKernel([message(rtnl.RTM_NEWRULE, body) + done()])
    stale = struct.pack("=IHHII", 16 + len(body), rtnl.RTM_NEWRULE, 2, 12345, 0) + body
    kernel.pending.append(stale)
    sock = sock_of(kernel)
    sock._seq = 12345 - 2  # the stale message answers the request before this one
    assert len(sock.dump(rtnl.RTM_GETRULE, b"\0" * 12)) == 1


def test_dump_never_hangs() -> None:
    silent = FakeKernel([])
    with pytest.raises(rtnl.NetlinkError, match="did not answer") as caught:
        sock_of(silent).dump(rtnl.RTM_GETLINK, b"\0" * 16, timeout=0.2)
    assert caught.value.errno == errno.ETIMEDOUT

    class Chatty(FakeKernel):
        def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
            time.sleep(0.01)
            noop = message(rtnl.NLMSG_NOOP, b"", 0)
            seq = struct.unpack_from("=I", self.requests[-1], 8)[0]
            item = with_seq(noop, seq)
            buf[: len(item)] = item
            return len(item)

    with pytest.raises(rtnl.NetlinkError, match="timed out"):
        sock_of(Chatty()).dump(rtnl.RTM_GETLINK, b"\0" * 16, timeout=0.2)


def test_dump_refuses_truncated_datagrams_and_floods() -> None:
    class Huge(FakeKernel):
        def recv_into(self, buf: bytearray, nbytes: int = 0, flags: int = 0) -> int:
            return len(buf) + 1  # what MSG_TRUNC reports for a datagram larger than buf

    with pytest.raises(rtnl.NetlinkError, match="exceeds the buffer"):
        sock_of(Huge()).dump(rtnl.RTM_GETLINK, b"\0" * 16)
    body = bodies("rules4")[0]
    many = FakeKernel([message(rtnl.RTM_NEWRULE, body) * 20 + done()])
    with pytest.raises(rtnl.NetlinkError, match="more than 10 messages"):
        sock_of(many).dump(rtnl.RTM_GETRULE, b"\0" * 12, max_messages=10)


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
        fake.deliver(message(rtnl.RTM_NEWROUTE, b"\x02\x18", 0))  # a truncated struct rtmsg
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
