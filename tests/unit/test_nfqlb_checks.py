"""MDB119-121 on snapshots of LBs that run real nfqlb (queue rules, flows, shms).

Each case breaks one LB the way the netns tests break the real lab (nfqlb killed, the flow
deleted or narrowed to another VIP, every target deactivated) and asserts exactly which
codes come out; the healthy state says nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from lab_fixture import build_lab, with_pod

from meridio_debug.controller.analysis import Severity, analyze
from meridio_debug.controller.model import (
    NfqlbFlow,
    NfqlbShm,
    NftQueueRule,
    PodSnapshot,
    SectionStatus,
    TrenchState,
)

LBS = ("lb-fe-a", "lb-fe-b")
FLOW = NfqlbFlow(
    name="tshm-stream-a-flow-a",
    priority=1,
    protocols=("tcp", "udp"),
    dests=("20.0.0.1/32", "2000::1/128"),
    dports=("4000-4003",),
    user_ref="tshm-stream-a",
)
QUEUES = tuple(
    NftQueueRule("meridio-nfqlb", chain, family, f"ipv{family}-vips", "0-3")
    for chain in ("nfqlb", "nfqlb-local")
    for family in (4, 6)
)


def _section(s: PodSnapshot, name: str, state: str, message: str = "") -> PodSnapshot:
    return dataclasses.replace(
        s,
        sections=tuple(
            SectionStatus(name, state, message) if st.name == name else st  # type: ignore[arg-type]
            for st in s.sections
        ),
    )


def _real_nfqlb(s: PodSnapshot) -> PodSnapshot:
    """The LB as the lab runs it: queue rules instead of the mark map, one flow, one shm."""
    marks = tuple(sorted({r.fwmark for r in s.rules if r.has_fwmark}))
    s = _section(s, "nfqlb", "OK")
    return dataclasses.replace(
        s,
        nft=dataclasses.replace(s.nft, mark_maps=(), queue_rules=QUEUES),
        nfqlb_shms=(
            NfqlbShm(
                name="tshm-stream-a",
                m=9973,
                n=100,
                active=marks,
                indexes=tuple(m - 5001 for m in marks),
            ),
        ),
        nfqlb_flows=(FLOW,),
    )


def _healthy() -> TrenchState:
    state = build_lab()
    for lb in LBS:
        state = with_pod(state, lb, _real_nfqlb)
    return state


HEALTHY = _healthy()
Mutation = Callable[[TrenchState], TrenchState]


def on(pod: str, fn: Callable[[PodSnapshot], PodSnapshot]) -> Mutation:
    return lambda state: with_pod(state, pod, fn)


def _nfqlb_stopped(s: PodSnapshot) -> PodSnapshot:
    s = _section(s, "nfqlb", "ABSENT", "nfqlb not running: nothing listening on @nfqlb")
    return dataclasses.replace(s, nfqlb_flows=(), nfqlb_shms=())


def _flows(*flows: NfqlbFlow) -> Callable[[PodSnapshot], PodSnapshot]:
    return lambda s: dataclasses.replace(s, nfqlb_flows=flows)


def _no_active(s: PodSnapshot) -> PodSnapshot:
    shm = dataclasses.replace(s.nfqlb_shms[0], active=(), indexes=())
    return dataclasses.replace(s, nfqlb_shms=(shm,))


NFQLB_CASES: list[tuple[str, Mutation, set[tuple[str, str]]]] = [
    (
        "MDB119 nfqlb killed while nft queues to it",
        on("lb-fe-a", _nfqlb_stopped),
        {("MDB119", "lb-fe-a")},
    ),
    (
        "MDB120 the trench's flow deleted from nfqlb: both VIPs match nothing",
        on("lb-fe-b", _flows()),
        {("MDB120", "lb-fe-b")},
    ),
    (
        "MDB120 the flow narrowed to the IPv4 VIP: the IPv6 VIP matches nothing",
        on("lb-fe-a", _flows(dataclasses.replace(FLOW, dests=("20.0.0.1/32",)))),
        {("MDB120", "lb-fe-a")},
    ),
    (
        "MDB121 every target deactivated (and their rules gone: no MDB113)",
        on(
            "lb-fe-a",
            lambda s: _no_active(
                dataclasses.replace(s, rules=tuple(r for r in s.rules if not r.has_fwmark))
            ),
        ),
        {("MDB121", "lb-fe-a"), ("MDB402", "lb-fe-a")},
    ),
]


def problems(state: TrenchState) -> set[tuple[str, str]]:
    return {(f.code, f.pod) for f in analyze(state).at_least(Severity.WARNING)}


def test_healthy_nfqlb_lab_is_silent() -> None:
    assert problems(HEALTHY) == set()


@pytest.mark.parametrize(("name", "mutation", "want"), NFQLB_CASES, ids=[c[0] for c in NFQLB_CASES])
def test_nfqlb_breaks_are_reported_exactly(
    name: str, mutation: Mutation, want: set[tuple[str, str]]
) -> None:
    got = problems(mutation(HEALTHY))
    assert {p for p in got if p[0].startswith("MDB1")} == {
        p for p in want if p[0].startswith("MDB1")
    }, name
    assert {p for p in want if not p[0].startswith("MDB1")} <= got, name


def test_mdb119_evidence_names_the_queue_rules_and_why_nfqlb_is_absent() -> None:
    (finding,) = [
        f for f in analyze(on("lb-fe-a", _nfqlb_stopped)(HEALTHY)).findings if f.code == "MDB119"
    ]
    assert "meridio-nfqlb/nfqlb: @ipv4-vips -> queue 0-3" in finding.evidence["queue_rules"]
    assert "nothing listening on @nfqlb" in finding.evidence["nfqlb"]
    assert "stateless-lb" in finding.hint
