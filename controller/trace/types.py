"""The trace's plain data: FIB questions, the kernel's answers, and the path.

Why separate dataclasses (not the probe protobufs): the trace core is pure and
must be testable with hand-built answers; the I/O layer
(controller/services/trace.py) converts ``probe_pb2.RouteResult`` into
``RouteAnswer`` at its boundary, exactly as convert.py does for snapshots.

The JSON contract of ``trace -o json`` is ``TraceResult.to_dict()``: an
object with ``flow``, ``verdict`` (whole | degraded | uncertain | broken),
``paths`` (one per candidate target: ``target``, ``chosen``, ``hops`` of
``{pod, role, direction, ok, reason, code, degraded, candidates, via}``),
``first_broken`` (``{pod, direction, reason, code, certain}`` or null) and
``degraded`` (``[{pod, direction, reason, code}]``).

Verdict words, so nobody reads a working flow as broken:
- *whole*: every way the flow can take gets through, both directions;
- *degraded*: whole, but a hop on its path has kernel state that breaks
  other flows (a proxy's ECMP lacking an LB's nexthop): listed with its code,
  never as this flow's ``first_broken``;
- *uncertain*: the kernel picks between candidates with a hash we cannot
  compute (multipath.py) and some of them are broken: ``first_broken`` names
  the first such hop with ``certain: false``;
- *broken*: every way fails; ``first_broken`` is the first hop that stops it.

A hop where the kernel picks with such a hash carries ``candidates`` (pod
names); the hops after it that depend on the pick carry ``via`` (the
candidate they belong to), one run of hops per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from meridio_debug.controller.model import Nexthop
from meridio_debug.controller.trace.flow import Flow

Direction = Literal["forward", "return"]


@dataclass(frozen=True, slots=True)
class RouteQuery:
    """One ``ip route get`` to ask one pod's kernel (see protos/probe.proto)."""

    id: str
    dst: str
    src: str = ""
    iif: str = ""
    oif: str = ""
    mark: int = 0
    ipproto: str = ""
    sport: int = 0
    dport: int = 0


@dataclass(frozen=True, slots=True)
class RouteAnswer:
    """The kernel's answer: the selected next hop and the FIB entry that matched."""

    ok: bool
    errno: int = 0
    error: str = ""
    table: int = 0
    type: str = ""
    gateway: str = ""
    dev: str = ""
    prefsrc: str = ""
    route_dst: str = ""
    protocol: str = ""
    metric: int = 0
    nexthops: tuple[Nexthop, ...] = ()
    flags: tuple[str, ...] = ()

    def describe(self) -> str:
        """``table 5001: default via 172.16.1.6 dev conduit-a--232a`` (or the error)."""
        if not self.ok:
            return f"kernel: {self.error or f'errno {self.errno}'}"
        parts = [f"table {self.table}:"]
        if self.type not in ("unicast", ""):
            parts.append(self.type)
        parts.append(self.route_dst or "?")
        if self.gateway:
            parts.append(f"via {self.gateway}")
        if self.dev:
            parts.append(f"dev {self.dev}")
        return " ".join(parts)


# pod -> query id -> answer (a pod missing: its agent could not be asked)
Answers = dict[str, dict[str, RouteAnswer]]


@dataclass(frozen=True, slots=True)
class Hop:
    """One pod on the path, in one direction: fine, or broken and why."""

    pod: str
    role: str
    direction: Direction
    ok: bool
    reason: str
    code: str | None = None
    label: str = ""  # a few words for the drawing (mark, table, port ...)
    degraded: bool = False  # ok for this flow; ``code`` breaks other flows here
    candidates: tuple[str, ...] = ()  # the kernel picks one of these pods, hash unknown
    via: str = ""  # on the branch of this candidate (of the hop with candidates before it)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "role": self.role,
            "direction": self.direction,
            "ok": self.ok,
            "reason": self.reason,
            "code": self.code,
            "degraded": self.degraded,
            "candidates": list(self.candidates) if self.candidates else None,
            "via": self.via or None,
        }


@dataclass(frozen=True, slots=True)
class TracePath:
    """The way to and back from one candidate target."""

    target: str
    chosen: bool
    hops: tuple[Hop, ...]

    @property
    def first_broken(self) -> Hop | None:
        """The first hop that stops the flow on *every* way it can take (None: not certain)."""
        branches = self.branches
        for i, hop in enumerate(self.hops):
            if hop.ok:
                continue
            if not hop.via:
                return hop
            # a branch hop: certain only when every candidate's branch fails
            if all(any(not h.ok for h in hs) for hs in branches.values()):
                return hop
            return next((h for h in self.hops[i + 1 :] if not h.ok and not h.via), None)
        return None

    @property
    def maybe_broken(self) -> Hop | None:
        """The first broken hop on *some* way the flow can take."""
        return next((h for h in self.hops if not h.ok), None)

    @property
    def branches(self) -> dict[str, list[Hop]]:
        out: dict[str, list[Hop]] = {}
        for hop in self.hops:
            if hop.via:
                out.setdefault(hop.via, []).append(hop)
        return out

    @property
    def degraded(self) -> tuple[Hop, ...]:
        return tuple(h for h in self.hops if h.degraded)

    @property
    def whole(self) -> bool:
        return self.maybe_broken is None

    @property
    def verdict(self) -> str:
        if self.first_broken is not None:
            return "broken"
        if self.maybe_broken is not None:
            return "uncertain"
        return "degraded" if self.degraded else "whole"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "chosen": self.chosen,
            "hops": [h.to_dict() for h in self.hops],
        }


@dataclass(frozen=True, slots=True)
class Broken:
    pod: str
    direction: Direction
    reason: str
    code: str | None = None
    certain: bool = True  # False: broken on some of the candidates the kernel picks from

    def to_dict(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "direction": self.direction,
            "reason": self.reason,
            "code": self.code,
            "certain": self.certain,
        }


def degraded_dict(hop: Hop) -> dict[str, Any]:
    return {"pod": hop.pod, "direction": hop.direction, "reason": hop.reason, "code": hop.code}


@dataclass(frozen=True, slots=True)
class TraceResult:
    flow: Flow
    paths: tuple[TracePath, ...]
    first_broken: Broken | None
    notes: tuple[str, ...] = field(default=())  # how the choice was made, what is unknown
    degraded: tuple[Hop, ...] = field(default=())  # on the flow's path, breaking other flows

    @property
    def chosen(self) -> TracePath | None:
        return next((p for p in self.paths if p.chosen), None)

    @property
    def ok(self) -> bool:
        return self.first_broken is None

    @property
    def verdict(self) -> str:
        if self.first_broken is not None:
            return "broken" if self.first_broken.certain else "uncertain"
        return "degraded" if self.degraded else "whole"

    def to_dict(self) -> dict[str, Any]:
        return {
            "flow": self.flow.to_dict(),
            "verdict": self.verdict,
            "paths": [p.to_dict() for p in self.paths],
            "first_broken": self.first_broken.to_dict() if self.first_broken else None,
            "degraded": [degraded_dict(h) for h in self.degraded],
        }
