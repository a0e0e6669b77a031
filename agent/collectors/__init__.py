"""Collectors: one small object per snapshot section, behind one Protocol.

A collector reads one part of the namespace's state and writes it into the
Snapshot protobuf (this is the agent's single conversion boundary: netlink,
psutil, nft and bird output become proto messages here and nowhere else).

A collector that raises never fails the Snapshot RPC: ``run_collectors``
turns SectionAbsent into an ABSENT section status and any other exception into
an ERROR section status with a one-line message, and the other sections still
come back.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from meridio_debug.agent.errors import SectionAbsent
from meridio_debug.protos import agent_pb2 as pb

# The sections are the Snapshot message's fields after `sections`, in proto order:
# protos/agent.proto is their one definition.
SECTIONS: tuple[str, ...] = tuple(
    f.name for f in pb.Snapshot.DESCRIPTOR.fields if f.number > pb.Snapshot.SECTIONS_FIELD_NUMBER
)


# Sections read from the pod's network namespace, which all its containers share.
_POD_WIDE = frozenset(
    {"links", "addresses", "rules", "routes", "neighbours", "fdb", "sysctls", "nftables", "sockets"}
)


def target_container() -> str:
    """The container whose PID namespace the agent shares ('' when the runtime did not say).

    The runtime sets it (agent/ephemeral.py TARGET_CONTAINER_ENV): an agent cannot
    learn its target container's name from inside.
    """
    from meridio_debug.agent.ephemeral import TARGET_CONTAINER_ENV

    return os.environ.get(TARGET_CONTAINER_ENV, "")


def pod_containers() -> tuple[str, ...]:
    """The pod's container names, when the runtime passed them."""
    from meridio_debug.agent.ephemeral import POD_CONTAINERS_ENV

    return tuple(c for c in os.environ.get(POD_CONTAINERS_ENV, "").split(",") if c)


def where_processes() -> str:
    """'container frontend's PID namespace' (or the agent's own), for messages."""
    name = target_container()
    return f"container {name}'s PID namespace" if name else "the agent's PID namespace"


def attribute(snap: pb.Snapshot, section: str, container: str, source: str) -> None:
    """Record which container ``section`` came from and how (see SectionStatus)."""
    for status in reversed(snap.sections):
        if status.name == section:
            status.container = container
            status.source = source
            return


def _default_source(status: pb.SectionStatus) -> None:
    if status.source:
        return
    if status.name in _POD_WIDE:
        status.source = "the pod's network namespace (shared by all its containers)"
    elif status.name == "processes":
        status.container = target_container()
        status.source = f"/proc of {where_processes()}"


class Collector(Protocol):
    """Reads one section of a snapshot."""

    name: str

    def available(self) -> tuple[bool, str]:
        """Whether this collector can work here, and a short reason (shown in GetInfo)."""
        ...

    def collect(self, snap: pb.Snapshot) -> None:
        """Fill this collector's fields of ``snap``.

        Raise SectionAbsent when the component is not there, anything else on failure.
        """
        ...


def describe_error(exc: BaseException) -> str:
    """One line saying what failed, for an ERROR section."""
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (
        errno.EPERM,
        errno.EACCES,
    ):
        return f"permission denied: {exc} (the agent needs NET_ADMIN/SYS_PTRACE or privileged)"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}".splitlines()[0]


def run_collectors(
    collectors: Iterable[Collector], snap: pb.Snapshot, sections: Sequence[str] = ()
) -> None:
    """Run every selected collector into ``snap``; failures become section statuses."""
    from meridio_debug.agent.collectors.procs import one_scan

    wanted = set(sections)
    with one_scan():
        _run(collectors, snap, wanted)


def _run(collectors: Iterable[Collector], snap: pb.Snapshot, wanted: set[str]) -> None:
    for collector in collectors:
        if wanted and collector.name not in wanted:
            continue
        status = snap.sections.add(name=collector.name)
        start = time.perf_counter()
        try:
            collector.collect(snap)
        except SectionAbsent as exc:
            status.state = pb.SectionStatus.ABSENT
            status.message = str(exc)
        except Exception as exc:  # a collector must never take the RPC down
            status.state = pb.SectionStatus.ERROR
            status.message = describe_error(exc)
        else:
            status.state = pb.SectionStatus.OK
        _default_source(status)
        status.duration_ms = (time.perf_counter() - start) * 1000.0
