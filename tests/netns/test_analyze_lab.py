"""Automatic analysis on the real lab: healthy is silent, every real break is named.

One lab per module (pid-unique prefix, always removed). Each test breaks the
running lab the way the findings catalog describes -- with the same ``ip``,
``nft``, ``sysctl`` and ``birdc`` commands an operator (or a bug) would run --
asserts that exactly the expected codes are reported on the right pods, and
restores what it broke. An autouse fixture then checks the lab is healthy
again (repairing it with ``lab up`` and failing the test that left it
broken), so one test's damage never shows up as another test's finding.

Analysis runs in-process through the public API (gather_async ->
analyze_evidence), with the agents started once and kept warm for the
module, so an analysis costs a few hundred milliseconds; a few tests go
through the CLI for exit codes, ``--report``, ``--fail-on``, ``--suppress``
and ``collect``/``--from``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from warm import WarmRuntime

from meridio_debug.controller import cli
from meridio_debug.controller.analysis import AnalysisResult, Severity
from meridio_debug.controller.lab import build_spec, down, up
from meridio_debug.controller.lab.containers import exec_argv
from meridio_debug.controller.lab.render import nfqlb_commands
from meridio_debug.controller.lab.spec import LabSpec
from meridio_debug.controller.lab.state import bird_paths, read_state, state_dir
from meridio_debug.controller.model import TrenchConfig
from meridio_debug.controller.runtime import PodRef
from meridio_debug.controller.runtime.local import LocalRuntime
from meridio_debug.controller.services.analyze import (
    analyze_evidence,
    gather_async,
    lab_evidence_source,
)
from meridio_debug.controller.services.bundle import (
    Evidence,
    read_bundle,
    trench_state,
    write_bundle,
)
from meridio_debug.controller.wire.client import AgentClient

pytestmark = [
    pytest.mark.netns,
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
    pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 not installed"),
]

Problems = set[tuple[str, str]]


# --------------------------------------------------------------------------- warm agents


class Lab:
    """The module's lab: its spec, warm agents, and helpers to break and inspect it."""

    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.prefix = spec.prefix
        runtime, config, _source = lab_evidence_source(spec.prefix, [])
        assert isinstance(runtime, LocalRuntime)
        self.config: TrenchConfig = config
        self.runtime = WarmRuntime(runtime)

    def evidence(self) -> Evidence:
        ev: Evidence = self.runtime.run(
            gather_async(self.runtime, self.config, f"lab {self.prefix}")
        )
        return ev

    def analyze(self, suppress: Sequence[str] = ()) -> AnalysisResult:
        return analyze_evidence(self.evidence(), suppress)

    def problems(self) -> Problems:
        return problems(self.analyze())

    # --- commands, argv only -------------------------------------------------------

    def ns(self, pod: str) -> str:
        return self.spec.netns(pod)

    def ip(self, pod: str, *args: str) -> None:
        run(["ip", "-n", self.ns(pod), *args])

    def nft(self, pod: str, *args: str, stdin: str | None = None) -> str:
        return run(["ip", "netns", "exec", self.ns(pod), "nft", *args], stdin=stdin)

    def sysctl(self, pod: str, key: str, value: str) -> str:
        """Set a sysctl; return the old value."""
        old = run(["ip", "netns", "exec", self.ns(pod), "sysctl", "-n", key]).strip()
        run(["ip", "netns", "exec", self.ns(pod), "sysctl", "-q", "-w", f"{key}={value}"])
        return old

    def flowlb(self, pod: str) -> int:
        """PID 1 of ``pod``'s stateless-lb container: nfqlb flowlb."""
        state = read_state(self.prefix)
        assert state is not None
        return next(p.pid for p in state.processes if p.pod == pod and p.kind == "nfqlb")

    def nfqlb(self, pod: str, *args: str) -> str:
        """``nfqlb ARGS`` inside ``pod``'s stateless-lb container, as the stateless-lb runs it."""
        pid = self.flowlb(pod)
        return run(exec_argv("nsenter", pid, [os.readlink(f"/proc/{pid}/exe"), *args]))

    def birdc(self, pod: str, *args: str) -> str:
        ctl = bird_paths(state_dir(self.prefix), pod)["ctl"]
        return run(["birdc", "-s", str(ctl), *args])

    # --- the lab's own facts (spec), so nothing hard-codes a hashed interface name ------

    def target(self, pod: str) -> Any:
        return self.spec.target(pod)

    def conduit(self, lb: str, node: str) -> Any:
        """The LB's conduit (spec.Conduit) towards ``node`` ("a", "b")."""
        return next(c for c in self.spec.frontend(lb).conduits if c.node == node)

    def lb_target_route(self, lb: str, target: str, family: int) -> list[str]:
        """``route replace`` argv tail restoring the LB's table for ``target``."""
        t = self.target(target)
        via = t.ipv4 if family == 4 else t.ipv6
        dev = self.conduit(lb, t.node).ifname
        return [
            f"-{family}",
            "route",
            "replace",
            "default",
            "via",
            via,
            "dev",
            dev,
            "table",
            str(t.table),
        ]

    def restore_lb_target(self, lb: str, target: str, families: Sequence[int] = (4, 6)) -> None:
        """Rule (when missing) and route of ``target`` in ``lb``, as the lab builds them."""
        t = self.target(target)
        for family in families:
            rules = run(
                ["ip", "-n", self.ns(lb), f"-{family}", "rule", "show", "fwmark", str(t.fwmark)]
            )
            if not rules.strip():
                pref = str(100 - t.identifier)
                self.ip(
                    lb,
                    f"-{family}",
                    "rule",
                    "add",
                    "pref",
                    pref,
                    "fwmark",
                    str(t.fwmark),
                    "lookup",
                    str(t.table),
                )
            self.ip(lb, *self.lb_target_route(lb, target, family))

    def restore_proxy_egress(self, proxy: str, family: int) -> None:
        node = next(n for n in self.spec.nodes if n.proxy == proxy)
        hops: list[str] = []
        for fe in self.spec.frontends:
            c = self.conduit(fe.pod, node.letter)
            hops += ["nexthop", "via", c.ipv4 if family == 4 else c.ipv6, "dev", "bridge0"]
        self.ip(proxy, f"-{family}", "route", "replace", "default", "table", "1", *hops)

    def restore_target_policy(self, target: str) -> None:
        node = next(n for n in self.spec.nodes if n.letter == self.target(target).node)
        self.ip(
            target,
            "-4",
            "route",
            "replace",
            "default",
            "via",
            node.bridge_ipv4,
            "dev",
            "nsm-0",
            "onlink",
            "table",
            "1",
        )
        self.ip(
            target,
            "-6",
            "route",
            "replace",
            "default",
            "via",
            node.bridge_ipv6,
            "dev",
            "nsm-0",
            "onlink",
            "table",
            "2",
        )

    def rebuild(self) -> None:
        """The last resort: a fresh lab (``lab up`` alone does not re-add deleted routes)."""
        self.runtime.close()
        down(self.prefix)
        up(self.spec)
        runtime, _config, _source = lab_evidence_source(self.prefix, [])
        assert isinstance(runtime, LocalRuntime)
        self.runtime = WarmRuntime(runtime)

    def healthy_or_repair(self) -> Problems:
        """Wait until the lab is healthy; rebuild it when it does not heal. Return what was left."""
        left = wait_for(self.problems, set(), timeout=15.0)
        if left:
            self.rebuild()
            assert wait_for(self.problems, set(), timeout=30.0) == set()
        return left


def run(argv: Sequence[str], stdin: str | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=stdin, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def problems(result: AnalysisResult) -> Problems:
    return {(f.code, f.pod) for f in result.at_least(Severity.WARNING)}


def wait_for(fn: Callable[[], Problems], want: Problems, timeout: float) -> Problems:
    """Poll ``fn`` until it returns ``want`` or time runs out; return the last value."""
    deadline = time.monotonic() + timeout
    got = fn()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.5)
        got = fn()
    return got


@pytest.fixture(scope="module")
def lab(lab_prefix: Callable[[], str]) -> Iterator[Lab]:
    spec = build_spec(prefix=lab_prefix())
    the_lab: Lab | None = None
    try:
        up(spec)
        the_lab = Lab(spec)
        yield the_lab
    finally:
        if the_lab is not None:
            the_lab.runtime.close()
        down(spec.prefix)


@pytest.fixture(autouse=True)
def restored(request: pytest.FixtureRequest, lab: Lab) -> Iterator[None]:
    """After each test: the lab must be healthy again (else repair it and fail the test)."""
    yield
    left = lab.healthy_or_repair()
    if left:
        pytest.fail(f"{request.node.name} left the lab broken: {sorted(left)} (repaired)")


def expect(lab: Lab, want: Problems, timeout: float = 10.0) -> None:
    """The lab shows exactly ``want`` (problems appear at once, or after a protocol timer)."""
    got = wait_for(lab.problems, want, timeout)
    assert got == want


# --------------------------------------------------------------------------- healthy


def test_healthy_lab_is_silent(lab: Lab) -> None:
    result = lab.analyze()
    assert problems(result) == set()
    # the lab runs real nfqlb: no section is absent on an LB (no "nfqlb not running")
    info = {(f.code, f.pod) for f in result.findings}
    assert not {pod for code, pod in info if code == "MDB003" and pod.startswith("lb-fe")}
    assert not [f for f in result.findings if "nfqlb" in f.message and f.code == "MDB003"]
    assert {p.pod for p in trench_state(lab.evidence()).pods} == {
        p.name for p in lab.spec.pods if p.role != "gateway"
    }


def test_cli_healthy_exit_0_and_reports(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.xml"
    rc = cli.main(
        ["analyze", "--lab", "--prefix", lab.prefix, "-o", "json", "--report", str(report)]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["error"] == 0 and doc["summary"]["warning"] == 0
    assert "<testsuites>" in report.read_text()


# --------------------------------------------------------------------------- LB/FE


@dataclass(frozen=True)
class Break:
    """One real break of the lab, how to undo it, and what analysis must say about it."""

    id: str
    do: Callable[[Lab], object]
    undo: Callable[[Lab], object]
    want: Problems
    why: str = ""  # when one break legitimately implies several codes: why
    settle: float = 10.0  # protocol timers (BFD, BGP) need a few seconds


def _lb_neigh_mac(lab: Lab) -> None:
    c = lab.conduit("lb-fe-a", "a").ifname
    lab.ip(
        "lb-fe-a",
        "neigh",
        "replace",
        "172.16.1.6",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        c,
        "nud",
        "permanent",
    )


def _lb_neigh_failed6(lab: Lab) -> None:
    c = lab.conduit("lb-fe-a", "a").ifname
    lab.ip("lb-fe-a", "-6", "neigh", "replace", "fd00:0:0:1::6", "dev", c, "nud", "failed")


def _lb_neigh_del(lab: Lab, addr: str) -> None:
    lab.ip("lb-fe-a", "neigh", "del", addr, "dev", lab.conduit("lb-fe-a", "a").ifname)


def _forget_target(lab: Lab, lbs: Sequence[str], target: str) -> None:
    """LBs drop the target's fwmark rules and tables (both families), as after NSM flapping."""
    t = lab.target(target)
    for lb in lbs:
        for family in ("-4", "-6"):
            lab.ip(lb, family, "rule", "del", "fwmark", str(t.fwmark), "lookup", str(t.table))
            lab.ip(lb, family, "route", "flush", "table", str(t.table))


SHM = "--shm=tshm-stream-a"


def _flow_set(lab: Lab, pod: str, **override: str) -> None:
    """The lab's ``nfqlb flow-set`` for the trench's flow, with options replaced."""
    (cmd,) = [c for c in nfqlb_commands(lab.spec) if c[0] == "flow-set"]
    args = [a for a in cmd if a.split("=")[0].lstrip("-") not in override]
    lab.nfqlb(pod, *args, *(f"--{k}={v}" for k, v in override.items()))


def _kill_flowlb(lab: Lab, pod: str) -> None:
    """SIGKILL nfqlb flowlb (PID 1 of stateless-lb): the container ends, nft still queues."""
    pid = lab.flowlb(pod)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)


def _deactivate(lab: Lab, pods: Sequence[str], targets: Sequence[str]) -> None:
    for pod in pods:
        for t in targets:
            lab.nfqlb(pod, "deactivate", f"--index={lab.target(t).identifier - 1}", SHM)


def _activate(lab: Lab, pods: Sequence[str], targets: Sequence[str]) -> None:
    for pod in pods:
        for t in targets:
            tgt = lab.target(t)
            lab.nfqlb(pod, "activate", f"--index={tgt.identifier - 1}", SHM, str(tgt.fwmark))


def _proxy_hops(lab: Lab, proxy: str, family: int, hops: Sequence[str]) -> None:
    argv: list[str] = []
    for hop in hops:
        argv += ["nexthop", "via", hop, "dev", "bridge0"]
    lab.ip(proxy, f"-{family}", "route", "replace", "default", "table", "1", *argv)


def _block_bfd(lab: Lab, pod: str) -> None:
    """Drop the gateway's IPv6 BFD control packets (UDP 3784) arriving at ``pod``."""
    lab.nft(pod, "add", "table", "inet", "mdt-test")
    lab.nft(
        pod, "add", "chain", "inet", "mdt-test", "in", "{ type filter hook input priority -400; }"
    )
    lab.nft(
        pod,
        "add",
        "rule",
        "inet",
        "mdt-test",
        "in",
        "ip6",
        "saddr",
        "100:100::150",
        "udp",
        "dport",
        "3784",
        "drop",
    )


def _tentative(lab: Lab) -> None:
    """DAD on for nsm-0 with a long probe: a new address stays tentative."""
    lab.sysctl("target-a1", "net.ipv6.conf.nsm-0.dad_transmits", "100")
    lab.sysctl("target-a1", "net.ipv6.conf.nsm-0.accept_dad", "1")
    lab.ip("target-a1", "-6", "addr", "add", "fd00:0:0:1::66/64", "dev", "nsm-0")


def _untentative(lab: Lab) -> None:
    lab.ip("target-a1", "-6", "addr", "del", "fd00:0:0:1::66/64", "dev", "nsm-0")
    lab.sysctl("target-a1", "net.ipv6.conf.nsm-0.accept_dad", "0")
    lab.sysctl("target-a1", "net.ipv6.conf.nsm-0.dad_transmits", "1")


def _move_bird_socket(lab: Lab, back: bool) -> None:
    ctl = bird_paths(state_dir(lab.prefix), "lb-fe-b")["ctl"]
    moved = ctl.with_name(ctl.name + ".moved")
    if back:
        moved.rename(ctl)
    else:
        ctl.rename(moved)


_defrag_saved: dict[str, str] = {}


def _delete_defrag(lab: Lab) -> None:
    _defrag_saved["lb-fe-a"] = lab.nft("lb-fe-a", "list", "table", "inet", "meridio-defrag")
    lab.nft("lb-fe-a", "delete", "table", "inet", "meridio-defrag")


A1, A2, B1, B2 = "target-a1", "target-a2", "target-b1", "target-b2"
LBA, LBB, PXA, PXB = "lb-fe-a", "lb-fe-b", "proxy-a", "proxy-b"

BREAKS: list[Break] = [
    # --- LB/FE --------------------------------------------------------------------------
    Break(
        "MDB101-v4-bgp-disabled",
        lambda lab: lab.birdc(LBA, "disable", '"NBR-gateway-v4-a"'),
        lambda lab: lab.birdc(LBA, "enable", '"NBR-gateway-v4-a"'),
        {("MDB101", LBA), ("MDB103", LBA)},
        why="bird withdraws the gateway's default from table 4096 with the session",
    ),
    Break(
        "MDB101-v6-bgp-disabled",
        lambda lab: lab.birdc(LBB, "disable", '"NBR-gateway-v6-a"'),
        lambda lab: lab.birdc(LBB, "enable", '"NBR-gateway-v6-a"'),
        {("MDB101", LBB), ("MDB103", LBB)},
        why="bird withdraws the gateway's default from table 4096 with the session",
    ),
    Break(
        "MDB102-v6-bfd-blocked",
        lambda lab: _block_bfd(lab, LBB),
        lambda lab: lab.nft(LBB, "delete", "table", "inet", "mdt-test"),
        {("MDB102", LBB)},
        why="BFD down first resets BGP (MDB101, MDB103 for a moment); bird re-establishes "
        "BGP while BFD stays down, which is the steady state asserted",
        settle=15.0,
    ),
    Break(
        "MDB103-v4-egress-default-deleted",
        lambda lab: lab.ip(LBA, "-4", "route", "del", "default", "table", "4096"),
        lambda lab: lab.ip(
            LBA,
            "-4",
            "route",
            "replace",
            "default",
            "via",
            "169.254.100.150",
            "dev",
            "ext-vlan0",
            "proto",
            "bird",
            "metric",
            "32",
            "table",
            "4096",
        ),
        {("MDB103", LBA)},
    ),
    Break(
        "MDB103-v6-egress-default-deleted",
        lambda lab: lab.ip(LBB, "-6", "route", "del", "default", "table", "4096"),
        lambda lab: lab.ip(
            LBB,
            "-6",
            "route",
            "replace",
            "default",
            "via",
            "100:100::150",
            "dev",
            "ext-vlan0",
            "proto",
            "bird",
            "metric",
            "32",
            "table",
            "4096",
        ),
        {("MDB103", LBB)},
    ),
    Break(
        "MDB104-v4-vip-egress-rule-deleted",
        lambda lab: lab.ip(LBA, "-4", "rule", "del", "from", "20.0.0.1", "lookup", "4096"),
        lambda lab: lab.ip(
            LBA, "-4", "rule", "add", "pref", "100", "from", "20.0.0.1", "lookup", "4096"
        ),
        {("MDB104", LBA)},
    ),
    Break(
        "MDB104-v6-vip-drop-rule-deleted",
        lambda lab: lab.ip(LBB, "-6", "rule", "del", "from", "2000::1", "lookup", "4097"),
        lambda lab: lab.ip(
            LBB, "-6", "rule", "add", "pref", "101", "from", "2000::1", "lookup", "4097"
        ),
        {("MDB104", LBB)},
    ),
    Break(
        "MDB105-v6-external-address-deleted",
        lambda lab: lab.ip(LBA, "-6", "addr", "del", "100:100::2/64", "dev", "ext-vlan0"),
        lambda lab: lab.ip(LBA, "-6", "addr", "add", "100:100::2/64", "dev", "ext-vlan0", "nodad"),
        {("MDB105", LBA), ("MDB101", LBA), ("MDB103", LBA)},
        why="without its address the IPv6 BGP session drops and its default route goes",
    ),
    Break(
        "MDB106-conduit-down",
        lambda lab: lab.ip(LBA, "link", "set", lab.conduit(LBA, "a").ifname, "down"),
        lambda lab: (
            lab.ip(LBA, "link", "set", lab.conduit(LBA, "a").ifname, "up"),
            lab.restore_lb_target(LBA, A1),
            lab.restore_lb_target(LBA, A2),
        ),
        {("MDB106", LBA), ("MDB110", LBA), ("MDB402", LBA), ("MDB202", PXA), ("MDB205", PXA)},
        why="the kernel deletes the target routes via the downed link (MDB110, so lb-fe-a no "
        "longer serves target-a1/a2: MDB402); the proxy's end loses carrier (MDB202) and its "
        "egress keeps a nexthop for the dead link (MDB205)",
    ),
    Break(
        "MDB110-v4-target-table-emptied",
        lambda lab: lab.ip(LBA, "-4", "route", "del", "default", "table", "5001"),
        lambda lab: lab.restore_lb_target(LBA, A1, (4,)),
        {("MDB110", LBA), ("MDB118", LBA)},
        why="the same target is then load-balanced over IPv6 only",
    ),
    Break(
        "MDB110-v6-target-table-emptied",
        lambda lab: lab.ip(LBB, "-6", "route", "del", "default", "table", "5003"),
        lambda lab: lab.restore_lb_target(LBB, B1, (6,)),
        {("MDB110", LBB), ("MDB118", LBB)},
        why="the same target is then load-balanced over IPv4 only",
    ),
    Break(
        "MDB111-v4-nexthop-off-subnet",
        lambda lab: lab.ip(
            LBA,
            "-4",
            "route",
            "replace",
            "default",
            "via",
            "172.16.3.6",
            "dev",
            lab.conduit(LBA, "a").ifname,
            "onlink",
            "table",
            "5001",
        ),
        lambda lab: lab.restore_lb_target(LBA, A1, (4,)),
        {("MDB111", LBA), ("MDB401", LBA)},
        why="an address outside every conduit subnet is also owned by no target",
    ),
    Break(
        "MDB112-v4-neighbour-wrong-mac",
        _lb_neigh_mac,
        lambda lab: _lb_neigh_del(lab, "172.16.1.6"),
        {("MDB112", LBA)},
    ),
    Break(
        "MDB112-v6-neighbour-failed",
        _lb_neigh_failed6,
        lambda lab: _lb_neigh_del(lab, "fd00:0:0:1::6"),
        {("MDB112", LBA)},
    ),
    Break(
        "MDB113-v6-fwmark-rule-deleted",
        lambda lab: lab.ip(LBA, "-6", "rule", "del", "fwmark", "5002", "lookup", "5002"),
        lambda lab: lab.restore_lb_target(LBA, A2, (6,)),
        {("MDB113", LBA), ("MDB118", LBA)},
        why="the mark is handed out without a v6 rule, so the target is IPv4-only",
    ),
    Break(
        "MDB113-v4-fwmark-rule-deleted",
        lambda lab: lab.ip(LBB, "-4", "rule", "del", "fwmark", "5004", "lookup", "5004"),
        lambda lab: lab.restore_lb_target(LBB, B2, (4,)),
        {("MDB113", LBB), ("MDB118", LBB)},
        why="the mark is handed out without a v4 rule, so the target is IPv6-only",
    ),
    Break(
        "MDB114-v4-vip-set-element-deleted",
        lambda lab: lab.nft(
            LBA, "delete", "element", "inet", "meridio-nfqlb", "ipv4-vips", "{ 20.0.0.1 }"
        ),
        lambda lab: lab.nft(
            LBA, "add", "element", "inet", "meridio-nfqlb", "ipv4-vips", "{ 20.0.0.1 }"
        ),
        {("MDB114", LBA)},
    ),
    Break(
        "MDB114-v6-vip-set-element-deleted",
        lambda lab: lab.nft(
            LBB, "delete", "element", "inet", "meridio-nfqlb", "ipv6-vips", "{ 2000::1 }"
        ),
        lambda lab: lab.nft(
            LBB, "add", "element", "inet", "meridio-nfqlb", "ipv6-vips", "{ 2000::1 }"
        ),
        {("MDB114", LBB)},
    ),
    Break(
        "MDB115-defrag-table-deleted",
        _delete_defrag,
        lambda lab: lab.nft(LBA, "-f", "-", stdin=_defrag_saved.pop(LBA)),
        {("MDB115", LBA)},
    ),
    Break(
        "MDB116-lb-rp-filter",
        lambda lab: lab.sysctl(LBA, "net.ipv4.conf.all.rp_filter", "1"),
        lambda lab: lab.sysctl(LBA, "net.ipv4.conf.all.rp_filter", "0"),
        {("MDB116", LBA)},
    ),
    Break(
        "MDB117-conduit-mtu-lowered",
        lambda lab: lab.ip(LBA, "link", "set", lab.conduit(LBA, "a").ifname, "mtu", "1400"),
        lambda lab: lab.ip(LBA, "link", "set", lab.conduit(LBA, "a").ifname, "mtu", "1500"),
        {("MDB117", LBA), ("MDB405", LBA)},
        why="the lowered conduit is also the one hop with another MTU on the LB->proxy->target path",
    ),
    # --- proxy --------------------------------------------------------------------------
    Break(
        "MDB201-v4-bridge-address-deleted",
        lambda lab: lab.ip(PXA, "-4", "addr", "del", "172.16.1.1/24", "dev", "bridge0"),
        lambda lab: (
            lab.ip(PXA, "-4", "addr", "add", "172.16.1.1/24", "dev", "bridge0"),
            lab.restore_proxy_egress(PXA, 4),
        ),
        {("MDB201", PXA), ("MDB204", PXA)},
        why="the kernel deletes the IPv4 egress default with the bridge's connected subnet",
    ),
    Break(
        "MDB201-v6-bridge-address-deleted",
        lambda lab: lab.ip(PXB, "-6", "addr", "del", "fd00:0:0:2::1/64", "dev", "bridge0"),
        lambda lab: lab.ip(PXB, "-6", "addr", "add", "fd00:0:0:2::1/64", "dev", "bridge0", "nodad"),
        {("MDB201", PXB)},
    ),
    Break(
        "MDB202-target-port-unenslaved",
        lambda lab: lab.ip(PXA, "link", "set", lab.target(A1).proxy_ifname, "nomaster"),
        lambda lab: lab.ip(PXA, "link", "set", lab.target(A1).proxy_ifname, "master", "bridge0"),
        {("MDB202", PXA)},
    ),
    Break(
        "MDB203-v4-vip-rule-deleted",
        lambda lab: lab.ip(PXA, "-4", "rule", "del", "from", "20.0.0.1", "lookup", "1"),
        lambda lab: lab.ip(
            PXA, "-4", "rule", "add", "pref", "32765", "from", "20.0.0.1", "lookup", "1"
        ),
        {("MDB203", PXA)},
    ),
    Break(
        "MDB203-v6-vip-rule-deleted",
        lambda lab: lab.ip(PXB, "-6", "rule", "del", "from", "2000::1", "lookup", "1"),
        lambda lab: lab.ip(
            PXB, "-6", "rule", "add", "pref", "32765", "from", "2000::1", "lookup", "1"
        ),
        {("MDB203", PXB)},
    ),
    Break(
        "MDB204-v4-nexthop-dropped",
        lambda lab: _proxy_hops(lab, PXA, 4, ["172.16.1.2"]),
        lambda lab: lab.restore_proxy_egress(PXA, 4),
        {("MDB204", PXA), ("MDB403", PXA)},
        why="the proxy's nexthops then differ from the LB addresses on its subnet (lb-fe-b missing)",
    ),
    Break(
        "MDB204-v6-nexthop-dropped",
        lambda lab: _proxy_hops(lab, PXB, 6, ["fd00:0:0:2::4"]),
        lambda lab: lab.restore_proxy_egress(PXB, 6),
        {("MDB204", PXB), ("MDB403", PXB)},
        why="the proxy's nexthops then differ from the LB addresses on its subnet (lb-fe-a missing)",
    ),
    Break(
        "MDB205-v4-nexthop-without-lb",
        lambda lab: _proxy_hops(lab, PXA, 4, ["172.16.1.2", "172.16.1.4", "172.16.1.10"]),
        lambda lab: lab.restore_proxy_egress(PXA, 4),
        {("MDB205", PXA), ("MDB403", PXA)},
        why="172.16.1.10 is no LB's address, which is also a nexthop set that differs from the LBs'",
    ),
    Break(
        "MDB205-v6-nexthop-neighbour-failed",
        lambda lab: lab.ip(
            PXB, "-6", "neigh", "replace", "fd00:0:0:2::4", "dev", "bridge0", "nud", "failed"
        ),
        lambda lab: lab.ip(PXB, "-6", "neigh", "del", "fd00:0:0:2::4", "dev", "bridge0"),
        {("MDB205", PXB)},
    ),
    Break(
        "MDB207-v6-tentative-address",
        _tentative,
        _untentative,
        {("MDB207", A1)},
    ),
    Break(
        "MDB208-proxy-rp-filter",
        lambda lab: lab.sysctl(PXB, "net.ipv4.conf.all.rp_filter", "1"),
        lambda lab: lab.sysctl(PXB, "net.ipv4.conf.all.rp_filter", "0"),
        {("MDB208", PXB)},
    ),
    Break(
        "MDB208-proxy-accept-dad",
        lambda lab: lab.sysctl(PXA, "net.ipv6.conf.all.accept_dad", "1"),
        lambda lab: lab.sysctl(PXA, "net.ipv6.conf.all.accept_dad", "0"),
        {("MDB208", PXA)},
    ),
    # --- target -------------------------------------------------------------------------
    Break(
        "MDB301-v4-vip-removed",
        lambda lab: lab.ip(A1, "-4", "addr", "del", "20.0.0.1/32", "dev", "nsm-0"),
        lambda lab: lab.ip(A1, "-4", "addr", "add", "20.0.0.1/32", "dev", "nsm-0"),
        {("MDB301", A1)},
    ),
    Break(
        "MDB301-v6-vip-removed",
        lambda lab: lab.ip(B2, "-6", "addr", "del", "2000::1/128", "dev", "nsm-0"),
        lambda lab: lab.ip(B2, "-6", "addr", "add", "2000::1/128", "dev", "nsm-0", "nodad"),
        {("MDB301", B2)},
    ),
    Break(
        "MDB302-v4-source-rule-deleted",
        lambda lab: lab.ip(A1, "-4", "rule", "del", "from", "20.0.0.1", "lookup", "1"),
        lambda lab: lab.ip(
            A1, "-4", "rule", "add", "pref", "32765", "from", "20.0.0.1", "lookup", "1"
        ),
        {("MDB302", A1)},
    ),
    Break(
        "MDB302-v6-source-rule-deleted",
        lambda lab: lab.ip(B1, "-6", "rule", "del", "from", "2000::1", "lookup", "2"),
        lambda lab: lab.ip(
            B1, "-6", "rule", "add", "pref", "32765", "from", "2000::1", "lookup", "2"
        ),
        {("MDB302", B1)},
    ),
    Break(
        "MDB303-v4-policy-default-deleted",
        lambda lab: lab.ip(A1, "-4", "route", "del", "default", "table", "1"),
        lambda lab: lab.restore_target_policy(A1),
        {("MDB303", A1)},
    ),
    Break(
        "MDB303-v6-policy-default-without-via",
        lambda lab: lab.ip(B1, "-6", "route", "replace", "default", "dev", "nsm-0", "table", "2"),
        lambda lab: lab.restore_target_policy(B1),
        {("MDB303", B1)},
    ),
    Break(
        "MDB304-v4-bridge-neighbour-failed",
        lambda lab: lab.ip(
            A2, "-4", "neigh", "replace", "172.16.1.1", "dev", "nsm-0", "nud", "failed"
        ),
        lambda lab: lab.ip(A2, "-4", "neigh", "del", "172.16.1.1", "dev", "nsm-0"),
        {("MDB304", A2)},
    ),
    Break(
        "MDB304-v6-bridge-neighbour-incomplete",
        lambda lab: lab.ip(
            B2, "-6", "neigh", "replace", "fd00:0:0:2::1", "dev", "nsm-0", "nud", "incomplete"
        ),
        lambda lab: lab.ip(B2, "-6", "neigh", "del", "fd00:0:0:2::1", "dev", "nsm-0"),
        {("MDB304", B2)},
    ),
    Break(
        "MDB305-nsm-interface-down",
        lambda lab: lab.ip(A2, "link", "set", "nsm-0", "down"),
        lambda lab: (lab.ip(A2, "link", "set", "nsm-0", "up"), lab.restore_target_policy(A2)),
        {("MDB305", A2), ("MDB303", A2), ("MDB202", PXA)},
        why="the kernel deletes the policy routes via the downed interface (MDB303) and the "
        "proxy's end of the pair loses carrier (MDB202)",
    ),
    # --- across pods --------------------------------------------------------------------
    Break(
        "MDB401-v4-stale-target",
        lambda lab: lab.ip(
            LBA,
            "-4",
            "route",
            "replace",
            "default",
            "via",
            "172.16.1.50",
            "dev",
            lab.conduit(LBA, "a").ifname,
            "table",
            "5001",
        ),
        lambda lab: lab.restore_lb_target(LBA, A1, (4,)),
        {("MDB401", LBA)},
    ),
    Break(
        "MDB401-v6-stale-target",
        lambda lab: lab.ip(
            LBB,
            "-6",
            "route",
            "replace",
            "default",
            "via",
            "fd00:0:0:1::50",
            "dev",
            lab.conduit(LBB, "a").ifname,
            "table",
            "5002",
        ),
        lambda lab: lab.restore_lb_target(LBB, A2, (6,)),
        {("MDB401", LBB)},
    ),
    Break(
        "MDB402-one-lb-forgets-a-target",
        lambda lab: _forget_target(lab, [LBA], B1),
        lambda lab: lab.restore_lb_target(LBA, B1),
        {("MDB402", LBA), ("MDB113", LBA)},
        why="nfqlb still has the forgotten target Active (MDB113)",
    ),
    Break(
        "MDB404-no-lb-serves-a-target",
        lambda lab: _forget_target(lab, [LBA, LBB], B2),
        lambda lab: (lab.restore_lb_target(LBA, B2), lab.restore_lb_target(LBB, B2)),
        {("MDB404", B2), ("MDB113", LBA), ("MDB113", LBB)},
        why="nfqlb still has the forgotten target Active (MDB113 on each LB)",
    ),
    Break(
        "MDB405-target-mtu-lowered",
        lambda lab: lab.ip(A2, "link", "set", "nsm-0", "mtu", "1400"),
        lambda lab: lab.ip(A2, "link", "set", "nsm-0", "mtu", "1500"),
        {("MDB405", A2)},
    ),
    # --- real nfqlb ----------------------------------------------------------------------
    Break(
        "MDB113-nfqlb-target-deactivated",
        lambda lab: _deactivate(lab, [LBA], [A2]),
        lambda lab: _activate(lab, [LBA], [A2]),
        {("MDB113", LBA)},
    ),
    Break(
        "MDB404-nfqlb-target-forgotten-everywhere",
        lambda lab: (_deactivate(lab, [LBA, LBB], [B2]), _forget_target(lab, [LBA, LBB], B2)),
        lambda lab: (
            lab.restore_lb_target(LBA, B2),
            lab.restore_lb_target(LBB, B2),
            _activate(lab, [LBA, LBB], [B2]),
        ),
        {("MDB404", B2)},
        why="what the stateless-lb does when a target unregisters (deactivate, rules and "
        "table gone): consistent LBs, but target-b2 still holds the VIPs",
    ),
    Break(
        "MDB119-nfqlb-killed",
        lambda lab: _kill_flowlb(lab, LBA),
        lambda lab: lab.rebuild(),
        {("MDB119", LBA)},
    ),
    Break(
        "MDB120-nfqlb-flow-deleted",
        lambda lab: lab.nfqlb(LBB, "flow-delete", "--name=tshm-stream-a-flow-a"),
        lambda lab: _flow_set(lab, LBB),
        {("MDB120", LBB), ("MDB601", LBB)},
        why="both VIPs match no nfqlb flow (MDB120) and the trench's Flow flow-a has no nfqlb "
        "flow (MDB601, from the lab's CRs)",
    ),
    Break(
        "MDB602-nfqlb-flow-ports-and-protocols-differ",
        lambda lab: _flow_set(lab, LBA, dports="4000-4001", protocols="tcp"),
        lambda lab: _flow_set(lab, LBA),
        {("MDB602", LBA)},
    ),
    Break(
        "MDB121-nfqlb-no-active-target",
        lambda lab: _deactivate(lab, [LBB], [A1, A2, B1, B2]),
        lambda lab: _activate(lab, [LBB], [A1, A2, B1, B2]),
        {("MDB121", LBB), ("MDB113", LBB)},
        why="the flow's shm has no Active target (MDB121) while the four fwmark rules stay "
        "(MDB113)",
    ),
    # --- access -------------------------------------------------------------------------
    Break(
        "MDB001-bird-socket-gone",
        lambda lab: _move_bird_socket(lab, back=False),
        lambda lab: _move_bird_socket(lab, back=True),
        {("MDB001", LBB)},
    ),
]


@pytest.mark.parametrize("case", BREAKS, ids=[b.id for b in BREAKS])
def test_break_is_reported_exactly(lab: Lab, case: Break) -> None:
    case.do(lab)
    try:
        expect(lab, case.want, case.settle)
    finally:
        case.undo(lab)


def test_every_code_the_lab_can_produce_has_a_break() -> None:
    covered = {code for b in BREAKS for code, _pod in b.want}
    from meridio_debug.controller.analysis import CHECKS

    # MDB002: test_unreachable_pod_is_mdb002; MDB003 (info): not in a healthy nfqlb lab.
    not_in_lab = {"MDB002", "MDB003"}
    # Pod health (MDB5xx) needs Kubernetes: tests/cluster/test_pod_health.py and unit tests.
    # Configuration and flaps: their lab breaks are in test_beyond_lab.py (MDB602, MDB701-703);
    # the others are unit-tested on the lab fixture (test_config_checks.py, test_flaps.py).
    not_in_lab |= {c.code for c in CHECKS if c.code[:4] in ("MDB5", "MDB6", "MDB7")}
    assert {c.code for c in CHECKS} - covered - not_in_lab == set()


# --------------------------------------------------------------------------- MDB002, bundles, CLI


class WithGhost:
    """The lab's pods plus one whose namespace does not exist (its agent cannot start)."""

    def __init__(self, warm: WarmRuntime, ghost: PodRef) -> None:
        self.warm = warm
        self.ghost = ghost

    def pods(self) -> list[PodRef]:
        return [*self.warm.pods(), self.ghost]

    def open(self, pod: PodRef) -> contextlib.AbstractAsyncContextManager[AgentClient]:
        return self.warm.inner.open(pod) if pod == self.ghost else self.warm.open(pod)


def test_unreachable_pod_is_mdb002_and_the_others_are_still_analysed(lab: Lab) -> None:
    ghost = PodRef("target-c1", "target", f"{lab.prefix}target-c1", "lab")
    runtime = WithGhost(lab.runtime, ghost)
    evidence = lab.runtime.run(gather_async(runtime, lab.config, "lab + ghost"))
    result = analyze_evidence(evidence)
    assert problems(result) == {("MDB002", "target-c1")}
    finding = next(f for f in result.findings if f.code == "MDB002")
    assert "does not exist" in str(finding.evidence["error"])


def test_bundle_replay_equals_the_live_analysis(lab: Lab, tmp_path: Path) -> None:
    _lb_neigh_mac(lab)  # a broken lab, so there is something to compare
    try:
        live = lab.evidence()
        path = tmp_path / "bundle.tar.gz"
        write_bundle(live, path, ["test"])
        replay = read_bundle(path)
        assert trench_state(replay) == trench_state(live)
        a, b = analyze_evidence(live), analyze_evidence(replay)
        assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings]
        assert a.runs == b.runs
        assert problems(a) == {("MDB112", LBA)}
    finally:
        _lb_neigh_del(lab, "172.16.1.6")


def _cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = cli.main(list(argv))
    return rc, capsys.readouterr().out


def test_cli_collect_then_analyze_from_gives_the_live_findings(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab.ip(PXA, "link", "set", lab.target(A1).proxy_ifname, "nomaster")
    try:
        rc, out = _cli(["analyze", "--lab", "--prefix", lab.prefix, "-o", "json"], capsys)
        assert rc == 3
        live = json.loads(out)
        bundle = tmp_path / "bundle.tar.gz"
        rc, _ = _cli(["collect", "--lab", "--prefix", lab.prefix, "-o", str(bundle)], capsys)
        assert rc == 0
    finally:
        lab.ip(PXA, "link", "set", lab.target(A1).proxy_ifname, "master", "bridge0")
    rc, out = _cli(["analyze", "--from", str(bundle), "-o", "json"], capsys)
    assert rc == 3
    replay = json.loads(out)
    assert replay["findings"] == live["findings"]
    assert replay["summary"] == live["summary"]
    assert replay["checks_run"] == live["checks_run"]
    assert {(f["code"], f["pod"]) for f in replay["findings"] if f["severity"] != "info"} == {
        ("MDB202", PXA)
    }


def test_cli_exit_codes_fail_on_and_suppress(
    lab: Lab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["analyze", "--lab", "--prefix", lab.prefix]
    lab.sysctl(LBA, "net.ipv4.conf.all.rp_filter", "1")  # a warning (MDB116)
    try:
        report = tmp_path / "report.xml"
        rc, out = _cli([*base, "--report", str(report)], capsys)
        assert rc == 0  # a warning does not fail by default
        assert "MDB116" in out and "hint:" in out
        rc, _ = _cli(
            [*base, "--fail-on", "warning", "-o", "junit", "--report", str(report)], capsys
        )
        assert rc == 3
        from junitparser import Failure, JUnitXml

        xml = JUnitXml.fromfile(str(report))
        failed = {
            (suite.name, case.name.split()[0])
            for suite in xml
            for case in suite
            if any(isinstance(r, Failure) for r in case.result)
        }
        assert failed == {(LBA, "MDB116")}
        rc, _ = _cli([*base, "--fail-on", "warning", "--suppress", f"MDB116={LBA}"], capsys)
        assert rc == 0
        html = tmp_path / "report.html"
        rc, _ = _cli([*base, "--fail-on", "never", "-o", "json", "--report", str(html)], capsys)
        assert rc == 0 and "MDB116" in html.read_text()
    finally:
        lab.sysctl(LBA, "net.ipv4.conf.all.rp_filter", "0")
    lab.ip(LBA, "-4", "route", "del", "default", "table", "5001")  # errors
    try:
        rc, _ = _cli(base, capsys)
        assert rc == 3
        rc, _ = _cli([*base, "--suppress", "MDB110", "--suppress", "MDB118"], capsys)
        assert rc == 0
        rc, _ = _cli([*base, "--fail-on", "never"], capsys)
        assert rc == 0
    finally:
        lab.restore_lb_target(LBA, A1, (4,))
