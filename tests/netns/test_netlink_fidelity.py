"""Our netlink collectors and watcher against iproute2, in a real namespace.

One namespace per module is filled with a few hundred random (seeded) rules
and routes of every shape Meridio and its failures produce, plus links of
several kinds, addresses with DAD states, neighbours in several NUD states and
bridge fdb entries. The collectors run inside the namespace through
``ip netns exec`` (the same code path as the agent: run_collectors on a fresh
Snapshot), and each section is compared with ``ip -d -j`` / ``bridge -j`` as
sets of normalized tuples; a mismatch fails with both sides of the difference.

Neighbour and fdb entries age on kernel timers, so a section that differs is
read again (both sides) up to three times before it fails: a real decoding bug
differs every time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meridio_debug.protos import agent_pb2 as pb

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

SEED = 20240611
NS = f"mdt-fid-{os.getpid()}"
PEER_NS = f"mdt-fidp-{os.getpid()}"
TABLE_NAMES = {"local": 255, "main": 254, "default": 253}

COLLECT = """
import sys
from meridio_debug.agent.collectors import run_collectors
from meridio_debug.agent.collectors.netlink import netlink_collectors
from meridio_debug.agent.collectors.sysctls import SysctlsCollector
from meridio_debug.protos import agent_pb2 as pb
snap = pb.Snapshot()
run_collectors([*netlink_collectors(), SysctlsCollector()], snap, sys.argv[1:])
sys.stdout.buffer.write(snap.SerializeToString())
"""

WATCH = """
import select, sys
from google.protobuf import json_format
from meridio_debug.agent.watch import NetlinkWatcher
watcher = NetlinkWatcher(set(sys.argv[1:]))
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    for event in watcher.events(0.1):
        print(json_format.MessageToJson(event, indent=None), flush=True)
watcher.close()
"""

SLOW_WATCH = """
import select, sys
from google.protobuf import json_format
from meridio_debug.agent.watch import NetlinkWatcher
watcher = NetlinkWatcher({"route"}, rcvbuf=4096)  # tiny queue: overflows on a burst
print("ready", flush=True)
sys.stdin.readline()  # "go": start reading only after the burst
while not select.select([sys.stdin], [], [], 0)[0]:
    for event in watcher.events(0.1):
        print(json_format.MessageToJson(event, indent=None), flush=True)
watcher.close()
"""


# --- helpers -------------------------------------------------------------------------------


def run(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ip_json(*args: str) -> Any:
    return json.loads(run("ip", "-n", NS, "-d", "-j", *args) or "[]")


def batch(lines: list[str], *opts: str) -> None:
    """Feed commands to one `ip -batch` (fails on the first bad line, naming it)."""
    run("ip", "-n", NS, *opts, "-batch", "-", stdin="\n".join(lines) + "\n")


def collect(*sections: str) -> pb.Snapshot:
    """Run our collectors inside the namespace, as the agent would."""
    proc = subprocess.run(
        ["ip", "netns", "exec", NS, sys.executable, "-c", COLLECT, *sections],
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    snap = pb.Snapshot.FromString(proc.stdout)
    bad = [f"{s.name}: {s.message}" for s in snap.sections if s.state != pb.SectionStatus.OK]
    assert not bad, f"sections failed: {bad}"
    return snap


def diff(name: str, ours: set[Any], theirs: set[Any]) -> str:
    lines = [f"{name}: ours {len(ours)}, iproute2 {len(theirs)}"]
    lines += [f"  only ours:     {t}" for t in sorted(ours - theirs, key=repr)[:40]]
    lines += [f"  only iproute2: {t}" for t in sorted(theirs - ours, key=repr)[:40]]
    return "\n".join(lines)


def assert_same(
    name: str, read: Callable[[], tuple[set[Any], set[Any]]], attempts: int = 3
) -> None:
    """Compare two sets read together; reread on mismatch (kernel timers move states)."""
    for attempt in range(attempts):
        ours, theirs = read()
        if ours == theirs:
            assert ours, f"{name}: nothing collected"
            return
        if attempt < attempts - 1:
            time.sleep(0.3)
    pytest.fail(diff(name, ours, theirs))


def full_prefix(addr: str, family: int) -> str:
    if addr == "default" or "/" in addr:
        return addr
    return f"{addr}/{32 if family == 4 else 128}"


def table_number(name: str | int) -> int:
    return TABLE_NAMES.get(str(name)) or int(name)


# --- the namespace ----------------------------------------------------------------------------


def random_config(rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(-4 batch lines, -6 batch lines, -6 rule lines): seeded rules and routes of every shape."""
    tables = [
        *rng.sample(range(1, 250), 12),
        256,
        1000,
        4096,
        4097,
        *range(5001, 5011),
        65535,
        100000,
        2**31 + 5,
    ]
    protos = ["", "static", "bird", "kernel", "dhcp", "99", "200", "12", "186"]
    v4: list[str] = []
    v6: list[str] = []
    seen: set[tuple[int, str, int]] = set()

    def v4_gw() -> tuple[str, str]:
        if rng.random() < 0.7:
            return f"10.0.{rng.randint(0, 3)}.{rng.randint(2, 250)}", "v0"
        return f"172.16.1.{rng.randint(2, 250)}", "br0"

    def v6_gw() -> tuple[str, str]:
        if rng.random() < 0.7:
            return f"fd00::{rng.randint(2, 0xFFFF):x}", "v0"
        return f"fd00:1::{rng.randint(2, 0xFFFF):x}", "br0"

    for i in range(360):
        family = 4 if i % 2 == 0 else 6
        table = rng.choice(tables)
        metric = rng.choice([0, 0, 1, 10, 100, 1024, 4294967295])
        if family == 4:
            plen = rng.choice([0, 8, 16, 24, 32])
            net = (10 << 24 | rng.randint(0, 0xFFFFFF)) >> (32 - plen) << (32 - plen) if plen else 0
            dst = (
                "default"
                if plen == 0
                else f"{net >> 24}.{net >> 16 & 255}.{net >> 8 & 255}.{net & 255}/{plen}"
            )
        else:
            plen = rng.choice([0, 48, 64, 128])
            words = [0xFD10, rng.randint(0, 0xFFFF), rng.randint(0, 0xFFFF), rng.randint(0, 0xFFFF)]
            dst = "default" if plen == 0 else ":".join(f"{w:x}" for w in words) + f"::/{plen}"
            if plen == 128:
                dst = ":".join(f"{w:x}" for w in words) + "::1/128"
        if family == 6 and metric == 0:
            metric = 1024  # IPv6 routes always carry a metric; 0 means 1024
        key = (table, dst, metric)
        if key in seen:
            continue
        seen.add(key)
        proto = rng.choice(protos)
        tail = f" table {table}" + (f" metric {metric}" if metric else "")
        tail += f" proto {proto}" if proto else ""
        shape = rng.random()
        gw, dev = v4_gw() if family == 4 else v6_gw()
        if shape < 0.45:
            line = f"route add {dst} via {gw} dev {dev}{tail}"
        elif shape < 0.55:
            line = (
                f"route add {dst} dev {dev} scope link{tail}"
                if family == 4
                else f"route add {dst} dev {dev}{tail}"
            )
        elif shape < 0.62:
            onlink_gw = (
                f"192.0.2.{rng.randint(1, 254)}"
                if family == 4
                else f"2001:db8::{rng.randint(1, 999)}"
            )
            line = f"route add {dst} via {onlink_gw} dev v0 onlink{tail}"
        elif shape < 0.75:
            hops = []
            for _ in range(rng.randint(2, 4)):
                hgw, hdev = v4_gw() if family == 4 else v6_gw()
                weight = rng.choice([1, 1, 2, 3, 10, 100, 256])
                hops.append(f"nexthop via {hgw} dev {hdev} weight {weight}")
            line = f"route add {dst}{tail} " + " ".join(hops)
        elif shape < 0.87:
            rtype = rng.choice(["blackhole", "unreachable", "prohibit", "throw"])
            line = f"route add {rtype} {dst}{tail}"
        elif shape < 0.93 and family == 4:
            line = f"route add {dst} via {gw} dev {dev} src {rng.choice(['10.0.0.1', '172.16.1.1'])}{tail}"
        elif shape < 0.93:
            line = f"route add {dst} from fd00:{rng.randint(2, 99):x}::/64 via {gw} dev {dev}{tail}"
        elif family == 4:
            line = f"route add {dst} tos 0x{rng.choice([4, 8, 12]):02x} via {gw} dev {dev}{tail}"
        else:
            line = f"route add {dst} via {gw} dev {dev} pref {rng.choice(['low', 'high'])}{tail}"
        (v4 if family == 4 else v6).append(line)

    rules4: list[str] = []
    rules6: list[str] = []
    prefs = rng.sample(range(1, 32000), 300)
    for i in range(300):
        family = 4 if i % 2 == 0 else 6
        parts = ["rule add"]
        if rng.random() < 0.1:
            parts.append("not")
        if rng.random() < 0.4:
            if family == 4:
                parts.append(f"from 10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.0/24")
            else:
                parts.append(f"from fd0{rng.randint(0, 9)}:{rng.randint(0, 0xFFFF):x}::/64")
        if rng.random() < 0.25:
            parts.append(f"to 20.{rng.randint(0, 255)}.0.0/16" if family == 4 else "to 2000::/16")
        if rng.random() < 0.4:
            mark = rng.randint(1, 0xFFFF)
            parts.append(
                rng.choice(
                    [f"fwmark {mark}", f"fwmark {mark:#x}/{rng.choice([0xFF, 0xFF00, 0xFFFF]):#x}"]
                )
            )
        if rng.random() < 0.15:
            parts.append(f"iif {rng.choice(['v0', 'br0', 'lo', 'gone0'])}")
        if rng.random() < 0.1:
            parts.append(f"oif {rng.choice(['v1', 'br0'])}")
        if family == 4 and rng.random() < 0.1:
            parts.append(f"tos 0x{rng.choice([4, 8, 12]):02x}")
        if rng.random() < 0.85:
            parts.append(f"pref {prefs[i]}")
        action = rng.random()
        if action < 0.7:
            parts.append(f"lookup {rng.choice(tables)}")
            if rng.random() < 0.1:
                parts.append(f"suppress_prefixlength {rng.choice([0, 8, 32])}")
        elif action < 0.8:
            parts.append(rng.choice(["blackhole", "unreachable", "prohibit"]))
        elif action < 0.85:
            parts.append("nop")
        else:
            parts.append("goto 32766" if rng.random() < 0.5 else "lookup main")
        if rng.random() < 0.2:
            parts.append(f"protocol {rng.choice(['static', 'bird', '99', '200'])}")
        if rng.random() < 0.15:
            proto = rng.choice(
                ["tcp", "udp", "sctp", "gre", "200"] + (["icmp"] if family == 4 else [])
            )
            parts.append(f"ipproto {proto}")
            if proto in ("tcp", "udp", "sctp") and rng.random() < 0.7:
                lo = rng.randint(1, 60000)
                parts.append(f"dport {lo}" if rng.random() < 0.5 else f"sport {lo}-{lo + 99}")
        if rng.random() < 0.05:
            lo = rng.randint(0, 5000)
            parts.append(f"uidrange {lo}-{lo + rng.randint(0, 100)}")
        line = " ".join(parts)
        if "goto" in line and "pref" not in line:
            line += f" pref {prefs[i]}"
        (rules4 if family == 4 else rules6).append(line)
    return v4 + rules4, v6, rules6


LINKS_AND_ADDRESSES = [
    "link set lo up",
    "link add v0 type veth peer name v1",
    "link add br0 type bridge",
    "link add p0 type veth peer name p0p",
    "link add p1 type veth peer name p1p",
    "link add proxy.cond-1 type veth peer name nsm-0",
    "link set p0 master br0",
    "link set p1 master br0",
    "link set proxy.cond-1 master br0",
    "link add vx0 type vxlan id 42 dstport 4789 local 10.0.0.1 nolearning",
    "link add vx6 type vxlan id 43 dstport 4790 local fd00::1 nolearning",
    "link add mv0 link v0 type macvlan mode bridge",
    "link set v0 mtu 1400",
    "link set dev v0 alias uplink-to-gw",
    *(
        f"link set {d} up"
        for d in ("v0", "v1", "br0", "p0", "p0p", "p1", "proxy.cond-1", "nsm-0", "vx0")
    ),
    "addr add 10.0.0.1/16 dev v0",
    "addr add 10.0.0.9/16 dev v0",
    "addr add 10.6.6.6/24 brd + dev v0 label v0:lbl",
    "addr add 10.5.5.5/24 dev v0 noprefixroute",
    "addr add 10.7.7.1 peer 10.7.7.2/32 dev v1",
    "addr add fd00::1/64 dev v0 nodad",
    "addr add fd00::7/64 dev v0 nodad preferred_lft 0 valid_lft forever",
    "addr add 172.16.1.1/24 dev br0",
    "addr add fd00:1::1/64 dev br0 nodad",
    "addr add fd00:9::1/64 dev v0 nodad valid_lft 3600 preferred_lft 1800",
]

NEIGHBOURS_AND_FDB = [
    "neigh add 10.0.0.50 lladdr 02:00:00:00:00:50 dev v0 nud permanent",
    "neigh add 10.0.0.51 lladdr 02:00:00:00:00:51 dev v0 nud stale",
    "neigh add 10.0.0.52 lladdr 02:00:00:00:00:52 dev v0 nud reachable",
    "neigh add 10.0.0.53 lladdr 02:00:00:00:00:53 dev v0 nud noarp",
    "neigh add 10.0.0.54 dev v0 nud incomplete",
    "neigh add 10.0.0.55 dev v0 nud failed",
    "neigh add 172.16.1.2 lladdr 02:00:00:00:01:02 dev br0 nud reachable",
    "neigh add fd00::50 lladdr 02:00:00:00:00:60 dev v0 nud reachable router",
    "neigh add fd00::51 lladdr 02:00:00:00:00:61 dev v0 nud stale extern_learn",
]

BRIDGE_FDB = [
    "fdb add 02:00:00:00:00:aa dev p0 master static",
    "fdb add 02:00:00:00:00:ab dev p0 master extern_learn",
    "fdb add 02:00:00:00:00:ac dev p1 master static sticky",
    "fdb add 02:00:00:00:00:ae dev proxy.cond-1 master",
    "fdb append 00:00:00:00:00:00 dev vx0 dst 10.0.0.77 self permanent",
    "fdb append 00:00:00:00:00:00 dev vx6 dst fd00::77 self permanent",
]

SYSCTLS = {
    "net.ipv4.conf.all.forwarding": "1",
    "net.ipv6.conf.all.forwarding": "1",
    "net.ipv4.fib_multipath_hash_policy": "1",
    "net.ipv6.fib_multipath_hash_policy": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "2",
    "net.ipv4.conf.v0.rp_filter": "1",
    "net.ipv4.fwmark_reflect": "1",
    "net.ipv6.fwmark_reflect": "1",
    "net.ipv4.ip_local_port_range": "49152 65535",
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.all.keep_addr_on_down": "1",
    "net.ipv6.conf.proxy/cond-1.accept_dad": "0",
}


def ip_addr_flags(info: dict[str, Any]) -> frozenset[str]:
    keys = {
        "secondary", "temporary", "nodad", "optimistic", "dadfailed", "home", "deprecated",
        "tentative", "mngtmpaddr", "noprefixroute", "autojoin", "stable-privacy", "dynamic",
    }  # fmt: skip
    return frozenset(k for k in keys if info.get(k))


def wait_for(check: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    for name in (NS, PEER_NS):
        run("ip", "netns", "add", name)
    try:
        v4, v6, rules6 = random_config(random.Random(SEED))
        batch(LINKS_AND_ADDRESSES)
        # a veth whose peer lives in another namespace: IFLA_LINK_NETNSID
        run(
            "ip",
            "-n",
            NS,
            "link",
            "add",
            "out0",
            "type",
            "veth",
            "peer",
            "name",
            "in0",
            "netns",
            PEER_NS,
        )
        run("ip", "-n", NS, "link", "set", "out0", "up")
        for key, value in SYSCTLS.items():
            run("ip", "netns", "exec", NS, "sysctl", "-q", "-w", f"{key}={value}")
        # DAD: a tentative address (DAD kept running for a minute) and a duplicate (dadfailed)
        run("ip", "netns", "exec", NS, "sysctl", "-q", "-w", "net.ipv6.conf.v1.accept_dad=1")
        run("ip", "netns", "exec", NS, "sysctl", "-q", "-w", "net.ipv6.conf.v1.dad_transmits=60")
        batch(["addr add fd00::99/64 dev v1", "addr add fd00::1/64 dev v1"])
        batch(NEIGHBOURS_AND_FDB)
        run("bridge", "-n", NS, "-batch", "-", stdin="\n".join(BRIDGE_FDB) + "\n")
        batch(v4, "-4")
        batch(v6 + rules6, "-6")

        def dadfailed() -> bool:
            infos = [a for link in ip_json("addr", "show", "dev", "v1") for a in link["addr_info"]]
            return any(a.get("dadfailed") for a in infos)

        wait_for(
            dadfailed, 5.0
        )  # not asserted: the comparison below covers whatever state it is in
        yield NS
    finally:
        for name in (NS, PEER_NS):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


# --- comparisons -----------------------------------------------------------------------------


def our_route(r: pb.Route) -> tuple[Any, ...]:
    nexthops = tuple(
        sorted((nh.gateway, nh.dev, nh.weight, tuple(sorted(nh.flags))) for nh in r.nexthops)
    )
    return (
        r.family, r.table, r.type, r.dst, r.gateway, r.dev, r.protocol, r.scope, r.metric,
        r.prefsrc, tuple(sorted(r.flags)), nexthops, r.tos, r.src,
    )  # fmt: skip


def ip_route(r: dict[str, Any], family: int) -> tuple[Any, ...]:
    def gateway(d: dict[str, Any]) -> str:
        return str(d.get("gateway") or d.get("via", {}).get("host", ""))

    nexthops = tuple(
        sorted(
            (
                gateway(nh),
                nh.get("dev", ""),
                nh.get("weight", 1),
                tuple(sorted(nh.get("flags", []))),
            )
            for nh in r.get("nexthops", [])
        )
    )
    scope = r.get("scope", "global")
    tos = r.get("tos", "0")
    return (
        family,
        table_number(r.get("table", "main")),
        r.get("type", "unicast"),
        full_prefix(r["dst"], family),
        gateway(r),
        r.get("dev", ""),
        r.get("protocol", "boot"),
        "universe" if scope == "global" else scope,
        r.get("metric", 0),
        r.get("prefsrc", ""),
        tuple(sorted(r.get("flags", []))),
        nexthops,
        int(tos, 16) if tos.startswith("0x") else int(tos),
        full_prefix(r["from"], family) if "from" in r else "",
    )


def test_routes_all_tables_match_ip(ns: str) -> None:
    def read() -> tuple[set[Any], set[Any]]:
        snap = collect("routes")
        theirs = {ip_route(r, 4) for r in ip_json("-4", "route", "show", "table", "all")}
        theirs |= {ip_route(r, 6) for r in ip_json("-6", "route", "show", "table", "all")}
        return {our_route(r) for r in snap.routes}, theirs

    assert_same("routes", read)
    snap = collect("routes")
    tables = {r.table for r in snap.routes}
    assert {254, 255, 4096, 100000, 2**31 + 5} <= tables
    assert {"blackhole", "unreachable", "prohibit", "throw", "local", "broadcast"} <= {
        r.type for r in snap.routes
    }
    assert any(len(r.nexthops) >= 2 and r.family == 6 for r in snap.routes)
    assert any(nh.weight == 256 for r in snap.routes for nh in r.nexthops)
    assert any("onlink" in r.flags for r in snap.routes)
    assert {"bird", "openr", "200", "dhcp", "bgp"} <= {r.protocol for r in snap.routes}


def our_rule(r: pb.Rule) -> tuple[Any, ...]:
    if r.action == "to_tbl":
        action: tuple[Any, ...] = ("to_tbl", r.table)
    elif r.action == "goto":
        action = ("goto", r.goto)
    else:
        action = (r.action,)
    return (
        r.family,
        r.priority,
        f"{r.src}/{r.src_len}" if r.src else "",
        f"{r.dst}/{r.dst_len}" if r.dst else "",
        r.invert,
        r.tos,
        (r.fwmark, r.fwmask) if r.has_fwmark else None,
        r.iif,
        r.oif,
        action,
        r.suppress_prefixlen,
        r.protocol,
        r.ipproto,
        (r.sport_start, r.sport_end),
        (r.dport_start, r.dport_end),
        (r.uid_start, r.uid_end) if r.has_uid_range else None,
    )


def ip_ports(r: dict[str, Any], name: str) -> tuple[int, int]:
    """ip -j prints a single port as NAME, a range as NAME_start/NAME_end."""
    if name in r:
        return int(r[name]), int(r[name])
    return int(r.get(f"{name}_start", 0)), int(r.get(f"{name}_end", 0))


def ip_rule(r: dict[str, Any], family: int) -> tuple[Any, ...]:
    host = 32 if family == 4 else 128
    src = "" if r["src"] == "all" else f"{r['src']}/{r.get('srclen', host)}"
    dst = f"{r['dst']}/{r.get('dstlen', host)}" if "dst" in r else ""
    if "table" in r:
        action: tuple[Any, ...] = ("to_tbl", table_number(r["table"]))
    elif "goto" in r:
        action = ("goto", r["goto"])
    elif "nop" in r:
        action = ("nop",)
    else:
        action = (r["action"],)
    mark = None
    if "fwmark" in r:
        mark = (int(r["fwmark"], 16), int(r.get("fwmask", "0xffffffff"), 16))
    tos = r.get("tos", "0")
    return (
        family,
        r["priority"],
        src,
        dst,
        "not" in r,
        int(tos, 16) if tos.startswith("0x") else int(tos),
        mark,
        r.get("iif", ""),
        r.get("oif", ""),
        action,
        r.get("suppress_prefixlen", -1),
        r.get("protocol", ""),
        r.get("ipproto", ""),
        ip_ports(r, "sport"),
        ip_ports(r, "dport"),
        (r["uid_start"], r["uid_end"]) if "uid_start" in r else None,
    )


def test_rules_match_ip(ns: str) -> None:
    def read() -> tuple[set[Any], set[Any]]:
        snap = collect("rules")
        theirs = {ip_rule(r, 4) for r in ip_json("-4", "rule", "show")}
        theirs |= {ip_rule(r, 6) for r in ip_json("-6", "rule", "show")}
        ours = [our_rule(r) for r in snap.rules]
        assert len(ours) == len(set(ours)), "duplicate rules"
        return set(ours), theirs

    assert_same("rules", read)
    snap = collect("rules")
    assert len(snap.rules) > 250
    assert any(r.has_fwmark and r.fwmask == 0xFF00 for r in snap.rules)
    assert any(r.invert for r in snap.rules)
    assert {"tcp", "udp", "gre", "ipproto-200"} <= {r.ipproto for r in snap.rules}
    assert any(r.sport_start != r.sport_end for r in snap.rules)
    assert any(r.dport_start and r.dport_start == r.dport_end for r in snap.rules)
    assert any(r.has_uid_range for r in snap.rules)
    assert {"to_tbl", "goto", "nop", "blackhole", "unreachable", "prohibit"} <= {
        r.action for r in snap.rules
    }
    assert any(r.table > 2**31 for r in snap.rules)


def our_address(a: pb.Address) -> tuple[Any, ...]:
    flags = set(a.flags) - {"permanent"}
    if "permanent" not in a.flags:
        flags.add("dynamic")
    local, peer = (a.local, a.address) if a.local else (a.address, "")
    label = a.label if a.family == 4 else ""
    return (
        a.ifname,
        a.family,
        local,
        peer,
        a.prefixlen,
        a.scope,
        frozenset(flags),
        label,
        a.broadcast,
    )


def test_addresses_match_ip(ns: str) -> None:
    def read() -> tuple[set[Any], set[Any]]:
        snap = collect("addresses")
        theirs = set()
        for link in ip_json("addr", "show"):
            for a in link["addr_info"]:
                family = 4 if a["family"] == "inet" else 6
                theirs.add(
                    (
                        link["ifname"], family, a["local"], a.get("address", ""), a["prefixlen"],
                        a["scope"], ip_addr_flags(a), a.get("label", "") if family == 4 else "",
                        a.get("broadcast", ""),
                    )
                )  # fmt: skip
        return {our_address(a) for a in snap.addresses}, theirs

    assert_same("addresses", read)
    snap = collect("addresses")
    by_addr = {a.address: a for a in snap.addresses}
    assert "tentative" in by_addr["fd00::99"].flags
    assert {"nodad", "deprecated"} <= set(by_addr["fd00::7"].flags)
    assert "noprefixroute" in by_addr["10.5.5.5"].flags  # only in the 32-bit IFA_FLAGS
    assert "secondary" in by_addr["10.0.0.9"].flags
    assert "permanent" not in by_addr["fd00:9::1"].flags
    assert by_addr["10.7.7.2"].local == "10.7.7.1"


def test_links_match_ip(ns: str) -> None:
    def read() -> tuple[set[Any], set[Any]]:
        snap = collect("links")
        names = {link.index: link.name for link in snap.links}
        ours = set()
        for link in snap.links:
            if link.link_netnsid >= 0:
                peer: Any = ("index", link.link_index, link.link_netnsid)
            else:
                peer = names.get(link.link_index) if link.link_index else None
            ours.add(
                (
                    link.index, link.name, link.kind, link.slave_kind, frozenset(link.flags),
                    link.mtu, link.state, link.mac, link.master, peer, link.alias,
                )
            )  # fmt: skip
        theirs = set()
        for link in ip_json("link", "show"):
            info = link.get("linkinfo", {})
            if "link_index" in link:
                peer = ("index", link["link_index"], link["link_netnsid"])
            else:
                peer = link.get("link")
            theirs.add(
                (
                    link["ifindex"], link["ifname"], info.get("info_kind", ""),
                    info.get("info_slave_kind", ""), frozenset(link["flags"]) - {"M-DOWN"}, link["mtu"],
                    link["operstate"], link.get("address", ""), link.get("master", ""), peer,
                    link.get("ifalias", ""),
                )
            )  # fmt: skip
        return ours, theirs

    assert_same("links", read)
    snap = collect("links")
    by_name = {link.name: link for link in snap.links}
    assert by_name["p0"].master == "br0" and by_name["p0"].slave_kind == "bridge"
    assert by_name["out0"].link_netnsid >= 0
    assert by_name["v0"].vlan_id == -1
    # counters only grow: ours were read before iproute2's
    theirs = {link["ifname"]: link["stats64"] for link in ip_json("-s", "link", "show")}
    for link in snap.links:
        assert link.stats.rx_packets <= theirs[link.name]["rx"]["packets"]
        assert link.stats.tx_bytes <= theirs[link.name]["tx"]["bytes"]


NEIGH_FLAGS = {"router", "proxy", "extern_learn", "offload", "managed"}


def test_neighbours_match_ip(ns: str) -> None:
    def read() -> tuple[set[Any], set[Any]]:
        snap = collect("neighbours")
        ours = {
            (n.family, n.ifname, n.dst, n.lladdr, n.state, frozenset(set(n.flags) & NEIGH_FLAGS))
            for n in snap.neighbours
        }
        theirs = set()
        for family in (4, 6):
            for n in ip_json(f"-{family}", "neigh", "show", "nud", "all"):
                theirs.add(
                    (
                        family, n["dev"], n["dst"], n.get("lladdr", ""),
                        ",".join(n.get("state", [])) or "NONE", frozenset(NEIGH_FLAGS & set(n)),
                    )
                )  # fmt: skip
        return ours, theirs

    assert_same("neighbours", read)
    states = {n.dst: n.state for n in collect("neighbours").neighbours}
    assert states["10.0.0.50"] == "PERMANENT"
    assert states["10.0.0.53"] == "NOARP"
    assert states["10.0.0.55"] in {"FAILED", "INCOMPLETE"}
    assert {"REACHABLE", "STALE"} & {states["10.0.0.52"]}


def test_fdb_matches_bridge(ns: str) -> None:
    def read() -> tuple[set[Any], set[Any]]:
        snap = collect("fdb")
        ours = {
            (f.mac, f.ifname, f.vlan, f.master, f.state, frozenset(f.flags), f.dst)
            for f in snap.fdb
        }
        out = run("bridge", "-n", ns, "-d", "-j", "fdb", "show")
        theirs = {
            (
                f["mac"], f["ifname"], f.get("vlan", -1), f.get("master", ""),
                f.get("state") or "reachable", frozenset(f.get("flags", [])), f.get("dst", ""),
            )
            for f in json.loads(out)
        }  # fmt: skip
        return ours, theirs

    assert_same("fdb", read)
    fdb = collect("fdb").fdb
    assert any(f.mac == "02:00:00:00:00:ac" and "sticky" in f.flags for f in fdb)
    assert any(f.dst == "fd00::77" for f in fdb)
    assert any(f.ifname == "proxy.cond-1" and f.master == "br0" for f in fdb)


def test_sysctls_read_in_the_namespace(ns: str) -> None:
    got = {s.key: s.value for s in collect("sysctls").sysctls}
    for key, value in SYSCTLS.items():
        assert got.get(key) == value, key
    for key in ("net.ipv4.conf.br0.rp_filter", "net.ipv6.conf.default.accept_dad"):
        live = run("ip", "netns", "exec", ns, "sysctl", "-n", key).strip()
        assert got[key] == live


# --- watch -----------------------------------------------------------------------------------


class Child:
    """A watcher child process in a namespace, read line by line from its raw stdout.

    select() on a buffered pipe file misses lines already in its buffer, so
    lines are split here from os.read() chunks.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.pending = b""

    def line(self, timeout: float) -> str | None:
        """The next line, or None on timeout or end of output."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def events(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
    ) -> list[dict[str, Any]]:
        """Events the child printed, until ``done(events)`` or ``timeout``."""
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not done(events):
            line = self.line(deadline - time.monotonic())
            if line is None:
                break
            events.append(json.loads(line))
        return events

    def stop(self) -> None:
        self.send("stop\n")
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def watcher_in(ns: str, script: str, *args: str) -> Iterator[Child]:
    """A watcher child process in ``ns`` that has subscribed (it printed "ready")."""
    with subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            child = Child(proc)
            assert child.line(30) == "ready", "watcher did not start"
            yield child
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_watch_reports_changes_in_order(ns: str) -> None:
    steps = [
        # onlink: the random rules above may blackhole the gateway check's lookup
        ("route", "new", ["route", "add", "10.99.0.0/24", "via", "10.0.0.5", "dev", "v0", "onlink", "table", "777"]),
        ("rule", "new", ["rule", "add", "fwmark", "777", "lookup", "777", "pref", "777"]),
        ("address", "new", ["addr", "add", "10.98.0.1/24", "dev", "v0"]),
        ("link", "new", ["link", "add", "w0", "type", "veth", "peer", "name", "w1"]),
        ("neighbour", "new", ["neigh", "add", "10.0.0.97", "lladdr", "02:00:00:00:00:97", "dev", "v0", "nud", "permanent"]),
        ("neighbour", "del", ["neigh", "del", "10.0.0.97", "dev", "v0"]),
        ("link", "del", ["link", "del", "w0"]),
        ("address", "del", ["addr", "del", "10.98.0.1/24", "dev", "v0"]),
        ("rule", "del", ["rule", "del", "pref", "777"]),
        ("route", "del", ["route", "del", "10.99.0.0/24", "table", "777"]),
        ("route", "new", ["-6", "route", "add", "fd77::/64", "via", "fd00::5", "dev", "v0", "onlink", "table", "777"]),
        ("rule", "new", ["-6", "rule", "add", "from", "fd77::/64", "lookup", "777", "pref", "778"]),
    ]  # fmt: skip
    wanted = [(kind, action) for kind, action, _ in steps]
    with watcher_in(ns, WATCH, "link", "address", "route", "rule", "neighbour") as child:
        for _kind, _action, cmd in steps:
            run("ip", "-n", ns, *cmd)
        events = child.events(lambda evs: direct_events(evs) == wanted)
        child.stop()
    seqs = [int(e["seq"]) for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(int(e["unixNs"]) > 0 and int(e["monotonicNs"]) > 0 for e in events)
    summary = "\n".join(
        f"{e['seq']} {e.get('kind')} {e.get('action')} {e.get('summary')}" for e in events
    )
    assert direct_events(events) == wanted, f"events out of order or missing:\n{summary}"
    route = next(e for e in events if e.get("kind") == "route" and "10.99.0.0/24" in e["summary"])
    assert route["route"]["table"] == 777 and route["route"]["gateway"] == "10.0.0.5"
    assert route["summary"] == "10.99.0.0/24 via 10.0.0.5 dev v0 table 777 onlink"
    rule = next(e for e in events if e.get("kind") == "rule")
    assert rule["rule"]["fwmark"] == 777 and rule["rule"]["table"] == 777
    neigh_del = next(e for e in events if e.get("kind") == "neighbour" and e["action"] == "del")
    assert neigh_del["summary"].startswith("Deleted 10.0.0.97 dev v0")
    assert not any(e.get("overflow") for e in events)


def direct_events(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(kind, action) of the events the steps cause directly, first occurrence of each object.

    The kernel adds follow-ups (a local route for a new address, repeated
    RTM_NEWLINK as a veth pair comes up, a FAILED update before a neighbour
    is deleted); those are not what the steps assert on.
    """
    seen: set[tuple[str, str, str]] = set()
    out: list[tuple[str, str]] = []
    for e in events:
        kind, action = e.get("kind", ""), e.get("action", "")
        if kind == "route" and e["route"].get("table") == 777:
            ident = e["route"]["dst"]
        elif kind == "rule" and e["rule"].get("priority") in (777, 778):
            ident = str(e["rule"]["priority"])
        elif kind == "address" and e["address"].get("address") == "10.98.0.1":
            ident = "10.98.0.1"
        elif kind == "link" and e["link"].get("name") == "w0":
            ident = "w0"
        elif kind == "neighbour" and e["neighbour"].get("dst") == "10.0.0.97":
            ident = "10.0.0.97"
        else:
            continue
        if (kind, action, ident) not in seen:
            seen.add((kind, action, ident))
            out.append((kind, action))
    return out


def test_watch_overflow_is_an_event_and_watching_goes_on(ns: str) -> None:
    burst = [f"route add 10.200.{i // 256}.{i % 256}/32 dev v0 table 778" for i in range(400)]
    with watcher_in(ns, SLOW_WATCH) as child:
        batch(burst)
        child.send("go\n")
        events = child.events(lambda evs: any(e.get("overflow") for e in evs), timeout=5)
        run("ip", "-n", ns, "route", "add", "10.201.0.0/24", "dev", "v0", "table", "778")
        events += child.events(
            lambda evs: any("10.201.0.0/24" in e.get("summary", "") for e in evs)
        )
        child.stop()
    run("ip", "-n", ns, "route", "flush", "table", "778")
    overflow = [e for e in events if e.get("overflow")]
    assert overflow, "no overflow event after a burst into a 4 KiB queue"
    assert "ENOBUFS" in overflow[0]["summary"]
    routes = [e for e in events if e.get("kind") == "route"]
    assert len(routes) < len(burst), "nothing was dropped: the burst was too small"
    seen = "\n".join(f"{e['seq']} {e.get('overflow', '')} {e.get('summary')}" for e in events)
    assert "10.201.0.0/24 dev v0 table 778" in routes[-1]["summary"], seen
