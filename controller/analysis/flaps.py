"""Over time (MDB7xx): what happened during a watched window (``analyze --watch S``).

Why: a snapshot shows a trench that has already recovered, or a broken one
without saying how it broke. Meridio #575 is the pattern: a link flap, then a
route that never came back. The agents stream netlink events for S seconds
and bird is sampled every second; these rules read that timeline (and, for
"which tables matter", the final snapshot's relations: the tables ``from VIP``
rules and fwmark rules point at). Times in evidence are seconds from the
window's start, so the findings read like a story.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from meridio_debug.controller.analysis._base import trench_check
from meridio_debug.controller.analysis._view import TrenchView
from meridio_debug.controller.analysis.findings import Issue, Severity
from meridio_debug.controller.model import NetEvent, Timeline

_FAILED = ("FAILED", "INCOMPLETE")


def _timeline(trench: TrenchView) -> Timeline | None:
    return trench.state.timeline


def _at(timeline: Timeline, unix_ns: int) -> float:
    return round((unix_ns - timeline.start_unix_ns) / 1e9, 3)


@trench_check("MDB701", Severity.WARNING, "link went down during the window", roles=())
def check_link_flaps(trench: TrenchView) -> Iterator[Issue]:
    """A link that went down (and maybe up again) while watched."""
    tl = _timeline(trench)
    if tl is None:
        return
    history: dict[tuple[str, str], list[tuple[float, bool]]] = defaultdict(list)
    for e in tl.events:
        if e.kind == "link" and e.link is not None and e.action == "new":
            history[(e.pod, e.link.name)].append((_at(tl, e.unix_ns), e.link.is_up))
        elif e.kind == "link" and e.link is not None and e.action == "del":
            history[(e.pod, e.link.name)].append((_at(tl, e.unix_ns), False))
    for (pod, ifname), changes in sorted(history.items()):
        downs = [
            t
            for (t, up), prev in zip(changes, [(0.0, True), *changes], strict=False)
            if not up and prev[1]
        ]
        if not downs:
            continue
        back = changes[-1][1]
        yield Issue(
            pod=pod,
            summary=f"{ifname} went down {len(downs)} time(s) at {', '.join(f'{t:g} s' for t in downs)}"
            + (", up again at the end" if back else ", still down at the end"),
            evidence={
                "interface": ifname,
                "down_at_s": downs,
                "up_at_end": back,
                "changes": [{"at_s": t, "up": up} for t, up in changes],
            },
            hint="a flapping conduit or external link: NSM healing (conduit), the VLAN/NAD "
            "(external); check that routes came back after it (MDB702)",
        )


def _watched_tables(trench: TrenchView, pod: str) -> dict[int, str]:
    view = trench.by_name.get(pod)
    if view is None:
        return {}
    out = {t: "VIP egress" for t in view.source_tables}
    out.update({r.table: f"fwmark {r.fwmark:#x}" for r in view.fwmark_rules})
    return out


@trench_check(
    "MDB702", Severity.ERROR, "route withdrawn from a VIP egress or fwmark table", roles=()
)
def check_route_withdrawals(trench: TrenchView) -> Iterator[Issue]:
    """A route deleted from a table that ``from VIP`` or fwmark rules use (Meridio #575)."""
    tl = _timeline(trench)
    if tl is None:
        return
    per_route: dict[tuple[str, int, str], list[NetEvent]] = defaultdict(list)
    for e in tl.events:
        if e.kind == "route" and e.route is not None:
            per_route[(e.pod, e.route.table, f"{e.route.family}:{e.route.dst}")].append(e)
    for (pod, table, _key), events in sorted(per_route.items()):
        tables = _watched_tables(trench, pod)
        if table not in tables or not any(e.action == "del" for e in events):
            continue
        route = next(e.route for e in events if e.action == "del" and e.route is not None)
        back = events[-1].action == "new"
        withdrawn = [_at(tl, e.unix_ns) for e in events if e.action == "del"]
        yield Issue(
            pod=pod,
            summary=f"{route} ({tables[table]} table) withdrawn at "
            f"{', '.join(f'{t:g} s' for t in withdrawn)}"
            + (", back at the end" if back else ", not back at the end"),
            evidence={
                "table": table,
                "purpose": tables[table],
                "route": str(route),
                "withdrawn_at_s": withdrawn,
                "back_at_end": back,
                "events": [
                    {"at_s": _at(tl, e.unix_ns), "action": e.action, "summary": e.summary}
                    for e in events
                ],
            },
            hint="VIP egress: bird withdrew the gateway's default (BGP/BFD drop, MDB703); fwmark: "
            "the LB removed a target (TAPA closed the stream or NSM re-healed the conduit)",
        )


@trench_check("MDB703", Severity.ERROR, "BGP or BFD session dropped during the window", roles=())
def check_session_drops(trench: TrenchView) -> Iterator[Issue]:
    """A BGP protocol that left Established, or a BFD session that left Up, between samples."""
    tl = _timeline(trench)
    if tl is None:
        return
    seen: dict[tuple[str, str], list[tuple[float, bool, str]]] = defaultdict(list)
    for sample in sorted(tl.samples, key=lambda s: s.unix_ns):
        t = _at(tl, sample.unix_ns)
        for p in sample.protocols:
            if p.is_bgp:
                seen[(sample.pod, f"BGP {p.name}")].append(
                    (t, p.is_established, f"{p.state} {p.info}".strip())
                )
        for b in sample.bfd_sessions:
            seen[(sample.pod, f"BFD {b.address}")].append((t, b.is_up, b.state))
    for (pod, name), states in sorted(seen.items()):
        drops = [
            t
            for (t, ok, _s), (_pt, pok, _ps) in zip(states[1:], states, strict=False)
            if pok and not ok
        ]
        if not drops:
            continue
        yield Issue(
            pod=pod,
            summary=f"{name} dropped at {', '.join(f'{t:g} s' for t in drops)}; "
            f"at the end: {states[-1][2]}",
            evidence={
                "session": name,
                "dropped_at_s": drops,
                "samples": [{"at_s": t, "ok": ok, "state": st} for t, ok, st in states],
            },
            hint="the gateway's routes go with it (MDB702 on the VIP egress table); check the "
            "router and BFD timers against the Gateway, and the external link (MDB701)",
        )


@trench_check("MDB704", Severity.WARNING, "neighbour failed during the window", roles=())
def check_neighbour_failures(trench: TrenchView) -> Iterator[Issue]:
    """A neighbour that became FAILED/INCOMPLETE while watched (a next hop stopped answering)."""
    tl = _timeline(trench)
    if tl is None:
        return
    failed: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for e in tl.events:
        n = e.neighbour
        if e.kind == "neighbour" and n is not None and e.action == "new" and n.is_failed:
            failed[(e.pod, n.ifname, n.dst)].append(_at(tl, e.unix_ns))
    for (pod, ifname, dst), times in sorted(failed.items()):
        yield Issue(
            pod=pod,
            summary=f"neighbour {dst} on {ifname} failed at {', '.join(f'{t:g} s' for t in times)}",
            evidence={"neighbour": dst, "interface": ifname, "failed_at_s": times},
            hint="the next hop stopped answering ARP/ND: its pod restarted or its link flapped",
        )


@trench_check("MDB705", Severity.WARNING, "watched window incomplete", roles=())
def check_window_incomplete(trench: TrenchView) -> Iterator[Issue]:
    """The kernel dropped events (ENOBUFS), or a pod could not be watched."""
    tl = _timeline(trench)
    if tl is None:
        return
    for pod in sorted({e.pod for e in tl.events if e.overflow}):
        yield Issue(
            pod=pod,
            summary="the kernel dropped netlink events during the window: "
            "the timeline of this pod is incomplete",
            evidence={"overflow": True},
            hint="watch fewer kinds or a shorter window; the snapshot is still exact",
        )
    for error in tl.errors:
        yield Issue(
            pod="",
            summary=f"not watched: {error}",
            evidence={"error": error},
            hint="the other pods' timelines are complete",
        )


CHECKS = (
    check_link_flaps,
    check_route_withdrawals,
    check_session_drops,
    check_neighbour_failures,
    check_window_incomplete,
)
