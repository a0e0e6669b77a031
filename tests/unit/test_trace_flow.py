"""Flow parsing, the offline mark hash, and the trace renderings (table, JSON, HTML/SVG)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from meridio_debug.controller.lab import build_spec, predict_target
from meridio_debug.controller.model import NftMarkMap
from meridio_debug.controller.report.trace import render_html, render_svg, render_table
from meridio_debug.controller.trace import Flow, FlowError, Hop, TracePath, TraceResult, parse_flow
from meridio_debug.controller.trace.hashing import computable, mark_for
from meridio_debug.controller.trace.types import Broken


@pytest.mark.parametrize(
    ("text", "flow"),
    [
        (
            "tcp 200.100.0.7:40000 -> 20.0.0.1:4000",
            Flow("tcp", "200.100.0.7", "20.0.0.1", 40000, 4000),
        ),
        ("UDP 200.100.0.7:1->20.0.0.1:4003", Flow("udp", "200.100.0.7", "20.0.0.1", 1, 4003)),
        ("icmp 200.100.0.7 -> 20.0.0.1", Flow("icmp", "200.100.0.7", "20.0.0.1")),
        (
            "tcp [200:100::7]:40000 -> [2000::1]:4000",
            Flow("tcp", "200:100::7", "2000::1", 40000, 4000),
        ),
        ("icmp 200:100::7 -> 2000::1", Flow("icmp", "200:100::7", "2000::1")),
        ("icmp [200:100::7] -> [2000::1]", Flow("icmp", "200:100::7", "2000::1")),
    ],
)
def test_parse_flow(text: str, flow: Flow) -> None:
    assert parse_flow(text) == flow
    assert parse_flow(str(flow)) == flow  # round trip


@pytest.mark.parametrize(
    "text",
    [
        "",
        "tcp 200.100.0.7 -> 20.0.0.1:4000",  # missing source port
        "sctp 1.2.3.4:1 -> 5.6.7.8:2",
        "tcp 1.2.3.4:1 -> [2000::1]:2",  # mixed families
        "tcp 1.2.3.4:0 -> 5.6.7.8:2",
        "tcp 1.2.3.4:1 -> 5.6.7.8:70000",
        "icmp 1.2.3.4:1 -> 5.6.7.8",
        "tcp 999.1.1.1:1 -> 5.6.7.8:2",
        "tcp 200.100.0.7:40000 20.0.0.1:4000",
    ],
)
def test_bad_flows_say_the_expected_form(text: str) -> None:
    with pytest.raises(FlowError) as info:
        parse_flow(text)
    assert "\n" not in str(info.value)


def test_mark_hash_agrees_with_the_lab_prediction() -> None:
    spec = build_spec("mdl-", marking="nft-jhash")
    entries = tuple((i, t.fwmark) for i, t in enumerate(spec.targets))
    by_mark = {t.fwmark: t.pod for t in spec.targets}
    for family, sources in ((4, spec.gateway.client_sources4), (6, spec.gateway.client_sources6)):
        m = NftMarkMap(
            table="meridio-nfqlb",
            chain="nfqlb",
            family=family,
            vip_set="",
            marks=tuple(mark for _i, mark in entries),
            modulus=len(entries),
            hash="jhash",
            seed=spec.hash_seed,
            entries=entries,
        )
        assert computable(m)
        for src in sources:
            _index, mark = mark_for(m, src)
            assert mark is not None and by_mark[mark] == predict_target(spec, src)
    unseeded = NftMarkMap(
        "t", "c", 4, "", (1, 2), 2, hash="jhash", seed=None, entries=((0, 1), (1, 2))
    )
    assert not computable(unseeded) and mark_for(unseeded, "1.2.3.4") == (None, None)


def _result(broken_at: int | None) -> TraceResult:
    roles = [
        ("gw", "gateway", "forward"),
        ("lb-fe-a", "lb-fe", "forward"),
        ("proxy-a", "proxy", "forward"),
        ("target-a1", "target", "forward"),
        ("target-a1", "target", "return"),
        ("proxy-a", "proxy", "return"),
        ("lb-fe-b", "lb-fe", "return"),
        ("gw", "gateway", "return"),
    ]
    hops = tuple(
        Hop(
            pod,
            role,
            direction,
            i != broken_at,
            f"reason <{i}>",
            "MDB110" if i == broken_at else None,
        )  # type: ignore[arg-type]
        for i, (pod, role, direction) in enumerate(roles)
    )
    path = TracePath("target-a1", True, hops)
    first = path.first_broken
    broken = Broken(first.pod, first.direction, first.reason, first.code) if first else None
    return TraceResult(parse_flow("tcp 200.100.0.7:40000 -> 20.0.0.1:4000"), (path,), broken)


def test_json_contract_keys() -> None:
    doc = json.loads(json.dumps(_result(1).to_dict()))
    assert set(doc) == {"flow", "verdict", "paths", "first_broken", "degraded"}
    assert set(doc["first_broken"]) == {"pod", "direction", "reason", "code", "certain"}
    assert doc["first_broken"]["pod"] == "lb-fe-a" and doc["verdict"] == "broken"
    assert set(doc["paths"][0]) == {"target", "chosen", "hops"}
    keys = {"pod", "role", "direction", "ok", "reason", "code", "degraded", "candidates", "via"}
    assert all(set(h) == keys for h in doc["paths"][0]["hops"])
    whole = _result(None).to_dict()
    assert whole["first_broken"] is None and whole["verdict"] == "whole"
    assert whole["degraded"] == []


def test_table_and_html() -> None:
    table = render_table(_result(2))
    assert "BROKEN at proxy-a (forward) [MDB110]" in table
    page = render_html(_result(2))
    assert (
        page.startswith("<!DOCTYPE html>")
        and "<script" not in page
        and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    assert "&lt;2&gt;" in page  # reasons are escaped
    svg = ET.fromstring(render_svg(_result(2).paths[0]))
    rects = svg.findall(".//{http://www.w3.org/2000/svg}rect")
    assert len(rects) == 8
    assert rects[2].get("stroke") == "#c62828"  # the broken hop in red
    assert rects[1].get("stroke") == "#2e7d32" and rects[3].get("stroke") == "#9e9e9e"
    assert "whole" in render_table(_result(None))
