"""Shared by the trace netns tests: a warm lab, the flows, and the six ways to break a hop.

Why a module of its own: the static trace (test_trace.py) and the active
trace (test_trace_active.py) must be judged on exactly the same breaks, made
with the ``ip``/``birdc`` commands an operator (or a bug) would run, and
restored the same way. Each breaker is a context manager yielding a
``Break``: the hop it breaks ``(pod, direction, code)``, the pods the packets
may show it at (``any_of``: a reply ECMP the kernel hashes with a seed we
cannot know has several), and whether it only *degrades* the flow (state that
breaks other flows: the flow itself still gets through).

The suite must pass on any boot (issue 10): a break of the reply path breaks
every LB the static trace lists as a candidate, never only the one a
seed-dependent ``route get`` happens to name. ``MERIDIO_DEBUG_TRACE_SOURCE``
(an index into the lab's client sources, default 7) varies the flows' source
address from one run to the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

from warm import WarmRuntime

from meridio_debug.controller.lab import build_spec, down, up
from meridio_debug.controller.lab.spec import LabSpec
from meridio_debug.controller.lab.state import bird_paths, state_dir
from meridio_debug.controller.runtime.local import LocalRuntime
from meridio_debug.controller.services.active_trace import (
    ActiveOptions,
    ActiveRun,
    active_trace_async,
)
from meridio_debug.controller.services.trace import lab_trace_source, trace_async
from meridio_debug.controller.trace import TraceResult, parse_flow


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Lab:
    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        runtime, self.config = lab_trace_source(spec.prefix)
        assert isinstance(runtime, LocalRuntime)
        self.runtime = WarmRuntime(runtime)

    def traces(self, *flows: str) -> list[TraceResult]:
        parsed = [parse_flow(f) for f in flows]
        result = self.runtime.run(trace_async(self.runtime, parsed, self.config))
        assert not result.errors
        return list(result.results)

    def trace(self, flow: str) -> TraceResult:
        return self.traces(flow)[0]

    def active(self, flow: str, options: ActiveOptions) -> ActiveRun:
        """The active trace over the warm agents (captures in every pod, probes from gw)."""
        coro = active_trace_async(self.runtime, parse_flow(flow), self.config, options)
        result: ActiveRun = self.runtime.run(coro)
        assert not result.errors, result.errors
        return result

    def ip(self, pod: str, *args: str) -> str:
        return run(["ip", "-n", self.spec.netns(pod), *args])

    def birdc(self, pod: str, *args: str) -> str:
        ctl = bird_paths(state_dir(self.spec.prefix), pod)["ctl"]
        return run(["birdc", "-s", str(ctl), *args])


@contextlib.contextmanager
def running_lab(prefix: str) -> Iterator[Lab]:
    """``lab up`` with warm agents; everything removed afterwards, also on failure."""
    spec = build_spec(prefix)
    try:
        up(spec)
        the_lab = Lab(spec)
        try:
            yield the_lab
        finally:
            the_lab.runtime.close()
    finally:
        down(spec.prefix)


SOURCE = int(os.environ.get("MERIDIO_DEBUG_TRACE_SOURCE", "7"))
SRC4 = f"200.100.0.{SOURCE}"
SRC6 = f"200:100::{SOURCE:x}"
FLOWS = {
    4: f"tcp {SRC4}:40000 -> 20.0.0.1:4000",
    6: f"tcp [{SRC6}]:40000 -> [2000::1]:4000",
}
UDP_FLOWS = {
    4: f"udp {SRC4}:40000 -> 20.0.0.1:4001",
    6: f"udp [{SRC6}]:40000 -> [2000::1]:4001",
}


@dataclass(frozen=True)
class Break:
    pod: str
    direction: str
    code: str
    any_of: tuple[str, ...] = ()  # pods the break may show at (the kernel's pick); () = pod
    degraded: bool = False  # the flow gets through; the state breaks other flows

    @property
    def pods(self) -> tuple[str, ...]:
        return self.any_of or (self.pod,)


# --------------------------------------------------------------------------- breaks


def _hop(result: TraceResult, role: str, direction: str) -> str:
    assert result.chosen is not None
    return next(h.pod for h in result.chosen.hops if h.role == role and h.direction == direction)


def _fam(family: int) -> list[str]:
    return ["-6"] if family == 6 else []


def _vip(lab: Lab, family: int) -> str:
    return lab.spec.vip4 if family == 4 else lab.spec.vip6


@contextlib.contextmanager
def break_lb_fwmark_route(lab: Lab, healthy: TraceResult, family: int) -> Iterator[Break]:
    lb = _hop(healthy, "lb-fe", "forward")
    assert healthy.chosen is not None
    table = str(lab.spec.target(healthy.chosen.target).table)
    saved = json.loads(lab.ip(lb, *_fam(family), "-j", "route", "show", "table", table))[0]
    lab.ip(lb, *_fam(family), "route", "del", "default", "table", table)
    try:
        yield Break(lb, "forward", "MDB110")
    finally:
        lab.ip(
            lb,
            *_fam(family),
            "route",
            "add",
            "default",
            "via",
            saved["gateway"],
            "dev",
            saved["dev"],
            "table",
            table,
        )


@contextlib.contextmanager
def unenslave_target_port(lab: Lab, healthy: TraceResult, family: int) -> Iterator[Break]:
    proxy = _hop(healthy, "proxy", "forward")
    assert healthy.chosen is not None
    port = lab.spec.target(healthy.chosen.target).proxy_ifname
    lab.ip(proxy, "link", "set", port, "nomaster")
    try:
        yield Break(proxy, "forward", "MDB202")
    finally:
        lab.ip(proxy, "link", "set", port, "master", "bridge0")


@contextlib.contextmanager
def remove_target_vip(lab: Lab, healthy: TraceResult, family: int) -> Iterator[Break]:
    assert healthy.chosen is not None
    target = healthy.chosen.target
    plen = "32" if family == 4 else "128"
    vip = f"{_vip(lab, family)}/{plen}"
    lab.ip(target, "addr", "del", vip, "dev", "nsm-0")
    try:
        yield Break(target, "forward", "MDB301")
    finally:
        lab.ip(target, "addr", "add", vip, "dev", "nsm-0", *(["nodad"] if family == 6 else []))


@contextlib.contextmanager
def delete_target_return_rule(lab: Lab, healthy: TraceResult, family: int) -> Iterator[Break]:
    assert healthy.chosen is not None
    target = healthy.chosen.target
    table = str(lab.spec.target_table4 if family == 4 else lab.spec.target_table6)
    vip = _vip(lab, family)
    lab.ip(target, *_fam(family), "rule", "del", "from", vip, "lookup", table)
    try:
        yield Break(target, "return", "MDB302")
    finally:
        lab.ip(target, *_fam(family), "rule", "add", "from", vip, "lookup", table)


@contextlib.contextmanager
def drop_proxy_nexthop(lab: Lab, healthy: TraceResult, family: int) -> Iterator[Break]:
    proxy = _hop(healthy, "proxy", "return")
    table = str(lab.spec.proxy_table)
    saved = json.loads(lab.ip(proxy, *_fam(family), "-j", "route", "show", "table", table))[0]
    hops = saved["nexthops"]
    assert len(hops) == 2
    lab.ip(
        proxy,
        *_fam(family),
        "route",
        "replace",
        "default",
        "table",
        table,
        "nexthop",
        "via",
        hops[0]["gateway"],
        "dev",
        hops[0]["dev"],
    )
    try:
        # the replies all take the LB left: this flow is whole, other flows lose that LB
        yield Break(proxy, "return", "MDB204", degraded=True)
    finally:
        argv = [*_fam(family), "route", "replace", "default", "table", table]
        for hop in hops:
            argv += ["nexthop", "via", hop["gateway"], "dev", hop["dev"]]
        lab.ip(proxy, *argv)


def return_lbs(result: TraceResult) -> tuple[str, ...]:
    """Every LB the static trace says the reply may leave through (one when exact)."""
    assert result.chosen is not None
    proxy = next(h for h in result.chosen.hops if h.role == "proxy" and h.direction == "return")
    if proxy.candidates:
        return proxy.candidates
    return (_hop(result, "lb-fe", "return"),)


@contextlib.contextmanager
def empty_lb_egress_table(lab: Lab, healthy: TraceResult, family: int) -> Iterator[Break]:
    """Every candidate LB loses its VIP egress route: the reply dies wherever the kernel sends it."""
    lbs = return_lbs(healthy)
    # bird owns table 4096 and re-adds a deleted route at once: disable its kernel
    # protocol of that family instead (it withdraws what it exported).
    kernel = "kernel1" if family == 4 else "kernel2"
    table = str(lab.spec.vip_table)
    try:
        for lb in lbs:
            lab.birdc(lb, "disable", kernel)
        for lb in lbs:
            deadline = time.monotonic() + 5
            while lab.ip(lb, *_fam(family), "route", "show", "table", table).strip():
                assert time.monotonic() < deadline, "bird did not withdraw table 4096"
                time.sleep(0.05)
        yield Break(lbs[0], "return", "MDB103", any_of=lbs)
    finally:
        for lb in lbs:
            lab.birdc(lb, "enable", kernel)
        for lb in lbs:
            deadline = time.monotonic() + 10
            while not lab.ip(lb, *_fam(family), "route", "show", "table", table).strip():
                assert time.monotonic() < deadline, "bird did not restore table 4096"
                time.sleep(0.05)


BREAKS = [
    break_lb_fwmark_route,
    unenslave_target_port,
    remove_target_vip,
    delete_target_return_rule,
    drop_proxy_nexthop,
    empty_lb_egress_table,
]
