"""What is there: namespaces, containers and BGP sessions of a lab.

Why separate from building: ``status`` must work for anyone (a half-built
lab, a lab whose bird died, no lab at all) and must never change anything.
It reads ``lab.json``, looks at /run/netns and /proc, and asks each FE's
bird over its control socket (``birdc -s SOCK show protocols``), the same
question Meridio's frontend asks to decide whether a gateway is up.
``up`` uses the same checks to wait until the lab carries traffic.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meridio_debug.controller.errors import LabError
from meridio_debug.controller.lab import _system as system
from meridio_debug.controller.lab import containers
from meridio_debug.controller.lab.prereq import find_tools
from meridio_debug.controller.lab.spec import DEFAULT_PREFIX, LabSpec
from meridio_debug.controller.lab.state import (
    STATE_ROOT,
    bird_paths,
    read_state,
    state_dir,
)

# bird2 `show protocols`: Name Proto Table State Since Info; Since is a time,
# or a date and a time, depending on bird's timeformat.
_PROTO_LINE = re.compile(
    r"^(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+"
    r"(?P<since>\d{4}-\d\d-\d\d \S+|\S+)\s*(?P<info>.*)$"
)


@dataclass(frozen=True)
class NamespaceStatus:
    name: str
    pod: str
    role: str
    exists: bool


@dataclass(frozen=True)
class ProcessStatus:
    """A container of the lab: its PID 1 (host pid) and what that runs."""

    kind: str  # bird, target, nfqlb, idle
    pod: str
    netns: str
    pid: int
    alive: bool
    container: str = ""


@dataclass(frozen=True)
class BgpSession:
    """One gateway session of an FE as bird reports it: a BGP protocol or a BFD session.

    For BGP, ``protocol`` is the protocol name and state/info are bird's State
    and Info columns. For BFD (``kind="bfd"``), ``protocol`` is ``BFD ADDRESS``
    and ``state`` is the session state (Up, Down, Init, AdminDown). Meridio's
    frontend needs both: BGP Established *and* BFD Up.
    """

    pod: str
    protocol: str
    state: str  # bird's State column ("up", "start", ...), or "unknown"
    info: str  # bird's Info column ("Established", "Active Socket: ..."), or why unknown
    kind: str = "bgp"

    @property
    def established(self) -> bool:
        if self.kind == "bfd":
            return self.state == "Up"
        return self.state == "up" and self.info.startswith("Established")


@dataclass(frozen=True)
class LabStatus:
    """The lab with one prefix, as found now."""

    prefix: str
    spec: LabSpec | None  # None: no lab.json
    complete: bool  # ``up`` finished
    namespaces: tuple[NamespaceStatus, ...]
    processes: tuple[ProcessStatus, ...]
    sessions: tuple[BgpSession, ...]
    stray_namespaces: tuple[str, ...]  # named like this lab's but not in its spec

    @property
    def exists(self) -> bool:
        return self.spec is not None or bool(self.stray_namespaces)

    @property
    def problems(self) -> tuple[str, ...]:
        """What is wrong, one line each; empty for a healthy lab."""
        if self.spec is None:
            if self.stray_namespaces:
                return (
                    f"namespaces {', '.join(self.stray_namespaces)} exist but no lab is "
                    "recorded: run lab down (or lab up) with this prefix",
                )
            return ("no lab with this prefix",)
        out: list[str] = []
        if not self.complete:
            out.append("lab up did not finish")
        out += [f"namespace {n.name} missing" for n in self.namespaces if not n.exists]
        out += [
            f"container {p.container} of {p.pod} ({p.kind}, pid {p.pid}) not running"
            for p in self.processes
            if not p.alive
        ]
        out += [
            f"{s.pod} {s.protocol}: {s.state} {s.info}".rstrip()
            for s in self.sessions
            if not s.established
        ]
        out += [f"stray namespace {n}" for n in self.stray_namespaces]
        return tuple(out)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for ``lab status -o json``)."""
        spec = self.spec
        return {
            "prefix": self.prefix,
            "exists": self.exists,
            "complete": self.complete,
            "healthy": self.healthy,
            "problems": list(self.problems),
            "layout": None
            if spec is None
            else {
                "lbs": spec.lbs,
                "proxies": spec.proxies,
                "targets_per_proxy": spec.targets_per_proxy,
            },
            "namespaces": [asdict(n) for n in self.namespaces],
            "processes": [asdict(p) for p in self.processes],
            "sessions": [{**asdict(x), "established": x.established} for x in self.sessions],
            "stray_namespaces": list(self.stray_namespaces),
        }

    def established(self, pod: str) -> bool:
        """Whether every gateway session of FE ``pod`` is Established."""
        mine = [s for s in self.sessions if s.pod == pod]
        return bool(mine) and all(s.established for s in mine)


def parse_bird_protocols(text: str) -> dict[str, tuple[str, str]]:
    """``birdc show protocols`` output -> protocol name -> (state, info)."""
    out: dict[str, tuple[str, str]] = {}
    header_seen = False
    for line in text.splitlines():
        if line.startswith("Name "):
            header_seen = True
            continue
        if not header_seen or not line.strip():
            continue
        m = _PROTO_LINE.match(line.strip())
        if m:
            out[m["name"]] = (m["state"], m["info"].strip())
    return out


def parse_bfd_sessions(text: str) -> list[tuple[str, str, str]]:
    """``birdc show bfd sessions`` output -> (address, interface, state) per session."""
    out: list[tuple[str, str, str]] = []
    header_seen = False
    for line in text.splitlines():
        if line.startswith("IP address"):
            header_seen = True
            continue
        fields = line.split()
        if header_seen and len(fields) >= 3 and not line.endswith(":"):
            out.append((fields[0], fields[1], fields[2]))
    return out


def bgp_sessions(spec: LabSpec, birdc: str | None, root: Path = STATE_ROOT) -> list[BgpSession]:
    """The gateway sessions of every FE, BGP then BFD (``unknown`` when bird cannot be asked)."""
    directory = state_dir(spec.prefix, root)
    names = (spec.bgp.protocol4, spec.bgp.protocol6)

    def ask(pod: str) -> list[BgpSession]:
        if birdc is None:
            return [BgpSession(pod, n, "unknown", "birdc not found") for n in names]
        socket = bird_paths(directory, pod)["ctl"]
        try:
            text = system.run(
                [birdc, "-s", str(socket), "show", "protocols"], what=f"birdc {pod}", timeout=5
            )
        except LabError as exc:
            return [BgpSession(pod, n, "unknown", str(exc)) for n in names]
        found = parse_bird_protocols(text)
        sessions = [
            BgpSession(pod, n, *found.get(n, ("unknown", "no such protocol in bird")))
            for n in names
        ]
        if not all(x.established for x in sessions):
            return sessions  # BFD sessions appear with BGP: ask once that is up
        try:
            text = system.run(
                [birdc, "-s", str(socket), "show", "bfd", "sessions"],
                what=f"birdc {pod}",
                timeout=5,
            )
        except LabError as exc:
            return [*sessions, BgpSession(pod, "BFD", "unknown", str(exc), kind="bfd")]
        bfd = [
            BgpSession(pod, f"BFD {addr}", state, f"{state} on {iface}", kind="bfd")
            for addr, iface, state in parse_bfd_sessions(text)
        ]
        if not bfd:
            bfd = [BgpSession(pod, "BFD", "none", "no BFD session yet", kind="bfd")]
        return sessions + bfd

    results = system.parallel(ask, [f.pod for f in spec.frontends])
    return [s for group in results for s in group]


def _route_hops(ip: str, netns: str, family: int, dst: str, table: str) -> int:
    """How many next hops ``ip -n netns route show dst table table`` has (0: no route)."""
    try:
        text = system.run(
            [ip, f"-{family}", "-n", netns, "-j", "route", "show", dst, "table", table],
            what=f"routes of {netns}",
            timeout=5,
        )
    except LabError as exc:
        # The kernel creates a table with its first route: until bird installs the
        # default, `ip route show table 4096` fails instead of printing nothing.
        if "FIB table does not exist" in str(exc):
            return 0
        raise
    routes = json.loads(text or "[]")
    return sum(
        len(r.get("nexthops", [])) or 1 for r in routes if r.get("type", "unicast") == "unicast"
    )


def dataplane_problems(spec: LabSpec, ip: str, birdc: str, root: Path = STATE_ROOT) -> list[str]:
    """What still keeps traffic from flowing: BGP and BFD sessions, FE egress defaults, gateway VIP routes."""
    problems = [
        f"{s.pod} {s.protocol}: {s.state} {s.info}".rstrip()
        for s in bgp_sessions(spec, birdc, root)
        if not s.established
    ]
    if problems:
        return problems
    gw_ns = spec.netns(spec.gateway.pod)
    checks: list[tuple[str, int, str, str, int]] = [
        (gw_ns, 4, f"{spec.vip4}/32", "main", len(spec.frontends)),
        (gw_ns, 6, f"{spec.vip6}/128", "main", len(spec.frontends)),
    ]
    for f in spec.frontends:
        ns = spec.netns(f.pod)
        checks += [(ns, fam, "default", str(spec.vip_table), 1) for fam in (4, 6)]

    def check(item: tuple[str, int, str, str, int]) -> str | None:
        ns, fam, dst, table, want = item
        have = _route_hops(ip, ns, fam, dst, table)
        if have < want:
            return f"{ns}: {dst} table {table} has {have} of {want} next hops"
        return None

    return [p for p in system.parallel(check, checks) if p]


def status(prefix: str = DEFAULT_PREFIX, root: Path = STATE_ROOT) -> LabStatus:
    """What exists of lab ``prefix`` now. Changes nothing; works without root (less detail)."""
    state = read_state(prefix, root)
    found = set(system.lab_namespaces(prefix))
    if state is None:
        return LabStatus(prefix, None, False, (), (), (), tuple(sorted(found)))
    spec = state.spec
    directory = state_dir(prefix, root)
    namespaces = tuple(
        NamespaceStatus(p.netns, p.name, p.role, system.netns_exists(p.netns)) for p in spec.pods
    )
    processes = tuple(
        ProcessStatus(
            r.kind,
            r.pod,
            r.netns,
            r.pid,
            containers.alive_and_ours(
                r.pid, directory, containers.marker(directory, r.pod, r.container)
            ),
            r.container,
        )
        for r in state.processes
    )
    tools, _ = find_tools()
    sessions = tuple(bgp_sessions(spec, tools.get("birdc"), root))
    stray = tuple(sorted(found - set(spec.namespaces)))
    return LabStatus(prefix, spec, state.complete, namespaces, processes, sessions, stray)
