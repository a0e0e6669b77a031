"""Over time (MDB7xx): flap rules on hand-built timelines over the healthy lab.

Each timeline is what the agents would stream (netlink events as pb.Event, bird
samples as bird-only snapshots) and goes through the bundle's conversion, so
the replay path is the one tested; the lab fixture gives the final snapshot
whose relations say which tables matter.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lab_fixture import build_lab, snap

from meridio_debug.controller.analysis import Severity, analyze
from meridio_debug.controller.model import TrenchState
from meridio_debug.controller.services.bundle import (
    Evidence,
    Recording,
    read_bundle,
    recording_to_dict,
    trench_state,
    write_bundle,
)
from meridio_debug.protos import agent_pb2 as pb

BASE = build_lab()
T0 = 1_764_000_000_000_000_000
S = 1_000_000_000


def link(pod: str, name: str, up: bool, at: float) -> tuple[str, pb.Event]:
    flags = ["UP", "LOWER_UP"] if up else []
    return pod, pb.Event(
        unix_ns=int(T0 + at * S),
        kind="link",
        action="new",
        summary=f"{name} {'UP' if up else 'DOWN'}",
        link=pb.Link(name=name, state="UP" if up else "DOWN", flags=flags),
    )


def route(pod: str, action: str, table: int, at: float) -> tuple[str, pb.Event]:
    return pod, pb.Event(
        unix_ns=int(T0 + at * S),
        kind="route",
        action=action,
        summary=f"{action} default",
        route=pb.Route(
            family=2, table=table, dst="default", gateway="169.254.100.150", dev="ext-vlan0"
        ),
    )


def bird(pod: str, at: float, established: bool) -> tuple[str, int, pb.Snapshot]:
    s = pb.Snapshot()
    s.bird.protocols.append(
        pb.BirdProtocol(
            name="NBR-gateway-v4-a",
            proto="BGP",
            state="up" if established else "start",
            info="Established" if established else "Active",
        )
    )
    return pod, int(T0 + at * S), s


def state(events=(), samples=(), errors=()) -> TrenchState:  # type: ignore[no-untyped-def]
    rec = Recording(T0, T0 + 10 * S, tuple(events), tuple(samples), tuple(errors))
    timeline = trench_state(Evidence(items=(), recording=rec)).timeline
    return dataclasses.replace(BASE, timeline=timeline)


def problems(s: TrenchState) -> set[tuple[str, str]]:
    return {(f.code, f.pod) for f in analyze(s).at_least(Severity.WARNING)}


def vip_table() -> int:
    lb = snap(BASE, "lb-fe-a")
    return next(r.table for r in lb.rules if r.is_source_lookup and r.family == 4)


def test_quiet_window_is_silent() -> None:
    quiet = state(samples=[bird("lb-fe-a", t, True) for t in (0, 1, 2)])
    assert problems(quiet) == set()


def test_link_flap_and_its_recovery() -> None:
    s = state([link("proxy-a", "bridge0", False, 2.0), link("proxy-a", "bridge0", True, 3.5)])
    assert problems(s) == {("MDB701", "proxy-a")}
    (f,) = analyze(s).at_least(Severity.WARNING)
    assert f.evidence["down_at_s"] == [2.0] and f.evidence["up_at_end"] is True
    assert "up again at the end" in f.summary


def test_vip_egress_route_withdrawn_and_not_back_is_mdb702() -> None:
    t = vip_table()
    s = state([route("lb-fe-a", "del", t, 4.0)])
    assert problems(s) == {("MDB702", "lb-fe-a")}
    (f,) = analyze(s).at_least(Severity.WARNING)
    assert f.evidence["purpose"] == "VIP egress" and f.evidence["back_at_end"] is False
    # a table no rule uses: not Meridio's business
    assert problems(state([route("lb-fe-a", "del", 77, 4.0)])) == set()


def test_bgp_drop_between_samples_is_mdb703() -> None:
    samples = [bird("lb-fe-a", 1, True), bird("lb-fe-a", 2, False), bird("lb-fe-a", 3, True)]
    s = state(samples=samples)
    assert problems(s) == {("MDB703", "lb-fe-a")}
    (f,) = analyze(s).at_least(Severity.WARNING)
    assert f.evidence["dropped_at_s"] == [2.0]


def test_neighbour_failure_and_lost_events() -> None:
    n = (
        "lb-fe-a",
        pb.Event(
            unix_ns=T0 + 5 * S,
            kind="neighbour",
            action="new",
            neighbour=pb.Neighbour(
                family=2, ifname="conduit-a--x", dst="172.16.1.6", state="FAILED"
            ),
        ),
    )
    lost = (
        "proxy-b",
        pb.Event(
            unix_ns=T0 + S,
            kind="link",
            action="new",
            overflow=True,
            link=pb.Link(name="bridge0", state="UP", flags=["UP"]),
        ),
    )
    s = state([n, lost], errors=["target-b2: agent did not start"])
    assert problems(s) == {("MDB704", "lb-fe-a"), ("MDB705", "proxy-b"), ("MDB705", "")}


def test_bundle_replays_the_window(tmp_path: Path) -> None:
    t = vip_table()
    rec = Recording(
        T0, T0 + 10 * S, (route("lb-fe-a", "del", t, 4.0),), (bird("lb-fe-a", 1, True),)
    )
    path = tmp_path / "w.tar.gz"
    write_bundle(Evidence(items=(), recording=rec), path)
    back = read_bundle(path).recording
    assert back is not None and recording_to_dict(back) == recording_to_dict(rec)


COVERED = {"MDB701", "MDB702", "MDB703", "MDB704", "MDB705"}
