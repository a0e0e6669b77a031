"""Configuration vs data plane (MDB6xx): the lab's Meridio objects against its pods' state.

Each case breaks one side -- the data plane (an nfqlb flow on other ports, a stale
nft VIP, a bird session with another ASN) or the configuration (a Flow edited,
a Vip added) -- of a healthy lab with real-nfqlb LBs, and asserts exactly which
code fires on which pod. Parser tests read Meridio's own e2e CRs and ConfigMap form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from lab_fixture import build_lab, change, with_pod

from meridio_debug.controller.analysis import Severity, analyze
from meridio_debug.controller.analysis.config import port_ranges
from meridio_debug.controller.errors import ConfigError
from meridio_debug.controller.lab.spec import build_spec
from meridio_debug.controller.lab.trench_crs import lab_config, lab_crs_yaml
from meridio_debug.controller.model import (
    CfgVip,
    MeridioConfig,
    NfqlbFlow,
    NfqlbShm,
    PodSnapshot,
    SectionStatus,
    TrenchState,
)
from meridio_debug.controller.model.meridio_config import (
    config_from_configmap,
    config_from_yaml,
    read_config_file,
)
from meridio_debug.controller.services.bundle import _config_from_dict, _config_to_dict

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "meridio" / "e2e"
SPEC = build_spec()
LBS = ("lb-fe-a", "lb-fe-b")


def _real_nfqlb(s: PodSnapshot) -> PodSnapshot:
    """The LB as real nfqlb runs it: flow tshm-stream-a-flow-a as Meridio's stateless-lb sets."""
    marks = tuple(sorted({r.fwmark for r in s.rules if r.has_fwmark}))
    return dataclasses.replace(
        s,
        sections=tuple(
            SectionStatus(st.name, "OK") if st.name == "nfqlb" else st for st in s.sections
        ),
        nft=dataclasses.replace(s.nft, mark_maps=()),
        nfqlb_shms=(NfqlbShm(name="tshm-stream-a", m=9973, n=100, active=marks),),
        nfqlb_flows=(
            NfqlbFlow(
                name="tshm-stream-a-flow-a",
                priority=1,
                protocols=("tcp", "udp"),
                dests=("20.0.0.1/32", "2000::1/128"),
                dports=("4000-4003",),
                user_ref="tshm-stream-a",
            ),
        ),
    )


def _healthy() -> TrenchState:
    state = build_lab(with_config=True)
    for lb in LBS:
        state = with_pod(state, lb, _real_nfqlb)
    return state


HEALTHY = _healthy()
Mutation = Callable[[TrenchState], TrenchState]


def problems(state: TrenchState) -> set[tuple[str, str]]:
    return {(f.code, f.pod) for f in analyze(state).at_least(Severity.WARNING)}


def on(pod: str, fn: Callable[[PodSnapshot], PodSnapshot]) -> Mutation:
    return lambda state: with_pod(state, pod, fn)


def flow(**fields: object) -> Callable[[PodSnapshot], PodSnapshot]:
    return lambda s: dataclasses.replace(
        s, nfqlb_flows=change(s.nfqlb_flows, lambda _f: True, **fields)
    )


def config(fn: Callable[[MeridioConfig], MeridioConfig]) -> Mutation:
    def run(state: TrenchState) -> TrenchState:
        assert state.config is not None and state.config.meridio is not None
        cfg = dataclasses.replace(state.config, meridio=fn(state.config.meridio))
        return dataclasses.replace(state, config=cfg)

    return run


def bird(**fields: object) -> Callable[[PodSnapshot], PodSnapshot]:
    return lambda s: dataclasses.replace(
        s,
        bird_protocols=change(
            s.bird_protocols, lambda p: p.neighbor_address == "169.254.100.150", **fields
        ),
    )


CONFIG_CASES: list[tuple[str, Mutation, set[tuple[str, str]]]] = [
    (
        "nfqlb flow missing",
        on("lb-fe-a", flow(name="tshm-stream-a-other")),
        {("MDB601", "lb-fe-a"), ("MDB603", "lb-fe-a")},
    ),
    ("nfqlb ports differ", on("lb-fe-b", flow(dports=("5000",))), {("MDB602", "lb-fe-b")}),
    (
        "nfqlb protocol and priority differ",
        on("lb-fe-a", flow(protocols=("tcp",), priority=3)),
        {("MDB602", "lb-fe-a")},
    ),
    (
        "Flow edited, LBs kept the old flow",
        config(
            lambda c: dataclasses.replace(
                c, flows=(dataclasses.replace(c.flows[0], destination_ports=("4000-4001",)),)
            )
        ),
        {("MDB602", "lb-fe-a"), ("MDB602", "lb-fe-b")},
    ),
    (
        "stale VIP in nft set",
        on(
            "lb-fe-a",
            lambda s: dataclasses.replace(
                s,
                nft=dataclasses.replace(
                    s.nft,
                    vip_sets=change(
                        s.nft.vip_sets,
                        lambda v: v.family == 4,
                        elements=("20.0.0.1/32", "20.0.0.9/32"),
                    ),
                ),
            ),
        ),
        # MDB114: the pods disagree too (an LB-only VIP)
        {("MDB114", "lb-fe-a")},
    ),
    (
        "stale from-VIP rule in a proxy",
        on(
            "proxy-a",
            lambda s: dataclasses.replace(
                s,
                rules=(
                    *s.rules,
                    dataclasses.replace(
                        next(r for r in s.rules if r.is_source_lookup and r.family == 4),
                        src="20.0.0.9/32",
                    ),
                ),
            ),
        ),
        {("MDB611", "proxy-a")},
    ),
    (
        "stale VIP on a target",
        on(
            "target-a1",
            lambda s: dataclasses.replace(
                s,
                addresses=(
                    *s.addresses,
                    dataclasses.replace(
                        next(a for a in s.addresses if a.address == "20.0.0.1"), address="20.0.0.9"
                    ),
                ),
            ),
        ),
        {("MDB611", "target-a1")},
    ),
    ("bird on another ASN", on("lb-fe-a", bird(neighbor_as="65000")), {("MDB621", "lb-fe-a")}),
    ("bird without BFD", on("lb-fe-b", bird(bfd=False)), {("MDB621", "lb-fe-b")}),
    (
        "a session that is down is MDB101 only",
        on("lb-fe-a", bird(neighbor_as="65000", bfd=False, state="start", info="Active")),
        {("MDB101", "lb-fe-a")},
    ),
    (
        "bird peers with an undeclared gateway",
        on("lb-fe-a", bird(neighbor_address="169.254.100.151")),
        # MDB102: BFD is configured and no session to that address exists
        {("MDB621", "lb-fe-a"), ("MDB622", "lb-fe-a"), ("MDB102", "lb-fe-a")},
    ),
    (
        "attractor interface renamed",
        config(
            lambda c: dataclasses.replace(
                c, attractors=(dataclasses.replace(c.attractors[0], interface="ext-vlan9"),)
            )
        ),
        {("MDB631", "lb-fe-a"), ("MDB631", "lb-fe-b")},
    ),
    (
        "shm N differs",
        on(
            "lb-fe-a",
            lambda s: dataclasses.replace(
                s, nfqlb_shms=change(s.nfqlb_shms, lambda _s: True, n=10)
            ),
        ),
        {("MDB632", "lb-fe-a")},
    ),
    (
        "conduit without interface",
        config(
            lambda c: dataclasses.replace(
                c, conduits=(dataclasses.replace(c.conduits[0], name="load-balancer"),)
            )
        ),
        {("MDB633", n) for n in ("lb-fe-a", "lb-fe-b", "proxy-a", "proxy-b")},
    ),
]


def test_healthy_lab_with_meridio_config_is_silent() -> None:
    assert problems(HEALTHY) == set()
    ran = {r.code for r in analyze(HEALTHY).runs if not r.skipped}
    assert {"MDB601", "MDB602", "MDB611", "MDB621", "MDB632", "MDB633"} <= ran


@pytest.mark.parametrize(
    ("mutation", "expected"), [pytest.param(m, e, id=n) for n, m, e in CONFIG_CASES]
)
def test_config_mutation_reports_exactly(
    mutation: Mutation, expected: set[tuple[str, str]]
) -> None:
    assert problems(mutation(HEALTHY)) == expected


def test_port_mismatch_shows_both_sides() -> None:
    state = on("lb-fe-b", flow(dports=("5000", "5001")))(HEALTHY)
    (finding,) = [f for f in analyze(state).findings if f.code == "MDB602"]
    assert finding.evidence["differs"] == {
        "dports": {"config": ["4000-4003"], "nfqlb": ["5000-5001"]}
    }
    assert "dports 5000-5001 (Flow: 4000-4003)" in finding.summary


def test_without_configuration_the_checks_are_silent() -> None:
    state = dataclasses.replace(HEALTHY, config=None)
    broken = on("lb-fe-b", flow(dports=("5000",)))(state)
    assert not {f.code for f in analyze(broken).findings if f.code.startswith("MDB6")}


@pytest.mark.parametrize(
    ("items", "ranges"),
    [
        (["4000"], ((4000, 4000),)),
        (["4000-4003"], ((4000, 4003),)),
        (["4000", "4001", "4002-4003"], ((4000, 4003),)),
        (["any"], ((0, 65535),)),
        ([], ((0, 65535),)),
        (["0-65535"], ((0, 65535),)),
    ],
)
def test_port_ranges(items: list[str], ranges: tuple[tuple[int, int], ...]) -> None:
    assert port_ranges(items) == ranges


def test_meridio_e2e_crs_parse() -> None:
    cfg = config_from_yaml((SHARED / "init-trench-a.yaml").read_text(), trench="trench-a")
    assert cfg.trench == "trench-a"
    flow = next(f for f in cfg.flows if f.name == "flow-a-z-tcp")
    assert (flow.stream, flow.priority, flow.protocols, flow.destination_ports) == (
        "stream-a-i",
        1,
        ("tcp",),
        ("4000",),
    )
    assert flow.vips == ("vip-a-1-v4", "vip-a-1-v6")
    gw = next(g for g in cfg.gateways if g.name == "gateway-v4-a-1")
    assert (gw.address, gw.remote_asn, gw.hold_time_s, gw.bfd, gw.bfd_min_tx_ms) == (
        "169.254.100.150",
        4248829953,
        24,
        True,
        300,
    )
    att = next(a for a in cfg.attractors if a.name == "attractor-a-1")
    assert att.interface == "ext-vlan0" and att.composites == ("conduit-a-1",)
    assert cfg.vip("vip-a-1-v4") == CfgVip("vip-a-1-v4", "20.0.0.1/32")


def test_configmap_form_parses() -> None:
    data = {
        "trench": "name: trench-a\n",
        "streams": "items:\n- name: stream-a\n  conduit: conduit-a\n  max-targets: 10\n",
        "flows": "items:\n- name: flow-a\n  vips: [vip1]\n  destination-port-ranges: ['5000-5003']\n"
        "  protocols: [tcp]\n  stream: stream-a\n  priority: 2\n",
        "vips": "items:\n- name: vip1\n  address: 10.0.0.1/32\n",
        "gateways": "items:\n- name: gw\n  address: 169.254.100.254\n  bfd: true\n"
        "  hold-time: 24\n  remote-asn: 4248829953\n  local-asn: 8103\n",
    }
    cfg = config_from_configmap(data, source="ConfigMap")
    assert cfg.trench == "trench-a"
    assert cfg.streams[0].max_targets == 10
    assert cfg.flows[0].destination_ports == ("5000-5003",) and cfg.flows[0].priority == 2
    assert cfg.gateways[0].bfd and cfg.gateways[0].hold_time_s == 24


def test_lab_crs_round_trip_through_yaml_and_bundle_meta() -> None:
    cfg = lab_config(SPEC)
    assert config_from_yaml(lab_crs_yaml(SPEC), source=cfg.source) == cfg
    assert HEALTHY.config is not None
    back = _config_from_dict(_config_to_dict(HEALTHY.config))
    assert back == HEALTHY.config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Flow\nspec: [1]\nmetadata: {name: f}\n", "spec is not a mapping"),
        ("a: [", "not valid YAML"),
        ("kind: Pod\n", "no Meridio object"),
        ("kind: Stream\nmetadata: {name: s}\nspec: {max-targets: lots}\n", "not a number"),
    ],
)
def test_bad_configuration_is_one_line(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "trench.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        read_config_file(path)
    assert "\n" not in str(err.value)


def test_readme_findings_table_lists_every_check() -> None:
    from meridio_debug.controller.analysis import CHECKS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [c.code for c in CHECKS if f"| {c.code} | {c.severity.label} |" not in readme]
    assert not missing, f"add these codes to the README's findings table: {missing}"
