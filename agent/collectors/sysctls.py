"""Section ``sysctls``: the network sysctls Meridio sets (meridio-reference.md §2.2, §7.11).

Read from /proc/sys/net, which shows the network namespace of the process
that opens the file (net/sysctl_net.c registers these tables per netns), so
the agent, running inside the pod's namespace, sees the pod's values without
any setns.

Keys are printed the way sysctl(8) prints them: dotted, with a dot inside an
interface name turned into '/' (the file ``conf/proxy.cond-97e3/rp_filter``
is the key ``net.ipv4.conf.proxy/cond-97e3.rp_filter``). Whitespace inside a
value is collapsed to one space (``ip_local_port_range`` is tab-separated in
/proc). A sysctl that does not exist here (IPv6 disabled, an older kernel) is
left out rather than reported as empty; a section with nothing readable is an
error.
"""

from __future__ import annotations

import os

from meridio_debug.agent.errors import CollectorError
from meridio_debug.protos import agent_pb2 as pb

PROC_SYS_NET = "/proc/sys/net"

# Paths below /proc/sys/net; "{if}" expands to every interface (all and default included).
GLOBAL_SYSCTLS: tuple[str, ...] = (
    "ipv4/ip_forward",
    "ipv4/conf/all/forwarding",
    "ipv6/conf/all/forwarding",
    "ipv4/fib_multipath_hash_policy",
    "ipv6/fib_multipath_hash_policy",
    "ipv4/fwmark_reflect",
    "ipv6/fwmark_reflect",
    "ipv4/ip_local_port_range",
    "ipv6/conf/all/keep_addr_on_down",
)
PER_INTERFACE_SYSCTLS: tuple[tuple[str, str], ...] = (
    ("ipv4", "rp_filter"),
    ("ipv6", "accept_dad"),
)


def sysctl_key(path: str) -> str:
    """``ipv4/conf/proxy.cond-1/rp_filter`` -> ``net.ipv4.conf.proxy/cond-1.rp_filter``."""
    return "net." + ".".join(part.replace(".", "/") for part in path.split("/"))


def read_value(path: str) -> str | None:
    """A sysctl's value with whitespace collapsed, or None when it does not exist here."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " ".join(f.read().split())
    except (FileNotFoundError, NotADirectoryError):
        return None


def interfaces(root: str, family: str) -> list[str]:
    """Entries of ``<family>/conf`` (all, default and one per interface), sorted; [] if absent."""
    try:
        return sorted(os.listdir(os.path.join(root, family, "conf")))
    except (FileNotFoundError, NotADirectoryError):
        return []


def wanted_paths(root: str = PROC_SYS_NET) -> list[str]:
    """Every sysctl path (relative to ``root``) this section reads, in report order."""
    paths = list(GLOBAL_SYSCTLS)
    for family, name in PER_INTERFACE_SYSCTLS:
        names = interfaces(root, family)
        # all and default first, then interfaces, like the analysis wants to read them
        ordered: list[str] = [n for n in ("all", "default") if n in names]
        ordered += [n for n in names if n not in ("all", "default")]
        paths += [f"{family}/conf/{n}/{name}" for n in ordered]
    return paths


class SysctlsCollector:
    """Reads the Meridio-relevant sysctls of the agent's network namespace."""

    name = "sysctls"

    def __init__(self, root: str = PROC_SYS_NET) -> None:
        self.root = root

    def available(self) -> tuple[bool, str]:
        if os.path.isdir(self.root):
            return True, self.root
        return False, f"{self.root} is not mounted"

    def collect(self, snap: pb.Snapshot) -> None:
        found = 0
        for path in wanted_paths(self.root):
            try:
                value = read_value(os.path.join(self.root, path))
            except OSError as exc:
                raise CollectorError(f"cannot read {self.root}/{path}: {exc.strerror}") from exc
            if value is None:
                continue
            snap.sysctls.add(key=sysctl_key(path), value=value)
            found += 1
        if not found:
            raise CollectorError(f"no network sysctl readable under {self.root}")
