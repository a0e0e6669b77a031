"""The one place that lists the agent's collectors, in section order.

Collector modules are imported here lazily (at the first Snapshot or GetInfo,
not at process start) so the agent serves within a second of starting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meridio_debug.agent.collectors import SECTIONS, Collector

if TYPE_CHECKING:
    from meridio_debug.agent.server import Watcher, WatcherFactory


def default_collectors() -> list[Collector]:
    """One collector per section of SECTIONS, in that order."""
    from meridio_debug.agent.collectors import bird, netlink, nfqlb, nftables, procs, sysctls

    collectors: list[Collector] = [
        netlink.LinksCollector(),
        netlink.AddressesCollector(),
        netlink.RulesCollector(),
        netlink.RoutesCollector(),
        netlink.NeighboursCollector(),
        netlink.FdbCollector(),
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
