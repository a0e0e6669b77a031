"""Record real rtnetlink dumps and notifications for the unit tests (needs root).

    .venv/bin/python tests/unit/data/netlink/record.py

Builds a throw-away namespace with one object of each interesting shape (the
Meridio tables 4096/4097 and fwmark tables, multipath with weights, onlink,
blackhole/unreachable/prohibit/throw, address flags, NUD states, bridge fdb),
then writes next to this file:

- dumps.json   raw datagrams (hex) of each dump our collectors send;
- ip.json      what ``ip -d -j`` / ``bridge -d -j`` printed for the same state;
- events.json  raw datagrams (hex) a multicast listener received while the
               steps in EVENT_STEPS ran, plus the steps.

The unit tests decode these bytes with the collectors' conversions and compare
with ip.json, so decoding is checked on real kernel bytes without root.
Re-record only with a kernel and iproute2 where tests/netns passes.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NS = f"mdt-rec-{os.getpid()}"

SETUP = """
link set lo up
link add v0 address 02:00:00:00:10:00 type veth peer name v1 address 02:00:00:00:10:01
link add br0 address 02:00:00:00:20:00 type bridge
link add p0 address 02:00:00:00:30:00 type veth peer name p0p address 02:00:00:00:30:01
link set p0 master br0
link add vx0 address 02:00:00:00:40:00 type vxlan id 42 dstport 4789 local 10.0.0.1 nolearning
link add mv0 link v0 address 02:00:00:00:50:00 type macvlan mode bridge
link set v0 mtu 1400
link set dev v0 alias uplink
link set v0 up
link set v1 up
link set br0 up
link set p0 up
addr add 10.0.0.1/16 dev v0
addr add 10.0.0.9/16 dev v0
addr add 10.6.6.6/24 brd + dev v0 label v0:lbl
addr add 10.5.5.5/24 dev v0 noprefixroute
addr add 10.7.7.1 peer 10.7.7.2/32 dev v1
addr add fd00::1/64 dev v0 nodad
addr add fd00::7/64 dev v0 nodad preferred_lft 0 valid_lft forever
addr add 172.16.1.1/24 dev br0
addr add fd00:1::1/64 dev br0 nodad
neigh add 10.0.0.50 lladdr 02:00:00:00:00:50 dev v0 nud permanent
neigh add 10.0.0.51 lladdr 02:00:00:00:00:51 dev v0 nud stale
neigh add 10.0.0.53 lladdr 02:00:00:00:00:53 dev v0 nud noarp
neigh add 10.0.0.55 dev v0 nud failed
neigh add fd00::50 lladdr 02:00:00:00:00:60 dev v0 nud stale router
rule add pref 100 from 20.0.0.1 lookup 4096
rule add pref 101 from 20.0.0.1 lookup 4097
rule add fwmark 5001 lookup 5001
rule add fwmark 0x10/0xf0 lookup 5002 pref 12
rule add not to 10.2.0.0/16 lookup 1 pref 11
rule add iif v0 oif v1 blackhole pref 13
rule add tos 0x10 unreachable pref 14
rule add goto 20 pref 15
rule add nop pref 20
rule add lookup main suppress_prefixlength 0 pref 21 proto 99
rule add prohibit pref 22 proto bird
route add 10.1.0.0/24 via 10.0.0.5 dev v0 table 100 proto bird metric 7 src 10.0.0.1
route add default via 169.254.100.150 dev v0 onlink table 4096 proto bird metric 32
route add blackhole default table 4097 metric 4294967295
route add default via 10.0.0.6 dev v0 table 5001
route add default table 1 nexthop via 172.16.1.2 dev br0 weight 3 nexthop via 172.16.1.4 dev br0
route add unreachable 10.9.0.0/16 table 100
route add prohibit 10.8.0.0/16 table 100 proto 200
route add throw 10.7.0.0/16 table 100
route add 10.11.0.0/16 tos 0x10 via 10.0.0.5 table 100
route add 10.12.0.0/16 via inet6 fd00::5 dev v0 table 100
"""
SETUP6 = """
rule add from 2000::1 lookup 4096 pref 100
rule add fwmark 5001 lookup 5001
route add default table 1 nexthop via fd00:1::2 dev br0 weight 2 nexthop via fd00:1::4 dev br0
route add blackhole default table 4097 metric 4294967295
route add fd0a::/64 from fd00:9::/64 via fd00::5 dev v0 table 300
route add default via fd00::6 dev v0 table 5001 pref high
"""
BRIDGE = """
fdb add 02:00:00:00:00:aa dev p0 master static
fdb add 02:00:00:00:00:ab dev p0 master extern_learn
fdb append 00:00:00:00:00:00 dev vx0 dst 10.0.0.77 self permanent
"""
EVENT_STEPS = [
    "route add 10.99.0.0/24 via 10.0.0.5 dev v0 table 777",
    "rule add fwmark 777 lookup 777 pref 777",
    "addr add 10.98.0.1/24 dev v0",
    "neigh add 10.0.0.97 lladdr 02:00:00:00:00:97 dev v0 nud permanent",
    "neigh del 10.0.0.97 dev v0",
    "addr del 10.98.0.1/24 dev v0",
    "rule del pref 777",
    "route del 10.99.0.0/24 table 777",
]

# (name, message type, family header as hex): what the collectors send.
DUMPS = [
    ("links", 18, "00000000" + "00" * 12),
    ("addresses", 22, "00" * 8),
    ("rules4", 34, "02" + "00" * 11),
    ("rules6", 34, "0a" + "00" * 11),
    ("routes4", 26, "02" + "00" * 11),
    ("routes6", 26, "0a" + "00" * 11),
    ("neighbours", 30, "00" * 12),
    ("fdb", 30, "07" + "00" * 11),
]


def record_dumps() -> dict[str, list[str]]:
    """Inside the namespace: raw datagrams of each dump."""
    out: dict[str, list[str]] = {}
    for seq, (name, mtype, header) in enumerate(DUMPS, start=1):
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
        s.bind((0, 0))
        body = bytes.fromhex(header)
        s.send((16 + len(body)).to_bytes(4, "little") + mtype.to_bytes(2, "little")
               + (0x301).to_bytes(2, "little") + seq.to_bytes(4, "little") + bytes(4) + body)  # fmt: skip
        datagrams = []
        done = False
        while not done:
            data = s.recv(1 << 20)
            datagrams.append(data.hex())
            # NLMSG_DONE (3) or NLMSG_ERROR (2) ends the dump
            done = any(
                int.from_bytes(data[o + 4 : o + 6], "little") in (2, 3) for o in _offsets(data)
            )
        s.close()
        out[name] = datagrams
    return out


def _offsets(data: bytes) -> list[int]:
    offs, off = [], 0
    while off + 16 <= len(data):
        offs.append(off)
        off += (int.from_bytes(data[off : off + 4], "little") + 3) & ~3
    return offs


def record_events() -> list[str]:
    """Inside the namespace: join the rtnetlink groups, run EVENT_STEPS, keep the datagrams."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    s.bind((0, 0))
    for group in (1, 3, 5, 7, 8, 9, 11, 19):
        s.setsockopt(270, 1, group)
    for step in EVENT_STEPS:
        subprocess.run(["ip", *step.split()], check=True)
    out = []
    while select.select([s], [], [], 0.5)[0]:
        out.append(s.recv(1 << 20).hex())
    return out


def ip_json(*args: str) -> object:
    return json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    if sys.argv[1:] == ["--inside"]:
        json.dump({"dumps": record_dumps(), "events": record_events()}, sys.stdout)
        return
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        subprocess.run(["ip", "-n", NS, "-batch", "-"], input=SETUP, text=True, check=True)
        subprocess.run(["ip", "-n", NS, "-6", "-batch", "-"], input=SETUP6, text=True, check=True)
        subprocess.run(["bridge", "-n", NS, "-batch", "-"], input=BRIDGE, text=True, check=True)
        time.sleep(0.5)
        ip = {
            "routes4": ip_json("ip", "-n", NS, "-d", "-j", "-4", "route", "show", "table", "all"),
            "routes6": ip_json("ip", "-n", NS, "-d", "-j", "-6", "route", "show", "table", "all"),
            "rules4": ip_json("ip", "-n", NS, "-d", "-j", "-4", "rule", "show"),
            "rules6": ip_json("ip", "-n", NS, "-d", "-j", "-6", "rule", "show"),
            "addresses": ip_json("ip", "-n", NS, "-d", "-j", "addr", "show"),
            "links": ip_json("ip", "-n", NS, "-d", "-j", "link", "show"),
            "neighbours4": ip_json("ip", "-n", NS, "-j", "-4", "neigh", "show", "nud", "all"),
            "neighbours6": ip_json("ip", "-n", NS, "-j", "-6", "neigh", "show", "nud", "all"),
            "fdb": ip_json("bridge", "-n", NS, "-d", "-j", "fdb", "show"),
        }
        inside = subprocess.run(
            ["ip", "netns", "exec", NS, sys.executable, __file__, "--inside"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        recorded = json.loads(inside.stdout)
        (HERE / "dumps.json").write_text(json.dumps(recorded["dumps"], indent=1) + "\n")
        (HERE / "ip.json").write_text(json.dumps(ip, indent=1) + "\n")
        events = {"steps": EVENT_STEPS, "datagrams": recorded["events"]}
        (HERE / "events.json").write_text(json.dumps(events, indent=1) + "\n")
    finally:
        subprocess.run(["ip", "netns", "del", NS], check=False)


if __name__ == "__main__":
    main()
