"""The default lab (shared/lab.md) as the domain model: what a healthy trench looks like.

Why a pure builder: analysis must report nothing above info on a fresh lab,
and every rule is tested by breaking this state in one place. Names and
addresses come from the lab's own spec (controller/lab/spec.py, whose tests
pin it to lab.md), so the fixture cannot drift from what ``lab up`` builds;
the kernel's share -- local/main tables, connected routes, link-locals,
default rules, learned fdb entries, sysctls as the agent reads them, the nft
JSON as ``nft -j`` prints it -- is added here the way the kernel would.

``build_lab(lbs, proxies, targets_per_proxy)`` scales like ``lab up`` does;
bench/analysis_bench.py uses it for the 100-target trench.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from meridio_debug.controller.lab.spec import DEFAULT_PREFIX, LabSpec, Pod, build_spec
from meridio_debug.controller.lab.trench_crs import lab_config
from meridio_debug.controller.model import (
    Address,
    BfdSession,
    BirdProtocol,
    FdbEntry,
    Link,
    Neighbour,
    Nexthop,
    NftState,
    PodResult,
    PodSnapshot,
    Process,
    Role,
    Route,
    Rule,
    SectionStatus,
    TrenchConfig,
    TrenchState,
)
from meridio_debug.controller.wire.convert import nft_state_from_json

SECTIONS = (
    "links",
    "addresses",
    "rules",
    "routes",
    "neighbours",
    "fdb",
    "sysctls",
    "nftables",
    "sockets",
    "processes",
    "bird",
    "nfqlb",
)
LOCAL, MAIN, DEFAULT = 255, 254, 253
UP_FLAGS = ("BROADCAST", "MULTICAST", "UP", "LOWER_UP")


def mac_for(pod: str, ifname: str) -> str:
    """A stable locally administered unicast MAC, as the kernel gives veths and bridges."""
    digest = hashlib.sha256(f"{pod}/{ifname}".encode()).digest()
    first = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in (first, *digest[1:6]))


def link_local(mac: str) -> str:
    octets = [int(x, 16) for x in mac.split(":")]
    octets[0] ^= 0x02
    eui = [*octets[:3], 0xFF, 0xFE, *octets[3:]]
    words = [f"{(eui[i] << 8) | eui[i + 1]:x}" for i in range(0, 8, 2)]
    return str(ipaddress.ip_address("fe80::" + ":".join(words)))


class _PodBuilder:
    """Accumulates one namespace's state the way the kernel would present it."""

    def __init__(self, pod: str) -> None:
        self.pod = pod
        self.links: list[Link] = []
        self.addresses: list[Address] = []
        self.routes: list[Route] = []
        self.rules: list[Rule] = []
        self.neighbours: list[Neighbour] = []
        self.fdb: list[FdbEntry] = []
        self.sysctls: dict[str, str] = {}
        self.add_link(
            Link(
                name="lo",
                kind="",
                state="UNKNOWN",
                flags=("LOOPBACK", "UP", "LOWER_UP"),
                mtu=65536,
                mac="00:00:00:00:00:00",
            )
        )
        self.add_address("lo", "127.0.0.1/8", scope="host")
        self.add_address("lo", "::1/128", scope="host")
        for family in (4, 6):
            self.rules.append(Rule(family=family, priority=0, table=LOCAL))
            self.rules.append(Rule(family=family, priority=32766, table=MAIN))
        self.rules.append(Rule(family=4, priority=32767, table=DEFAULT))

    def add_link(self, link: Link) -> Link:
        link = replace(link, index=len(self.links) + 1)
        self.links.append(link)
        if link.name != "lo":
            self.add_address(link.name, f"{link_local(link.mac)}/64", scope="link")
            self.routes.append(
                Route(
                    family=6,
                    table=MAIN,
                    dst="fe80::/64",
                    dev=link.name,
                    protocol="kernel",
                    metric=256,
                )
            )
            self.routes.append(
                Route(
                    family=6,
                    table=LOCAL,
                    dst="ff00::/8",
                    type="multicast",
                    dev=link.name,
                    protocol="kernel",
                    metric=256,
                )
            )
        return link

    def veth(self, name: str, master: str = "") -> Link:
        return self.add_link(
            Link(
                name=name,
                kind="veth",
                state="UP",
                flags=UP_FLAGS,
                mtu=1500,
                mac=mac_for(self.pod, name),
                master=master,
                slave_kind="bridge" if master else "",
            )
        )

    def bridge(self, name: str) -> Link:
        return self.add_link(
            Link(
                name=name,
                kind="bridge",
                state="UP",
                flags=UP_FLAGS,
                mtu=1500,
                mac=mac_for(self.pod, name),
            )
        )

    def add_address(self, ifname: str, cidr: str, scope: str = "global") -> None:
        iface = ipaddress.ip_interface(cidr)
        family = iface.version
        flags: tuple[str, ...] = ("permanent",)
        if family == 6 and scope == "global":
            flags = ("nodad", "permanent")
        self.addresses.append(
            Address(
                family=family,
                ifname=ifname,
                address=str(iface.ip),
                prefixlen=iface.network.prefixlen,
                scope=scope,
                flags=flags,
            )
        )
        if scope == "link":
            self.routes.append(
                Route(
                    family=6,
                    table=LOCAL,
                    dst=f"{iface.ip}/128",
                    type="local",
                    dev=ifname,
                    protocol="kernel",
                    metric=0,
                )
            )
            return
        host = f"{iface.ip}/{32 if family == 4 else 128}"
        self.routes.append(
            Route(
                family=family,
                table=LOCAL,
                dst=host,
                type="local",
                dev=ifname,
                protocol="kernel",
                scope="host",
                prefsrc=str(iface.ip) if family == 4 else "",
            )
        )
        if iface.network.prefixlen == (32 if family == 4 else 128) or scope == "host":
            if family == 4 and ifname == "lo":
                self.routes.append(
                    Route(
                        family=4,
                        table=LOCAL,
                        dst="127.0.0.0/8",
                        type="local",
                        dev="lo",
                        protocol="kernel",
                        scope="host",
                        prefsrc="127.0.0.1",
                    )
                )
            return
        if family == 4:
            self.routes.append(
                Route(
                    family=4,
                    table=MAIN,
                    dst=str(iface.network),
                    dev=ifname,
                    protocol="kernel",
                    scope="link",
                    prefsrc=str(iface.ip),
                )
            )
            self.routes.append(
                Route(
                    family=4,
                    table=LOCAL,
                    dst=f"{iface.network.broadcast_address}/32",
                    type="broadcast",
                    dev=ifname,
                    protocol="kernel",
                    scope="link",
                    prefsrc=str(iface.ip),
                )
            )
        else:
            self.routes.append(
                Route(
                    family=6,
                    table=MAIN,
                    dst=str(iface.network),
                    dev=ifname,
                    protocol="kernel",
                    metric=256,
                )
            )

    def self_fdb(self, link: Link) -> None:
        """The permanent entries ``bridge fdb`` lists for every device."""
        self.fdb.append(
            FdbEntry(mac="33:33:00:00:00:01", ifname=link.name, state="permanent", flags=("self",))
        )
        if link.master:
            self.fdb.append(
                FdbEntry(
                    mac=link.mac,
                    ifname=link.name,
                    master=link.master,
                    vlan=1,
                    state="permanent",
                    flags=("master",),
                )
            )

    def rp_filter_sysctls(self, value: str = "0") -> None:
        for name in ("all", "default", *(lk.name for lk in self.links)):
            self.sysctls[f"net.ipv4.conf.{name.replace('.', '/')}.rp_filter"] = value

    def accept_dad_sysctls(self, all_value: str) -> None:
        self.sysctls["net.ipv6.conf.all.accept_dad"] = all_value
        for name in ("default", *(lk.name for lk in self.links)):
            self.sysctls[f"net.ipv6.conf.{name.replace('.', '/')}.accept_dad"] = "0"

    def snapshot(self, role: Role, spec: LabSpec, **extra: Any) -> PodSnapshot:
        sections = extra.pop("sections")
        return PodSnapshot(
            pod=self.pod,
            role=role,
            netns=f"net:[{4026532000 + len(self.pod)}]",
            taken_unix_ns=1_700_000_000_000_000_000,
            sections=tuple(
                SectionStatus(
                    name=n,
                    state=sections.get(n, "OK"),
                    message=_absent_message(n) if sections.get(n) else "",
                )
                for n in SECTIONS
            ),
            links=tuple(self.links),
            addresses=tuple(self.addresses),
            rules=tuple(sorted(self.rules, key=lambda r: (r.family, r.priority))),
            routes=tuple(self.routes),
            neighbours=tuple(self.neighbours),
            fdb=tuple(self.fdb),
            sysctls=dict(self.sysctls),
            **extra,
        )


def _absent_message(section: str) -> str:
    return {
        "bird": "no bird process in this pod's network namespace",
        "nfqlb": "no nfqlb process in this pod's network namespace",
    }.get(section, "")


def _common_sysctls(b: _PodBuilder) -> None:
    b.sysctls["net.ipv6.conf.all.keep_addr_on_down"] = "1"


def lb_nft_json(spec: LabSpec) -> dict[str, Any]:
    """``nft -j list ruleset`` of an LB after ``lab up`` (render.nft_ruleset)."""
    pairs = [[i, t.fwmark] for i, t in enumerate(spec.targets)]

    def mark_rule(handle: int, proto: str, vip_set: str) -> dict[str, Any]:
        return {
            "rule": {
                "family": "inet",
                "table": "meridio-nfqlb",
                "chain": "nfqlb",
                "handle": handle,
                "expr": [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": proto, "field": "daddr"}},
                            "right": f"@{vip_set}",
                        }
                    },
                    {"counter": {"packets": 0, "bytes": 0}},
                    {
                        "mangle": {
                            "key": {"meta": {"key": "mark"}},
                            "value": {
                                "map": {
                                    "key": {
                                        "jhash": {
                                            "mod": len(pairs),
                                            "seed": spec.hash_seed,
                                            "expr": {
                                                "payload": {"protocol": proto, "field": "saddr"}
                                            },
                                        }
                                    },
                                    "data": {"set": pairs},
                                }
                            },
                        }
                    },
                ],
            }
        }

    iif = f"{spec.conduit}.{spec.trench}"[:10].replace(".", "-")
    return {
        "nftables": [
            {
                "metainfo": {
                    "version": "1.0.6",
                    "release_name": "Lester Gooch #5",
                    "json_schema_version": 1,
                }
            },
            {"table": {"family": "inet", "name": "meridio-nfqlb", "handle": 1}},
            {
                "set": {
                    "family": "inet",
                    "name": "ipv4-vips",
                    "table": "meridio-nfqlb",
                    "type": "ipv4_addr",
                    "handle": 2,
                    "flags": ["interval"],
                    "elem": [spec.vip4],
                }
            },
            {
                "set": {
                    "family": "inet",
                    "name": "ipv6-vips",
                    "table": "meridio-nfqlb",
                    "type": "ipv6_addr",
                    "handle": 3,
                    "flags": ["interval"],
                    "elem": [spec.vip6],
                }
            },
            {
                "chain": {
                    "family": "inet",
                    "table": "meridio-nfqlb",
                    "name": "nfqlb",
                    "handle": 1,
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": 0,
                    "policy": "accept",
                }
            },
            mark_rule(5, "ip", "ipv4-vips"),
            mark_rule(7, "ip6", "ipv6-vips"),
            {"table": {"family": "inet", "name": "meridio-defrag", "handle": 2}},
            {
                "chain": {
                    "family": "inet",
                    "table": "meridio-defrag",
                    "name": "pre-defrag",
                    "handle": 1,
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": -500,
                    "policy": "accept",
                }
            },
            {
                "chain": {
                    "family": "inet",
                    "table": "meridio-defrag",
                    "name": "in",
                    "handle": 2,
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": -300,
                    "policy": "accept",
                }
            },
            {
                "chain": {
                    "family": "inet",
                    "table": "meridio-defrag",
                    "name": "out",
                    "handle": 3,
                    "type": "filter",
                    "hook": "output",
                    "prio": -300,
                    "policy": "accept",
                }
            },
            {
                "rule": {
                    "family": "inet",
                    "table": "meridio-defrag",
                    "chain": "pre-defrag",
                    "handle": 4,
                    "expr": [
                        {
                            "match": {
                                "op": "==",
                                "left": {"meta": {"key": "iifname"}},
                                "right": f"{iif}*",
                            }
                        },
                        {"notrack": None},
                    ],
                }
            },
            {
                "rule": {
                    "family": "inet",
                    "table": "meridio-defrag",
                    "chain": "in",
                    "handle": 5,
                    "expr": [{"notrack": None}],
                }
            },
            {
                "rule": {
                    "family": "inet",
                    "table": "meridio-defrag",
                    "chain": "in",
                    "handle": 6,
                    "expr": [
                        {
                            "match": {
                                "op": "in",
                                "left": {"ct": {"key": "state"}},
                                "right": "untracked",
                            }
                        },
                        {"accept": None},
                    ],
                }
            },
            {
                "rule": {
                    "family": "inet",
                    "table": "meridio-defrag",
                    "chain": "out",
                    "handle": 7,
                    "expr": [{"notrack": None}],
                }
            },
        ]
    }


def _lb(spec: LabSpec, pod: Pod, macs: dict[tuple[str, str], str]) -> PodSnapshot:
    fe = spec.frontend(pod.name)
    gw = spec.gateway
    b = _PodBuilder(pod.name)
    ext = b.veth(fe.ext_ifname)
    b.add_address(ext.name, f"{fe.ipv4}/24")
    b.add_address(ext.name, f"{fe.ipv6}/64")
    b.self_fdb(ext)
    conduit_of_node: dict[str, str] = {}
    for c in fe.conduits:
        link = b.veth(c.ifname)
        b.add_address(link.name, f"{c.ipv4}/24")
        b.add_address(link.name, f"{c.ipv6}/64")
        b.self_fdb(link)
        conduit_of_node[c.node] = link.name
    for family, vip, gw_ip in ((4, spec.vip4, gw.ipv4), (6, spec.vip6, gw.ipv6)):
        host = f"{vip}/{32 if family == 4 else 128}"
        b.rules.append(Rule(family=family, priority=100, table=spec.vip_table, src=host))
        b.rules.append(Rule(family=family, priority=101, table=spec.drop_table, src=host))
        b.routes.append(
            Route(
                family=family,
                table=spec.drop_table,
                dst="default",
                type="blackhole",
                protocol="boot",
                metric=spec.drop_metric,
            )
        )
        b.routes.append(
            Route(
                family=family,
                table=spec.vip_table,
                dst="default",
                gateway=gw_ip,
                dev=ext.name,
                protocol="bird",
                metric=32,
            )
        )
        b.neighbours.append(
            Neighbour(
                family=family,
                ifname=ext.name,
                dst=gw_ip,
                lladdr=macs[("gw", gw.bridge)],
                state="REACHABLE",
            )
        )
        # ip rule add fwmark N lookup N without a priority: 99, 98, ... below the VIP rules.
        for i, t in enumerate(spec.targets):
            via = t.ipv4 if family == 4 else t.ipv6
            dev = conduit_of_node[t.node]
            b.rules.append(
                Rule(
                    family=family,
                    priority=99 - i,
                    table=t.table,
                    fwmark=t.fwmark,
                    fwmask=0xFFFFFFFF,
                    has_fwmark=True,
                )
            )
            b.routes.append(
                Route(
                    family=family,
                    table=t.table,
                    dst="default",
                    gateway=via,
                    dev=dev,
                    protocol="boot",
                    metric=0 if family == 4 else 1024,
                )
            )
            b.neighbours.append(
                Neighbour(
                    family=family,
                    ifname=dev,
                    dst=via,
                    lladdr=macs[(t.pod, t.ifname)],
                    state="REACHABLE",
                )
            )
    _common_sysctls(b)
    b.sysctls.update(
        {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.forwarding": "1",
            "net.ipv6.conf.all.forwarding": "1",
            "net.ipv4.fib_multipath_hash_policy": "1",
            "net.ipv6.fib_multipath_hash_policy": "1",
            "net.ipv4.fwmark_reflect": "1",
            "net.ipv6.fwmark_reflect": "1",
            "net.ipv4.ip_local_port_range": "49152 65535",
        }
    )
    b.rp_filter_sysctls()
    b.accept_dad_sysctls("1")
    bgp = spec.bgp
    protocols = (
        BirdProtocol(name="device1", proto="Device", state="up"),
        BirdProtocol(name="VIP4", proto="Static", state="up", table="master4"),
        BirdProtocol(name="VIP6", proto="Static", state="up", table="master6"),
        BirdProtocol(name="kernel1", proto="Kernel", state="up", table="master4"),
        BirdProtocol(name="kernel2", proto="Kernel", state="up", table="master6"),
        *(
            BirdProtocol(
                name=name,
                proto="BGP",
                state="up",
                info="Established",
                table=f"master{fam}",
                bgp_state="Established",
                neighbor_address=addr,
                neighbor_as=str(bgp.remote_asn),
                local_as=str(bgp.local_asn),
                bfd=True,
                channel=f"ipv{fam}",
            )
            for name, fam, addr in ((bgp.protocol4, 4, gw.ipv4), (bgp.protocol6, 6, gw.ipv6))
        ),
        BirdProtocol(name=bgp.bfd_protocol, proto="BFD", state="up"),
    )
    sessions = tuple(
        BfdSession(address=addr, state="Up", interface=ext.name, protocol=bgp.bfd_protocol)
        for addr in (gw.ipv4, gw.ipv6)
    )
    return b.snapshot(
        "lb-fe",
        spec,
        sections={"nfqlb": "ABSENT"},
        nft=nft_state_from_json(lb_nft_json(spec)),
        processes=(Process(pid=100, name="bird", cmdline=("bird", "-c", "bird.conf")),),
        bird_protocols=protocols,
        bfd_sessions=sessions,
    )


def _proxy(spec: LabSpec, pod: Pod, macs: dict[tuple[str, str], str]) -> PodSnapshot:
    node = next(n for n in spec.nodes if n.proxy == pod.name)
    b = _PodBuilder(pod.name)
    bridge = b.bridge("bridge0")
    b.add_address(bridge.name, f"{node.bridge_ipv4}/24")
    b.add_address(bridge.name, f"{node.bridge_ipv6}/64")
    b.self_fdb(bridge)
    lb_hops: list[tuple[str, str]] = []
    for fe in spec.frontends:
        for c in fe.conduits:
            if c.node != node.letter:
                continue
            port = b.veth(c.proxy_ifname, master=bridge.name)
            b.add_address(port.name, f"{c.proxy_ipv4}/24")
            b.add_address(port.name, f"{c.proxy_ipv6}/64")
            b.self_fdb(port)
            lb_mac = macs[(fe.pod, c.ifname)]
            b.fdb.append(
                FdbEntry(
                    mac=lb_mac,
                    ifname=port.name,
                    master=bridge.name,
                    vlan=1,
                    state="reachable",
                    flags=("master",),
                )
            )
            for family, addr in ((4, c.ipv4), (6, c.ipv6)):
                b.neighbours.append(
                    Neighbour(
                        family=family,
                        ifname=bridge.name,
                        dst=addr,
                        lladdr=lb_mac,
                        state="REACHABLE",
                    )
                )
            lb_hops.append((c.ipv4, c.ipv6))
    for t in spec.targets:
        if t.node != node.letter:
            continue
        port = b.veth(t.proxy_ifname, master=bridge.name)
        b.add_address(port.name, f"{t.proxy_ipv4}/24")
        b.add_address(port.name, f"{t.proxy_ipv6}/64")
        b.self_fdb(port)
        b.fdb.append(
            FdbEntry(
                mac=macs[(t.pod, t.ifname)],
                ifname=port.name,
                master=bridge.name,
                vlan=1,
                state="reachable",
                flags=("master",),
            )
        )
    for family, vip in ((4, spec.vip4), (6, spec.vip6)):
        host = f"{vip}/{32 if family == 4 else 128}"
        b.rules.append(Rule(family=family, priority=32765, table=spec.proxy_table, src=host))
        hops = [h[0] if family == 4 else h[1] for h in lb_hops]
        metric = 0 if family == 4 else 1024
        if len(hops) == 1:
            b.routes.append(
                Route(
                    family=family,
                    table=spec.proxy_table,
                    dst="default",
                    gateway=hops[0],
                    dev=bridge.name,
                    protocol="boot",
                    metric=metric,
                )
            )
        else:
            b.routes.append(
                Route(
                    family=family,
                    table=spec.proxy_table,
                    dst="default",
                    protocol="boot",
                    metric=metric,
                    nexthops=tuple(Nexthop(gateway=h, dev=bridge.name, weight=1) for h in hops),
                )
            )
    _common_sysctls(b)
    b.sysctls.update(
        {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.forwarding": "1",
            "net.ipv6.conf.all.forwarding": "1",
            "net.ipv4.fib_multipath_hash_policy": "1",
            "net.ipv6.fib_multipath_hash_policy": "1",
            "net.ipv4.fwmark_reflect": "0",
            "net.ipv6.fwmark_reflect": "0",
            "net.ipv4.ip_local_port_range": "32768 60999",
        }
    )
    b.rp_filter_sysctls()
    b.accept_dad_sysctls("0")
    return b.snapshot("proxy", spec, sections={"bird": "ABSENT", "nfqlb": "ABSENT"})


def _target(spec: LabSpec, pod: Pod, macs: dict[tuple[str, str], str]) -> PodSnapshot:
    t = spec.target(pod.name)
    node = next(n for n in spec.nodes if n.letter == t.node)
    b = _PodBuilder(pod.name)
    nsm = b.veth(t.ifname)
    for cidr in (f"{t.ipv4}/24", f"{t.ipv6}/64", f"{spec.vip4}/32", f"{spec.vip6}/128"):
        b.add_address(nsm.name, cidr)
    b.self_fdb(nsm)
    bridge_mac = macs[(node.proxy, "bridge0")]
    for family, vip, table, gw in (
        (4, spec.vip4, spec.target_table4, node.bridge_ipv4),
        (6, spec.vip6, spec.target_table6, node.bridge_ipv6),
    ):
        host = f"{vip}/{32 if family == 4 else 128}"
        b.rules.append(Rule(family=family, priority=32765, table=table, src=host))
        b.routes.append(
            Route(
                family=family,
                table=table,
                dst="default",
                gateway=gw,
                dev=nsm.name,
                protocol="boot",
                metric=0 if family == 4 else 1024,
                flags=("onlink",),
            )
        )
        b.neighbours.append(
            Neighbour(family=family, ifname=nsm.name, dst=gw, lladdr=bridge_mac, state="REACHABLE")
        )
    _common_sysctls(b)
    b.sysctls.update(
        {
            "net.ipv4.ip_forward": "0",
            "net.ipv4.conf.all.forwarding": "0",
            "net.ipv6.conf.all.forwarding": "0",
        }
    )
    b.rp_filter_sysctls()
    b.accept_dad_sysctls("1")
    return b.snapshot(
        "target",
        spec,
        sections={"bird": "ABSENT", "nfqlb": "ABSENT"},
        processes=(Process(pid=200, name="python3", cmdline=("python3", "-m", "target_server")),),
    )


def _gateway(spec: LabSpec, pod: Pod, macs: dict[tuple[str, str], str]) -> PodSnapshot:
    gw = spec.gateway
    b = _PodBuilder(pod.name)
    bridge = b.bridge(gw.bridge)
    b.add_address(bridge.name, f"{gw.ipv4}/24")
    b.add_address(bridge.name, f"{gw.ipv6}/64")
    for source in gw.client_sources4:
        b.add_address("lo", f"{source}/32", scope="global")
    for source in gw.client_sources6:
        b.add_address("lo", f"{source}/128", scope="global")
    for fe in spec.frontends:
        port = b.veth(f"ext-{fe.pod}", master=bridge.name)
        b.self_fdb(port)
        b.fdb.append(
            FdbEntry(
                mac=macs[(fe.pod, fe.ext_ifname)],
                ifname=port.name,
                master=bridge.name,
                vlan=1,
                state="reachable",
                flags=("master",),
            )
        )
        for family, addr in ((4, fe.ipv4), (6, fe.ipv6)):
            b.neighbours.append(
                Neighbour(
                    family=family,
                    ifname=bridge.name,
                    dst=addr,
                    lladdr=macs[(fe.pod, fe.ext_ifname)],
                    state="REACHABLE",
                )
            )
    for family, vip in ((4, spec.vip4), (6, spec.vip6)):
        host = f"{vip}/{32 if family == 4 else 128}"
        hops = tuple(
            Nexthop(gateway=fe.ipv4 if family == 4 else fe.ipv6, dev=bridge.name)
            for fe in spec.frontends
        )
        b.routes.append(
            Route(family=family, table=MAIN, dst=host, protocol="bird", metric=32, nexthops=hops)
        )
    _common_sysctls(b)
    b.sysctls.update({"net.ipv4.conf.all.forwarding": "1", "net.ipv6.conf.all.forwarding": "1"})
    b.rp_filter_sysctls()
    b.accept_dad_sysctls("1")
    protocols = [
        BirdProtocol(name="device1", proto="Device", state="up"),
        BirdProtocol(name="bfd1", proto="BFD", state="up"),
        BirdProtocol(name="GW4", proto="BGP", state="start", info="Passive"),
        BirdProtocol(name="GW6", proto="BGP", state="start", info="Passive"),
    ]
    sessions = []
    for i, fe in enumerate(spec.frontends, start=1):
        for fam, addr in ((4, fe.ipv4), (6, fe.ipv6)):
            protocols.append(
                BirdProtocol(
                    name=f"GW{fam}_{i}",
                    proto="BGP",
                    state="up",
                    info="Established",
                    bgp_state="Established",
                    neighbor_address=addr,
                    bfd=True,
                    channel=f"ipv{fam}",
                )
            )
            sessions.append(
                BfdSession(address=addr, state="Up", interface=bridge.name, protocol="bfd1")
            )
    return b.snapshot(
        "gateway",
        spec,
        sections={"nfqlb": "ABSENT"},
        nft=NftState(),
        processes=(Process(pid=50, name="bird", cmdline=("bird", "-c", "bird-gw.conf")),),
        bird_protocols=tuple(protocols),
        bfd_sessions=tuple(sessions),
    )


def _macs(spec: LabSpec) -> dict[tuple[str, str], str]:
    """Every interface MAC in the lab, so one pod's neighbours can name another's MAC."""
    out: dict[tuple[str, str], str] = {}
    for link in spec.links:
        for end in (link.a, link.b):
            out[(end.pod, end.ifname)] = mac_for(end.pod, end.ifname)
    for br in spec.bridges:
        out[(br.pod, br.name)] = mac_for(br.pod, br.name)
    return out


_BUILDERS: dict[str, Callable[[LabSpec, Pod, dict[tuple[str, str], str]], PodSnapshot]] = {
    "gateway": _gateway,
    "lb-fe": _lb,
    "proxy": _proxy,
    "target": _target,
}


def build_lab(
    lbs: int = 2,
    proxies: int = 2,
    targets_per_proxy: int = 2,
    *,
    with_config: bool = False,
) -> TrenchState:
    """The lab's healthy state; defaults are exactly lab.md's 9 pods."""
    # The healthy state with the nft jhash marking (the mark map a static trace can hash).
    spec = build_spec(DEFAULT_PREFIX, lbs, proxies, targets_per_proxy, marking="nft-jhash")
    macs = _macs(spec)
    pods = tuple(
        PodResult(pod=p.name, role=p.role, snapshot=_BUILDERS[p.role](spec, p, macs))
        for p in spec.pods
    )
    config = None
    if with_config:
        config = TrenchConfig(
            name=spec.trench,
            vips=(f"{spec.vip4}/32", f"{spec.vip6}/128"),
            external_interface="ext-vlan0",
            meridio=lab_config(spec),
        )
    return TrenchState(pods=pods, config=config)


# --------------------------------------------------------------------------- mutation helpers


def with_pod(
    state: TrenchState, pod: str, change: Callable[[PodSnapshot], PodSnapshot]
) -> TrenchState:
    """A copy of ``state`` with one pod's snapshot replaced by ``change(snapshot)``."""
    pods = []
    for result in state.pods:
        if result.pod == pod:
            assert result.snapshot is not None
            pods.append(replace(result, snapshot=change(result.snapshot)))
        else:
            pods.append(result)
    return replace(state, pods=tuple(pods))


def snap(state: TrenchState, pod: str) -> PodSnapshot:
    result = state.pod(pod)
    assert result is not None and result.snapshot is not None
    return result.snapshot


def drop(items: Iterable[Any], pred: Callable[[Any], bool]) -> tuple[Any, ...]:
    kept = tuple(i for i in items if not pred(i))
    return kept


def change(items: Iterable[Any], pred: Callable[[Any], bool], **fields: Any) -> tuple[Any, ...]:
    return tuple(replace(i, **fields) if pred(i) else i for i in items)
