"""Send connections through the lab and count which target answered each.

Why: "healthy" in lab.md is a statement about traffic: every flow from a
gateway client source to a VIP port is answered by exactly one target, and
the load is spread. The probes are planned here (pure: sources, ports and
protocols spread deterministically), run by ``traffic_client`` inside the
gateway namespace, and each answer is compared with
:func:`~meridio_debug.controller.lab.jhash.predict_target`, so a result
shows not only *that* something is wrong but which flows went astray.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from meridio_debug.controller.errors import LabError
from meridio_debug.controller.lab import _system as system
from meridio_debug.controller.lab.jhash import predict_target
from meridio_debug.controller.lab.prereq import check_root_and_ip
from meridio_debug.controller.lab.spec import LabSpec
from meridio_debug.controller.lab.state import STATE_ROOT, load_spec

log = logging.getLogger(__name__)

Protocol = Literal["tcp", "udp"]


@dataclass(frozen=True)
class Probe:
    """One connection (TCP) or one request/answer (UDP) from a gateway client source."""

    family: int
    src: str
    dst: str
    port: int
    proto: Protocol


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    expected: str  # the target predict_target names for the flow ("" when it cannot)
    answer: str | None  # the target that answered; None on failure
    error: str | None  # "timeout", "refused", ... ; None on success
    ms: float
    sport: int | None = None  # the source port the kernel gave the probe

    @property
    def ok(self) -> bool:
        return self.answer is not None and self.error is None


@dataclass(frozen=True)
class TrafficResult:
    """All probes of one ``traffic`` run and what they show."""

    prefix: str
    targets: tuple[str, ...]  # every target pod of the lab, in spec order
    results: tuple[ProbeResult, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Answers per target pod (every target listed, 0 included; strangers too)."""
        got = Counter(r.answer for r in self.results if r.ok and r.answer is not None)
        out = {t: got.get(t, 0) for t in self.targets}
        out.update({name: n for name, n in got.items() if name not in out})
        return out

    @property
    def failures(self) -> tuple[ProbeResult, ...]:
        """Probes nobody answered."""
        return tuple(r for r in self.results if not r.ok)

    @property
    def mispredicted(self) -> tuple[ProbeResult, ...]:
        """Answered probes whose target differs from the predicted one."""
        return tuple(r for r in self.results if r.ok and r.answer != r.expected)

    @property
    def unreached(self) -> tuple[str, ...]:
        """Targets that answered nothing."""
        counts = self.counts
        return tuple(t for t in self.targets if counts[t] == 0)

    @property
    def healthy(self) -> bool:
        """lab.md: every probe answered by exactly one target, and every target got some."""
        return bool(self.results) and not self.failures and not self.unreached

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary and every probe (for ``lab traffic -o json``)."""
        return {
            "prefix": self.prefix,
            "healthy": self.healthy,
            "probes": len(self.results),
            "failures": len(self.failures),
            "mispredicted": len(self.mispredicted),
            "counts": self.counts,
            "unreached": list(self.unreached),
            "results": [
                {
                    **asdict(r.probe),
                    "sport": r.sport,
                    "answer": r.answer,
                    "expected": r.expected,
                    "error": r.error,
                    "ms": r.ms,
                }
                for r in self.results
            ],
        }


def plan_probes(
    spec: LabSpec, connections: int = 64, family: int | None = None, udp: bool = True
) -> tuple[Probe, ...]:
    """``connections`` probes per family, over the client sources and the flow's ports.

    Probe ``i`` of a family comes from source ``i mod 64`` and uses a port
    that varies with ``i``; every fourth probe is UDP when ``udp``.
    """
    if connections < 1:
        raise LabError("traffic: connections must be at least 1")
    if family not in (None, 4, 6):
        raise LabError("traffic: family must be 4, 6 or None (both)")
    gw = spec.gateway
    probes: list[Probe] = []
    for fam in (4, 6) if family is None else (family,):
        sources = gw.client_sources4 if fam == 4 else gw.client_sources6
        dst = spec.vip4 if fam == 4 else spec.vip6
        for i in range(connections):
            proto: Protocol = "udp" if udp and i % 4 == 3 else "tcp"
            port = spec.ports[(i + i // 4) % len(spec.ports)]
            probes.append(Probe(fam, sources[i % len(sources)], dst, port, proto))
    return tuple(probes)


def _parse(text: str, count: int) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
        results = data["results"]
        if not isinstance(results, list) or len(results) != count:
            raise ValueError(f"expected {count} results")
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"traffic: the client in the gateway answered nonsense ({exc})") from exc
    return results


def _expected(spec: LabSpec, probe: Probe, sport: Any) -> str:
    """The target the lab's LBs should pick for the probe's flow; "" when its port is unknown."""
    try:
        return predict_target(
            spec,
            probe.src,
            dst_ip=probe.dst,
            proto=probe.proto,
            sport=int(sport) if sport is not None else None,
            dport=probe.port,
        )
    except ValueError:
        return ""


def traffic(
    lab: LabSpec | str,
    connections: int = 64,
    family: int | None = None,
    *,
    udp: bool = True,
    timeout: float = 2.0,
    concurrency: int = 128,
    root: Path = STATE_ROOT,
) -> TrafficResult:
    """Run ``connections`` probes per family (both when ``family`` is None) from the gateway.

    ``lab`` is a spec or the prefix of a running lab. Each probe waits at
    most ``timeout`` s. Needs root (it enters the gateway namespace).
    """
    spec = load_spec(lab, root) if isinstance(lab, str) else lab
    if spec is None:
        raise LabError(f"traffic: no lab with prefix {lab!r} is up (run lab up first)")
    ip = check_root_and_ip("lab traffic")
    gw_ns = spec.netns(spec.gateway.pod)
    if not system.netns_exists(gw_ns):
        raise LabError(f"traffic: the gateway namespace {gw_ns} does not exist (run lab up)")
    probes = plan_probes(spec, connections, family, udp)
    request = {
        "timeout": timeout,
        "concurrency": concurrency,
        "probes": [{"src": p.src, "dst": p.dst, "port": p.port, "proto": p.proto} for p in probes],
    }
    rounds = -(-len(probes) // max(1, concurrency))
    out = system.run(
        [ip, "netns", "exec", gw_ns, sys.executable, "-m", system.CLIENT_MODULE],
        what=f"traffic client in {gw_ns}",
        stdin=json.dumps(request),
        timeout=10.0 + rounds * timeout * 2,
    )
    raw = _parse(out, len(probes))
    results = tuple(
        ProbeResult(
            probe=p,
            expected=_expected(spec, p, r.get("sport")),
            answer=r.get("answer"),
            error=r.get("error"),
            ms=float(r.get("ms", 0.0)),
            sport=int(r["sport"]) if isinstance(r.get("sport"), int) else None,
        )
        for p, r in zip(probes, raw, strict=True)
    )
    result = TrafficResult(spec.prefix, tuple(t.pod for t in spec.targets), results)
    log.info(
        "traffic: %d probes, %d failed, %d not as predicted",
        len(results),
        len(result.failures),
        len(result.mispredicted),
    )
    return result
