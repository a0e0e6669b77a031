"""The one place that lists the agent's collectors, in section order.

Collector modules are imported here lazily (at the first Snapshot or GetInfo,
not at process start) so the agent serves within a second of starting. The
netlink collectors go one step further: pyroute2 costs ~150 ms to import, and
GetInfo (the handshake) only asks whether an rtnetlink socket opens, so their
module is imported at their first collect (DeferredNetlink).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from meridio_debug.agent.collectors import SECTIONS, Collector
from meridio_debug.protos import agent_pb2 as pb

if TYPE_CHECKING:
    from meridio_debug.agent.server import Watcher, WatcherFactory


class DeferredNetlink:
    """A netlink collector (collectors/netlink.py) whose module is imported on first collect."""

    def __init__(self, name: str, class_name: str) -> None:
        self.name = name
        self._class_name = class_name
        self._real: Collector | None = None

    def available(self) -> tuple[bool, str]:
        try:
            socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE
            ).close()
        except OSError as exc:
            return False, f"cannot open an rtnetlink socket: {exc.strerror}"
        return True, "rtnetlink (pyroute2)"

    def collect(self, snap: pb.Snapshot) -> None:
        if self._real is None:
            from meridio_debug.agent.collectors import netlink

            self._real = getattr(netlink, self._class_name)()
        self._real.collect(snap)


def default_collectors() -> list[Collector]:
    """One collector per section of SECTIONS, in that order."""
    from meridio_debug.agent.collectors import bird, nfqlb, nftables, procs, sysctls

    collectors: list[Collector] = [
        DeferredNetlink("links", "LinksCollector"),
        DeferredNetlink("addresses", "AddressesCollector"),
        DeferredNetlink("rules", "RulesCollector"),
        DeferredNetlink("routes", "RoutesCollector"),
        DeferredNetlink("neighbours", "NeighboursCollector"),
        DeferredNetlink("fdb", "FdbCollector"),
        sysctls.SysctlsCollector(),
        nftables.NftablesCollector(),
        procs.SocketsCollector(),
        procs.ProcessesCollector(),
        bird.BirdCollector(),
        nfqlb.NfqlbCollector(),
    ]
    assert [c.name for c in collectors] == list(SECTIONS)
    return collectors


def watcher_factory() -> WatcherFactory:
    """Build a netlink watcher for the given event kinds (agent/watch.py)."""

    def make(kinds: set[str]) -> Watcher:
        from meridio_debug.agent.watch import NetlinkWatcher

        return NetlinkWatcher(kinds)

    return make
