"""The proto/JSON -> model boundary: normalisation, nft reduction, bundles, roles.

Why these tests: everything downstream trusts the model to be normalised
(families 4/6, one spelling of states and actions, prefixes with lengths), so
agent-side spellings (AF numbers, "to_tbl", comma-joined NUD states, nft
numbers that became floats in a protobuf Struct) are pinned here.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from lab_fixture import build_lab, lb_nft_json

from meridio_debug.controller.analysis import Severity, analyze
from meridio_debug.controller.lab.spec import build_spec
from meridio_debug.controller.model import infer_role
from meridio_debug.controller.wire.convert import (
    nft_state_from_json,
    pod_result_from_proto,
    snapshot_from_dict,
    snapshot_from_proto,
)
from meridio_debug.protos import agent_pb2 as pb

# `nft -j list ruleset` of lab-examples/lb.nft, as printed on this kernel (nft 1.0.6).
LB_EXAMPLE_NFT: dict[str, Any] = json.loads(
    """{"nftables": [
 {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "meridio-nfqlb", "handle": 1}},
 {"set": {"family": "inet", "name": "ipv4-vips", "table": "meridio-nfqlb", "type": "ipv4_addr",
          "handle": 2, "flags": ["interval"],
          "elem": [{"prefix": {"addr": "10.0.0.0", "len": 24}}, "20.0.0.1",
                   {"range": ["30.0.0.1", "30.0.0.5"]}]}},
 {"set": {"family": "inet", "name": "ipv6-vips", "table": "meridio-nfqlb", "type": "ipv6_addr",
          "handle": 3, "flags": ["interval"], "elem": ["2000::1"]}},
 {"chain": {"family": "inet", "table": "meridio-nfqlb", "name": "nfqlb", "handle": 1,
            "type": "filter", "hook": "prerouting", "prio": 0, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "meridio-nfqlb", "chain": "nfqlb", "handle": 5, "expr": [
   {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
              "right": "@ipv4-vips"}},
   {"counter": {"packets": 0, "bytes": 0}},
   {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"map": {
     "key": {"jhash": {"mod": 2, "seed": 4660,
                       "expr": {"payload": {"protocol": "ip", "field": "saddr"}}}},
     "data": {"set": [[0, 5006], [1, 5008]]}}}}}]}},
 {"rule": {"family": "inet", "table": "meridio-nfqlb", "chain": "nfqlb", "handle": 7, "expr": [
   {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
              "right": "@ipv6-vips"}},
   {"counter": {"packets": 0, "bytes": 0}},
   {"queue": {"num": {"range": [0, 3]}, "flags": ["fanout"]}}]}},
 {"table": {"family": "inet", "name": "meridio-defrag", "handle": 2}},
 {"rule": {"family": "inet", "table": "meridio-defrag", "chain": "pre-defrag", "handle": 4,
           "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                               "right": "conduit-a-*"}}, {"notrack": null}]}}
]}"""
)


def _snapshot() -> pb.Snapshot:
    snap = pb.Snapshot(taken_unix_ns=42)
    snap.info.netns = "net:[4026532001]"
    for name in ("links", "addresses", "rules", "routes", "neighbours", "nftables", "bird"):
        snap.sections.add(name=name, state=pb.SectionStatus.OK)
    snap.sections.add(name="nfqlb", state=pb.SectionStatus.ABSENT, message="not running")
    snap.sections.add(name="sysctls", state=pb.SectionStatus.ERROR, message="EPERM")
    snap.links.add(
        name="conduit-a--0a17",
        kind="veth",
        state="up",
        flags=["UP", "LOWER_UP"],
        mtu=1500,
        mac="AA:BB:CC:00:11:22",
    )
    snap.addresses.add(
        family=10,
        ifname="conduit-a--0a17",
        address="fd00::2",
        prefixlen=64,
        scope="global",
        flags=["NODAD", "permanent"],
    )
    snap.rules.add(
        family=2,
        priority=99,
        fwmark=5006,
        fwmask=0xFFFFFFFF,
        table=5006,
        action="to_tbl",
        has_fwmark=True,
    )
    snap.rules.add(family=10, priority=100, src="2000::1", src_len=128, table=4096, action="unspec")
    snap.routes.add(
        family=2,
        table=5006,
        dst="default",
        gateway="172.16.1.6",
        dev="conduit-a--0a17",
        type="unicast",
    )
    route = snap.routes.add(family=10, table=1, dst="::/0", type="")
    route.nexthops.add(gateway="fd00::2", dev="bridge0", weight=1, flags=["ONLINK"])
    snap.routes.add(family=2, table=4097, dst="default", type="blackhole", metric=4294967295)
    snap.neighbours.add(
        family=2,
        ifname="conduit-a--0a17",
        dst="172.16.1.6",
        lladdr="AA:00:00:00:00:06",
        state="STALE,FAILED",
    )
    snap.nftables.update(LB_EXAMPLE_NFT)
    snap.bird.protocols.add(
        name="NBR-gateway-v4-a",
        proto="BGP",
        state="Up",
        info="Idle          Error: Neighbor lost",
        neighbor_address="169.254.100.150%ext-vlan0",
    )
    snap.bird.bfd_sessions.add(address="169.254.100.150", interface="ext-vlan0", state="Up")
    return snap


def test_proto_is_normalised() -> None:
    model = snapshot_from_proto("lb-fe-a", None, _snapshot(), namespace="red")
    assert model.role == "lb-fe"  # inferred: meridio-nfqlb table
    assert (model.namespace, model.netns, model.taken_unix_ns) == ("red", "net:[4026532001]", 42)
    link = model.links[0]
    assert (link.state, link.mac, link.is_up) == ("UP", "aa:bb:cc:00:11:22", True)
    addr = model.addresses[0]
    assert (addr.family, addr.flags) == (6, ("nodad", "permanent"))
    fwmark, vip = model.rules
    assert (fwmark.family, fwmark.action, fwmark.is_fwmark_lookup) == (4, "lookup", True)
    assert str(fwmark) == "99: from all fwmark 0x138e lookup 5006"
    assert (vip.family, vip.src, vip.action, vip.is_source_lookup) == (
        6,
        "2000::1/128",
        "lookup",
        True,
    )
    assert str(vip) == "-6 100: from 2000::1 lookup 4096"
    v4, v6, blackhole = model.routes
    assert (v4.family, v4.dst, v4.is_default, v4.is_unicast) == (4, "default", True, True)
    assert (v6.dst, v6.type, v6.paths()[0].flags) == ("default", "unicast", ("onlink",))
    assert (blackhole.is_unicast, blackhole.metric) == (False, 4294967295)
    assert model.neighbours[0].is_failed
    assert model.bird_protocols[0].state == "up"
    assert model.bird_protocols[0].info == "Idle Error: Neighbor lost"
    assert model.bird_protocols[0].neighbor_address == "169.254.100.150"
    assert model.section("sysctls") is not None and not model.ok("sysctls")
    assert model.ok("rules", "routes") and not model.ok("nfqlb")


def test_rule_transport_selectors_are_kept_and_not_a_plain_source_rule() -> None:
    """``from VIP ipproto tcp dport 80 lookup T`` steers only part of the VIP's traffic."""
    snap = pb.Snapshot()
    snap.rules.add(
        family=2, priority=100, src="20.0.0.1", src_len=32, table=4096, action="to_tbl",
        ipproto="tcp", dport_start=80, dport_end=80, sport_start=1000, sport_end=2000,
        has_uid_range=True, uid_start=0, uid_end=99, suppress_prefixlen=-1,
    )  # fmt: skip
    snap.rules.add(
        family=2, priority=101, src="20.0.0.1", src_len=32, table=4096, action="to_tbl",
        suppress_prefixlen=-1,
    )  # fmt: skip
    selective, plain = snapshot_from_proto("lb-fe-a", "lb-fe", snap).rules
    assert (selective.ipproto, selective.dport, selective.sport) == ("tcp", (80, 80), (1000, 2000))
    assert selective.uid_range == (0, 99)
    assert selective.selects_transport and not selective.is_source_lookup
    assert str(selective) == (
        "100: from 20.0.0.1 uidrange 0-99 ipproto tcp sport 1000-2000 dport 80 lookup 4096"
    )
    assert plain.is_source_lookup and not plain.selects_transport
    assert plain.dport is None and plain.uid_range is None


def test_goto_rule_prints_its_target_and_the_table_uses_the_same_text() -> None:
    from meridio_debug.controller.report.snapshot import rule_text

    rule = pb.Rule(family=2, priority=50, fwmark=7, fwmask=0xFFFFFFFF, has_fwmark=True,
                   action="goto", goto=32766, suppress_prefixlen=-1)  # fmt: skip
    model = snapshot_from_proto("lb-fe-a", "lb-fe", pb.Snapshot(rules=[rule])).rules[0]
    assert str(model) == "50: from all fwmark 0x7 goto 32766"
    assert rule_text(rule) == "50: from all fwmark 0x7 goto 32766"


def test_nft_json_is_reduced_even_after_a_struct_round_trip() -> None:
    model = snapshot_from_proto("lb", "lb-fe", _snapshot())  # Struct: numbers are floats
    for nft in (model.nft, nft_state_from_json(LB_EXAMPLE_NFT)):
        sets = {s.name: s.elements for s in nft.vip_sets}
        assert sets == {
            "ipv4-vips": ("10.0.0.0/24", "20.0.0.1/32", "30.0.0.1-30.0.0.5"),
            "ipv6-vips": ("2000::1/128",),
        }
        (mark_map,) = nft.mark_maps
        assert (mark_map.family, mark_map.vip_set, mark_map.marks, mark_map.modulus) == (
            4,
            "ipv4-vips",
            (5006, 5008),
            2,
        )
        (queue,) = nft.queue_rules
        assert (queue.family, queue.vip_set, queue.queue) == (6, "ipv6-vips", "0-3")
        assert nft.defrag is not None and nft.defrag.iifname_prefixes == ("conduit-a-",)
        assert nft.has_table("meridio-nfqlb")


def test_lab_ruleset_reduces_to_the_lab_marks() -> None:
    spec = build_spec()
    nft = nft_state_from_json(lb_nft_json(spec))
    assert {m.family: m.marks for m in nft.mark_maps} == {
        4: (5001, 5002, 5003, 5004),
        6: (5001, 5002, 5003, 5004),
    }


def test_empty_or_odd_nft_json_gives_empty_state() -> None:
    assert nft_state_from_json({}).tables == ()
    assert nft_state_from_json({"nftables": "garbage"}).vip_sets == ()
    odd = nft_state_from_json({"nftables": [1, {"rule": {"expr": "x"}}, {"set": {"type": "x"}}]})
    assert odd.mark_maps == () and odd.vip_sets == ()


def test_saved_json_converts_through_the_same_code() -> None:
    snap = _snapshot()
    data = json.loads(json.dumps(json_format.MessageToDict(snap, preserving_proto_field_name=True)))
    data["field_from_a_newer_agent"] = {"x": 1}
    assert snapshot_from_dict("lb-fe-a", "lb-fe", data) == snapshot_from_proto(
        "lb-fe-a", "lb-fe", snap
    )


def test_nftables_section_not_ok_means_no_nft_state() -> None:
    snap = _snapshot()
    for status in snap.sections:
        if status.name == "nftables":
            status.state = pb.SectionStatus.ERROR
    model = snapshot_from_proto("lb-fe-a", "lb-fe", snap)
    assert model.nft.tables == () and not model.ok("nftables")


def test_pod_results_for_answered_and_unreachable_pods() -> None:
    ok = pod_result_from_proto("lb-fe-a", "LB", _snapshot())
    assert ok.reachable and ok.role == "lb-fe" and ok.snapshot is not None
    down = pod_result_from_proto("target-a1", "target", None, error="image pull failed")
    assert (down.reachable, down.error, down.role) == (False, "image pull failed", "target")


def test_roles_inferred_from_the_lab_state() -> None:
    for result in build_lab().pods:
        assert result.snapshot is not None
        assert infer_role(result.snapshot) == result.role, result.pod


def test_snapshots_are_hashable_and_findings_stable() -> None:
    state = build_lab()
    assert len({r.snapshot for r in state.pods}) == len(state.pods)
    first = analyze(state)
    assert first == analyze(build_lab())
    assert first.at_least(Severity.WARNING) == ()
