"""Turn a LabSpec into the text the tools eat: ip batches, sysctls, nft, bird.

Why separate from the builder: every line the lab writes into the kernel is
decided here without I/O, so a reviewer can read (and a unit test can check)
exactly what ``up`` will do, and the builder only feeds this text to
``ip -batch``, ``nft -f`` and ``bird -c``.

Ordering matters in a few places, following Meridio and lab.md:

- LB: the VIP rules (pref 100/101) go in before the fwmark rules, which get no
  explicit priority, so the kernel numbers them 99, 98, ... as in a real LB.
- Sysctls run before the links are created, so ``default.*`` values
  (keep_addr_on_down, accept_dad, rp_filter) are inherited by every interface.
- ``ip -batch`` has no per-line family switch, so each namespace gets one
  batch for links/addresses, one run with ``-4`` and one with ``-6``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meridio_debug.controller.lab.spec import (
    DEFAULT_MAX_TARGETS,
    NFQLB_M_PER_TARGET,
    NFQLB_QLENGTH,
    NFQLB_QUEUES,
    LabSpec,
    Pod,
)

# Meridio's defrag chain matches iifname "<first 10 chars of the LB's network
# service>*"; NSM names interfaces from the same 10 characters, dots as dashes.
DEFRAG_IFNAME_PREFIX_LEN = 10


@dataclass(frozen=True)
class NamespacePlan:
    """What one namespace gets, as command text."""

    netns: str
    pod: str
    sysctls: tuple[str, ...]
    setup: tuple[str, ...]  # ip -batch lines: bridges, masters, addresses, link up
    routes4: tuple[str, ...]  # ip -4 -batch lines: rules and routes
    routes6: tuple[str, ...]  # ip -6 -batch lines


def _addr_line(cidr: str, dev: str) -> str:
    # NSM adds IPv6 addresses with nodad; without it the first IPv6
    # connection waits 1-2 s for DAD (lab.md, gotchas).
    suffix = " nodad" if ":" in cidr else ""
    return f"addr add {cidr} dev {dev}{suffix}"


def veth_lines(spec: LabSpec) -> tuple[str, ...]:
    """``ip -batch`` lines (run in the caller's namespace) creating every veth pair."""
    return tuple(
        f"link add {lk.a.ifname} netns {lk.a.netns} type veth "
        f"peer name {lk.b.ifname} netns {lk.b.netns}"
        for lk in spec.links
    )


def netns_add_lines(spec: LabSpec) -> tuple[str, ...]:
    return tuple(f"netns add {ns}" for ns in spec.namespaces)


def sysctls(spec: LabSpec, pod: Pod) -> tuple[str, ...]:
    """``key=value`` sysctls for ``pod`` (Meridio's init containers, lab.md "Sysctls")."""
    common = [
        # Without it a link flap deletes global IPv6 addresses and the IPv6
        # BGP session does not come back (lab.md, gotchas).
        "net.ipv6.conf.all.keep_addr_on_down=1",
        "net.ipv6.conf.default.keep_addr_on_down=1",
        # Link-local addresses of new interfaces skip DAD as well.
        "net.ipv6.conf.default.accept_dad=0",
    ]
    forwarding = ["net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"]
    no_rp_filter = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
    multipath = ["net.ipv4.fib_multipath_hash_policy=1", "net.ipv6.fib_multipath_hash_policy=1"]
    if pod.role == "gateway":
        return (*common, *forwarding, *no_rp_filter)
    if pod.role == "lb-fe":
        return (
            *common,
            *forwarding,
            *multipath,
            *no_rp_filter,
            "net.ipv4.fwmark_reflect=1",
            "net.ipv6.fwmark_reflect=1",
            "net.ipv4.ip_local_port_range=49152 65535",
        )
    if pod.role == "proxy":
        return (*common, *forwarding, *multipath, *no_rp_filter, "net.ipv6.conf.all.accept_dad=0")
    return tuple(common)


def _setup_lines(spec: LabSpec, pod: Pod) -> list[str]:
    lines = ["link set lo up"]
    for br in spec.bridges:
        if br.netns == pod.netns:
            lines.append(f"link add {br.name} type bridge")
            lines += [_addr_line(a, br.name) for a in br.addresses]
            lines.append(f"link set {br.name} up")
    if pod.role == "gateway":
        gw = spec.gateway
        lines += [_addr_line(f"{s}/32", "lo") for s in gw.client_sources4]
        lines += [_addr_line(f"{s}/128", "lo") for s in gw.client_sources6]
    for lk in spec.links:
        for end in (lk.a, lk.b):
            if end.netns != pod.netns:
                continue
            if end.mac:
                lines.append(f"link set {end.ifname} address {end.mac}")
            if end.master:
                lines.append(f"link set {end.ifname} master {end.master}")
            lines += [_addr_line(a, end.ifname) for a in end.addresses]
            lines.append(f"link set {end.ifname} up")
    return lines


def _route_lines(spec: LabSpec, pod: Pod, family: int) -> list[str]:
    vip = spec.vip4 if family == 4 else spec.vip6
    lines: list[str] = []
    if pod.role == "lb-fe":
        lines += [
            f"rule add pref 100 from {vip} lookup {spec.vip_table}",
            f"rule add pref 101 from {vip} lookup {spec.drop_table}",
            f"route add blackhole default metric {spec.drop_metric} table {spec.drop_table}",
        ]
        for t in spec.targets:
            via = t.ipv4 if family == 4 else t.ipv6
            lines += [
                f"rule add fwmark {t.fwmark} lookup {t.table}",
                f"route add default via {via} table {t.table}",
            ]
    elif pod.role == "proxy":
        node = next(n for n in spec.nodes if n.proxy == pod.name)
        hops = [
            c.ipv4 if family == 4 else c.ipv6
            for f in spec.frontends
            for c in f.conduits
            if c.node == node.letter
        ]
        lines.append(f"rule add from {vip} lookup {spec.proxy_table}")
        if len(hops) == 1:
            lines.append(f"route add default via {hops[0]} dev bridge0 table {spec.proxy_table}")
        else:
            nexthops = " ".join(f"nexthop via {h} dev bridge0 weight 1" for h in hops)
            lines.append(f"route add default table {spec.proxy_table} {nexthops}")
    elif pod.role == "target":
        t = spec.target(pod.name)
        node = next(n for n in spec.nodes if n.letter == t.node)
        table = spec.target_table4 if family == 4 else spec.target_table6
        gw = node.bridge_ipv4 if family == 4 else node.bridge_ipv6
        lines += [
            f"rule add from {vip} lookup {table}",
            f"route add default via {gw} dev {t.ifname} onlink table {table}",
        ]
    return lines


def namespace_plan(spec: LabSpec, pod: Pod) -> NamespacePlan:
    """Everything ``up`` configures in ``pod``'s namespace with ip and sysctl."""
    return NamespacePlan(
        netns=pod.netns,
        pod=pod.name,
        sysctls=sysctls(spec, pod),
        setup=tuple(_setup_lines(spec, pod)),
        routes4=tuple(_route_lines(spec, pod, 4)),
        routes6=tuple(_route_lines(spec, pod, 6)),
    )


def nft_ruleset(spec: LabSpec, *, native_queue: bool = True) -> str:
    """The LB's nftables: ``meridio-nfqlb`` and Meridio's ``meridio-defrag`` table.

    With nfqlb (the default) ``meridio-nfqlb`` is Meridio's (reference §2.3): chain ``nfqlb``
    queues VIP traffic to nfqlb's queues 0-3, ``nfqlb-local`` queues locally generated ICMP to
    a VIP, ``snat-local`` gives a locally generated frag-needed / packet-too-big whose inner
    destination is a VIP that VIP as source. ``native_queue=False`` leaves the two queue
    rules out: on a kernel without nft's ``queue`` expression (CONFIG_NFT_QUEUE unset, as
    here) the builder adds them as the xtables NFQUEUE target instead (``nft_queue``).

    With ``nft-jhash`` the chain marks by a jhash of the source address instead; ``jhash``
    gets an explicit seed: without one nft picks a random seed per rule, so LBs (and v4 vs
    v6) would disagree and nothing could predict the target. ``fwd`` would be a reserved
    word, so the chain keeps Meridio's name ``nfqlb``.
    """
    service = f"{spec.conduit}.{spec.trench}"
    iif = service[:DEFRAG_IFNAME_PREFIX_LEN].replace(".", "-")
    if spec.marking == "nft-jhash":
        n = len(spec.targets)
        marks = ", ".join(f"{i} : {t.fwmark}" for i, t in enumerate(spec.targets))
        seed = f"0x{spec.hash_seed:08x}"
        chains = f"""  chain nfqlb {{
    type filter hook prerouting priority filter; policy accept;
    ip daddr @ipv4-vips counter meta mark set jhash ip saddr mod {n} seed {seed} map {{ {marks} }}
    ip6 daddr @ipv6-vips counter meta mark set jhash ip6 saddr mod {n} seed {seed} map {{ {marks} }}
  }}
"""
    else:
        queue = f"queue num {NFQLB_QUEUES.replace(':', '-')}"
        q4 = f"\n    ip daddr @ipv4-vips counter {queue}" if native_queue else ""
        q6 = f"\n    ip6 daddr @ipv6-vips counter {queue}" if native_queue else ""
        l4 = f"\n    meta l4proto icmp ip daddr @ipv4-vips counter {queue}" if native_queue else ""
        l6 = (
            f"\n    meta l4proto ipv6-icmp ip6 daddr @ipv6-vips counter {queue}"
            if native_queue
            else ""
        )
        # The inner IP header of an ICMP error starts 8 bytes into it: its destination
        # is at bit 8*8+16*8 (v4) / 8*8+24*8 (v6) of the transport header.
        vip4_hex = f"0x{int(ipaddress.IPv4Address(spec.vip4)):08x}"
        vip6_hex = f"0x{int(ipaddress.IPv6Address(spec.vip6)):032x}"
        chains = f"""  chain nfqlb {{
    type filter hook prerouting priority filter; policy accept;{q4}{q6}
  }}
  chain nfqlb-local {{
    type filter hook output priority filter; policy accept;{l4}{l6}
  }}
  chain snat-local {{
    type route hook output priority raw; policy accept;
    meta mark != 0 icmp type destination-unreachable icmp code frag-needed @th,192,32 {vip4_hex} counter ip saddr set {spec.vip4} meta mark set 0
    meta mark != 0 icmpv6 type packet-too-big @th,256,128 {vip6_hex} counter ip6 saddr set {spec.vip6} meta mark set 0
  }}
"""
    return f"""table inet meridio-nfqlb {{
  set ipv4-vips {{
    type ipv4_addr; flags interval; elements = {{ {spec.vip4}/32 }}
  }}
  set ipv6-vips {{
    type ipv6_addr; flags interval; elements = {{ {spec.vip6}/128 }}
  }}
{chains}}}
table inet meridio-defrag {{
  chain pre-defrag {{
    type filter hook prerouting priority -500; policy accept;
    iifname "{iif}*" notrack
  }}
  chain in {{
    type filter hook prerouting priority raw; policy accept;
    notrack
    ct state untracked accept
  }}
  chain out {{
    type filter hook output priority raw; policy accept;
    notrack
  }}
}}
"""


NFQLB_FLOWLB_ARGS: tuple[str, ...] = (
    "flowlb",
    "--promiscuous_ping",
    f"--queue={NFQLB_QUEUES}",
    f"--qlength={NFQLB_QLENGTH}",
    "--hash_mode=0",
)


def nfqlb_flow_name(spec: LabSpec) -> str:
    """Meridio's nfqlb flow name: ``tshm-<stream>-<flow>`` (reference §2.4)."""
    return f"{spec.shm}-{spec.flow}"


def nfqlb_commands(spec: LabSpec) -> tuple[tuple[str, ...], ...]:
    """nfqlb arguments, in order, that configure a running ``flowlb`` as Meridio's LB does.

    One shm per stream (M = 100 x max-targets, which nfqlb lowers to a prime), each target
    activated at index identifier-1 with its fwmark (one command for all beyond 100
    targets), then one flow per trench Flow (the shm must exist before ``flow-set`` names
    it as target).
    """
    n = spec.max_targets
    cmds: list[tuple[str, ...]] = [
        ("init", "--ownfw=0", f"--shm={spec.shm}", f"--M={NFQLB_M_PER_TARGET * n}", f"--N={n}")
    ]
    if len(spec.targets) <= DEFAULT_MAX_TARGETS:
        cmds += [
            ("activate", f"--index={t.identifier - 1}", f"--shm={spec.shm}", str(t.fwmark))
            for t in spec.targets
        ]
    else:
        # Beyond Meridio's default stream size, one command: ``activate --index`` rebuilds
        # the whole Maglev table (M = 100 x N entries) per target, O(N^2 x 100) for the
        # lab (1,000 targets: > 30 s per LB); ``activate FWMARK...`` fills the first free
        # index of each in turn (nfqlb cmdConfig.c) and rebuilds once. On the fresh shm
        # of ``init``, in identifier order, that is index identifier-1: the same table.
        cmds.append(("activate", f"--shm={spec.shm}", *(str(t.fwmark) for t in spec.targets)))
    ports = ",".join(str(p) for p in spec.ports)
    cmds.append(
        (
            "flow-set",
            f"--name={nfqlb_flow_name(spec)}",
            f"--target={spec.shm}",
            f"--prio={spec.flow_priority}",
            f"--protocols={','.join(spec.protocols)}",
            f"--dsts={','.join(spec.vips)}",
            f"--dports={_port_ranges(spec.ports) or ports}",
        )
    )
    return tuple(cmds)


def _port_ranges(ports: tuple[int, ...]) -> str:
    """(4000, 4001, 4002, 4003) -> "4000-4003"; gaps give several ranges."""
    out: list[str] = []
    for p in sorted(set(ports)):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == p - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{p}"
        elif out and "-" not in out[-1] and int(out[-1]) == p - 1:
            out[-1] = f"{out[-1]}-{p}"
        else:
            out.append(str(p))
    return ",".join(out)


_FE_FILTERS = """\
filter default_rt { if net ~ [0.0.0.0/0] then accept; if net ~ [::/0] then accept; reject; }
filter cluster_breakout {
  if net ~ [0.0.0.0/0] then accept; if net ~ [::/0] then accept;
  if source = RTS_BGP then accept; reject;
}
filter cluster_access {
  if net ~ [0.0.0.0/0] then reject; if net ~ [::/0] then reject;
  if source = RTS_STATIC && dest != RTD_BLACKHOLE then accept; reject;
}
"""

# Fast timers (lab.md gotchas): connect delay 1 s instead of 5 s and error
# wait 1..5 s instead of up to 60 s, so sessions come up within seconds.
_FAST_TIMERS = (
    "connect delay time 1; connect retry time 2; error wait time 1, 5; error forget time 10;"
)


def bird_fe_conf(spec: LabSpec, fe_name: str, log_path: str) -> str:
    """bird2 configuration of an FE, modelled on Meridio's bird-fe-meridio.conf."""
    fe = spec.frontend(fe_name)
    gw = spec.gateway
    b = spec.bgp
    bfd = (
        f"bfd {{ min rx interval {b.bfd_min_rx_ms} ms; min tx interval {b.bfd_min_tx_ms} ms; "
        f"multiplier {b.bfd_multiplier}; }};"
    )
    common = (
        f'interface "{fe.ext_ifname}"; direct; hold time {b.hold_time}; graceful restart off;\n'
        f"  {_FAST_TIMERS}\n"
        f"  local port {b.port} as {b.local_asn};\n"
        f"  {bfd}"
    )
    return f"""# meridio-debug lab: FE {fe.pod} (generated; lab.md is the contract)
log "{log_path}" all;
router id {fe.router_id};
protocol device {{}}
{_FE_FILTERS}
protocol static VIP4 {{ ipv4 {{ preference 110; }}; route {spec.vip4}/32 via "lo"; }}
protocol static VIP6 {{ ipv6 {{ preference 110; }}; route {spec.vip6}/128 via "lo"; }}
protocol kernel {{
  ipv4 {{ import none; export filter cluster_breakout; }};
  kernel table {spec.vip_table}; merge paths on; scan time 10;
}}
protocol kernel {{
  ipv6 {{ import none; export filter cluster_breakout; }};
  kernel table {spec.vip_table}; merge paths on; scan time 10;
}}
protocol bgp '{b.protocol4}' {{
  {common}
  neighbor {gw.ipv4} port {b.port} as {b.remote_asn};
  ipv4 {{ import filter cluster_breakout; export filter cluster_access; next hop self; }};
}}
protocol bgp '{b.protocol6}' {{
  {common}
  neighbor {gw.ipv6} port {b.port} as {b.remote_asn};
  ipv6 {{ import filter cluster_breakout; export filter cluster_access; next hop self; }};
}}
protocol bfd '{b.bfd_protocol}' {{ accept direct; interface "{fe.ext_ifname}" {{}}; }}
"""


def bird_gw_conf(spec: LabSpec, log_path: str) -> str:
    """bird2 configuration of the gateway (Meridio's kind demo bird-gw.conf)."""
    gw = spec.gateway
    b = spec.bgp
    common = (
        f"direct; hold time {b.hold_time}; bfd on; graceful restart off;\n"
        f"  {_FAST_TIMERS}\n"
        f"  local port {b.port} as {b.remote_asn};"
    )
    return f"""# meridio-debug lab: gateway (generated; lab.md is the contract)
log "{log_path}" all;
router id {gw.ipv4};
protocol device {{}}
protocol bfd {{ interface "*" {{ passive on; }}; }}
protocol static DEFAULT4 {{ ipv4 {{ preference 110; }}; route 0.0.0.0/0 blackhole; }}
protocol static DEFAULT6 {{ ipv6 {{ preference 110; }}; route ::/0 blackhole; }}
filter gw_kernel_export {{ if source = RTS_STATIC && dest = RTD_BLACKHOLE then reject; accept; }}
filter bgp_announce {{ if net ~ [0.0.0.0/0] then accept; if net ~ [::/0] then accept; reject; }}
protocol kernel {{ ipv4 {{ import none; export filter gw_kernel_export; }}; merge paths on; }}
protocol kernel {{ ipv6 {{ import none; export filter gw_kernel_export; }}; merge paths on; }}
protocol bgp GW4 {{
  {common}
  neighbor range {gw.prefix4} port {b.port} as {b.local_asn}; dynamic name "GW4_";
  ipv4 {{ import all; export filter bgp_announce; next hop self; }};
}}
protocol bgp GW6 {{
  {common}
  neighbor range {gw.prefix6} port {b.port} as {b.local_asn}; dynamic name "GW6_";
  ipv6 {{ import all; export filter bgp_announce; next hop self; }};
}}
"""
