"""The lab's spec, renderers, hash port and prerequisite messages (no root needed).

The defaults are checked against /work/shared/lab.md line by line: names,
addresses and identifiers there are a contract other tools rely on.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections import Counter

import pytest

from meridio_debug.controller.errors import LabError, MeridioDebugError
from meridio_debug.controller.lab import (
    LabSpec,
    build_spec,
    check_prerequisites,
    plan_probes,
    predict_target,
)
from meridio_debug.controller.lab.jhash import jhash, nft_jhash_mod
from meridio_debug.controller.lab.render import (
    bird_fe_conf,
    bird_gw_conf,
    namespace_plan,
    nft_ruleset,
    veth_lines,
)
from meridio_debug.controller.lab.spec import spec_from_json, spec_to_json
from meridio_debug.controller.lab.status import BgpSession, parse_bfd_sessions, parse_bird_protocols

IFNAMSIZ = 15


@pytest.fixture(scope="module")
def spec() -> LabSpec:
    return build_spec()


def end(spec: LabSpec, pod: str, ifname: str):
    for lk in spec.links:
        for e in (lk.a, lk.b):
            if e.pod == pod and e.ifname == ifname:
                return e
    raise AssertionError(f"no interface {ifname} in {pod}")


# --- defaults == lab.md ---------------------------------------------------------------------------


def test_default_pods_roles_and_namespaces(spec):
    assert [(p.name, p.role, p.netns, p.node) for p in spec.pods] == [
        ("gw", "gateway", "mdl-gw", None),
        ("lb-fe-a", "lb-fe", "mdl-lb-fe-a", None),
        ("lb-fe-b", "lb-fe", "mdl-lb-fe-b", None),
        ("proxy-a", "proxy", "mdl-proxy-a", "a"),
        ("proxy-b", "proxy", "mdl-proxy-b", "b"),
        ("target-a1", "target", "mdl-target-a1", "a"),
        ("target-a2", "target", "mdl-target-a2", "a"),
        ("target-b1", "target", "mdl-target-b1", "b"),
        ("target-b2", "target", "mdl-target-b2", "b"),
    ]


def test_default_meridio_names(spec):
    assert (spec.trench, spec.conduit, spec.stream, spec.flow, spec.attractor) == (
        "red",
        "conduit-a",
        "stream-a",
        "flow-a",
        "attractor-a",
    )
    assert spec.gateways == ("gateway-v4-a", "gateway-v6-a")
    assert spec.protocols == ("tcp", "udp")
    assert spec.ports == (4000, 4001, 4002, 4003)
    assert spec.vips == ("20.0.0.1/32", "2000::1/128")


def test_default_external_segment(spec):
    gw = spec.gateway
    assert (gw.bridge, gw.ipv4, gw.ipv6) == ("ext-br", "169.254.100.150", "100:100::150")
    assert spec.bridges[0].addresses == ("169.254.100.150/24", "100:100::150/64")
    a = end(spec, "lb-fe-a", "ext-vlan0")
    b = end(spec, "lb-fe-b", "ext-vlan0")
    assert a.addresses == ("169.254.100.2/24", "100:100::2/64")
    assert b.addresses == ("169.254.100.3/24", "100:100::3/64")
    gw_ports = [lk.b for lk in spec.links if lk.kind == "external"]
    assert all(p.netns == "mdl-gw" and p.master == "ext-br" for p in gw_ports)


def test_default_client_sources(spec):
    gw = spec.gateway
    assert gw.client_sources4 == tuple(f"200.100.0.{i}" for i in range(1, 65))
    assert gw.client_sources6[0] == "200:100::1"
    assert gw.client_sources6[-1] == "200:100::40"
    assert len(set(gw.client_sources6)) == 64


def test_default_nodes_and_bridges(spec):
    assert [(n.letter, n.proxy, n.subnet4, n.subnet6) for n in spec.nodes] == [
        ("a", "proxy-a", "172.16.1.0/24", "fd00:0:0:1::/64"),
        ("b", "proxy-b", "172.16.2.0/24", "fd00:0:0:2::/64"),
    ]
    assert [(b.netns, b.name, b.addresses) for b in spec.bridges[1:]] == [
        ("mdl-proxy-a", "bridge0", ("172.16.1.1/24", "fd00:0:0:1::1/64")),
        ("mdl-proxy-b", "bridge0", ("172.16.2.1/24", "fd00:0:0:2::1/64")),
    ]


def test_default_conduits(spec):
    got = {
        (lk.a.pod, lk.b.pod): (lk.a.addresses, lk.b.addresses)
        for lk in spec.links
        if lk.kind == "conduit"
    }
    assert got == {
        ("lb-fe-a", "proxy-a"): (("172.16.1.2/24", "fd00:0:0:1::2/64"), ("172.16.1.3/24", "fd00:0:0:1::3/64")),
        ("lb-fe-a", "proxy-b"): (("172.16.2.2/24", "fd00:0:0:2::2/64"), ("172.16.2.3/24", "fd00:0:0:2::3/64")),
        ("lb-fe-b", "proxy-a"): (("172.16.1.4/24", "fd00:0:0:1::4/64"), ("172.16.1.5/24", "fd00:0:0:1::5/64")),
        ("lb-fe-b", "proxy-b"): (("172.16.2.4/24", "fd00:0:0:2::4/64"), ("172.16.2.5/24", "fd00:0:0:2::5/64")),
    }  # fmt: skip
    for lk in spec.links:
        if lk.kind == "conduit":
            assert re.fullmatch(r"conduit-a--[0-9a-f]{4}", lk.a.ifname)
            assert re.fullmatch(r"conduit-a--[0-9a-f]{4}", lk.b.ifname)
            assert lk.b.master == "bridge0"


def test_default_targets(spec):
    assert [(t.pod, t.identifier, t.fwmark, t.table, t.ipv4, t.ipv6, t.proxy_ipv4) for t in spec.targets] == [
        ("target-a1", 1, 5001, 5001, "172.16.1.6", "fd00:0:0:1::6", "172.16.1.7"),
        ("target-a2", 2, 5002, 5002, "172.16.1.8", "fd00:0:0:1::8", "172.16.1.9"),
        ("target-b1", 3, 5003, 5003, "172.16.2.6", "fd00:0:0:2::6", "172.16.2.7"),
        ("target-b2", 4, 5004, 5004, "172.16.2.8", "fd00:0:0:2::8", "172.16.2.9"),
    ]  # fmt: skip
    for t in spec.targets:
        nsm = end(spec, t.pod, "nsm-0")
        assert nsm.addresses == (f"{t.ipv4}/24", f"{t.ipv6}/64", "20.0.0.1/32", "2000::1/128")
        assert re.fullmatch(r"proxy\.cond-[0-9a-f]{4}", t.proxy_ifname)
        assert end(spec, f"proxy-{t.node}", t.proxy_ifname).master == "bridge0"


def test_default_bgp(spec):
    assert (spec.bgp.protocol4, spec.bgp.protocol6, spec.bgp.bfd_protocol) == (
        "NBR-gateway-v4-a",
        "NBR-gateway-v6-a",
        "NBR-BFD",
    )
    assert (spec.bgp.local_asn, spec.bgp.remote_asn, spec.bgp.port) == (8103, 4248829953, 10179)
    assert (spec.vip_table, spec.drop_table, spec.drop_metric) == (4096, 4097, 4294967295)


# --- scaling -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lbs,proxies,per", [(1, 1, 1), (2, 2, 2), (3, 2, 5), (4, 4, 10), (26, 3, 100)]
)
def test_scaled_lab_has_no_collisions(lbs, proxies, per):
    spec = build_spec(prefix="mdx-", lbs=lbs, proxies=proxies, targets_per_proxy=per)
    assert [f.pod for f in spec.frontends] == [f"lb-fe-{chr(97 + j)}" for j in range(lbs)]
    assert [n.proxy for n in spec.nodes] == [f"proxy-{chr(97 + n)}" for n in range(proxies)]
    assert [t.identifier for t in spec.targets] == list(range(1, proxies * per + 1))
    assert spec.targets[per - 1].pod == f"target-a{per}"
    assert len({p.netns for p in spec.pods}) == len(spec.pods)
    # Interface names fit IFNAMSIZ and are unique in each namespace.
    per_ns = Counter((e.netns, e.ifname) for lk in spec.links for e in (lk.a, lk.b))
    per_ns.update((b.netns, b.name) for b in spec.bridges)
    assert max(per_ns.values()) == 1
    assert all(len(ifname) <= IFNAMSIZ for _, ifname in per_ns)
    # Every unicast address is used once (the VIPs are on every target by design).
    addresses = [a for lk in spec.links for e in (lk.a, lk.b) for a in e.addresses]
    addresses += [a for b in spec.bridges for a in b.addresses]
    addresses = [a for a in addresses if a not in spec.vips]
    assert len(set(addresses)) == len(addresses)
    # Each address lies in the subnet its link belongs to.
    for lk in spec.links:
        if lk.kind != "external":
            node = next(n for n in spec.nodes if n.proxy == lk.b.pod)
            for a in (*lk.a.addresses, *lk.b.addresses):
                if a in spec.vips:
                    continue
                net = node.subnet6 if ":" in a else node.subnet4
                assert ipaddress.ip_interface(a).network == ipaddress.ip_network(net)
    assert len({t.fwmark for t in spec.targets}) == len(spec.targets)


def test_hex_names_are_stable_and_independent_of_prefix():
    assert veth_lines(build_spec(prefix="x-")) == veth_lines(build_spec(prefix="x-"))
    one = [(lk.a.ifname, lk.b.ifname) for lk in build_spec(prefix="x-").links]
    two = [(lk.a.ifname, lk.b.ifname) for lk in build_spec(prefix="y-").links]
    assert one == two


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lbs": 0},
        {"lbs": 27},
        {"proxies": 0},
        {"targets_per_proxy": 0},
        {"lbs": 26, "targets_per_proxy": 101},
        {"prefix": "Bad/"},
        {"prefix": ""},
    ],
)
def test_impossible_sizes_are_one_line_lab_errors(kwargs):
    with pytest.raises(LabError) as info:
        build_spec(**kwargs)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, MeridioDebugError)


def test_spec_json_round_trip():
    spec = build_spec(prefix="mdj-", lbs=3, proxies=2, targets_per_proxy=3)
    assert spec_from_json(spec_to_json(spec)) == spec


def test_spec_json_rejects_other_versions():
    text = spec_to_json(build_spec()).replace('"version": 2', '"version": 99')
    with pytest.raises(ValueError, match="version"):
        spec_from_json(text)


# --- hashing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,seed,want",
    [
        # Bob Jenkins' lookup3.c driver values for hashlittle(), which jhash() equals.
        (b"", 0, 0xDEADBEEF),
        (b"", 0xDEADBEEF, 0xBD5B7DDE),
        (b"Four score and seven years ago", 0, 0x17770551),
        (b"Four score and seven years ago", 1, 0xCD628161),
    ],
)
def test_jhash_matches_lookup3_vectors(key, seed, want):
    assert jhash(key, seed) == want


def test_nft_mod_takes_the_high_part():
    h = jhash(bytes([200, 100, 0, 1]), 7)
    assert nft_jhash_mod(bytes([200, 100, 0, 1]), 4, 7) == (h * 4) >> 32
    assert nft_jhash_mod(b"x", 1, 0) == 0


@pytest.fixture
def jhash_spec() -> LabSpec:
    return build_spec(marking="nft-jhash")


def test_predictions_seen_live_on_the_default_lab(jhash_spec):
    # Recorded from `lab traffic` on a default lab with nft jhash (all 128 answers matched).
    spec = jhash_spec
    assert [predict_target(spec, f"200.100.0.{i}") for i in range(1, 9)] == [
        "target-a1", "target-a1", "target-b2", "target-a1",
        "target-b2", "target-b1", "target-b2", "target-a1",
    ]  # fmt: skip
    assert [predict_target(spec, f"200:100::{i}") for i in range(1, 9)] == [
        "target-b1", "target-a2", "target-a1", "target-a1",
        "target-b1", "target-b1", "target-b2", "target-a1",
    ]  # fmt: skip


def test_default_sources_reach_every_target(jhash_spec):
    spec = jhash_spec
    for sources in (spec.gateway.client_sources4, spec.gateway.client_sources6):
        assert {predict_target(spec, s) for s in sources} == {t.pod for t in spec.targets}


# --- rendering -----------------------------------------------------------------------------------


def test_lb_rules_put_vip_rules_before_fwmark_rules(spec):
    plan = namespace_plan(spec, spec.pod("lb-fe-a"))
    lines = list(plan.routes4)
    assert lines[:3] == [
        "rule add pref 100 from 20.0.0.1 lookup 4096",
        "rule add pref 101 from 20.0.0.1 lookup 4097",
        "route add blackhole default metric 4294967295 table 4097",
    ]
    assert "rule add fwmark 5003 lookup 5003" in lines
    assert "route add default via 172.16.2.6 table 5003" in lines
    assert "route add default via fd00:0:0:2::6 table 5003" in plan.routes6
    assert "net.ipv4.fwmark_reflect=1" in plan.sysctls


def test_proxy_and_target_routes(spec):
    proxy = namespace_plan(spec, spec.pod("proxy-b"))
    assert proxy.routes4 == (
        "rule add from 20.0.0.1 lookup 1",
        "route add default table 1 nexthop via 172.16.2.2 dev bridge0 weight 1 "
        "nexthop via 172.16.2.4 dev bridge0 weight 1",
    )
    assert "net.ipv6.conf.all.accept_dad=0" in proxy.sysctls
    target = namespace_plan(spec, spec.pod("target-b2"))
    assert target.routes4 == (
        "rule add from 20.0.0.1 lookup 1",
        "route add default via 172.16.2.1 dev nsm-0 onlink table 1",
    )
    assert target.routes6 == (
        "rule add from 2000::1 lookup 2",
        "route add default via fd00:0:0:2::1 dev nsm-0 onlink table 2",
    )
    assert all("nodad" in line for line in target.setup if "addr add" in line and ":" in line)


def test_nft_ruleset_has_fixed_seed_and_full_map(jhash_spec):
    spec = jhash_spec
    text = nft_ruleset(spec)
    seed = f"seed 0x{spec.hash_seed:08x}"
    assert text.count(seed) == 2
    assert "map { 0 : 5001, 1 : 5002, 2 : 5003, 3 : 5004 }" in text
    assert 'iifname "conduit-a-*" notrack' in text
    assert "table inet meridio-defrag" in text


def test_bird_configs_name_the_contract(spec):
    fe = bird_fe_conf(spec, "lb-fe-b", "/tmp/x.log")
    assert "protocol bgp 'NBR-gateway-v4-a'" in fe
    assert "protocol bgp 'NBR-gateway-v6-a'" in fe
    assert "protocol bfd 'NBR-BFD'" in fe
    assert "router id 169.254.100.3;" in fe
    assert "kernel table 4096" in fe
    assert "connect delay time 1" in fe and "error wait time 1, 5" in fe
    gw = bird_gw_conf(spec, "/tmp/y.log")
    assert "neighbor range 169.254.100.0/24 port 10179 as 8103" in gw


def test_parse_bird_protocols():
    text = (
        "BIRD 2.0.12 ready.\n"
        "Name       Proto      Table      State  Since         Info\n"
        "device1    Device     ---        up     23:40:01.123  \n"
        "NBR-gateway-v4-a BGP        ---        up     23:40:03.456  Established   \n"
        "NBR-gateway-v6-a BGP        ---        start  2026-11-20 23:40:03  Active        "
        "Socket: Connection refused\n"
    )
    assert parse_bird_protocols(text) == {
        "device1": ("up", ""),
        "NBR-gateway-v4-a": ("up", "Established"),
        "NBR-gateway-v6-a": ("start", "Active        Socket: Connection refused"),
    }


def test_probe_plan_spreads_sources_ports_and_protocols(spec):
    probes = plan_probes(spec, 64)
    assert len(probes) == 128
    v4 = [p for p in probes if p.family == 4]
    assert {p.src for p in v4} == set(spec.gateway.client_sources4)
    assert {p.port for p in v4} == set(spec.ports)
    assert {p.port for p in v4 if p.proto == "udp"} == set(spec.ports)
    assert Counter(p.proto for p in v4) == {"tcp": 48, "udp": 16}
    assert all(p.dst == "2000::1" for p in probes if p.family == 6)
    assert {p.proto for p in plan_probes(spec, 8, family=6, udp=False)} == {"tcp"}
    with pytest.raises(LabError):
        plan_probes(spec, 0)


# --- prerequisites ---------------------------------------------------------------------------------


def test_not_root_is_a_one_line_error():
    with pytest.raises(LabError) as info:
        check_prerequisites(euid=1000)
    msg = str(info.value)
    assert "\n" not in msg
    assert "root" in msg and "1000" in msg


def test_down_and_traffic_need_root_too():
    from meridio_debug.controller.lab.prereq import check_root_and_ip

    with pytest.raises(LabError, match=r"^lab down needs root.*sudo$"):
        check_root_and_ip("lab down", euid=1000)


def test_missing_tools_name_the_debian_packages(tmp_path):
    with pytest.raises(LabError) as info:
        check_prerequisites(euid=0, path=str(tmp_path))
    msg = str(info.value)
    assert "\n" not in msg
    for word in ("bird", "birdc", "nft", "ip", "bird2", "nftables", "iproute2", "apt-get install"):
        assert word in msg


def test_only_bird_missing(tmp_path):
    for tool in ("ip", "nft", "sysctl"):
        fake = tmp_path / tool
        fake.write_text("#!/bin/sh\n")
        os.chmod(fake, 0o755)
    with pytest.raises(LabError, match=r"needs bird, birdc .*bird2 \(apt-get install bird2\)$"):
        check_prerequisites(euid=0, path=str(tmp_path))


def test_parse_bfd_sessions_and_readiness():
    """``lab up`` waits for BFD Up as well: BGP is Established ~0.5 s before BFD is."""
    text = (
        "BIRD 2.0.12 ready.\n"
        "NBR-BFD:\n"
        "IP address                Interface  State      Since         Interval  Timeout\n"
        "169.254.100.150           ext-vlan0  Up         00:10:59.361    0.300    1.500\n"
        "100:100::150              ext-vlan0  Down       00:11:41.009    1.000    0.000\n"
    )
    rows = parse_bfd_sessions(text)
    assert rows == [
        ("169.254.100.150", "ext-vlan0", "Up"),
        ("100:100::150", "ext-vlan0", "Down"),
    ]
    ready = [BgpSession("lb-fe-a", f"BFD {a}", st, "", kind="bfd").established for a, _, st in rows]
    assert ready == [True, False]
    assert parse_bfd_sessions("BIRD 2.0.12 ready.\nNBR-BFD:\n") == []
