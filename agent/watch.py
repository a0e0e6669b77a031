"""Netlink events: what changed in the namespace, in kernel order, as ``pb.Event``.

One rtnetlink socket joins the multicast groups of the requested kinds
(``NETLINK_ADD_MEMBERSHIP``: link, IPv4/IPv6 addresses, routes and rules,
neighbours) as soon as the watcher is built, so a change made after the
constructor returns is seen. Each message is converted by the same ``fill_*``
function the snapshot uses (agent/collectors/netlink.py): an object looks the
same in a snapshot and in an event.

Kernel behaviours handled here:

- A multicast listener that reads too slowly loses messages: the kernel drops
  them and the next ``recvmsg`` fails once with ``ENOBUFS``
  (net/netlink/af_netlink.c ``netlink_overrun``: "sk->sk_err = ENOBUFS").
  That is reported as an event with ``overflow=true`` (the consumer must
  re-snapshot to resync) and watching goes on. The receive buffer is raised to
  8 MiB with ``SO_RCVBUFFORCE`` (needs NET_ADMIN; else ``SO_RCVBUF``, capped by
  ``net.core.rmem_max``) so that bursts such as bird installing a table fit.
- ``close()`` on a socket does not wake a thread blocked in ``recv`` on it, so
  the reader waits in ``select()`` on the socket and a self-pipe, and
  ``close()`` writes to the pipe. The file descriptors are released by whoever
  holds them last (the reader, or ``close()`` when nobody reads), never while
  the other thread may still use the descriptor number.
- Messages are decoded by pyroute2 (agent/rtnl.py: its socket and Marshal);
  one it cannot decode becomes an event that says so, the stream goes on.
- Bridge fdb changes arrive on the neighbour group too (``AF_BRIDGE``
  ``RTM_NEWNEIGH``); they are reported only for the kind ``fdb``, as a
  Neighbour with family 0 (the proto's Event has no FdbEntry yet).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator

from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_DELRULE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTM_NEWRULE,
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV4_RULE,
    RTNLGRP_IPV6_IFADDR,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_IPV6_RULE,
    RTNLGRP_LINK,
    RTNLGRP_NEIGH,
)

from meridio_debug.agent.collectors.netlink import (
    IfNames,
    fill_address,
    fill_fdb,
    fill_link,
    fill_neighbour,
    fill_route,
    fill_rule,
)
from meridio_debug.agent.rtnl import Message, NetlinkError, RtnlSocket
from meridio_debug.protos import agent_pb2 as pb

KINDS: frozenset[str] = frozenset({"link", "address", "route", "rule", "neighbour", "fdb"})
DEFAULT_KINDS: frozenset[str] = frozenset({"link", "address", "route", "rule", "neighbour"})

GROUPS: dict[str, tuple[int, ...]] = {
    "link": (RTNLGRP_LINK,),
    "address": (RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR),
    "route": (RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE),
    "rule": (RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE),
    "neighbour": (RTNLGRP_NEIGH,),
    "fdb": (RTNLGRP_NEIGH,),
}

# message type -> (kind, action)
MESSAGE_KINDS: dict[int, tuple[str, str]] = {
    RTM_NEWLINK: ("link", "new"),
    RTM_DELLINK: ("link", "del"),
    RTM_NEWADDR: ("address", "new"),
    RTM_DELADDR: ("address", "del"),
    RTM_NEWROUTE: ("route", "new"),
    RTM_DELROUTE: ("route", "del"),
    RTM_NEWRULE: ("rule", "new"),
    RTM_DELRULE: ("rule", "del"),
    RTM_NEWNEIGH: ("neighbour", "new"),
    RTM_DELNEIGH: ("neighbour", "del"),
}

RCVBUF = 8 << 20
MAX_EVENTS_PER_CALL = 4096
OVERFLOW_SUMMARY = (
    "the kernel dropped events (ENOBUFS: the watcher's receive queue overflowed); "
    "state may have changed unseen, take a new snapshot"
)


# --- one-line summaries, ip-monitor style -----------------------------------------------------

TABLE_NAMES = {253: "default", 254: "main", 255: "local"}  # iproute2's rt_tables
RT_TABLE_MAIN = 254


def route_line(r: pb.Route) -> str:
    """A route as ``ip route`` prints it (table always shown unless main)."""
    parts: list[str] = []
    if r.type and r.type != "unicast":
        parts.append(r.type)
    parts.append(r.dst)
    if r.src:
        parts += ["from", r.src]
    if r.gateway:
        parts += ["via", r.gateway]
    if r.dev:
        parts += ["dev", r.dev]
    if r.table != RT_TABLE_MAIN:
        parts += ["table", TABLE_NAMES.get(r.table, str(r.table))]
    if r.protocol and r.protocol != "boot":
        parts += ["proto", r.protocol]
    if r.scope and r.scope != "universe":
        parts += ["scope", r.scope]
    if r.prefsrc:
        parts += ["src", r.prefsrc]
    if r.metric:
        parts += ["metric", str(r.metric)]
    parts += list(r.flags)
    for nh in r.nexthops:
        parts.append("nexthop")
        if nh.gateway:
            parts += ["via", nh.gateway]
        if nh.dev:
            parts += ["dev", nh.dev]
        parts += ["weight", str(nh.weight), *nh.flags]
    return " ".join(parts)


def rule_line(r: pb.Rule) -> str:
    """A rule as ``ip rule`` prints it."""
    parts = [f"{r.priority}:"]
    if r.invert:
        parts.append("not")
    parts += ["from", f"{r.src}/{r.src_len}" if r.src else "all"]
    if r.dst:
        parts += ["to", f"{r.dst}/{r.dst_len}"]
    if r.tos:
        parts += ["tos", hex(r.tos)]
    if r.has_fwmark:
        mark = hex(r.fwmark)
        parts += ["fwmark", mark if r.fwmask == 0xFFFFFFFF else f"{mark}/{r.fwmask:#x}"]
    if r.iif:
        parts += ["iif", r.iif]
    if r.oif:
        parts += ["oif", r.oif]
    if r.has_uid_range:
        parts += ["uidrange", f"{r.uid_start}-{r.uid_end}"]
    if r.ipproto:
        parts += ["ipproto", r.ipproto]
    for name, start, end in (
        ("sport", r.sport_start, r.sport_end),
        ("dport", r.dport_start, r.dport_end),
    ):
        if start or end:
            parts += [name, str(start) if start == end else f"{start}-{end}"]
    if r.action == "to_tbl":
        parts += ["lookup", TABLE_NAMES.get(r.table, str(r.table))]
    elif r.action == "goto":
        parts += ["goto", str(r.goto)]
    else:
        parts.append(r.action)
    if r.suppress_prefixlen >= 0:
        parts += ["suppress_prefixlength", str(r.suppress_prefixlen)]
    if r.protocol and r.protocol != "unspec":
        parts += ["proto", r.protocol]
    return " ".join(parts)


def address_line(a: pb.Address) -> str:
    """An address as ``ip monitor address`` prints it."""
    family = "inet" if a.family == 4 else "inet6"
    parts = [f"{a.index}: {a.ifname}   ", family, f"{a.address}/{a.prefixlen}"]
    if a.local:
        parts[2] = f"{a.local} peer {a.address}/{a.prefixlen}"
    if a.broadcast:
        parts += ["brd", a.broadcast]
    parts += ["scope", a.scope, *a.flags]
    if a.label and a.label != a.ifname:
        parts.append(a.label)
    return " ".join(parts)


def link_line(link: pb.Link) -> str:
    """A link as ``ip monitor link`` prints it (shortened)."""
    head = f"{link.index}: {link.name}: <{','.join(link.flags)}> mtu {link.mtu}"
    parts = [head]
    if link.master:
        parts += ["master", link.master]
    parts += ["state", link.state]
    if link.kind:
        parts.append(link.kind)
    if link.mac:
        parts += ["link/ether", link.mac]
    return " ".join(parts)


def neighbour_line(n: pb.Neighbour) -> str:
    """A neighbour as ``ip neigh`` prints it."""
    parts = [n.dst, "dev", n.ifname]
    if n.lladdr:
        parts += ["lladdr", n.lladdr]
    parts += [*n.flags, n.state]
    return " ".join(parts)


def fdb_line(f: pb.FdbEntry) -> str:
    """An fdb entry as ``bridge monitor fdb`` prints it."""
    parts = [f.mac, "dev", f.ifname]
    if f.vlan >= 0:
        parts += ["vlan", str(f.vlan)]
    if f.master:
        parts += ["master", f.master]
    if f.dst:
        parts += ["dst", f.dst]
    parts += [*f.flags, f.state]
    return " ".join(parts)


def fdb_as_neighbour(f: pb.FdbEntry, out: pb.Neighbour) -> None:
    """Carry an fdb entry in the Event's Neighbour (family 0): the oneof has no FdbEntry."""
    out.family = 0
    out.index = f.index
    out.ifname = f.ifname
    out.lladdr = f.mac
    out.dst = f.dst
    out.state = f.state
    out.flags.extend(f.flags)


def event_from_message(
    msg: Message, names: IfNames, kinds: Iterable[str] = KINDS
) -> pb.Event | None:
    """One rtnetlink notification (decoded by pyroute2) as an Event (seq and times unset).

    None if it is not wanted.
    """
    kind_action = MESSAGE_KINDS.get(msg["header"]["type"])
    if kind_action is None:
        return None
    if "undecodable" in msg["header"]:
        raise ValueError(msg["header"]["undecodable"].split(": ", 1)[-1])
    kind, action = kind_action
    prefix = "Deleted " if action == "del" else ""
    ev = pb.Event(action=action)
    if kind == "link":
        fill_link(ev.link, msg, names)
        ev.summary = prefix + link_line(ev.link)
    elif kind == "address":
        fill_address(ev.address, msg, names)
        ev.summary = prefix + address_line(ev.address)
    elif kind == "route":
        fill_route(ev.route, msg, names)
        ev.summary = prefix + route_line(ev.route)
    elif kind == "rule":
        fill_rule(ev.rule, msg, names)
        ev.summary = prefix + rule_line(ev.rule)
    elif msg["family"] == socket.AF_BRIDGE:
        kind = "fdb"
        if kind in kinds:
            entry = pb.FdbEntry()
            fill_fdb(entry, msg, names)
            fdb_as_neighbour(entry, ev.neighbour)
            ev.summary = prefix + fdb_line(entry)
    else:
        fill_neighbour(ev.neighbour, msg, names)
        ev.summary = prefix + neighbour_line(ev.neighbour)
    if kind not in kinds:
        return None
    ev.kind = kind
    return ev


class NetlinkWatcher:
    """Subscribes on construction; ``events()`` returns what arrived; ``close()`` from any thread.

    Typical use (one reader thread, ``close()`` from another)::

        watcher = NetlinkWatcher({"route", "rule"})
        while running:
            for event in watcher.events(0.2):
                send(event)
        watcher.close()
    """

    def __init__(
        self,
        kinds: Iterable[str] = DEFAULT_KINDS,
        *,
        rcvbuf: int = RCVBUF,
        sock: RtnlSocket | None = None,
    ) -> None:
        """Subscribe now; ``sock`` injects an already subscribed socket (tests)."""
        wanted = set(kinds) or set(DEFAULT_KINDS)
        unknown = sorted(wanted - KINDS)
        if unknown:
            raise ValueError(
                f"unknown event kind(s) {', '.join(unknown)}; known: {', '.join(sorted(KINDS))}"
            )
        self.kinds = frozenset(wanted)
        groups = sorted({g for kind in self.kinds for g in GROUPS[kind]})
        self._sock = sock if sock is not None else RtnlSocket(groups, rcvbuf=rcvbuf)
        try:
            self._sock.sock.setblocking(False)
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._sock.close()
            raise NetlinkError(
                f"netlink watch: cannot set up: {exc.strerror}", exc.errno or 0
            ) from exc
        self._names = IfNames()
        self._seq = 0
        self._closed = False
        self._released = False
        self._reading = threading.Lock()  # held by the one thread inside events()
        self._state = threading.Lock()  # guards _closed/_released and the descriptors

    def __enter__(self) -> NetlinkWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop watching; wakes a reader blocked in ``events()``. Idempotent, thread-safe."""
        with self._state:
            if self._released:
                return
            self._closed = True
            with contextlib.suppress(OSError):  # a full pipe: the reader is being woken anyway
                os.write(self._wake_w, b"x")
        if self._reading.acquire(blocking=False):
            try:
                self._release()
            finally:
                self._reading.release()

    def _release(self) -> None:
        with self._state:
            if self._released:
                return
            self._released = True
            self._sock.close()
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _stamp(self, ev: pb.Event, unix_ns: int, mono_ns: int) -> pb.Event:
        self._seq += 1
        ev.seq = self._seq
        ev.unix_ns = unix_ns
        ev.monotonic_ns = mono_ns
        return ev

    def events(self, timeout: float) -> Iterator[pb.Event]:
        """Events that arrive within ``timeout`` seconds, returned as soon as some are there.

        Returns an empty iterator on timeout or after ``close()``. Raises
        NetlinkError only when the socket itself fails (not on ENOBUFS).
        """
        with self._reading:
            try:
                return iter(self._read(timeout))
            finally:
                if self._closed:
                    self._release()

    def _read(self, timeout: float) -> list[pb.Event]:
        out: list[pb.Event] = []
        if self._closed:
            return out
        deadline = time.monotonic() + max(timeout, 0.0)
        sock_fd = self._sock.fileno()
        while not out:
            remaining = deadline - time.monotonic()
            try:
                ready, _, _ = select.select([sock_fd, self._wake_r], [], [], max(remaining, 0.0))
            except InterruptedError:
                continue
            if self._closed or self._wake_r in ready or not ready:
                return out
            self._drain(out)
            if remaining <= 0:
                break
        return out

    def _drain(self, out: list[pb.Event]) -> None:
        """Read every datagram that is ready now (up to a cap) into ``out``."""
        while len(out) < MAX_EVENTS_PER_CALL:
            try:
                messages = self._sock.recv_datagram(0.0)
            except (BlockingIOError, TimeoutError):
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    ev = pb.Event(overflow=True, summary=OVERFLOW_SUMMARY)
                    out.append(self._stamp(ev, time.time_ns(), time.monotonic_ns()))
                    continue
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    return
                raise NetlinkError(
                    f"netlink watch: recv failed: {exc.strerror}", exc.errno or 0
                ) from exc
            unix_ns, mono_ns = time.time_ns(), time.monotonic_ns()
            for msg in messages:
                try:
                    event = event_from_message(msg, self._names, self.kinds)
                except (struct.error, IndexError, ValueError, KeyError, TypeError) as exc:
                    # A message we cannot decode must not end the stream (the agent never dies).
                    mtype = msg["header"]["type"]
                    kind, action = MESSAGE_KINDS.get(mtype, ("", ""))
                    summary = f"undecodable rtnetlink message type {mtype}: {exc}"
                    event = pb.Event(kind=kind, action=action, summary=summary)
                if event is not None:
                    out.append(self._stamp(event, unix_ns, mono_ns))
